"""NVFP4 reference quantizer (arXiv 2509.25149 §2 and App. B; same math as Transformer Engine).

NVFP4 = E2M1 elements, one E4M3 decode scale per block of 16 along the last (reduction) dim,
and one FP32 per-tensor scale. In FP32, with this evaluation order (DESIGN.md §1)::

    S_enc = min(448 * 6 / amax, FLT_MAX)         (S_enc = 1 if amax is 0 or not finite)
    S_dec = 1 / S_enc
    s_b   = e4m3_rne_satfinite(amax_b * (S_enc * fp32(1/6)))      per block b
    enc_b = min(1 / (fp32(s_b) * S_dec), FLT_MAX)
    q     = e2m1(clamp(x * enc_b, -6, 6))         round-to-nearest-even or stochastic
    x̂     = q * fp32(s_b) * S_dec

``tile=(1, 16)``: each row's 16-element block has its own ``amax_b``. ``tile=(16, 16)`` (2D weight
scaling): ``amax_b`` is the amax of a 16x16 tile, the scale is replicated to its 16 rows, so the
quantization of ``W`` transposed equals that of ``Wᵀ`` (Fprop and Dgrad see the same weight).
N-d inputs are flattened to rows ``[prod(shape[:-1]), shape[-1]]``.

``rht=True`` transforms the last dim with the 16x16 RHT (``formats.rht``) first; the transform is
rounded to the input's dtype (BF16 in -> BF16 values; FP32 unchanged) before the post-RHT amax and
the quantization, as Transformer Engine does (DESIGN.md §RHT). ``dequantize()`` returns values
**in the RHT basis** (``≈ apply_rht(x)``, not ``x``): a GEMM whose both operands are in that basis
gives the original product.

NaN/Inf policy: the global amax propagates NaN/Inf, so ``S_enc = 1`` then. A block containing
±Inf gets scale ``e4m3_rne_satfinite(Inf) = 448`` and the Inf element the code ±6; a block
containing NaN gets a NaN scale (E4M3 0x7F) so the whole block dequantizes to NaN (NaN stays
visible) and the NaN element the code ±6. All-zero blocks get scale 0 and codes 0 and
dequantize to exact zeros; an all-zero tensor never produces NaN.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from nvfp4_megatron.formats.inputs import (
    global_amax,
    check_float_input,
    check_tile,
)
from nvfp4_megatron.formats.constants import (
    F4_E2M1_MAX,
    FP32_MAX,
    NVFP4_BLOCK_SIZE,
    NVFP4_GLOBAL_SCALE_NUM,
)
from nvfp4_megatron.formats.e2m1 import (
    decode_e2m1,
    encode_e2m1_rne,
    encode_e2m1_sr,
    pack_e2m1,
    unpack_e2m1,
)
from nvfp4_megatron.formats.rht import apply_rht, hadamard_signs
from nvfp4_megatron.formats.rounding import e4m3_rne_satfinite

NVFP4_TILES = ((1, NVFP4_BLOCK_SIZE), (NVFP4_BLOCK_SIZE, NVFP4_BLOCK_SIZE))


@dataclasses.dataclass(frozen=True, kw_only=True)
class NVFP4Quantized:
    """One NVFP4-quantized tensor.

    data: uint8 ``[*shape[:-1], K // 2]``, two E2M1 codes a byte (element 2i in the low nibble).
    scale: float8_e4m3fn ``[*shape[:-1], K // 16]`` block decode scales ``s_b`` (16x16 tiles:
        the tile scale replicated to its 16 rows).
    amax: FP32 0-d global amax used (post-RHT when ``rht``); scale_enc = S_enc; scale_dec = S_dec.
    """

    data: torch.Tensor
    scale: torch.Tensor
    amax: torch.Tensor
    scale_enc: torch.Tensor
    scale_dec: torch.Tensor
    shape: torch.Size
    tile: tuple[int, int]
    rht: bool
    rht_signs: tuple[int, ...] | None = None

    def codes(self) -> torch.Tensor:
        """Unpacked E2M1 codes, uint8, one per element, ``shape``."""
        return unpack_e2m1(self.data)

    def dequantize_unscaled(self) -> torch.Tensor:
        """FP32 ``q * s_b`` (exact: at most 6 significant bits), ``shape``; S_dec not applied."""
        q_fp32 = decode_e2m1(self.codes())
        k = self.shape[-1]
        q_blocks = q_fp32.reshape(-1, k // NVFP4_BLOCK_SIZE, NVFP4_BLOCK_SIZE)
        s_fp32 = self.scale.float().reshape(-1, k // NVFP4_BLOCK_SIZE, 1)
        return (q_blocks * s_fp32).reshape(self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``q * fp32(s_b) * S_dec`` in FP32, then cast to ``dtype`` (RHT basis when ``rht``)."""
        return (self.dequantize_unscaled() * self.scale_dec).to(dtype)


def nvfp4_global_scales(amax_fp32: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S_enc, S_dec) from the global amax.

    ``S_enc = min(2688 / amax, FLT_MAX)``, or 1 if amax is 0 or not finite; ``S_dec = 1 / S_enc``.
    """
    amax_fp32 = amax_fp32.float()
    valid = torch.isfinite(amax_fp32) & (amax_fp32 > 0)
    safe = torch.where(valid, amax_fp32, torch.ones_like(amax_fp32))
    num = torch.full_like(safe, NVFP4_GLOBAL_SCALE_NUM)  # a fill, not a host-to-device copy
    s_enc = torch.clamp(num / safe, max=FP32_MAX)
    s_enc = torch.where(valid, s_enc, torch.ones_like(s_enc))
    return s_enc, 1.0 / s_enc


def _block_amax(x_fp32: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    """Per-block amax ``[rows, K // 16]`` (16x16: tile amax replicated to the tile's rows)."""
    rows, k = x_fp32.shape
    nb = k // NVFP4_BLOCK_SIZE
    a = x_fp32.abs()
    if tile[0] == 1:
        return a.reshape(rows, nb, NVFP4_BLOCK_SIZE).amax(dim=-1)
    tiles = a.reshape(rows // tile[0], tile[0], nb, NVFP4_BLOCK_SIZE).amax(dim=(1, 3))
    return tiles.repeat_interleave(tile[0], dim=0)


def check_nvfp4_args(
    x: torch.Tensor,
    *,
    tile,
    stochastic_rounding: bool,
    generator: torch.Generator | None,
    rand: torch.Tensor | None,
) -> tuple[tuple[int, int], int, int]:
    """Validate ``quantize_nvfp4``'s arguments (shared with the Triton kernel); ``(tile, rows, K)``.

    ValueError naming the shape and the rule: non-float dtype, last dim not divisible by 16,
    unknown tile, 16x16 tiles on rows not divisible by 16, SR inputs without SR, a bad ``rand``.
    """
    what = "quantize_nvfp4"
    check_float_input(x, min_ndim=1)
    tile, rows, k = check_tile(x, tile, NVFP4_TILES, what=what)
    if (rand is not None or generator is not None) and not stochastic_rounding:
        raise ValueError(
            f"{what}: generator/rand are only used with stochastic_rounding=True; set it or drop them"
        )
    if rand is not None:
        _check_rand(rand, x.shape)
    return tile, rows, k  # type: ignore[return-value]


def quantize_nvfp4(
    x: torch.Tensor,
    *,
    tile: tuple[int, int] = (1, NVFP4_BLOCK_SIZE),
    rht: bool = False,
    rht_signs: Sequence[int] | torch.Tensor | None = None,
    stochastic_rounding: bool = False,
    generator: torch.Generator | None = None,
    rand: torch.Tensor | None = None,
    amax: torch.Tensor | float | None = None,
) -> NVFP4Quantized:
    """Quantize ``x`` to NVFP4 along its last dimension (docs/formats.md "NVFP4").

    Args:
        x: BF16/FP16/FP32, rank >= 1, last dimension a multiple of 16.
        tile: ``(1, 16)`` or ``(16, 16)`` (2D; rows = prod(leading dims) must divide by 16).
        rht, rht_signs: apply the 16x16 RHT first (signs default ``DEFAULT_RHT_SIGNS``), its
            output rounded to ``x.dtype`` (``apply_rht``).
        stochastic_rounding, generator, rand: SR with ``generator`` or explicit uniforms ``rand``
            (shape of ``x``, RHT basis order when ``rht``); otherwise round-to-nearest-even.
        amax: a pre-reduced global amax (e.g. over the TP group); default ``max |x|`` (post-RHT
            when ``rht``), 0 for an empty tensor.

    Returns:
        ``NVFP4Quantized``: packed E2M1 codes, E4M3 block scales, FP32 global scales.
    """
    tile, rows, k = check_nvfp4_args(x, tile=tile, stochastic_rounding=stochastic_rounding,
                                     generator=generator, rand=rand)

    signs = None
    if rht:
        # Transformed in FP32, rounded to x's dtype (DESIGN.md §RHT): BF16 in -> BF16 values.
        x_fp32 = apply_rht(x.reshape(rows, k), rht_signs)
        signs = tuple(int(v) for v in hadamard_signs(rht_signs))
    else:
        x_fp32 = x.float().reshape(rows, k)

    amax_fp32 = global_amax(x_fp32, amax)
    s_enc, s_dec = nvfp4_global_scales(amax_fp32)

    inv6_fp32 = torch.full((), 1.0 / F4_E2M1_MAX, dtype=torch.float32, device=x.device)
    amax_b = _block_amax(x_fp32, tile)
    s_b_e4m3 = e4m3_rne_satfinite(amax_b * (s_enc * inv6_fp32))
    enc_b = torch.clamp(1.0 / (s_b_e4m3.float() * s_dec), max=FP32_MAX)

    nb = k // NVFP4_BLOCK_SIZE
    y_fp32 = x_fp32.reshape(rows, nb, NVFP4_BLOCK_SIZE) * enc_b.unsqueeze(-1)
    y_fp32 = torch.clamp(y_fp32, -F4_E2M1_MAX, F4_E2M1_MAX).reshape(rows, k)
    if stochastic_rounding:
        rand_r = None if rand is None else _check_rand(rand, x.shape).reshape(rows, k)
        codes = encode_e2m1_sr(y_fp32, generator=generator, rand=rand_r)
    else:
        codes = encode_e2m1_rne(y_fp32)

    lead = tuple(x.shape[:-1])
    return NVFP4Quantized(
        data=pack_e2m1(codes).reshape(*lead, k // 2),
        scale=s_b_e4m3.reshape(*lead, nb),
        amax=amax_fp32,
        scale_enc=s_enc,
        scale_dec=s_dec,
        shape=torch.Size(x.shape),
        tile=tile,  # type: ignore[arg-type]
        rht=bool(rht),
        rht_signs=signs,
    )


def _check_rand(rand: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if not isinstance(rand, torch.Tensor) or rand.shape != shape:
        raise ValueError(
            f"quantize_nvfp4: rand must be a tensor of the input's shape {tuple(shape)} with "
            f"uniforms in [0, 1), got {getattr(rand, 'shape', type(rand).__name__)}"
        )
    return rand
