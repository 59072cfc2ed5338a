import pathlib
import sys

# gemm_cases.py (tests/quant) is shared by the CPU interpreter test and these GPU tests
sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "quant"))
sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "training"))

from _train_launch import interrupt_on_sigterm  # noqa: E402

# `timeout N bash scripts/test_gpu.sh` ends with SIGTERM: without this, the training runs that
# tests start in their own sessions outlived the suite and ran beside the next benchmark
# (2026-12-04, lead session 8)
interrupt_on_sigterm()
