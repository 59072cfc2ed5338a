#!/usr/bin/env bash
# Start a one-node Slurm cluster on this machine (for CI and local testing of slurm/).
#
#   eval "$(scripts/slurm_local.sh)"        # install if missing, start, export SLURM_CONF
#   scripts/slurm_local.sh start            # the same (start is the default)
#   scripts/slurm_local.sh stop             # stop the daemons this script started
#
# What it does: installs Debian's slurm-wlm if `slurmctld` is missing (needs root + apt), writes a
# localhost slurm.conf (AuthType=auth/none, CredType=cred/none, one node named `hostname -s` with
# this machine's CPU count, proctrack/linuxproc, task/none, no accounting) under
# $SLURM_LOCAL_DIR (default ${TMPDIR:-/tmp}/nvfp4-slurm-local), starts slurmctld + slurmd with pid
# files there, and waits until `sinfo` reports the node idle. The only thing written to stdout is
# `export SLURM_CONF=...` so the caller can eval it; progress goes to stderr. As root, when
# /etc/slurm/slurm.conf does not exist, it is made a symlink to the generated file so that plain
# `sinfo`/`sbatch` find the cluster without SLURM_CONF (an existing site config is never touched;
# `stop` removes only our symlink). Re-running while the daemons are up is a no-op.
set -euo pipefail

DIR="${SLURM_LOCAL_DIR:-${TMPDIR:-/tmp}/nvfp4-slurm-local}"
CONF="$DIR/slurm.conf"
log() { echo "[slurm_local] $*" >&2; }

stop() {
  local f pid
  if [[ -L /etc/slurm/slurm.conf && "$(readlink /etc/slurm/slurm.conf)" == "$CONF" ]]; then
    rm -f /etc/slurm/slurm.conf
  fi
  for f in "$DIR/slurmd.pid" "$DIR/slurmctld.pid"; do
    if [[ -f "$f" ]]; then
      pid="$(cat "$f")"
      if kill -0 "$pid" 2>/dev/null; then log "stopping pid $pid ($f)"; kill "$pid" || true; fi
      rm -f "$f"
    fi
  done
}

case "${1:-start}" in
  stop) stop; exit 0 ;;
  start) ;;
  *) echo "usage: $0 [start|stop]" >&2; exit 2 ;;
esac

if ! command -v slurmctld >/dev/null 2>&1 && [[ ! -x /usr/sbin/slurmctld ]]; then
  log "slurmctld not found: installing Debian slurm-wlm"
  if [[ "$(id -u)" != 0 ]]; then log "need root to apt-get install slurm-wlm"; exit 1; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends slurm-wlm >&2
fi
export PATH="/usr/sbin:$PATH"

mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
NODE="$(hostname -s)"
CPUS="$(nproc)"
MEM_MB="$(awk '/MemTotal/ {printf "%d", $2/1024*0.9}' /proc/meminfo)"
USER_NAME="$(id -un)"

cat > "$CONF.tmp" <<CONF
# Written by scripts/slurm_local.sh: single-node localhost cluster for tests. Not for production.
ClusterName=nvfp4local
SlurmctldHost=$NODE
SlurmUser=$USER_NAME
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=${SLURM_LOCAL_CTLD_PORT:-6817}
SlurmdPort=${SLURM_LOCAL_SLURMD_PORT:-6818}
KillWait=30
MinJobAge=300
NodeName=$NODE CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
mv "$CONF.tmp" "$CONF"
export SLURM_CONF="$CONF"
if [[ "$(id -u)" == 0 && ! -e /etc/slurm/slurm.conf && ! -L /etc/slurm/slurm.conf ]]; then
  mkdir -p /etc/slurm
  ln -s "$CONF" /etc/slurm/slurm.conf
  log "linked /etc/slurm/slurm.conf -> $CONF (plain sinfo/sbatch work without SLURM_CONF)"
fi

running() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
if ! running "$DIR/slurmctld.pid"; then
  log "starting slurmctld (conf $CONF)"
  slurmctld -c -f "$CONF"     # -c: clean start, no state from an earlier run
fi
if ! running "$DIR/slurmd.pid"; then
  log "starting slurmd on $NODE"
  slurmd -f "$CONF"
fi

for _ in $(seq 1 60); do
  state="$(sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null || true)"
  if [[ "$state" == idle* ]]; then
    log "node $NODE is $state"
    echo "export SLURM_CONF=$CONF"
    exit 0
  fi
  if [[ "$state" == down* || "$state" == drain* ]]; then
    scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
  fi
  sleep 1
done
log "node $NODE did not become idle (state: '${state:-none}'); logs in $DIR/log"
tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
exit 1
