"""E2M1 (FP4) element codec: round-to-nearest-even, stochastic rounding, decode, pack/unpack.

E2M1 (OCP MX v1.0; NVFP4 element, arXiv 2509.25149 §2) has 1 sign, 2 exponent and 1 mantissa
bit: magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}. A code is a 4-bit nibble: bits 0-2 index that grid,
bit 3 is the sign. Two codes share a byte: element 2i in the low nibble, 2i+1 in the high nibble.

Round-to-nearest-even (``encode_e2m1_rne``). With ``a = |x|`` the magnitude code is the number
of thresholds ``a`` passes; the ties go to the even code (DESIGN.md §1)::

    a > 0.25, a >= 0.75, a > 1.25, a >= 1.75, a > 2.5, a >= 3.5, a > 5
    (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4; a > 5 -> 6)

so ``|x| > 6`` (and ±Inf) saturates to 6.

Stochastic rounding (``encode_e2m1_sr``): for ``lo <= a < hi`` (neighbouring grid points), round
up to ``hi`` iff ``u < (a - lo) / (hi - lo)`` with ``u`` uniform in [0, 1), so ``E[q] = x`` for
``|x| <= 6``. ``a - lo`` is exact in FP32 (Sterbenz: ``lo <= a < 2*lo`` for ``lo >= 0.5``) and
``hi - lo`` is a power of two, so the probability is exact. The uniforms come from ``generator``
(``torch.rand`` of the input's shape) or from an explicit ``rand`` tensor, so a kernel can be
compared draw for draw.

NaN/Inf policy (both modes): the sign bit is ``signbit(x)`` (so -0.0 encodes as 0x8); ±Inf
saturates to ±6; NaN encodes as ±6 with the NaN's sign bit (what PTX ``cvt.*.satfinite.e2m1x2``
does: E2M1 has no NaN, and a saturated code keeps the failure visible in range statistics rather
than hiding it as 0). Zero encodes as zero; nothing finite becomes NaN.
"""

from __future__ import annotations

import functools

import torch

from nvfp4_megatron.formats.constants import E2M1_GRID, E2M1_SIGN_BIT, F4_E2M1_MAX

_MAX_CODE = 7


@functools.cache
def _table(device: torch.device, signed: bool) -> torch.Tensor:
    """The E2M1 magnitudes (``signed``: followed by their negatives, in code order) on ``device``,
    built once per device. Building it from the Python constants is a host-to-device copy, and on
    CUDA such a copy waits for the stream: once per call it made every quantizer call wait for
    all the GPU work queued before it. Shared and read-only: callers only index it."""
    grid = torch.tensor(E2M1_GRID, dtype=torch.float32, device=device)
    return torch.cat([grid, -grid]) if signed else grid


def e2m1_grid(device: torch.device | str) -> torch.Tensor:
    """The eight E2M1 magnitudes (FP32) on ``device``: one shared, read-only tensor per device."""
    return _table(torch.device(device), False)


def _signed(mag_u8: torch.Tensor, x_fp32: torch.Tensor) -> torch.Tensor:
    sign_u8 = torch.signbit(x_fp32).to(torch.uint8) * E2M1_SIGN_BIT
    return mag_u8 | sign_u8


# the RNE thresholds of the module docstring: ``a > t`` for the first, ``a >= t`` for the second
_RNE_ABOVE = (0.25, 1.25, 2.5, 5.0)
_RNE_AT_OR_ABOVE = (0.75, 1.75, 3.5)


@functools.cache
def _thresholds(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The two threshold lists on ``device``, made once (see :func:`_table`)."""
    return (torch.tensor(_RNE_ABOVE, dtype=torch.float32, device=device),
            torch.tensor(_RNE_AT_OR_ABOVE, dtype=torch.float32, device=device))


def _rne_magnitude_compare(a: torch.Tensor) -> torch.Tensor:
    """Magnitude codes as the count of thresholds passed: seven compares and six adds."""
    mag = (a > _RNE_ABOVE[0]).to(torch.uint8)
    for t in _RNE_ABOVE[1:]:
        mag = mag + (a > t)
    for t in _RNE_AT_OR_ABOVE:
        mag = mag + (a >= t)
    return mag


def _rne_magnitude_bucketize(a: torch.Tensor) -> torch.Tensor:
    """The same count by two ``torch.bucketize`` passes: ``right=False`` counts the thresholds
    strictly below ``a`` (``a > t``), ``right=True`` those at or below it (``a >= t``)."""
    above, at_or_above = _thresholds(a.device)
    return (torch.bucketize(a, above, out_int32=True)
            + torch.bucketize(a, at_or_above, right=True, out_int32=True)).to(torch.uint8)


def encode_e2m1_rne(x_fp32: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, one per element, values 0..15) of ``x`` rounded to nearest even.

    On CUDA the threshold count takes two ``bucketize`` kernels instead of thirteen element-wise
    ones (this encoder, which only the Microsoft-FP4 ``e2m1_vector`` copies run on the GPU, was the
    largest kernel line of fp4_direct's profile); on the CPU the compares are faster. The two give
    the same codes (tests/formats/test_formats_e2m1.py, and on the GPU tests/gpu).
    """
    x_fp32 = x_fp32.float()
    a = x_fp32.abs()
    mag = _rne_magnitude_bucketize(a) if a.is_cuda else _rne_magnitude_compare(a)
    mag = torch.where(torch.isnan(a), torch.full_like(mag, _MAX_CODE), mag)
    return _signed(mag, x_fp32)


def _floor_code(a: torch.Tensor) -> torch.Tensor:
    """Magnitude code of the largest grid point <= a (a >= 0, not NaN)."""
    return (
        (a >= 0.5).to(torch.uint8)
        + (a >= 1.0)
        + (a >= 1.5)
        + (a >= 2.0)
        + (a >= 3.0)
        + (a >= 4.0)
        + (a >= 6.0)
    )


def encode_e2m1_sr(
    x_fp32: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    rand: torch.Tensor | None = None,
) -> torch.Tensor:
    """E2M1 codes with stochastic rounding (unbiased for |x| <= 6, saturating at 6, NaN -> ±6).

    Give either ``generator`` (or neither: torch's default generator) or ``rand``, a tensor of the
    input's shape with uniforms in [0, 1); element ``i`` rounds up iff ``rand[i] < p_i``.
    """
    x_fp32 = x_fp32.float()
    if rand is not None and generator is not None:
        raise ValueError("encode_e2m1_sr: pass either generator or rand, not both")
    if rand is None:
        rand = torch.rand(x_fp32.shape, generator=generator, device=x_fp32.device, dtype=torch.float32)
    else:
        if rand.shape != x_fp32.shape:
            raise ValueError(
                f"encode_e2m1_sr: rand has shape {tuple(rand.shape)} but the input has shape "
                f"{tuple(x_fp32.shape)}; give one uniform in [0, 1) per element"
            )
        rand = rand.to(device=x_fp32.device, dtype=torch.float32)
    a = torch.clamp(x_fp32.abs(), max=F4_E2M1_MAX)  # NaN stays NaN here, handled below
    lo_code = _floor_code(a)
    hi_code = torch.clamp(lo_code + 1, max=_MAX_CODE)
    grid = e2m1_grid(x_fp32.device)
    lo = grid[lo_code.long()]
    hi = grid[hi_code.long()]
    width = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    p_up = (a - lo) / width  # exact; 0 on grid points and at 6
    mag = torch.where(rand < p_up, hi_code, lo_code)
    mag = torch.where(torch.isnan(a), torch.full_like(mag, _MAX_CODE), mag)
    return _signed(mag, x_fp32)


def decode_e2m1(codes_u8: torch.Tensor) -> torch.Tensor:
    """FP32 values of E2M1 codes (uint8, one code per element; the high nibble must be 0)."""
    if codes_u8.dtype != torch.uint8:
        raise ValueError(f"decode_e2m1: codes must be uint8, got {codes_u8.dtype}")
    table = _table(codes_u8.device, True)  # code 0x8 is -0.0
    return table[codes_u8.long() & 0xF]


def pack_e2m1(codes_u8: torch.Tensor) -> torch.Tensor:
    """Pack codes two per byte along the last dim: element 2i low nibble, 2i+1 high nibble."""
    if codes_u8.dtype != torch.uint8:
        raise ValueError(f"pack_e2m1: codes must be uint8, got {codes_u8.dtype}")
    if codes_u8.dim() == 0 or codes_u8.shape[-1] % 2 != 0:
        raise ValueError(
            f"pack_e2m1: last dimension of shape {tuple(codes_u8.shape)} must be even (two codes a byte)"
        )
    return (codes_u8[..., 0::2] & 0xF) | ((codes_u8[..., 1::2] & 0xF) << 4)


def unpack_e2m1(packed_u8: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_e2m1``: one uint8 code per element, last dim doubled."""
    if packed_u8.dtype != torch.uint8:
        raise ValueError(f"unpack_e2m1: packed data must be uint8, got {packed_u8.dtype}")
    low = packed_u8 & 0xF
    high = packed_u8 >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed_u8.shape[:-1], packed_u8.shape[-1] * 2)
