"""MX block quantization kernel (OCP MX v1.0): MXFP8 (E4M3 / E5M2) and MXFP4 (E2M1), blocks of 32.

Same math as ``formats.mx`` (DESIGN.md §1): per block of 32 along the last dim,
``X_b = 2^ceil(log2(amax_b * fp32(1/elem_max)))`` clamped to ``[2^-127, 2^127]`` (amax 0 ->
2^-127, NaN -> the E8M0 NaN byte 0xFF), elements ``elem_rne_satfinite(x / X_b)``.

``ceil(log2 r)`` is read exactly from the FP32 bits of ``r``: for a normal ``r`` it is the
unbiased exponent, plus one when any mantissa bit is set; a subnormal ``r`` (mantissa ``m``,
``r = m * 2^-149``) gives -127 when ``m <= 2^22`` (``r <= 2^-127``) and -126 otherwise. ``x / X_b``
is computed as ``x * 2^-e``: both are the correctly rounded value of the same real number.
On the GPU the FP8 element bytes come from the hardware ``cvt.rn.satfinite`` (the contract's
RNE + saturation, one instruction per two elements); under the interpreter from the exact
integer rounding in ``_common.round_fp8``. Both are tested against the reference.
One program handles ``BLOCK_R`` rows x ``G`` blocks; one read of the input, one write of the
elements and the scale bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nvfp4_megatron.formats.mx import MX_ELEM_DTYPES, MXQuantized
from nvfp4_megatron.kernels._common import abs_bits, e2m1_rne_code, load_tile_3d, pow2_fp32, round_fp8

DEFAULT_CONFIG = {"BLOCK_R": 32, "G": 4, "num_warps": 4}

# elem id -> (mantissa bits, min normal exponent, max finite, 1/max as used in FP32)
_ELEM = {
    torch.float8_e4m3fn: (0, 3, -6, 448.0),
    torch.float8_e5m2: (1, 2, -14, 57344.0),
    "e2m1": (2, 1, 0, 6.0),
}


@triton.jit
def _mx_kernel(
    x_ptr, data_ptr, scale_ptr, R, C, stride_r, stride_c,
    BLOCK_R: tl.constexpr, G: tl.constexpr, BLOCK: tl.constexpr,
    ELEM: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr, MAXV: tl.constexpr,
    HW_CVT: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    chunks = tl.program_id(1) * G + tl.arange(0, G)
    x = load_tile_3d(x_ptr, rows, chunks, stride_r, stride_c, R, C, x_ptr, BLOCK, False)

    bmax = tl.max(abs_bits(x), axis=2).to(tl.float32, bitcast=True)  # [BLOCK_R, G]
    is_nan = bmax != bmax
    r = bmax * (1.0 / MAXV)
    rbits = r.to(tl.int32, bitcast=True)
    biased = (rbits >> 23) & 0xFF
    mant = rbits & 0x7FFFFF
    e_norm = biased - 127 + (mant != 0).to(tl.int32)
    e_sub = tl.where(mant <= 0x400000, -127, -126)
    e = tl.where(biased == 0, e_sub, e_norm)
    e = tl.minimum(tl.maximum(e, -127), 127)
    scale_byte = tl.where(is_nan, 255, e + 127)

    inv = pow2_fp32(-e)
    inv = tl.where(is_nan, bmax, inv)  # NaN block: NaN elements, as x / NaN
    y = x * inv[:, :, None]

    kk = tl.arange(0, BLOCK)
    rmask = rows < R
    if ELEM == 2:
        codes = e2m1_rne_code(y, not HW_CVT)  # saturates at ±6 itself
        lo, hi = tl.split(tl.reshape(codes, [BLOCK_R, G * BLOCK // 2, 2]))
        packed = (lo | (hi << 4)).to(tl.uint8)
        bcols = tl.program_id(1) * G * BLOCK // 2 + tl.arange(0, G * BLOCK // 2)
        dmask = rmask[:, None] & (bcols[None, :] < C // 2)
        tl.store(data_ptr + rows[:, None].to(tl.int64) * (C // 2) + bcols[None, :], packed, mask=dmask)
    else:
        if HW_CVT:  # cvt.rn.satfinite.{e4m3,e5m2}x2.f32 on sm_89+: the same RNE + saturation
            if ELEM == 0:
                code = y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
            else:
                code = y.to(tl.float8e5).to(tl.uint8, bitcast=True)
        else:
            code, _ = round_fp8(y, MBITS, EMIN, MAXV)
        cols = chunks[None, :, None] * BLOCK + kk[None, None, :]
        emask = rmask[:, None, None] & (cols < C)
        tl.store(data_ptr + rows[:, None, None].to(tl.int64) * C + cols, code.to(tl.uint8), mask=emask)
    smask = rmask[:, None] & (chunks[None, :] < C // BLOCK)
    tl.store(
        scale_ptr + rows[:, None].to(tl.int64) * (C // BLOCK) + chunks[None, :],
        scale_byte.to(tl.uint8),
        mask=smask,
    )


def quantize_mx(
    x: torch.Tensor, elem_dtype, *, block: int = 32, config: dict | None = None
) -> MXQuantized:
    """Triton twin of ``formats.quantize_mx`` (same arguments, same ``MXQuantized``, same bits)."""
    from nvfp4_megatron.formats.inputs import check_float_input, check_last_dim_divisible
    from nvfp4_megatron.kernels.nvfp4 import as_2d

    what = "quantize_mx"
    check_float_input(x, min_ndim=1)
    if not any(elem_dtype == d for d in MX_ELEM_DTYPES):
        raise ValueError(
            f"{what}: elem_dtype={elem_dtype!r} is not supported; use torch.float8_e4m3fn, "
            f"torch.float8_e5m2 or 'e2m1'"
        )
    if block != 32:
        raise ValueError(f"{what}: the Triton kernel implements block=32 (OCP MX), got block={block}")
    check_last_dim_divisible(x, block, what=what)
    cfg = dict(DEFAULT_CONFIG if config is None else config)
    k = x.shape[-1]
    x2d = as_2d(x)
    rows = x2d.shape[0]
    elem_id, mbits, emin, maxv = _ELEM[elem_dtype]
    data_cols = k // 2 if elem_id == 2 else k
    data = torch.empty(rows, data_cols, dtype=torch.uint8, device=x.device)
    scale = torch.empty(rows, k // block, dtype=torch.uint8, device=x.device)
    if x.numel():
        grid = (triton.cdiv(rows, cfg["BLOCK_R"]), triton.cdiv(k // block, cfg["G"]))
        _mx_kernel[grid](
            x2d, data, scale, rows, k, x2d.stride(0), x2d.stride(1),
            BLOCK_R=cfg["BLOCK_R"], G=cfg["G"], BLOCK=block,
            ELEM=elem_id, MBITS=mbits, EMIN=emin, MAXV=maxv, HW_CVT=x.is_cuda, num_warps=cfg["num_warps"],
        )
    lead = tuple(x.shape[:-1])
    if elem_id == 2:
        data_out = data.reshape(*lead, k // 2)
    else:
        data_out = data.view(elem_dtype).reshape(x.shape)
    return MXQuantized(
        data=data_out,
        scale=scale.view(torch.float8_e8m0fnu).reshape(*lead, k // block),
        elem_dtype=elem_dtype,
        block=block,
        shape=torch.Size(x.shape),
    )
