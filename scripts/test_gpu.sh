#!/usr/bin/env bash
# The GPU test suite (pytest marker `gpu`): Triton kernels bit-exact with the reference, the
# quantized GEMMs, and `torchrun pretrain.py` on the GPU (every recipe, kill -9 + resume, SIGTERM,
# NaN). Needs a CUDA GPU and the project's dependencies (`pip install -e '.[test]'`, or the
# wheels in .whl/ as on the lent H200: see docs/RESULTS.md). Usage:
#   bash scripts/test_gpu.sh [extra pytest args]
# NVFP4_GPU_SUMMARY=path.jsonl collects one line per training run for the lab notebook.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -d .whl ] && ! "$PY" -c "import megatron.core, hydra" 2>/dev/null; then
  # the lent H200: no registry; the wheels travel with the working tree
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print('[gpu]', torch.cuda.get_device_name(), torch.__version__)"
exec "$PY" -m pytest -m gpu -p no:cacheprovider "$@"
