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

The block-scaled formats (NVFP4, MXFP4, MXFP8) have a faster kernel, ``_block_dequant_kernel``
(``quant.gemm.dequant_bf16`` uses it for 4-byte-aligned codes): whole blocks per thread (8-byte
code loads, the scale decoded once, 16-byte stores, no shared-memory round trip) and every element
decoded through its FP16 bit pattern (E2M1: ``_code_pair``; E4M3 / E5M2: ``_fp8_pair``), two
elements per 32-bit word, each one exact FP16 -> FP32 convert and the generic kernel's one rounding
multiply. sm_90 SASS per element: NVFP4 9.5 (generic 22.25), MXFP4 8.5 (21.5), MXFP8 E4M3 8.5
(22.25), E5M2 6.25 (22.25); the generic kernel left the emulated GEMM's dequantize pass
issue-bound at about half the copy bandwidth (PERFORMANCE.md, session 13). Per-tensor FP8 and
other block sizes keep the generic kernel.
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
def _decode_e8m0(b):
    """E8M0 scale bytes (int32) -> ``2^(b - 127)`` as FP32; b = 0 is 2^-127 (an FP32 subnormal, bits
    1 << 22)."""
    return tl.where(b == 0, (b * 0 + 4194304).to(tl.float32, bitcast=True),
                    (b << 23).to(tl.int32).to(tl.float32, bitcast=True))


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
        s = _decode_e8m0(sb)
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


@triton.jit
def _f16_bits_times(bits, PRE: tl.constexpr, s):
    """FP32 ``(fp16(bits & 0xFFFF) * PRE) * s``: the FP16 -> FP32 convert and the multiply by the
    power of two ``PRE`` are exact, so the one rounding is that of the multiply by ``s``."""
    h = bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    if PRE != 1.0:
        h = h * PRE
    return h * s


@triton.jit
def _code_pair(w, K4: tl.constexpr, PRE: tl.constexpr, s):
    """``q * s_b`` (FP32) of E2M1 codes ``K4`` and ``K4 + 4`` of int32 words ``w`` of packed codes
    (code k in bits 4k..4k+3, so the two sit at bits 4*K4 and 4*K4 + 16), as
    ``(fp16 * PRE) * s`` with ``PRE * s = 2^14 * s_b`` (``PRE`` 1 when ``s`` already holds it).

    With the pair shifted down to bits 0-3 and 16-19, ``((x & 7) << 9) | ((x & 8) << 12)`` in each
    16-bit half is the FP16 bit pattern of ``q * 2^-14``: the E2M1 exponent lands in the two low
    bits of FP16's exponent field, its mantissa bit at the top of FP16's and its sign on FP16's
    sign (code 1, 0.5, becomes FP16's subnormal 2^-15: the same factor 2^-14 as every other code).
    So each value is one exact FP16 -> FP32 convert and one rounding multiply (-0 stays -0)."""
    x = w >> (4 * K4)
    p = ((x & 0x00070007) << 9) | ((x & 0x00080008) << 12)
    return _f16_bits_times(p, PRE, s), _f16_bits_times(p >> 16, PRE, s)


@triton.jit
def _fp8_pair(w, J: tl.constexpr, ELEM: tl.constexpr, PRE: tl.constexpr, s):
    """The values (FP32) of FP8 elements ``J`` and ``J + 2`` of int32 words of four FP8 bytes
    (element j in byte j), times the block scale: ``(fp16 * PRE) * s``. In each 16-bit half of the
    pair shifted down to bytes 0 and 2, E4M3 ``((x & 0x7F) << 7) | ((x & 0x80) << 8)`` is the FP16 bit
    pattern of ``e4m3 * 2^-8`` (the exponent bias 7 against FP16's 15; E4M3 subnormals land on FP16
    subnormals with the same factor), ``PRE = 2^8``; E5M2 is FP16's top byte, ``PRE = 1``."""
    x = w >> (8 * J)
    if ELEM == 1:
        p = ((x & 0x007F007F) << 7) | ((x & 0x00800080) << 8)
    else:
        p = (x & 0x00FF00FF) << 8
    return _f16_bits_times(p, PRE, s), _f16_bits_times(p >> 16, PRE, s)


@triton.jit
def _join8(v0, v1, v2, v3, v4, v5, v6, v7):
    """Eight ``[G, BR]`` tiles -> ``[G, BR, 8]`` in order along a new in-thread axis (``join(a, b)``
    puts ``a`` first on a new last axis: ``t[..., a, b, c] = v(4a + 2b + c)``)."""
    t = tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))
    return tl.reshape(t, [v0.shape[0], v0.shape[1], 8])


@triton.jit
def _e2m1_word_values(w, PRE: tl.constexpr, s):
    """The 8 values ``[G, BR, 8]`` of one int32 word of E2M1 codes per (block, row)."""
    v0, v4 = _code_pair(w, 0, PRE, s)
    v1, v5 = _code_pair(w, 1, PRE, s)
    v2, v6 = _code_pair(w, 2, PRE, s)
    v3, v7 = _code_pair(w, 3, PRE, s)
    return _join8(v0, v1, v2, v3, v4, v5, v6, v7)


@triton.jit
def _fp8_words_values(w0, w1, ELEM: tl.constexpr, PRE: tl.constexpr, s):
    """The 8 values ``[G, BR, 8]`` of two int32 words of FP8 elements per (block, row)."""
    v0, v2 = _fp8_pair(w0, 0, ELEM, PRE, s)
    v1, v3 = _fp8_pair(w0, 1, ELEM, PRE, s)
    v4, v6 = _fp8_pair(w1, 0, ELEM, PRE, s)
    v5, v7 = _fp8_pair(w1, 1, ELEM, PRE, s)
    return _join8(v0, v1, v2, v3, v4, v5, v6, v7)


@triton.jit
def _block_dequant_kernel(codes_ptr, scale_ptr, finite_ptr, out_ptr, R, K, codes_stride, scale_stride,
                          ELEM: tl.constexpr, SCALE: tl.constexpr, BLOCK: tl.constexpr,
                          BLOCK_R: tl.constexpr, G: tl.constexpr):
    """Block-scaled codes -> BF16 ``q * s_b`` (NVFP4, MXFP4, MXFP8): a tile of ``BLOCK_R`` rows x
    ``G`` blocks, held block-major (``[G, BLOCK_R, ...]``) with each thread holding whole blocks:
    the block's code bytes in 8-byte loads, its scale decoded once, every 8 BF16 values stored as
    16 contiguous bytes from the layout they are computed in (no shared memory, no shuffles; a
    ``[.., 16]`` tile made Triton split a block over two threads and go through shared memory).
    Element codes and scale codes as the generic kernel's; ``BLOCK`` a multiple of 16 for E2M1, of
    8 for FP8 (two int32 words per load)."""
    PAIRS: tl.constexpr = BLOCK // 16 if ELEM == 0 else BLOCK // 8  # 8-byte loads per block
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    blocks = pid_k * G + tl.arange(0, G)
    mask = (blocks < K // BLOCK)[:, None] & (rows < R)[None, :]
    sb = tl.load(scale_ptr + rows[None, :] * scale_stride + blocks[:, None], mask=mask, other=0).to(tl.int32)
    if SCALE == 0:  # E4M3 (NVFP4): s_b * 2^14 is exact (a power of two times <= 4 significant bits)
        s = _decode_e4m3_abs(sb) * 16384.0
        PRE: tl.constexpr = 1.0
    else:  # E8M0 (MX): 2^(b - 127) may be near FP32's limits, so the element's factor goes first
        s = _decode_e8m0(sb)
        PRE: tl.constexpr = 16384.0 if ELEM == 0 else (256.0 if ELEM == 1 else 1.0)
    ok = tl.load(finite_ptr)
    s = tl.where(ok != 0, s, float("nan"))  # NaN scale: every value NaN
    wrow = rows[None, :, None] * (codes_stride // 4)
    out_base = out_ptr + rows[None, :, None] * K + blocks[:, None, None] * BLOCK + tl.arange(0, 8)[None, None, :]
    for i in tl.static_range(PAIRS):
        woff = wrow + (2 * PAIRS) * blocks[:, None, None] + (2 * i + tl.arange(0, 2))[None, None, :]
        w0, w1 = tl.split(tl.load(codes_ptr.to(tl.pointer_type(tl.int32)) + woff, mask=mask[:, :, None], other=0))
        if ELEM == 0:  # 16 codes: 8 from each word
            tl.store(out_base + 16 * i, _e2m1_word_values(w0, PRE, s).to(tl.bfloat16), mask=mask[:, :, None])
            tl.store(out_base + 16 * i + 8, _e2m1_word_values(w1, PRE, s).to(tl.bfloat16), mask=mask[:, :, None])
        else:  # 8 FP8 elements: 4 from each word
            tl.store(out_base + 8 * i, _fp8_words_values(w0, w1, ELEM, PRE, s).to(tl.bfloat16),
                     mask=mask[:, :, None])
