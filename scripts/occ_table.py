#!/usr/bin/env python
"""The Microsoft FP4 paper's Table 1 (arXiv 2501.17116) for a run's own activations.

Cosine similarity, MSE and SNR of per-token E2M1 quantization of every linear layer's input with
no clamp; clamp at 99.9 % without compensation; clamp + compensation at 99.9, 99 and 97 % — from
a checkpoint of the run (default: its newest; validation batches run forward in one process) or
from the run's telemetry (``logging.quant_stats_interval=N logging.quant_stats_occ_table=true``).
Prints the table next to the paper's numbers and writes ``RUN_DIR/occ_table.{md,json}``.
Implementation: ``nvfp4_megatron/training/occ_report.py``.

    .venv/bin/python scripts/occ_table.py runs/msfp4_tiny
    .venv/bin/python scripts/occ_table.py runs/msfp4_tiny --source telemetry
    .venv/bin/python scripts/occ_table.py runs/x --checkpoint runs/x/checkpoints/step_200 --batches 2
"""

import sys

from nvfp4_megatron.training.occ_report import main

if __name__ == "__main__":
    sys.exit(main())
