"""Pure-PyTorch reference codecs: the numeric contract of ``../shared/DESIGN.md`` §1.

Every quantizer takes a BF16/FP16/FP32 tensor (CPU or CUDA), computes in FP32 and returns a frozen
result dataclass with ``.dequantize(dtype)``. ``kernels/`` fast paths are tested bit-exact against
these functions. See ``docs/formats.md`` for the formulas and a worked NVFP4 block.
"""

from nvfp4_megatron.formats.constants import (
    F4_E2M1_MAX,
    F8E4M3_MAX,
    F8E5M2_MAX,
    FP8_BLOCK_SIZE,
    MX_BLOCK_SIZE,
    NVFP4_BLOCK_SIZE,
)
from nvfp4_megatron.formats.e2m1 import (
    decode_e2m1,
    encode_e2m1_rne,
    encode_e2m1_sr,
    pack_e2m1,
    unpack_e2m1,
)
from nvfp4_megatron.formats.fp8 import (
    FP8BlockQuantized,
    FP8Quantized,
    fp8_scale_from_amax,
    quantize_fp8_block,
    quantize_fp8_current,
)
from nvfp4_megatron.formats.msfp4 import (
    AbsmaxE2M1Quantized,
    dge_derivative,
    dge_derivative_e2m1,
    outlier_clamp,
    quantize_absmax_e2m1,
    quantize_per_channel,
    quantize_per_token,
)
from nvfp4_megatron.formats.mx import MXQuantized, quantize_mx
from nvfp4_megatron.formats.nvfp4 import NVFP4Quantized, nvfp4_global_scales, quantize_nvfp4
from nvfp4_megatron.formats.rht import DEFAULT_RHT_SIGNS, apply_rht, hadamard_matrix
from nvfp4_megatron.formats.rounding import (
    e4m3_rne_satfinite,
    e8m0_round_up_exponent,
    fp8_rne_satfinite,
)

__all__ = [
    "DEFAULT_RHT_SIGNS",
    "F4_E2M1_MAX",
    "F8E4M3_MAX",
    "F8E5M2_MAX",
    "FP8_BLOCK_SIZE",
    "MX_BLOCK_SIZE",
    "NVFP4_BLOCK_SIZE",
    "AbsmaxE2M1Quantized",
    "FP8BlockQuantized",
    "FP8Quantized",
    "MXQuantized",
    "NVFP4Quantized",
    "apply_rht",
    "decode_e2m1",
    "dge_derivative",
    "dge_derivative_e2m1",
    "e4m3_rne_satfinite",
    "e8m0_round_up_exponent",
    "encode_e2m1_rne",
    "encode_e2m1_sr",
    "fp8_rne_satfinite",
    "fp8_scale_from_amax",
    "hadamard_matrix",
    "nvfp4_global_scales",
    "outlier_clamp",
    "pack_e2m1",
    "quantize_absmax_e2m1",
    "quantize_fp8_block",
    "quantize_fp8_current",
    "quantize_mx",
    "quantize_nvfp4",
    "quantize_per_channel",
    "quantize_per_token",
    "unpack_e2m1",
]
