"""FP8 with FP32 scales: per-tensor current scaling (FP8-CS) and DeepSeek-V3 style block scaling.

Current scaling (Transformer Engine ``Float8CurrentScaling``; DESIGN.md §1), every step::

    scale     = min(fmax / amax, FLT_MAX)    fmax = 448 (E4M3) or 57344 (E5M2); amax 0/Inf/NaN -> 1
    scale     = 2^floor(log2(scale))         only with pow2_scale (rounds DOWN: no overflow)
    data      = fp8_rne_satfinite(x * scale)
    scale_inv = 1 / scale,  x̂ = data * scale_inv

``amax`` may be passed pre-reduced over the tensor-parallel group so every rank uses one scale.

Block scaling (DeepSeek-V3 §3.3, the NVFP4 paper's FP8 baseline): the same rule with one FP32
scale per tile, ``tile=(1, 128)`` (activations/gradients) or ``(128, 128)`` (weights), from the
tile's amax. Scales are stored one per tile: ``[*shape[:-1], K // 128]`` for 1x128,
``[rows // 128, K // 128]`` for 128x128 (rows = prod of the leading dims).

NaN/Inf policy: Inf/NaN amax gives scale 1 (the rule above); Inf elements saturate to ±fmax, NaN
elements stay NaN in the FP8 data (both FP8 formats have NaN).
"""

from __future__ import annotations

import dataclasses

import torch

from nvfp4_megatron.formats.inputs import (
    global_amax,
    check_float_input,
    check_tile,
    check_fp8_dtype,
)
from nvfp4_megatron.formats.constants import FP8_BLOCK_SIZE, FP8_MAX, FP32_MAX
from nvfp4_megatron.formats.rounding import floor_log2_exact, fp8_rne_satfinite, pow2_fp32

FP8_BLOCK_TILES = ((1, FP8_BLOCK_SIZE), (FP8_BLOCK_SIZE, FP8_BLOCK_SIZE))


def fp8_scale_from_amax(amax_fp32: torch.Tensor, fp8_dtype: torch.dtype, *, pow2_scale: bool) -> torch.Tensor:
    """FP32 ``fmax / amax`` (capped at FLT_MAX; 1 for amax 0/Inf/NaN), optionally rounded down to 2^n."""
    amax_fp32 = amax_fp32.float()
    valid = torch.isfinite(amax_fp32) & (amax_fp32 > 0)
    safe = torch.where(valid, amax_fp32, torch.ones_like(amax_fp32))
    fmax = torch.full_like(safe, FP8_MAX[fp8_dtype])  # a fill, not a host-to-device copy
    scale = torch.where(valid, torch.clamp(fmax / safe, max=FP32_MAX), torch.ones_like(safe))
    if pow2_scale:
        scale = pow2_fp32(floor_log2_exact(scale))
    return scale


@dataclasses.dataclass(frozen=True, kw_only=True)
class FP8Quantized:
    """Per-tensor scaled FP8: ``data`` (fp8, ``shape``), FP32 0-d ``scale``/``scale_inv``/``amax``."""

    data: torch.Tensor
    scale: torch.Tensor
    scale_inv: torch.Tensor
    amax: torch.Tensor
    fp8_dtype: torch.dtype
    shape: torch.Size
    # What a GEMM multiplies its FP32 accumulator by: ``scale_inv``, or NaN when ``amax`` is not
    # finite (every output NaN, the contract for non-finite input), 16-byte aligned for cuBLASLt.
    # Written by the CUDA kernel in the same launch as the codes; None from this reference.
    gemm_scale_inv: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.data.float() * self.scale_inv).to(dtype)


def quantize_fp8_current(
    x: torch.Tensor,
    fp8_dtype: torch.dtype,
    *,
    pow2_scale: bool = False,
    amax: torch.Tensor | float | None = None,
) -> FP8Quantized:
    """Per-tensor current-scaling FP8 of ``x`` (BF16/FP16/FP32, any shape)."""
    check_float_input(x, min_ndim=0)
    check_fp8_dtype(fp8_dtype)
    x_fp32 = x.float()
    amax_fp32 = global_amax(x_fp32, amax)
    scale = fp8_scale_from_amax(amax_fp32, fp8_dtype, pow2_scale=pow2_scale)
    return FP8Quantized(
        data=fp8_rne_satfinite(x_fp32 * scale, fp8_dtype),
        scale=scale,
        scale_inv=1.0 / scale,
        amax=amax_fp32,
        fp8_dtype=fp8_dtype,
        shape=torch.Size(x.shape),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class FP8BlockQuantized:
    """Block-scaled FP8: ``data`` (fp8, ``shape``), one FP32 ``scale``/``scale_inv`` per tile."""

    data: torch.Tensor
    scale: torch.Tensor
    scale_inv: torch.Tensor
    fp8_dtype: torch.dtype
    tile: tuple[int, int]
    shape: torch.Size

    def _scale_inv_rows(self) -> torch.Tensor:
        """scale_inv as ``[rows, K // 128]`` (128x128 tiles replicated to their rows)."""
        k = self.shape[-1]
        s = self.scale_inv.reshape(-1, k // self.tile[1])
        return s.repeat_interleave(self.tile[0], dim=0) if self.tile[0] != 1 else s

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        k = self.shape[-1]
        tw = self.tile[1]
        d_fp32 = self.data.float().reshape(-1, k // tw, tw)
        return (d_fp32 * self._scale_inv_rows().unsqueeze(-1)).reshape(self.shape).to(dtype)


def quantize_fp8_block(
    x: torch.Tensor,
    fp8_dtype: torch.dtype,
    *,
    tile: tuple[int, int] = (1, FP8_BLOCK_SIZE),
    pow2_scale: bool = False,
) -> FP8BlockQuantized:
    """Block-scaled FP8 of ``x`` along its last dim, ``tile=(1, 128)`` or ``(128, 128)``."""
    what = "quantize_fp8_block"
    check_float_input(x, min_ndim=1)
    check_fp8_dtype(fp8_dtype)
    tile, rows, k = check_tile(x, tile, FP8_BLOCK_TILES, what=what)
    nb = k // tile[1]
    x_fp32 = x.float().reshape(rows, k)
    a = x_fp32.abs()
    if tile[0] == 1:
        amax_t = a.reshape(rows, nb, tile[1]).amax(dim=-1) if rows else a.new_zeros(0, nb)
        scale = fp8_scale_from_amax(amax_t, fp8_dtype, pow2_scale=pow2_scale)
        scale_rows = scale
        scale_shape = (*x.shape[:-1], nb)
    else:
        amax_t = a.reshape(rows // tile[0], tile[0], nb, tile[1]).amax(dim=(1, 3))
        scale = fp8_scale_from_amax(amax_t, fp8_dtype, pow2_scale=pow2_scale)
        scale_rows = scale.repeat_interleave(tile[0], dim=0)
        scale_shape = (rows // tile[0], nb)
    y_fp32 = x_fp32.reshape(rows, nb, tile[1]) * scale_rows.unsqueeze(-1)
    return FP8BlockQuantized(
        data=fp8_rne_satfinite(y_fp32, fp8_dtype).reshape(x.shape),
        scale=scale.reshape(scale_shape),
        scale_inv=(1.0 / scale).reshape(scale_shape),
        fp8_dtype=fp8_dtype,
        tile=tile,  # type: ignore[arg-type]
        shape=torch.Size(x.shape),
    )
