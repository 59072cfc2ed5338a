"""FP8 current scaling (FP8-CS) kernel: global amax, then scale and saturating cast in one pass.

Same math as ``formats.fp8.quantize_fp8_current`` (DESIGN.md §1; Transformer Engine's
``Float8CurrentScaling``): ``scale = min(fmax / amax, FLT_MAX)`` (1 when amax is 0, Inf or NaN),
optionally rounded down to a power of two, ``data = fp8_rne_satfinite(x * scale)``,
``scale_inv = 1 / scale``. The amax comes from ``kernels.amax`` (or the caller, e.g. reduced over
the tensor-parallel group); the cast kernel reads it from device memory and derives the scale
itself, so nothing syncs with the host. On the GPU the FP8 bytes come from the hardware
``cvt.rn.satfinite`` conversion (the contract's RNE + saturation); under the interpreter from
the exact integer rounding in ``kernels._common.round_fp8``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nvfp4_megatron.formats.constants import FP8_MAX
from nvfp4_megatron.formats.fp8 import FP8Quantized
from nvfp4_megatron.kernels._common import FP32_MAX, load_tile_3d, pow2_fp32, round_fp8
from nvfp4_megatron.kernels.amax import amax_2d

DEFAULT_CONFIG = {"BLOCK_R": 32, "G": 8, "num_warps": 4}
# cast-transpose: square-ish tiles so both stores write >= 64 contiguous bytes per row
DEFAULT_T_CONFIG = {"BLOCK_R": 64, "BLOCK_C": 64, "num_warps": 4}
CAST_TRANSPOSE_DTYPES = (torch.bfloat16, torch.float16)  # FP32: see quantize_fp8_current_transposed
_FORMAT = {torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}
_GEMM_SCALE, _SCALES_LEN = 4, 8  # the GEMM scale's slot (16-byte aligned) in the scales buffer


@triton.jit
def _cs_scale(amax_ptr, scales_ptr, first, MAXV: tl.constexpr, POW2: tl.constexpr):
    """The FP8-CS scale from the global amax in device memory; the ``first`` program stores
    ``scale`` and ``scale_inv`` to ``scales_ptr[0:2]``, and to ``scales_ptr[4]`` (16 bytes in,
    aligned for cuBLASLt) the GEMM scale: ``scale_inv``, or NaN when the amax is not finite."""
    amax = tl.load(amax_ptr)
    valid = (amax > 0.0) & (amax <= FP32_MAX)
    scale = tl.minimum(tl.div_rn(MAXV, tl.where(valid, amax, 1.0)), FP32_MAX)
    scale = tl.where(valid, scale, 1.0)
    if POW2:
        sbits = scale.to(tl.int32, bitcast=True)
        scale = pow2_fp32(((sbits >> 23) & 0xFF) - 127)  # scale >= 2^-126 here: floor(log2) from the exponent
    if first:
        scale_inv = tl.div_rn(1.0, scale)
        tl.store(scales_ptr, scale)
        tl.store(scales_ptr + 1, scale_inv)
        finite = amax <= FP32_MAX  # False for NaN and +Inf (amax >= 0)
        tl.store(scales_ptr + 4, tl.where(finite, scale_inv, float("nan")))
    return scale


@triton.jit
def _fp8_codes(v, MBITS: tl.constexpr, EMIN: tl.constexpr, MAXV: tl.constexpr,
               HW_CVT: tl.constexpr):
    """FP8 bytes (uint8) of FP32 ``v``: RNE, saturating finite, as the contract."""
    if HW_CVT:  # cvt.rn.satfinite.{e4m3,e5m2}x2.f32 (sm_89+): RNE + saturation, as the contract
        if MBITS == 3:
            code = v.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        else:
            code = v.to(tl.float8e5).to(tl.uint8, bitcast=True)
    else:
        code, _ = round_fp8(v, MBITS, EMIN, MAXV)
        code = code.to(tl.uint8)
    return code


@triton.jit
def _fp8_cs_kernel(
    x_ptr, amax_ptr, data_ptr, scales_ptr, R, C, stride_r, stride_c,
    BLOCK_R: tl.constexpr, G: tl.constexpr,
    MBITS: tl.constexpr, EMIN: tl.constexpr, MAXV: tl.constexpr, POW2: tl.constexpr,
    HW_CVT: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    scale = _cs_scale(amax_ptr, scales_ptr, (pid_r == 0) & (pid_c == 0), MAXV, POW2)

    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    chunks = pid_c * G + tl.arange(0, G)
    x = load_tile_3d(x_ptr, rows, chunks, stride_r, stride_c, R, C, x_ptr, 16, False)
    code = _fp8_codes(x * scale, MBITS, EMIN, MAXV, HW_CVT)
    cols = chunks[None, :, None] * 16 + tl.arange(0, 16)[None, None, :]
    mask = (rows[:, None, None] < R) & (cols < C)
    tl.store(data_ptr + rows[:, None, None].to(tl.int64) * C + cols, code, mask=mask)


@triton.jit
def _fp8_cs_t_kernel(
    x_ptr, amax_ptr, data_ptr, data_t_ptr, scales_ptr, R, C, stride_r, stride_c,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    MBITS: tl.constexpr, EMIN: tl.constexpr, MAXV: tl.constexpr, POW2: tl.constexpr,
    HW_CVT: tl.constexpr,
):
    """Cast-transpose: one read of the ``[R, C]`` tile, the FP8 bytes written twice, row-major
    to ``data`` ``[R, C]`` and transposed to ``data_t`` ``[C, R]`` (both contiguous). The bytes
    are the ones ``_fp8_cs_kernel`` writes: one scale, elementwise. BF16/FP16 inputs only (see
    the comment below and ``quantize_fp8_current_transposed``)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    scale = _cs_scale(amax_ptr, scales_ptr, (pid_r == 0) & (pid_c == 0), MAXV, POW2)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_r + cols[None, :].to(tl.int64) * stride_c,
                mask=mask, other=0.0).to(tl.float32)
    v = x * scale
    code = _fp8_codes(v, MBITS, EMIN, MAXV, HW_CVT)
    tl.store(data_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], code, mask=mask)
    # Transposed in FP32, then converted again (elementwise: the same bytes). For FP32 *inputs*
    # the transposed bytes came out wrong on the H200 (Triton 3.6, 2026-12-04: 25 % of a 256x2048
    # input, whether the codes or the FP32 values were transposed; BF16 inputs exact), so the
    # wrapper launches this kernel for BF16/FP16 inputs only.
    code_t = _fp8_codes(tl.trans(v), MBITS, EMIN, MAXV, HW_CVT)
    mask_t = (cols[:, None] < C) & (rows[None, :] < R)
    tl.store(data_t_ptr + cols[:, None].to(tl.int64) * R + rows[None, :], code_t, mask=mask_t)


def quantize_fp8_current(
    x: torch.Tensor,
    fp8_dtype: torch.dtype,
    *,
    pow2_scale: bool = False,
    amax: torch.Tensor | float | None = None,
    config: dict | None = None,
) -> FP8Quantized:
    """Triton twin of ``formats.quantize_fp8_current`` (same arguments, same ``FP8Quantized``, same bits)."""
    return _quantize(x, fp8_dtype, pow2_scale=pow2_scale, amax=amax, config=config,
                     transpose=False)[0]


def quantize_fp8_current_transposed(
    x: torch.Tensor,
    fp8_dtype: torch.dtype,
    *,
    pow2_scale: bool = False,
    amax: torch.Tensor | float | None = None,
    config: dict | None = None,
) -> tuple[FP8Quantized, torch.Tensor]:
    """``quantize_fp8_current`` of a 2-D ``x`` plus the transposed bytes, from one read of ``x``.

    Returns ``(q, data_t)``: ``q`` as ``quantize_fp8_current(x)`` gives it, and ``data_t``, the
    contiguous ``[C, R]`` FP8 tensor equal to ``q.data.t()`` bit for bit, which is also what
    quantizing ``x.t()`` gives (one scale from the same amax, elementwise). Hopper's FP8 GEMM takes
    only row-major A and column-major B, so Dgrad and Wgrad need these transposed copies
    (Transformer Engine's ``cast_transpose``). BF16/FP16 inputs run the cast-transpose kernel;
    FP32 inputs the row-major kernel and a transposing copy (same bytes; see below).
    """
    if x.dim() != 2:
        raise ValueError(f"quantize_fp8_current_transposed: need a 2-D tensor, got shape {tuple(x.shape)}")
    if x.dtype not in CAST_TRANSPOSE_DTYPES:
        # FP32 input: the cast-transpose kernel wrote wrong transposed bytes on the H200 (see
        # _fp8_cs_t_kernel), so the row-major kernel runs and the bytes are transposed by a copy:
        # the same bytes, slower. Training operands are BF16 and take the kernel.
        q = _quantize(x, fp8_dtype, pow2_scale=pow2_scale, amax=amax, config=None,
                      transpose=False)[0]
        return q, q.data.view(torch.uint8).t().contiguous().view(q.data.dtype)
    return _quantize(x, fp8_dtype, pow2_scale=pow2_scale, amax=amax, config=config,
                     transpose=True)


def _quantize(x, fp8_dtype, *, pow2_scale, amax, config, transpose):
    from nvfp4_megatron.formats.inputs import amax_tensor, check_float_input, check_fp8_dtype

    check_float_input(x, min_ndim=0)
    check_fp8_dtype(fp8_dtype)
    cfg = dict((DEFAULT_T_CONFIG if transpose else DEFAULT_CONFIG) if config is None else config)
    x2d = x.reshape(1, 1) if x.dim() == 0 else (x.reshape(1, -1) if x.dim() == 1 else x)
    if x2d.dim() > 2:
        x2d = x2d.reshape(-1, x.shape[-1])
    rows, cols = x2d.shape
    amax_fp32 = amax_2d(x2d) if amax is None else amax_tensor(amax, device=x.device)
    data = torch.empty(rows, cols, dtype=torch.uint8, device=x.device)
    data_t = torch.empty(cols, rows, dtype=torch.uint8, device=x.device) if transpose else None
    # [scale, scale_inv, -, -, GEMM scale]: every used slot written by the kernel (no fill launch)
    scales = torch.empty(_SCALES_LEN, dtype=torch.float32, device=x.device)
    mbits, emin = _FORMAT[fp8_dtype]
    consts = dict(MBITS=mbits, EMIN=emin, MAXV=FP8_MAX[fp8_dtype], POW2=bool(pow2_scale),
                  HW_CVT=x.is_cuda, num_warps=cfg["num_warps"])
    if x.numel() and transpose:
        grid = (triton.cdiv(rows, cfg["BLOCK_R"]), triton.cdiv(cols, cfg["BLOCK_C"]))
        _fp8_cs_t_kernel[grid](
            x2d, amax_fp32.reshape(1), data, data_t, scales, rows, cols, x2d.stride(0),
            x2d.stride(1), BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], **consts)
    elif x.numel():
        grid = (triton.cdiv(rows, cfg["BLOCK_R"]), triton.cdiv(cols, 16 * cfg["G"]))
        _fp8_cs_kernel[grid](
            x2d, amax_fp32.reshape(1), data, scales, rows, cols, x2d.stride(0), x2d.stride(1),
            BLOCK_R=cfg["BLOCK_R"], G=cfg["G"], **consts)
    else:
        from nvfp4_megatron.formats.fp8 import fp8_scale_from_amax

        scales[0] = fp8_scale_from_amax(amax_fp32, fp8_dtype, pow2_scale=pow2_scale)
        scales[1] = 1.0 / scales[0]
        scales[_GEMM_SCALE] = torch.where(torch.isfinite(amax_fp32.reshape(())), scales[1],
                                          float("nan"))
    q = FP8Quantized(
        data=data.view(fp8_dtype).reshape(x.shape),
        scale=scales[0],
        scale_inv=scales[1],
        amax=amax_fp32.reshape(()),
        fp8_dtype=fp8_dtype,
        shape=torch.Size(x.shape),
        gemm_scale_inv=scales[_GEMM_SCALE],
    )
    return q, (data_t.view(fp8_dtype) if transpose else None)
