"""Numeric constants of the formats (value in a comment next to each), in one place.

Block sizes and maxima follow ``../shared/DESIGN.md`` §1: NVFP4 (arXiv 2509.25149 §2), OCP MX v1.0
(MXFP8 / MXFP4), FP8 current scaling and DeepSeek-V3 style block FP8.
"""

from __future__ import annotations

import torch

F4_E2M1_MAX = 6.0  # largest E2M1 magnitude: 1.5 * 2^2
F8E4M3_MAX = 448.0  # largest float8_e4m3fn: 1.75 * 2^8
F8E5M2_MAX = 57344.0  # largest float8_e5m2: 1.75 * 2^15
FP32_MAX = torch.finfo(torch.float32).max  # 3.4028234663852886e38

NVFP4_BLOCK_SIZE = 16  # elements sharing one E4M3 block scale (1x16, or a 16x16 weight tile)
NVFP4_GLOBAL_SCALE_NUM = F8E4M3_MAX * F4_E2M1_MAX  # 2688.0 = 448 * 6, numerator of S_enc
MX_BLOCK_SIZE = 32  # elements sharing one E8M0 scale (OCP MX v1.0)
FP8_BLOCK_SIZE = 128  # DeepSeek-V3 block FP8: 1x128 activations, 128x128 weights
RHT_SIZE = 16  # Hadamard block: 16x16, matches the NVFP4 block

E8M0_EXP_BIAS = 127  # E8M0 stores 2^(e - 127) in one byte; 255 is NaN
E8M0_MIN_EXP = -127  # 2^-127, byte 0
E8M0_MAX_EXP = 127  # 2^127, byte 254
E8M0_NAN_BYTE = 255

# E2M1 grid, indexed by the 3 magnitude bits of a code (sign is bit 3 of the nibble).
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_SIGN_BIT = 0x8

# Input dtypes the quantizers accept (all are computed in FP32 internally).
SUPPORTED_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_MAX = {torch.float8_e4m3fn: F8E4M3_MAX, torch.float8_e5m2: F8E5M2_MAX}
