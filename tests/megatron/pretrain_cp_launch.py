"""Run ``pretrain.py`` with Megatron's RoPE CP slice routed to a CPU-safe copy (CPU only).

Megatron's ``get_pos_emb_on_this_cp_rank`` calls ``.cuda()``; until the CPU adapter routes it
(``context_parallel.route_megatron_rope_slice_to_cpu_safe``), CP runs of the training loop on CPU
start through this file: ``torchrun ... pretrain_cp_launch.py <pretrain.py overrides>``.
"""

import runpy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]

if __name__ == "__main__":
    if not torch.cuda.is_available():
        from nvfp4_megatron.mcore.context_parallel import route_megatron_rope_slice_to_cpu_safe

        route_megatron_rope_slice_to_cpu_safe()
    sys.argv[0] = str(ROOT / "pretrain.py")
    runpy.run_path(str(ROOT / "pretrain.py"), run_name="__main__")
