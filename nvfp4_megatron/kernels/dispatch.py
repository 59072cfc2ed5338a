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


def quantize_nvfp4(x: torch.Tensor, **kwargs) -> formats.NVFP4Tensor:
    if uses_kernel(x):
        from nvfp4_megatron.kernels import nvfp4

        return nvfp4.quantize_nvfp4(x, **kwargs)
    return formats.quantize_nvfp4(x, **kwargs)


def quantize_mx(x: torch.Tensor, elem_dtype, **kwargs) -> formats.MXTensor:
    if uses_kernel(x):
        if kwargs.get("block", 32) == 32:
            from nvfp4_megatron.kernels import mx

            return mx.quantize_mx(x, elem_dtype, **kwargs)
        _log_reference_once(f"quantize_mx(block={kwargs['block']})")
    return formats.quantize_mx(x, elem_dtype, **kwargs)


def quantize_fp8_current(x: torch.Tensor, fp8_dtype: torch.dtype, **kwargs) -> formats.FP8Tensor:
    if uses_kernel(x):
        from nvfp4_megatron.kernels import fp8

        return fp8.quantize_fp8_current(x, fp8_dtype, **kwargs)
    return formats.quantize_fp8_current(x, fp8_dtype, **kwargs)


def quantize_fp8_block(x: torch.Tensor, fp8_dtype: torch.dtype, **kwargs) -> formats.FP8BlockTensor:
    if uses_kernel(x):
        _log_reference_once("quantize_fp8_block")
    return formats.quantize_fp8_block(x, fp8_dtype, **kwargs)
