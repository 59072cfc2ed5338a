"""Triton kernel: block-scaled codes -> exact BF16 operand ``q * s_b`` for the emulated GEMM.

One pass reads the packed codes (E2M1 nibbles or FP8 bytes) and the block scales (E4M3 for
NVFP4, E8M0 for MX), decodes both from their bit patterns with integer arithmetic, multiplies
them in FP32 and stores BF16. The product is exact in FP32 (a 2-4 bit element significand times a
1-4 bit scale significand) and exact in BF16 (at most 8 significant bits; NVFP4: at most 6) as
long as it is not below BF16's smallest subnormal, 2^-133 (only an MX block whose E8M0 scale is
below 2^-124 can get there), so the FP32 -> BF16 store does not round (DESIGN.md §1).

``finite`` (an int32 flag on the device) turns every output element into NaN when the
high-precision operand had an Inf/NaN: a GEMM on that operand then returns NaN everywhere (the
quantized-linear contract) without a pass over the GEMM output and without a host sync.

Decoding without the hardware FP8 converts keeps the kernel identical under ``TRITON_INTERPRET=1``
(CPU tests) and on the GPU. Element codes: 0 = E2M1 packed two a byte (element 2i in the low
nibble), 1 = E4M3, 2 = E5M2. Scale codes: 0 = E4M3 (NVFP4 ``s_b``), 1 = E8M0 (MX).
"""

from __future__ import annotations

import triton
import triton.language as tl

ELEM_E2M1, ELEM_E4M3, ELEM_E5M2 = 0, 1, 2
SCALE_E4M3, SCALE_E8M0 = 0, 1


@triton.jit
def _exp2_bits(e):
    """``2^e`` as FP32 for int32 ``e`` in [-126, 127] (a normal number), from its bit pattern."""
    return ((e + 127) << 23).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _decode_e4m3_abs(b):
    """|value| of E4M3 bytes (int32, sign ignored); NaN (0x7F) is not expected (satfinite)."""
    exp = (b >> 3) & 15
    man = b & 7
    normal = (8 + man).to(tl.float32) * _exp2_bits(tl.maximum(exp, 1) - 10)
    sub = man.to(tl.float32) * 0.001953125  # man * 2^-9, exact
    return tl.where(exp == 0, sub, normal)


@triton.jit
def _e2m1_signed(code):
    """E2M1 nibble (int32) -> FP32 value with its sign (bit 3), sign of zero kept."""
    mag = code & 7
    e = mag >> 1
    m = mag & 1
    val = tl.where(e == 0, m.to(tl.float32) * 0.5, ((2 + m) << e).to(tl.float32) * 0.25)
    # sign as a bit (``-v`` may compile to ``0 - v``, which loses the sign of zero)
    return (val.to(tl.int32, bitcast=True) | ((code & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def _fp8_signed(byte, ELEM: tl.constexpr):
    """E4M3 (ELEM 1) or E5M2 (ELEM 2) byte (int32) -> FP32 value with its sign."""
    if ELEM == 1:
        val = _decode_e4m3_abs(byte)
    else:
        exp = (byte >> 2) & 31
        man = byte & 3
        normal = (4 + man).to(tl.float32) * _exp2_bits(tl.maximum(exp, 1) - 17)
        val = tl.where(exp == 0, man.to(tl.float32) * 0.0000152587890625, normal)  # 2^-16
    return (val.to(tl.int32, bitcast=True) | ((byte & 128) << 24)).to(tl.float32, bitcast=True)


@triton.jit
def _dequant_kernel(codes_ptr, scale_ptr, finite_ptr, out_ptr, R, K, codes_stride, scale_stride,
                    scale_col_stride, ELEM: tl.constexpr, SCALE: tl.constexpr,
                    BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """One [BLOCK_R, BLOCK_K] output tile; scales decoded once per block, broadcast in registers."""
    NB: tl.constexpr = BLOCK_K // BLOCK
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rmask = rows < R
    bcols = pid_k * NB + tl.arange(0, NB)
    smask = rmask[:, None] & ((bcols * BLOCK)[None, :] < K)
    sb = tl.load(scale_ptr + rows[:, None] * scale_stride + bcols[None, :] * scale_col_stride,
                 mask=smask, other=0).to(tl.int32)
    if SCALE == 0:
        s = _decode_e4m3_abs(sb)
    else:
        # E8M0: 2^(b - 127); b = 0 is 2^-127 (an FP32 subnormal, bits 1 << 22)
        s = tl.where(sb == 0, (sb * 0 + 4194304).to(tl.float32, bitcast=True),
                     (sb << 23).to(tl.int32).to(tl.float32, bitcast=True))
    ok = tl.load(finite_ptr)
    s = tl.where(ok != 0, s, float("nan"))  # NaN scale: every product is NaN
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    if ELEM == 0:
        HB: tl.constexpr = BLOCK // 2  # bytes per scale block
        bc = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        bmask = rmask[:, None] & ((bc * 2)[None, :] < K)
        byte = tl.load(codes_ptr + rows[:, None] * codes_stride + bc[None, :], mask=bmask,
                       other=0).to(tl.int32)
        s2 = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_R, NB, HB)), (BLOCK_R, BLOCK_K // 2))
        lo = _e2m1_signed(byte & 15) * s2
        hi = _e2m1_signed(byte >> 4) * s2
        v = tl.reshape(tl.join(lo, hi), (BLOCK_R, BLOCK_K))  # element 2i low nibble, 2i+1 high
    else:
        byte = tl.load(codes_ptr + rows[:, None] * codes_stride + cols[None, :],
                       mask=rmask[:, None] & (cols[None, :] < K), other=0).to(tl.int32)
        s2 = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_R, NB, BLOCK)), (BLOCK_R, BLOCK_K))
        v = _fp8_signed(byte, ELEM) * s2
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], v.to(tl.bfloat16),
             mask=rmask[:, None] & (cols[None, :] < K))
