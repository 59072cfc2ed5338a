#!/usr/bin/env bash
# Submit a pretraining run as a chain of Slurm jobs that resume one another until the token
# budget is reached.
#
#   slurm/submit.sh [options] -- +recipe=NAME [hydra overrides ...]
#
# Options:
#   --nodes N        nodes per job (default 1)
#   --jobs K|auto    jobs in the chain (default auto: the planner's wall-time estimate for
#                    N nodes x GPUS_PER_NODE divided by the per-job time limit, plus one spare)
#   --time HH:MM:SS  per-job time limit (default TIME_LIMIT from the site file)
#   --name NAME      run name = directory under RUNS_ROOT shared by the chain
#                    (default <recipe>-<UTC timestamp>)
#   --site FILE      site settings (default slurm/site.env; see slurm/site.env.example)
#   --dry-run        print the sbatch command lines instead of submitting
#
# Each job after the first waits for the previous one with --dependency=afterany, so it starts
# whether the previous job finished, hit its time limit (it checkpoints on SIGUSR1, see
# pretrain.sbatch) or failed. A job that finds the chain's DONE marker exits 0 at once; one that
# finds its FAILED marker (the trainer failed: see pretrain.sbatch) exits 1 at once, naming the log.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NODES=1 JOBS=auto TIME="" NAME="" DRY=0
SITE="${NVFP4_SITE_ENV:-$REPO/slurm/site.env}"
die() { echo "submit.sh: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) NODES="$2"; shift 2 ;;
    --jobs) JOBS="$2"; shift 2 ;;
    --time) TIME="$2"; shift 2 ;;
    --name) NAME="$2"; shift 2 ;;
    --site) SITE="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown option '$1' (overrides for the trainer go after --)" ;;
  esac
done
OVERRIDES=("$@")
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes=$NODES must be a positive integer"
[[ "$JOBS" == auto || "$JOBS" =~ ^[1-9][0-9]*$ ]] || die "--jobs=$JOBS must be a positive integer or auto"

if [[ -f "$SITE" ]]; then
  # shellcheck disable=SC1090
  source "$SITE"
  SITE_EXPORT=",NVFP4_SITE_ENV=$SITE"
else
  [[ "$SITE" == "$REPO/slurm/site.env" ]] || die "site file $SITE does not exist"
  echo "submit.sh: no $SITE; using defaults (copy slurm/site.env.example to set partition etc.)" >&2
fi
TIME="${TIME:-${TIME_LIMIT:-04:00:00}}"
GPUS="${GPUS_PER_NODE:-8}"
RUNS_ROOT="${RUNS_ROOT:-$REPO/runs}"

RECIPE=""
for o in "${OVERRIDES[@]}"; do
  [[ "$o" == +recipe=* ]] && RECIPE="${o#+recipe=}"
done
NAME="${NAME:-${RECIPE:-run}-$(date -u +%Y%m%d-%H%M%S)}"
[[ "$NAME" =~ ^[A-Za-z0-9._-]+$ ]] || die "--name=$NAME: use letters, digits, . _ -"
RUN_DIR="$RUNS_ROOT/$NAME"

time_to_s() {  # [D-]HH:MM:SS | MM:SS | MM
  local t="$1" d=0 h=0 m=0 s=0
  if [[ "$t" == *-* ]]; then d="${t%%-*}"; t="${t#*-}"; fi
  IFS=: read -r -a p <<< "$t"
  case "${#p[@]}" in
    3) h="${p[0]}"; m="${p[1]}"; s="${p[2]}" ;;
    2) m="${p[0]}"; s="${p[1]}" ;;
    1) m="${p[0]}" ;;
    *) die "--time=$1 not understood (use HH:MM:SS)" ;;
  esac
  echo $(( 10#$d * 86400 + 10#$h * 3600 + 10#$m * 60 + 10#$s ))
}

if [[ "$JOBS" == auto ]]; then
  WORLD=$(( NODES * GPUS ))
  PLAN_DIR="$(mktemp -d)"
  PY="${PYTHON_FOR_PLAN:-$REPO/.venv/bin/python}"
  [[ -x "$PY" ]] || PY=python3
  if ! (cd "$REPO" && "$PY" pretrain.py "${OVERRIDES[@]}" dry_run=true world_size="$WORLD" \
          run_dir="$PLAN_DIR" > "$PLAN_DIR/dry_run.log" 2>&1); then
    cat "$PLAN_DIR/dry_run.log" >&2
    die "the planner refused this run at world_size=$WORLD (above); fix the layout or pass --jobs"
  fi
  WALL="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["wall_time_s"] or 0)' "$PLAN_DIR/plan.json")"
  LIMIT_S="$(time_to_s "$TIME")"
  USABLE=$(( LIMIT_S > 900 ? LIMIT_S - 600 : LIMIT_S * 2 / 3 ))  # start-up, checkpoint, margin
  JOBS="$("$PY" -c "import math; print(max(1, math.ceil(float('$WALL') / $USABLE)) + 1)")"
  echo "submit.sh: planner estimates $(printf '%.0f' "$WALL") s on $WORLD GPUs -> $JOBS jobs of $TIME" >&2
  rm -rf "$PLAN_DIR"
fi

CHAIN_ID="$NAME-$(date -u +%s)"
SBATCH_ARGS=(--nodes="$NODES" --time="$TIME" --job-name="nvfp4-$NAME"
             --output="$RUN_DIR/slurm/%j.out"
             --export="ALL,NVFP4_REPO=$REPO,NVFP4_RUN_NAME=$NAME,NVFP4_CHAIN_ID=$CHAIN_ID${SITE_EXPORT:-}")
[[ -n "${PARTITION:-}" ]] && SBATCH_ARGS+=(--partition="$PARTITION")
[[ -n "${ACCOUNT:-}" ]] && SBATCH_ARGS+=(--account="$ACCOUNT")
[[ -n "${QOS:-}" ]] && SBATCH_ARGS+=(--qos="$QOS")
[[ -n "${CPUS_PER_TASK:-}" ]] && SBATCH_ARGS+=(--cpus-per-task="$CPUS_PER_TASK")
# shellcheck disable=SC2206
[[ -n "${SBATCH_EXTRA:-}" ]] && SBATCH_ARGS+=($SBATCH_EXTRA)

quote() {  # shell-quote only the arguments that need it
  local a out=()
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:,=+%@-]+$ ]]; then out+=("$a"); else out+=("$(printf '%q' "$a")"); fi
  done
  echo "${out[*]}"
}
PREV=""
[[ $DRY -eq 1 ]] || mkdir -p "$RUN_DIR/slurm"
for i in $(seq 1 "$JOBS"); do
  DEP=()
  if [[ -n "$PREV" ]]; then DEP=(--dependency="afterany:$PREV"); fi
  CMD=(sbatch --parsable "${SBATCH_ARGS[@]}" "${DEP[@]}" "$REPO/slurm/pretrain.sbatch" "${OVERRIDES[@]}")
  if [[ $DRY -eq 1 ]]; then
    quote "${CMD[@]}"
    PREV="JOBID_$i"
  else
    PREV="$("${CMD[@]}")"
    PREV="${PREV%%;*}"
    echo "submitted job $i/$JOBS: $PREV${DEP:+ (after ${DEP[0]#--dependency=afterany:})}"
  fi
done
echo "run directory: $RUN_DIR (chain $CHAIN_ID)" >&2
