"""Triton device helpers shared by the quantization kernels: exact rounding and the RHT tile load.

Bit-exactness with ``formats/`` (the contract of DESIGN.md §1; NVFP4 per arXiv 2509.25149 §2 and
App. B) rests on doing every step with operations whose result does not depend on the compiler
or the hardware:

* ``round_fp8`` (NVFP4's E4M3 block scales; FP8 elements under the interpreter, while the GPU
  uses the hardware ``cvt.rn.satfinite`` with the same RNE + saturation) rounds without any FP8
  convert: for ``a = |v|`` with unbiased exponent ``E = max(floor(log2 a), EMIN)`` (read from
  the FP32 bits), ``y = a * 2^(M - E)`` is exact and lies in ``[0, 2^(M+1))``; its integer part
  and fraction are exact, so round-to-nearest-even on them is exact; ``r * 2^(E - M)`` is the
  rounded value, and the byte is ``sign | ((E + bias - 1) << M) + r`` (one formula covers
  subnormals, normals and the carry into the next binade). Saturation (``satfinite``) clamps
  ``a`` to the format maximum first, as ``formats.rounding.fp8_rne_satfinite`` does. The same
  code runs under ``TRITON_INTERPRET=1`` (NumPy) and on the GPU.
* Divisions use ``tl.div_rn`` (IEEE round-to-nearest); Triton's ``/`` on FP32 is the
  approximate ``div.full.f32`` on NVIDIA GPUs. Multiplications by powers of two are exact.
* Max reductions run on the FP32 bit patterns as int32: for non-negative floats the integer
  order is the float order, and a NaN (0x7FC00000 after ``abs``) is larger than +Inf, so NaN
  propagates like ``torch.amax`` does and the same trick gives a global ``atomic_max``.
* E2M1 elements: scaled into their binade exactly, rounded with the FP32 "magic number" add
  (one IEEE rounding, nearest-even), read back from the bits (see ``e2m1_rne_code``).
* The RHT follows ``formats.rht.apply_rht`` operation for operation: signs (exact), the
  4-stage butterfly (FWHT) with strides 1, 2, 4, 8, then ``* 0.25`` (exact). 4 adds per
  element; any other summation order (a 16-term dot product, say) would round differently
  whenever a sum is inexact (0.05% of 16-blocks of BF16 N(0, 1) data, every block in FP32).
  The butterflies contain no multiply, so FMA contraction cannot change them.
* The RHT output is then rounded to the input's dtype (DESIGN.md §RHT; ``formats.rht.
  round_to_dtype``), in ``load_tile_3d``, so the post-RHT amax kernel, the RNE and the SR
  quantization all see it. BF16: on the GPU by ``cvt.rn.bf16.f32`` (nearest even), under the
  interpreter on the bits (``round_fp32_to_bf16``), since the interpreter's FP32 -> BF16 ``.to()``
  truncates instead of rounding (Triton 3.6); the bit formula equals the hardware convert and
  torch's conversion (both tested against the reference on the GPU). The post-RHT amax rounds
  only its final max (monotone, symmetric rounding: the same amax). FP16 uses
  ``.to(tl.float16)`` (``cvt.rn.f16.f32`` on the GPU, NumPy's ``astype`` in the interpreter:
  both nearest even, subnormals and overflow to Inf included). NaN passes through unchanged in
  both cases, as in the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP32_MAX = tl.constexpr(3.4028234663852886e38)  # torch.finfo(torch.float32).max


@triton.jit
def pow2_fp32(e):
    """Exact ``2^e`` (int32 ``e`` in [-149, 127]) as FP32, built from its bit pattern."""
    normal = ((e + 127) << 23).to(tl.int32)
    sub = (1 << tl.minimum(tl.maximum(e + 149, 0), 22)).to(tl.int32)
    bits = tl.where(e >= -126, normal, sub)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def round_fp8(v, MBITS: tl.constexpr, EMIN: tl.constexpr, MAXV: tl.constexpr):
    """Round FP32 ``v`` to an FP8-like format, nearest-even, saturating finite: (byte int32, value fp32).

    ``MBITS`` mantissa bits, ``EMIN`` the exponent of the smallest normal, ``MAXV`` the largest
    finite value (E4M3: 3, -6, 448; E5M2: 2, -14, 57344). NaN gives 0x7F with the sign bit.
    """
    vbits = v.to(tl.int32, bitcast=True)
    sign = (vbits >> 31) & 1
    a = tl.abs(v)
    is_nan = a != a
    a = tl.minimum(a, MAXV)
    a = tl.where(is_nan, 0.0, a)
    abits = a.to(tl.int32, bitcast=True)
    e = ((abits >> 23) & 0xFF) - 127
    e = tl.maximum(e, EMIN)
    y = a * pow2_fp32(MBITS - e)  # exact, in [0, 2^(MBITS+1))
    fl = y.to(tl.int32)  # y >= 0: truncation is floor
    frac = y - fl.to(tl.float32)
    up = (frac > 0.5) | ((frac == 0.5) & ((fl & 1) == 1))
    r = fl + up.to(tl.int32)
    value = r.to(tl.float32) * pow2_fp32(e - MBITS)
    bias: tl.constexpr = 1 - EMIN
    code = ((e + bias - 1) << MBITS) + r
    code = tl.where(is_nan, 0x7F, code) | (sign << 7)
    value = tl.where(sign == 1, -value, value)
    value = tl.where(is_nan, v, value)
    return code, value


_MAGIC_BITS = tl.constexpr(0x4B400000)  # bits of 1.5 * 2^23 (ulp 1): bits(1.5 * 2^23 + r) = _MAGIC_BITS + r


@triton.jit
def _e2m1_binade(y, FIX_NAN: tl.constexpr):
    """(t, ec, sign): ``t = min(|y|, 6)`` (NaN -> 6), ``ec = 127 + clamp(floor(log2 t), 0, 2)``
    (the biased FP32 exponent of ``t``, raised to 127; ``t <= 6`` needs no upper clamp) and the
    sign bit (0 or 1). In binade ``ec`` the E2M1 grid step is ``q = 2^(ec - 128)`` and the code
    of ``2^(ec - 127)`` is ``2 (ec - 127) + 2``.

    Integer and FP32 arithmetic only (no compare-and-select chains): the GPU issues the
    multiply-adds on its FMA pipe, while the ALU pipe is what bounds the NVFP4 quantizer
    (PERFORMANCE.md, "The NVFP4 quantizer off the ALU pipe")."""
    ybits = y.to(tl.int32, bitcast=True)
    sign = tl.umulhi(ybits.to(tl.uint32, bitcast=True), 2).to(tl.int32)
    t = tl.minimum(tl.abs(y), 6.0)
    if FIX_NAN:  # NaN -> ±6: the GPU's min.f32 returns the non-NaN operand already, NumPy does not
        t = tl.where(t != t, 6.0, t)
    ec = tl.maximum(t.to(tl.int32, bitcast=True) >> 23, 127)
    return t, ec, sign


@triton.jit
def e2m1_rne_code(y, FIX_NAN: tl.constexpr = True):
    """E2M1 code (int32 nibble) of ``y``, nearest-even with saturation; sign = signbit; NaN -> ±6.

    One FP32 "magic number" add per element: ``M = 1.5 * 2^23 * q`` (``q`` the grid step of the
    binade of ``t``, see ``_e2m1_binade``) has ulp ``q``, so ``t + M`` (``t <= 6 < 2^22 q``) is
    ``M + r q`` with ``r = rint(t / q)``, one IEEE rounding, nearest even; ``r`` is read back from
    the bits. Code = ``r + 2 (ec - 127)``: ``t < 1`` and ``[1, 2)`` share the step 0.5 and base 0,
    ``[2, 4)`` step 1 base 2, ``[4, 6]`` step 2 base 4 (e.g. 5 -> r 2 (tie to even) -> code 6 = 4.0).
    """
    t, ec, sign = _e2m1_binade(y, FIX_NAN)
    m_bits = (ec << 23) + (_MAGIC_BITS - (128 << 23))
    r = (t + m_bits.to(tl.float32, bitcast=True)).to(tl.int32, bitcast=True) - m_bits
    return r + (ec * 2 - 254) + sign * 8


@triton.jit
def e2m1_sr_code(y, u, FIX_NAN: tl.constexpr = True):
    """E2M1 code with stochastic rounding: up to the next grid point iff ``u < (a - lo) / (hi - lo)``.

    In the scaled binade ``v = t / q`` (exact: ``q`` is a power of two, see ``_e2m1_binade``) the
    neighbours are ``floor(v)`` and ``floor(v) + 1`` and ``(a - lo) / (hi - lo) = v - floor(v)``,
    exact, as in the reference.
    """
    t, ec, sign = _e2m1_binade(y, FIX_NAN)
    v = t * ((255 - ec) << 23).to(tl.float32, bitcast=True)  # t * 2^(128 - ec) = t / q
    lo = v.to(tl.int32)  # v >= 0: truncation is floor
    p_up = v - lo.to(tl.float32)
    return lo + (u < p_up).to(tl.int32) + (ec * 2 - 254) + sign * 8


@triton.jit
def _join16(y0, y1, y2, y3, y4, y5, y6, y7, y8, y9, y10, y11, y12, y13, y14, y15):
    """Inverse of ``_split16``: 16 slices ``[BR, G]`` -> ``[BR, G, 16]`` (joins add in-thread axes)."""
    BR: tl.constexpr = y0.shape[0]
    G: tl.constexpr = y0.shape[1]
    p0 = tl.join(y0, y8)  # axis b3
    p1 = tl.join(y1, y9)
    p2 = tl.join(y2, y10)
    p3 = tl.join(y3, y11)
    p4 = tl.join(y4, y12)
    p5 = tl.join(y5, y13)
    p6 = tl.join(y6, y14)
    p7 = tl.join(y7, y15)
    q0 = tl.join(p0, p4)  # axis b2
    q1 = tl.join(p1, p5)
    q2 = tl.join(p2, p6)
    q3 = tl.join(p3, p7)
    r0 = tl.join(q0, q2)  # axis b1
    r1 = tl.join(q1, q3)
    return tl.reshape(tl.join(r0, r1), [BR, G, 16])  # axis b0, innermost


@triton.jit
def _slice(base, cols0, k, stride_c, mask2, s_ptr):
    """Chunk element ``k`` of every (row, chunk) as FP32 ``[BR, G]``, times the k-th RHT sign."""
    xk = tl.load(base + (cols0 + k) * stride_c, mask=mask2, other=0.0).to(tl.float32)
    return xk * tl.load(s_ptr + k)


@triton.jit
def rht16(base, cols0, stride_c, mask2, s_ptr, RAW: tl.constexpr = False):
    """RHT tile ``[BR, G, 16]``: ``fwht16(x * signs) * 0.25`` of every 16-element chunk; with
    ``RAW`` the pair (RHT tile, ``x * signs`` tile): the untransformed elements with the signs
    applied (exact: the signs are ±1, so ``|x * s| = |x|``), for a caller that also needs the
    plain amax of the same elements (``kernels.amax``, both amaxes from one read).

    The 16 chunk elements are loaded as 16 slices ``[BR, G]`` (coalesced when the input is a
    transposed view; cached in L1 otherwise), so each butterfly is a plain elementwise add/sub
    with no data movement between threads, and ``_join16`` builds the tile with in-thread axes.
    The order (strides 1, 2, 4, 8; ``a + b`` then ``a - b``) is the one ``formats.rht.fwht16``
    defines, so every intermediate rounds identically to the reference.
    """
    x0 = _slice(base, cols0, 0, stride_c, mask2, s_ptr)
    x1 = _slice(base, cols0, 1, stride_c, mask2, s_ptr)
    x2 = _slice(base, cols0, 2, stride_c, mask2, s_ptr)
    x3 = _slice(base, cols0, 3, stride_c, mask2, s_ptr)
    x4 = _slice(base, cols0, 4, stride_c, mask2, s_ptr)
    x5 = _slice(base, cols0, 5, stride_c, mask2, s_ptr)
    x6 = _slice(base, cols0, 6, stride_c, mask2, s_ptr)
    x7 = _slice(base, cols0, 7, stride_c, mask2, s_ptr)
    x8 = _slice(base, cols0, 8, stride_c, mask2, s_ptr)
    x9 = _slice(base, cols0, 9, stride_c, mask2, s_ptr)
    x10 = _slice(base, cols0, 10, stride_c, mask2, s_ptr)
    x11 = _slice(base, cols0, 11, stride_c, mask2, s_ptr)
    x12 = _slice(base, cols0, 12, stride_c, mask2, s_ptr)
    x13 = _slice(base, cols0, 13, stride_c, mask2, s_ptr)
    x14 = _slice(base, cols0, 14, stride_c, mask2, s_ptr)
    x15 = _slice(base, cols0, 15, stride_c, mask2, s_ptr)
    if RAW:
        raw = _join16(x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15)
    # stride 1
    x0, x1 = x0 + x1, x0 - x1
    x2, x3 = x2 + x3, x2 - x3
    x4, x5 = x4 + x5, x4 - x5
    x6, x7 = x6 + x7, x6 - x7
    x8, x9 = x8 + x9, x8 - x9
    x10, x11 = x10 + x11, x10 - x11
    x12, x13 = x12 + x13, x12 - x13
    x14, x15 = x14 + x15, x14 - x15
    # stride 2
    x0, x2 = x0 + x2, x0 - x2
    x1, x3 = x1 + x3, x1 - x3
    x4, x6 = x4 + x6, x4 - x6
    x5, x7 = x5 + x7, x5 - x7
    x8, x10 = x8 + x10, x8 - x10
    x9, x11 = x9 + x11, x9 - x11
    x12, x14 = x12 + x14, x12 - x14
    x13, x15 = x13 + x15, x13 - x15
    # stride 4
    x0, x4 = x0 + x4, x0 - x4
    x1, x5 = x1 + x5, x1 - x5
    x2, x6 = x2 + x6, x2 - x6
    x3, x7 = x3 + x7, x3 - x7
    x8, x12 = x8 + x12, x8 - x12
    x9, x13 = x9 + x13, x9 - x13
    x10, x14 = x10 + x14, x10 - x14
    x11, x15 = x11 + x15, x11 - x15
    # stride 8
    x0, x8 = x0 + x8, x0 - x8
    x1, x9 = x1 + x9, x1 - x9
    x2, x10 = x2 + x10, x2 - x10
    x3, x11 = x3 + x11, x3 - x11
    x4, x12 = x4 + x12, x4 - x12
    x5, x13 = x5 + x13, x5 - x13
    x6, x14 = x6 + x14, x6 - x14
    x7, x15 = x7 + x15, x7 - x15
    y = _join16(x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15) * 0.25
    if RAW:
        return y, raw
    else:
        return y


@triton.jit
def round_fp32_to_bf16(v):
    """FP32 ``v`` rounded to nearest even on the BF16 grid, as FP32; NaN unchanged.

    Classic bit formula: add ``0x7FFF + lsb`` (lsb = bit 16, the BF16 mantissa's last bit) and
    clear the low 16 bits; the carry runs into the exponent, so FLT_MAX-sized values round to
    ±Inf and subnormals round like normals (BF16 has FP32's exponent range). int32 addition wraps
    only for NaN bit patterns, which the final ``where`` discards.
    """
    bits = v.to(tl.int32, bitcast=True)
    r = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536  # -65536 = 0xFFFF0000
    return tl.where(v != v, v, r.to(tl.float32, bitcast=True))


@triton.jit
def round_to_input_dtype(v, DTYPE: tl.constexpr, HW: tl.constexpr = False):
    """FP32 ``v`` rounded to ``DTYPE`` (BF16 / FP16; FP32: unchanged), back in FP32; NaN unchanged.
    ``HW`` (GPU only): BF16 by the hardware ``cvt.rn.bf16.f32`` (nearest even, no flush, overflow
    to Inf: the bit formula's result in fewer instructions); else the bit formula."""
    out = v
    if DTYPE == tl.bfloat16:
        if HW:
            out = tl.where(v != v, v, v.to(tl.bfloat16).to(tl.float32))
        else:
            out = round_fp32_to_bf16(v)
    if DTYPE == tl.float16:
        out = tl.where(v != v, v, v.to(tl.float16).to(tl.float32))
    return out


@triton.jit
def load_tile_3d(
    x_ptr, rows, chunks, stride_r, stride_c, R, C, s_ptr,
    CHUNK: tl.constexpr, RHT: tl.constexpr, ROUND: tl.constexpr = True, HW: tl.constexpr = False,
):
    """FP32 tile ``[BR, G, CHUNK]``: rows ``rows``, chunks ``chunks`` of ``CHUNK`` columns.

    Strided loads, so a transposed view is read in place. With ``RHT`` (CHUNK = 16, ``s_ptr`` the
    16 signs) each chunk is replaced by its RHT, rounded to the dtype of ``x_ptr`` (BF16 input ->
    BF16 values; DESIGN.md §RHT; ``HW``: by the hardware convert) unless ``ROUND`` is off (a
    caller that only needs the max of ``|.|`` rounds the max instead: rounding is monotone and
    symmetric, so the two agree). Out-of-range elements read as 0.
    """
    if RHT:
        mask2 = (rows < R)[:, None] & (chunks * CHUNK < C)[None, :]
        base = x_ptr + rows[:, None].to(tl.int64) * stride_r
        out = rht16(base, chunks[None, :].to(tl.int64) * CHUNK, stride_c, mask2, s_ptr)
        if ROUND:
            out = round_to_input_dtype(out, x_ptr.dtype.element_ty, HW)
    else:
        kk = tl.arange(0, CHUNK)
        cols = chunks[None, :, None].to(tl.int64) * CHUNK + kk[None, None, :]
        mask = (rows < R)[:, None, None] & (cols < C)
        ptrs = x_ptr + rows[:, None, None].to(tl.int64) * stride_r + cols * stride_c
        out = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return out


@triton.jit
def max_nan(a, b):
    """Elementwise max that propagates NaN (``max.NaN``), as ``torch.max``/``torch.amax`` do."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def max_nan_reduce(x, axis: tl.constexpr):
    """``tl.max`` that propagates NaN (``max_nan`` as the combine function)."""
    return tl.reduce(x, axis, max_nan)


@triton.jit
def tile_program(n_c, COL_FASTEST: tl.constexpr):
    """(row-tile, column-chunk) indices of this program: with ``COL_FASTEST`` a 1-D grid whose
    consecutive programs take neighbouring column chunks (``n_c`` of them) of one row band, else
    the 2-D grid ``(row tiles, column chunks)``."""
    if COL_FASTEST:
        pid_c = tl.program_id(0) % n_c
        pid_r = tl.program_id(0) // n_c
    else:
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
    return pid_r, pid_c


@triton.jit
def abs_bits(x):
    """``|x|`` as int32 bit patterns (order-preserving for non-negative floats, NaN largest)."""
    return tl.abs(x).to(tl.int32, bitcast=True)


_SIGNS_CACHE: dict[tuple[tuple[float, ...], str], torch.Tensor] = {}


def rht_signs_on(device: torch.device, rht_signs=None) -> torch.Tensor:
    """The RHT sign vector as an FP32 tensor on ``device``, made once per (signs, device).

    ``torch.tensor(..., device="cuda")`` copies from pageable host memory and synchronises the
    host with the GPU; done per quantizer call it cost ~320 syncs per 1.2B training step.
    """
    from nvfp4_megatron.formats.rht import hadamard_signs

    signs = tuple(hadamard_signs(rht_signs))
    key = (signs, str(torch.device(device)))
    t = _SIGNS_CACHE.get(key)
    if t is None:
        t = torch.tensor(signs, dtype=torch.float32, device=device)
        _SIGNS_CACHE[key] = t
    return t
