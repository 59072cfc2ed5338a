"""One entry point per quantizer: Triton for CUDA tensors, the formats reference otherwise.

Everything above ``kernels/`` quantizes through these functions, so a fast path added here is
picked up by every layer. The signatures and result dataclasses are those of
``nvfp4_megatron.formats``; for round-to-nearest the results are bit-identical (tests/kernels).

Rules:
* CPU tensors (and machines where Triton cannot be imported) use the reference: it is the CPU
  path and the oracle.
* CUDA tensors use the Triton kernel. Where no kernel exists for a case (``quantize_fp8_block``;
  MX with ``block != 32``) the reference runs on the GPU *explicitly*, and a warning naming the
  case is logged once. Same numbers, only slower: nothing falls back to a higher precision.
* Stochastic rounding on CUDA draws its uniforms with Triton's Philox (``tl.rand``) seeded from
  ``generator``, so the bits differ from the reference's ``torch.rand`` draws (both are tested
  statistically); pass ``rand=`` to either to get identical codes.
"""

from __future__ import annotations

import functools
import logging

import torch

from nvfp4_megatron import formats
from nvfp4_megatron.formats.inputs import global_amax

logger = logging.getLogger(__name__)


@functools.cache
def triton_available() -> bool:
    """True when Triton imports and a CUDA device is visible (Triton kernels can run)."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - Triton ships with the CUDA torch wheel
        return False
    return torch.cuda.is_available()


def uses_kernel(x: torch.Tensor) -> bool:
    """Whether ``x`` is quantized by a Triton kernel (CUDA tensor and Triton available)."""
    return isinstance(x, torch.Tensor) and x.is_cuda and triton_available()


@functools.cache
def _log_reference_once(case: str) -> None:
    logger.warning("kernels.dispatch: no Triton kernel for %s; running the formats reference on the GPU", case)


def amax(x: torch.Tensor, *, rht: bool = False, rht_signs=None) -> torch.Tensor:
    """FP32 0-d global amax of ``x`` (post-RHT along the last dim when ``rht``, the transform rounded
    to ``x.dtype`` as in ``formats.apply_rht``); no host sync on CUDA.

    Use it to compute an amax once (or to all-reduce it over the TP group) and pass it as
    ``amax=`` to several quantizers of the same tensor.
    """
    if uses_kernel(x):
        from nvfp4_megatron.kernels._common import rht_signs_on
        from nvfp4_megatron.kernels.amax import amax_2d
        from nvfp4_megatron.kernels.nvfp4 import as_2d

        s = rht_signs_on(x.device, rht_signs) if rht else None
        return amax_2d(as_2d(x), signs_fp32=s)
    return global_amax(formats.apply_rht(x, rht_signs) if rht else x.float())


def amax_and_transposed_rht(x2d: torch.Tensor, *, rht_signs=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(``amax(x2d)``, ``amax(x2d.t(), rht=True)``) of a 2-D ``[tokens, features]`` tensor, the
    same bits as those two calls, from one read of ``x2d`` on CUDA (``kernels.amax.amax_2d_both``
    on the transposed view). The quantized linear's row-wise copy of an activation or gradient
    takes the first, its RHT'd column-wise (Wgrad) copy the second. The token count must be a
    multiple of 16 (the RHT's chunk)."""
    if x2d.dim() != 2 or x2d.shape[0] % 16 != 0:
        raise ValueError(f"amax_and_transposed_rht: need a 2-D [tokens, features] tensor with the "
                         f"token count a multiple of 16, got shape {tuple(x2d.shape)}")
    if uses_kernel(x2d):
        from nvfp4_megatron.kernels._common import rht_signs_on
        from nvfp4_megatron.kernels.amax import amax_2d_both

        col, row = amax_2d_both(x2d.t(), signs_fp32=rht_signs_on(x2d.device, rht_signs))
        return row, col
    return amax(x2d), amax(x2d.t(), rht=True, rht_signs=rht_signs)


def quantize_nvfp4(x: torch.Tensor, *, tile: tuple[int, int] = (1, 16), rht: bool = False,
                   rht_signs=None, stochastic_rounding: bool = False,
                   generator: torch.Generator | None = None, rand: torch.Tensor | None = None,
                   amax: torch.Tensor | float | None = None,
                   config: dict | None = None,
                   seed: torch.Tensor | None = None) -> formats.NVFP4Quantized:
    """NVFP4 of ``x`` along its last dimension (docs/formats.md "NVFP4").

    Args:
        x: BF16/FP16/FP32, last dimension a multiple of 16.
        tile: ``(1, 16)`` or ``(16, 16)`` (2D weight tiles).
        rht, rht_signs: random Hadamard transform on 16-element chunks, and its signs.
        stochastic_rounding, generator, rand: SR to E2M1; ``rand`` gives the uniforms explicitly.
        amax: a global amax to use instead of ``max |x|`` (e.g. TP-reduced).
        config: Triton tile sizes (kernel path only).
        seed: SR on the kernel path only: the int32 ``[1]`` device tensor holding the Philox seed
            (``quant.state.sr_seed_tensor``), instead of one drawn from ``generator``.

    Returns:
        ``formats.NVFP4Quantized`` (packed codes, E4M3 block scales, global scales).
    """
    kw = dict(tile=tile, rht=rht, rht_signs=rht_signs, stochastic_rounding=stochastic_rounding,
              generator=generator, rand=rand, amax=amax)
    if uses_kernel(x):
        from nvfp4_megatron.kernels import nvfp4

        return nvfp4.quantize_nvfp4(x, **kw, config=config, seed=seed)
    if seed is not None:
        raise ValueError("quantize_nvfp4: seed= is the Triton kernel's Philox seed (CUDA tensors); "
                         "the reference draws from generator=")
    return formats.quantize_nvfp4(x, **kw)


def quantize_mx(x: torch.Tensor, elem_dtype, *, block: int = 32,
                config: dict | None = None) -> formats.MXQuantized:
    """MX (E8M0-scaled) quantization of ``x`` along its last dimension.

    Args:
        x: BF16/FP16/FP32, last dimension a multiple of ``block``.
        elem_dtype: ``torch.float8_e4m3fn`` / ``torch.float8_e5m2`` (MXFP8) or ``"e2m1"`` (MXFP4).
        block: elements per scale (32 in OCP MX; other sizes run the reference on CUDA too).
        config: Triton tile sizes (kernel path only).

    Returns:
        ``formats.MXQuantized``.
    """
    if uses_kernel(x):
        if block == 32:
            from nvfp4_megatron.kernels import mx

            return mx.quantize_mx(x, elem_dtype, block=block, config=config)
        _log_reference_once(f"quantize_mx(block={block})")
    return formats.quantize_mx(x, elem_dtype, block=block)


def quantize_fp8_current(x: torch.Tensor, fp8_dtype: torch.dtype, *, pow2_scale: bool = False,
                         amax: torch.Tensor | float | None = None,
                         config: dict | None = None) -> formats.FP8Quantized:
    """Per-tensor current-scaling FP8 of ``x``.

    Args:
        x: BF16/FP16/FP32, any shape.
        fp8_dtype: ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.
        pow2_scale: round the scale down to a power of two.
        amax: a global amax to use instead of ``max |x|``.
        config: Triton tile sizes (kernel path only).

    Returns:
        ``formats.FP8Quantized``.
    """
    if uses_kernel(x):
        from nvfp4_megatron.kernels import fp8

        return fp8.quantize_fp8_current(x, fp8_dtype, pow2_scale=pow2_scale, amax=amax,
                                        config=config)
    return formats.quantize_fp8_current(x, fp8_dtype, pow2_scale=pow2_scale, amax=amax)


def quantize_fp8_current_transposed(x: torch.Tensor, fp8_dtype: torch.dtype, *,
                                    pow2_scale: bool = False,
                                    amax: torch.Tensor | float | None = None,
                                    config: dict | None = None
                                    ) -> tuple[formats.FP8Quantized, torch.Tensor]:
    """``quantize_fp8_current`` of a 2-D ``x`` and its transposed bytes ``[C, R]`` (contiguous,
    equal to ``q.data.t()``): one kernel, one read of ``x`` on CUDA (cast-transpose); the reference
    and a transposing copy otherwise."""
    if uses_kernel(x):
        from nvfp4_megatron.kernels import fp8

        return fp8.quantize_fp8_current_transposed(x, fp8_dtype, pow2_scale=pow2_scale, amax=amax,
                                                   config=config)
    if x.dim() != 2:
        raise ValueError(f"quantize_fp8_current_transposed: need a 2-D tensor, got shape {tuple(x.shape)}")
    q = formats.quantize_fp8_current(x, fp8_dtype, pow2_scale=pow2_scale, amax=amax)
    return q, q.data.t().contiguous()


def quantize_fp8_block(x: torch.Tensor, fp8_dtype: torch.dtype, *,
                       tile: tuple[int, int] = (1, 128),
                       pow2_scale: bool = False) -> formats.FP8BlockQuantized:
    """Block-scaled FP8 of ``x`` (one FP32 scale per 1x128 or 128x128 tile). No kernel: the
    reference runs on CUDA too (logged once).

    Args:
        x: BF16/FP16/FP32, last dimension a multiple of 128 (rows too for 128x128).
        fp8_dtype: ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.
        tile: ``(1, 128)`` or ``(128, 128)``.
        pow2_scale: round the scales down to powers of two.

    Returns:
        ``formats.FP8BlockQuantized``.
    """
    if uses_kernel(x):
        _log_reference_once("quantize_fp8_block")
    return formats.quantize_fp8_block(x, fp8_dtype, tile=tile, pow2_scale=pow2_scale)
