import pathlib
import sys

# gemm_cases.py (tests/quant) is shared by the CPU interpreter test and these GPU tests
sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "quant"))
