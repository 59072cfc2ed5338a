"""Rounding helpers shared by the formats: saturating FP8 casts and E8M0 (power-of-two) scales.

``e4m3_rne_satfinite`` is the PTX ``cvt.rn.satfinite.e4m3x2.f32`` conversion that NVFP4 uses for
its block scales (arXiv 2509.25149 §2): round to nearest even, finite values beyond ±448 clamp to
±448 (±Inf too), NaN stays NaN. torch's own ``.to(torch.float8_e4m3fn)`` rounds to nearest even but
turns out-of-range values into NaN, so we clamp first and then cast.

E8M0 scales (OCP MX v1.0) are powers of two. We compute ``ceil(log2(r))`` exactly from the FP32
bit pattern with ``torch.frexp`` (``r = m * 2^e`` with ``m`` in [0.5, 1): ``ceil(log2 r)`` is
``e - 1`` when ``m == 0.5``, else ``e``), never with a floating-point ``log2`` whose rounding can
land on the wrong side of an integer.
"""

from __future__ import annotations

import torch

from nvfp4_megatron.formats.constants import (
    E8M0_EXP_BIAS,
    E8M0_MAX_EXP,
    E8M0_MIN_EXP,
    E8M0_NAN_BYTE,
    FP8_MAX,
)


def fp8_rne_satfinite(x_fp32: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """Round FP32 to ``fp8_dtype`` (nearest even), clamping to ±max first; NaN stays NaN."""
    fmax = FP8_MAX[fp8_dtype]
    return torch.clamp(x_fp32.float(), -fmax, fmax).to(fp8_dtype)


def e4m3_rne_satfinite(x_fp32: torch.Tensor) -> torch.Tensor:
    """FP32 -> float8_e4m3fn, round to nearest even, saturating at ±448 (NaN stays NaN)."""
    return fp8_rne_satfinite(x_fp32, torch.float8_e4m3fn)


def ceil_log2_exact(r_fp32: torch.Tensor) -> torch.Tensor:
    """``ceil(log2(r))`` for positive finite FP32 ``r`` (subnormals included), as int32, exactly."""
    mantissa, exponent = torch.frexp(r_fp32.float())
    return torch.where(mantissa == 0.5, exponent - 1, exponent).to(torch.int32)


def floor_log2_exact(r_fp32: torch.Tensor) -> torch.Tensor:
    """``floor(log2(r))`` for positive finite FP32 ``r``, as int32, exactly (``frexp`` exponent - 1)."""
    _, exponent = torch.frexp(r_fp32.float())
    return (exponent - 1).to(torch.int32)


def e8m0_round_up_exponent(amax_fp32: torch.Tensor, inv_elem_max_fp32: float) -> torch.Tensor:
    """Unbiased E8M0 exponent ``ceil(log2(amax * fp32(1/elem_max)))`` clamped to [-127, 127].

    amax 0 gives -127 (scale 2^-127), +Inf gives 127. NaN is not handled here (see
    ``e8m0_from_exponent``). The product is evaluated in FP32 in this order, as DESIGN.md §1 says.
    """
    r_fp32 = amax_fp32.float() * torch.tensor(inv_elem_max_fp32, dtype=torch.float32)
    positive_finite = (r_fp32 > 0) & torch.isfinite(r_fp32)
    safe_fp32 = torch.where(positive_finite, r_fp32, torch.ones_like(r_fp32))
    exp = ceil_log2_exact(safe_fp32)
    exp = torch.where(r_fp32 == 0, torch.full_like(exp, E8M0_MIN_EXP), exp)
    exp = torch.where(torch.isinf(r_fp32), torch.full_like(exp, E8M0_MAX_EXP), exp)
    return torch.clamp(exp, E8M0_MIN_EXP, E8M0_MAX_EXP)


def e8m0_from_exponent(exp_i32: torch.Tensor, nan_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Biased byte ``exp + 127`` viewed as ``torch.float8_e8m0fnu``; ``nan_mask`` entries -> 0xFF (NaN)."""
    biased_u8 = (exp_i32 + E8M0_EXP_BIAS).to(torch.uint8)
    if nan_mask is not None:
        biased_u8 = torch.where(nan_mask, torch.full_like(biased_u8, E8M0_NAN_BYTE), biased_u8)
    return biased_u8.view(torch.float8_e8m0fnu)


def pow2_fp32(exp_i32: torch.Tensor) -> torch.Tensor:
    """``2^exp`` in FP32, exact for exp in [-149, 127] (ldexp on 1.0)."""
    return torch.ldexp(torch.ones_like(exp_i32, dtype=torch.float32), exp_i32.to(torch.float32))
