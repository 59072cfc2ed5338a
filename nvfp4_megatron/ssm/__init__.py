"""Mamba-2 building blocks in plain PyTorch (no mamba_ssm, no Triton, no Megatron).

- ``ssd.mamba_chunk_scan_combined``: the chunked SSD scan with mamba_ssm's arguments, shapes and
  return convention, differentiable by autograd, any sequence length; ``chunk_scan_fn("compiled")``
  is the same function through ``torch.compile`` (the GPU path).
- ``gated_norm.RMSNormGated`` / ``rms_norm_gated``: Mamba-2's gated (grouped) RMSNorm.

They stay in high precision (DESIGN.md §2: only the linear layers' GEMMs are quantized). The
Megatron-Core mixer that uses them is ``nvfp4_megatron.mcore.mamba_mixer``.
"""

from nvfp4_megatron.ssm.gated_norm import RMSNormGated, rms_norm_gated
from nvfp4_megatron.ssm.ssd import (chunk_scan_fn, mamba_chunk_scan_combined,
                                    mamba_chunk_scan_combined_compiled)

__all__ = ["RMSNormGated", "chunk_scan_fn", "mamba_chunk_scan_combined",
           "mamba_chunk_scan_combined_compiled", "rms_norm_gated"]
