"""MX block formats (OCP Microscaling v1.0): MXFP8 (E4M3 / E5M2) and MXFP4 (E2M1).

One E8M0 (power-of-two) scale per block of 32 elements along the last dim. The scale rounds UP so
no element overflows (NVIDIA's MXFP8 pretraining recipe; DESIGN.md §1)::

    X_b   = 2^ceil(log2(amax_b * fp32(1/elem_max)))   clamped to [2^-127, 2^127]; amax_b 0 -> 2^-127
    q     = elem_rne_satfinite(x / X_b)                (E2M1: e2m1_rne(clamp(x / X_b, -6, 6)))
    x̂     = q * X_b

The exponent comes exactly from the FP32 bits (``torch.frexp``), not from a float ``log2``.
``x / X_b`` divides by a power of two, so it is exact unless it leaves the FP32 normal range.

Scales are stored as ``torch.float8_e8m0fnu`` (it works on CPU in torch 2.11): the byte is the
biased exponent ``e + 127``; ``.view(torch.uint8)`` gives it. NaN/Inf policy: a block whose amax is
NaN gets the E8M0 NaN scale (0xFF) and dequantizes to NaN; a block containing ±Inf gets scale 2^127
and the Inf element saturates to ±elem_max. An all-zero block has scale 2^-127 and zero elements.
MXFP4 data is packed like NVFP4 (two E2M1 codes a byte, element 2i in the low nibble).
"""

from __future__ import annotations

import dataclasses

import torch

from nvfp4_megatron.formats.inputs import check_float_input, check_last_dim_divisible
from nvfp4_megatron.formats.constants import F4_E2M1_MAX, FP8_DTYPES, FP8_MAX, MX_BLOCK_SIZE
from nvfp4_megatron.formats.e2m1 import decode_e2m1, encode_e2m1_rne, pack_e2m1, unpack_e2m1
from nvfp4_megatron.formats.rounding import (
    e8m0_from_exponent,
    e8m0_round_up_exponent,
    fp8_rne_satfinite,
    pow2_fp32,
)

MX_ELEM_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, "e2m1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MXQuantized:
    """One MX-quantized tensor.

    data: float8 ``shape`` (MXFP8) or uint8 ``[*shape[:-1], K // 2]`` packed E2M1 (MXFP4).
    scale: float8_e8m0fnu ``[*shape[:-1], K // block]``.
    """

    data: torch.Tensor
    scale: torch.Tensor
    elem_dtype: torch.dtype | str
    block: int
    shape: torch.Size

    def elements_fp32(self) -> torch.Tensor:
        """The element values (before scaling) in FP32, ``shape``."""
        if self.elem_dtype == "e2m1":
            return decode_e2m1(unpack_e2m1(self.data))
        return self.data.float()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        k = self.shape[-1]
        q_fp32 = self.elements_fp32().reshape(-1, k // self.block, self.block)
        scale_fp32 = self.scale.float().reshape(-1, k // self.block, 1)
        return (q_fp32 * scale_fp32).reshape(self.shape).to(dtype)


def _elem_max(elem_dtype: torch.dtype | str) -> float:
    if elem_dtype == "e2m1":
        return F4_E2M1_MAX
    return FP8_MAX[elem_dtype]  # type: ignore[index]


def quantize_mx(
    x: torch.Tensor, elem_dtype: torch.dtype | str, *, block: int = MX_BLOCK_SIZE
) -> MXQuantized:
    """Quantize ``x`` along its last dim to MXFP8 (``torch.float8_e4m3fn`` / ``torch.float8_e5m2``)
    or MXFP4 (``"e2m1"``), one E8M0 scale per ``block`` elements."""
    what = "quantize_mx"
    check_float_input(x, min_ndim=1)
    if not (elem_dtype == "e2m1" or elem_dtype in FP8_DTYPES):
        raise ValueError(
            f"{what}: elem_dtype={elem_dtype!r} is not supported; use torch.float8_e4m3fn, "
            f"torch.float8_e5m2 or 'e2m1'"
        )
    if not isinstance(block, int) or block < 2 or block % 2:
        raise ValueError(f"{what}: block={block!r} must be an even integer >= 2 (OCP MX uses 32)")
    check_last_dim_divisible(x, block, what=what)
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    nb = k // block

    x_fp32 = x.float().reshape(rows, nb, block)
    amax_b = x_fp32.abs().amax(dim=-1) if x_fp32.numel() else x_fp32.new_zeros(rows, nb)
    elem_max = _elem_max(elem_dtype)
    exp = e8m0_round_up_exponent(amax_b, 1.0 / elem_max)
    nan_block = torch.isnan(amax_b)
    scale_fp32 = torch.where(nan_block, torch.full_like(amax_b, float("nan")), pow2_fp32(exp))
    y_fp32 = x_fp32 / scale_fp32.unsqueeze(-1)

    lead = tuple(x.shape[:-1])
    if elem_dtype == "e2m1":
        codes = encode_e2m1_rne(torch.clamp(y_fp32, -F4_E2M1_MAX, F4_E2M1_MAX).reshape(rows, k))
        data = pack_e2m1(codes).reshape(*lead, k // 2)
    else:
        data = fp8_rne_satfinite(y_fp32, elem_dtype).reshape(x.shape)  # type: ignore[arg-type]
    return MXQuantized(
        data=data,
        scale=e8m0_from_exponent(exp, nan_block).reshape(*lead, nb),
        elem_dtype=elem_dtype,
        block=block,
        shape=torch.Size(x.shape),
    )
