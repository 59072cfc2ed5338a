#!/usr/bin/env bash
# The 12B-pattern hybrid proxy (recipes/nvfp4_hybrid_proxy.yaml) in NVFP4 and in BF16
# (recipes/bf16_hybrid_proxy.yaml) through pretrain.py on one GPU, one after the other, then
# their loss curves side by side (scripts/compare_runs.py). Writes to $OUT (default ./proxy_out):
#   nvfp4.metrics.jsonl bf16.metrics.jsonl nvfp4.result.json bf16.result.json
#   nvfp4.log bf16.log (last 200 lines each) loss.png loss.md          (8 files)
# Usage (the lent H200): OUT=$OUT bash scripts/run_hybrid_proxy.sh [extra Hydra overrides]
# The nvfp4 arm is cut off after ${NVFP4_TIMEOUT:-300} s, the bf16 arm after ${BF16_TIMEOUT:-230} s
# (exit 124 in its log; metrics.jsonl keeps the steps done, and the comparison uses the steps both
# arms reached), so both fit one 10-minute call.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/proxy_out}
mkdir -p "$OUT"
if [ -d .whl ] && ! "$PY" -c "import megatron.core, hydra" 2>/dev/null; then
  # the lent H200: no registry; the wheels travel with the working tree (as scripts/test_gpu.sh)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
WORK=${WORK:-/tmp/hybrid_proxy}
rm -rf "$WORK/nvfp4" "$WORK/bf16"
mkdir -p "$WORK"
for arm in nvfp4 bf16; do
  start=$(date +%s)
  if [ "$arm" = nvfp4 ]; then limit=${NVFP4_TIMEOUT:-300}; else limit=${BF16_TIMEOUT:-230}; fi
  timeout "$limit" "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 \
    pretrain.py +recipe=${arm}_hybrid_proxy run_dir="$WORK/$arm" data.cache_dir="$WORK/cache" \
    logging.plot=false "$@" > "$WORK/$arm.log" 2>&1
  rc=$?
  echo "[proxy] $arm exit $rc after $(( $(date +%s) - start )) s" | tee -a "$WORK/$arm.log"
  tail -n 200 "$WORK/$arm.log" > "$OUT/$arm.log"
  cp "$WORK/$arm/metrics.jsonl" "$OUT/$arm.metrics.jsonl" 2>/dev/null
  cp "$WORK/$arm/result.json" "$OUT/$arm.result.json" 2>/dev/null
done
"$PY" scripts/compare_runs.py "$WORK/bf16" "$WORK/nvfp4" --label "$WORK/bf16=bf16" \
  --label "$WORK/nvfp4=nvfp4" --baseline bf16 --every 20 --out "$WORK/compare"
cp "$WORK/compare/compare.png" "$OUT/loss.png"
cp "$WORK/compare/compare.md" "$OUT/loss.md"
