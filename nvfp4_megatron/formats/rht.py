"""Random Hadamard Transform (RHT) on 16-element chunks (arXiv 2509.25149 §4.2).

``H = diag(signs) @ Sylvester16 / 4`` is orthonormal (``H @ H.T = I``): Sylvester16 has entries
±1 and orthogonal rows of squared norm 16, and the diagonal sign flip keeps that. Applied as
``x.view(-1, 16) @ H`` along the dimension a GEMM reduces over, it spreads block outliers across
the 16 elements before NVFP4 quantization. Both operands of a GEMM are transformed along the same
reduction dim, so ``(A H)(Hᵀ B) = A B`` in exact arithmetic (the paper applies it to the Wgrad
operands only, DESIGN.md §2).

``DEFAULT_RHT_SIGNS`` is the vector Transformer Engine hard-codes: one vector for every layer and
rank for the whole run. The transform is computed in FP32 with a fixed summation order so a
fused kernel can reproduce it bit for bit: ``y = fwht16(x * signs) * 0.25``, where ``fwht16`` is
the natural-order fast Walsh-Hadamard butterfly with strides 1, 2, 4, 8 (stage ``h`` maps the pair
``(i, i + h)`` to ``(a + b, a - b)``). This equals ``x @ H`` in exact arithmetic; a BLAS matmul
would sum the 16 products in an order nobody specifies. Multiplying by 0.25 at the end is exact
except for FP32 subnormals (and overflow of inputs within 16x of FLT_MAX).

Output dtype (DESIGN.md §RHT): the FP32 result is then rounded once, to nearest even, to the
input's dtype (BF16 in -> BF16 grid, FP16 -> FP16, FP32 unchanged) and returned as FP32, so the
post-RHT amax and the NVFP4 quantization see the values Transformer Engine's RHT-cast produces:
its kernel is tested bit-exact against ``reference_nvfp4.py``, which computes ``x @ H`` in the
input's dtype. A NaN is passed through as the FP32 NaN (a dtype conversion would pick the NaN's
sign by platform: torch on x86 gives BF16 ``0xFFFF``, a GPU ``0x7FFF``; the sign becomes the
E2M1 code's sign bit). Transformer Engine's ``H`` is the same matrix: ``diag(signs) @
Sylvester16 / 4`` with this sign vector (``get_wgrad_sign_vector``, ``_build_hadamard_matrix``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nvfp4_megatron.formats.constants import RHT_SIZE

DEFAULT_RHT_SIGNS: tuple[int, ...] = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)


def hadamard_signs(signs: Sequence[int] | torch.Tensor | None) -> list[float]:
    """The sign vector as 16 floats (default ``DEFAULT_RHT_SIGNS``); ValueError if not 16 × ±1."""
    if signs is None:
        return [float(s) for s in DEFAULT_RHT_SIGNS]
    values = [float(s) for s in (signs.tolist() if isinstance(signs, torch.Tensor) else signs)]
    if len(values) != RHT_SIZE or any(v not in (1.0, -1.0) for v in values):
        raise ValueError(
            f"rht signs must be {RHT_SIZE} values each +1 or -1, got {values!r}"
        )
    return values


def sylvester_hadamard(n: int = RHT_SIZE, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unnormalized Sylvester Hadamard matrix of order ``n`` (a power of two), entries ±1."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester Hadamard order must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=dtype)
    base = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=dtype)
    while h.shape[0] < n:
        h = torch.kron(h, base)
    return h


def hadamard_matrix(
    signs: Sequence[int] | torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``diag(signs) @ Sylvester16 / 4`` (orthonormal), default signs ``DEFAULT_RHT_SIGNS``."""
    s = torch.tensor(hadamard_signs(signs), dtype=torch.float32)
    h_fp32 = (s[:, None] * sylvester_hadamard(RHT_SIZE, torch.float32)) / 4.0
    return h_fp32.to(dtype=dtype, device=device)


def apply_rht(x: torch.Tensor, signs: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
    """``x.view(-1, 16) @ H`` on chunks of the last dim, rounded to ``x.dtype``, as FP32.

    FP32 butterfly (``fwht16``), then one round-to-nearest-even to ``x.dtype`` (BF16/FP16; FP32
    and FP64 inputs are not rounded further), NaN kept; the result is an FP32 tensor of ``x``'s
    shape. ``apply_rht(x.float())`` gives the unrounded FP32 transform.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(
            f"apply_rht: x must be a floating-point tensor, got "
            f"{getattr(x, 'dtype', type(x).__name__)}"
        )
    if x.dim() == 0 or x.shape[-1] % RHT_SIZE != 0:
        raise ValueError(
            f"apply_rht: last dimension of shape {tuple(x.shape)} must be divisible by {RHT_SIZE}"
        )
    s_fp32 = torch.tensor(hadamard_signs(signs), dtype=torch.float32, device=x.device)
    y_fp32 = fwht16(x.float().reshape(-1, RHT_SIZE) * s_fp32) * 0.25
    return round_to_dtype(y_fp32, x.dtype).reshape(x.shape)


def round_to_dtype(y_fp32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FP32 ``y`` rounded to nearest even in ``dtype`` (BF16/FP16), back in FP32; NaN unchanged.

    Overflow gives ±Inf, as a dtype conversion does. FP32 and wider dtypes: ``y`` unchanged.
    """
    if dtype not in (torch.bfloat16, torch.float16):
        return y_fp32
    return torch.where(torch.isnan(y_fp32), y_fp32, y_fp32.to(dtype).float())


def fwht16(x_fp32: torch.Tensor) -> torch.Tensor:
    """Unnormalized natural-order Walsh-Hadamard transform of rows of 16 (``x @ Sylvester16``).

    Butterfly stages with strides 1, 2, 4, 8, in that order; this order is the contract that the
    Triton RHT kernel follows, so the two agree bit for bit.
    """
    rows = x_fp32.shape[0]
    y = x_fp32
    h = 1
    while h < RHT_SIZE:
        y = y.reshape(rows, RHT_SIZE // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(rows, RHT_SIZE)
