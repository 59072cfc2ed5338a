import pathlib
import sys

# kernel_cases.py is shared by the GPU tests and the interpreter subprocess
sys.path.insert(0, str(pathlib.Path(__file__).parent))
