"""Microsoft FP4 training pieces (Wang et al., arXiv 2501.17116), as pure functions.

Absmax scaling (§3): each row of ``x`` along ``dim`` is scaled so its absmax maps to 6 (the
E2M1 maximum) and rounded to E2M1 (nearest even): per token for activations ``X[tokens, in]``
and per output channel for weights ``W[out, in]`` (both reduce over the last dim)::

    scale = 6 / amax_row   (1 when amax_row is 0 or not finite),   q = e2m1(x * scale),   x̂ = q / scale

Differentiable gradient estimator, DGE (§3.1): the quantizer is replaced in the backward pass by
``f(x) = δ/2 (1 + sign(2x/δ - 1) |2x/δ - 1|^(1/k))`` on each quantization interval of width δ,
``x`` being the offset inside the interval. Its derivative, which multiplies the weight gradient,
is ``f'(x) = (1/k) |2x/δ - 1|^(1/k - 1)``; it is infinite at the interval midpoint, so it is capped
(default ``cap = 3.0``, ``k = 5``). ``dge_derivative`` is the formula; ``dge_derivative_e2m1``
locates each scaled value's E2M1 interval (widths 0.5, 1, 2) and evaluates it there.

Outlier clamping and compensation, OCC (§3.2): clamp activations to the [1-α, α] quantiles
(α = 0.99), quantize the clamped tensor, and compute ``(x - clamped) @ W`` in high precision. The
residual is sparse: ≈ 2(1-α) of the entries are non-zero (≈ 2% at α = 0.99). The quantiles are
``torch.quantile``'s (linear interpolation) computed with ``torch.topk``, which takes any size
(``torch.quantile`` refuses inputs above 2^24 elements) and runs in PyTorch's strict mode.
"""

from __future__ import annotations

import dataclasses

import torch

from nvfp4_megatron.formats.inputs import check_float_input
from nvfp4_megatron.formats.constants import E2M1_GRID, F4_E2M1_MAX
from nvfp4_megatron.formats.e2m1 import decode_e2m1, e2m1_grid, encode_e2m1_rne


@dataclasses.dataclass(frozen=True, kw_only=True)
class AbsmaxE2M1Quantized:
    """E2M1 codes (uint8, one per element, ``shape``) and FP32 ``scale`` (keepdim along ``dim``)."""

    codes: torch.Tensor
    scale: torch.Tensor
    dim: int
    shape: torch.Size

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (decode_e2m1(self.codes) / self.scale).to(dtype)


def quantize_absmax_e2m1(x: torch.Tensor, *, dim: int = -1) -> AbsmaxE2M1Quantized:
    """Absmax-to-6 E2M1 quantization with one FP32 scale per slice along ``dim``."""
    check_float_input(x, min_ndim=1)
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"quantize_absmax_e2m1: dim={dim} is out of range for shape {tuple(x.shape)}")
    x_fp32 = x.float()
    amax = x_fp32.abs().amax(dim=dim, keepdim=True)
    valid = torch.isfinite(amax) & (amax > 0)
    safe = torch.where(valid, amax, torch.ones_like(amax))
    scale = torch.where(valid, F4_E2M1_MAX / safe, torch.ones_like(safe))
    codes = encode_e2m1_rne(torch.clamp(x_fp32 * scale, -F4_E2M1_MAX, F4_E2M1_MAX))
    return AbsmaxE2M1Quantized(codes=codes, scale=scale, dim=dim % x.dim(), shape=torch.Size(x.shape))


def quantize_per_token(x: torch.Tensor) -> AbsmaxE2M1Quantized:
    """Activations ``[..., tokens, hidden]``: one scale per token (reduce over the last dim)."""
    return quantize_absmax_e2m1(x, dim=-1)


def quantize_per_channel(w: torch.Tensor) -> AbsmaxE2M1Quantized:
    """Weights ``[out, in]``: one scale per output channel (reduce over ``in``, the last dim)."""
    return quantize_absmax_e2m1(w, dim=-1)


def dge_derivative(
    x_scaled: torch.Tensor, delta: torch.Tensor | float, *, k: float = 5.0, cap: float = 3.0
) -> torch.Tensor:
    """``min((1/k) |2x/δ - 1|^(1/k - 1), cap)`` with ``x`` the offset inside an interval of width δ."""
    if k <= 0:
        raise ValueError(f"dge_derivative: k={k} must be > 0 (the paper uses k = 5)")
    if cap <= 0:
        raise ValueError(f"dge_derivative: cap={cap} must be > 0 (the paper uses 3.0)")
    x_fp32 = x_scaled.float()
    delta_fp32 = torch.as_tensor(delta, dtype=torch.float32, device=x_fp32.device)
    if bool((delta_fp32 <= 0).any()):
        raise ValueError("dge_derivative: every interval width delta must be > 0")
    return _dge_unchecked(x_fp32, delta_fp32, k=k, cap=cap)


def _dge_unchecked(x_fp32: torch.Tensor, delta_fp32: torch.Tensor, *, k: float, cap: float
                   ) -> torch.Tensor:
    """:func:`dge_derivative`'s arithmetic without its argument checks, for callers whose widths
    are positive by construction: the ``delta > 0`` check reads a device tensor back to the host,
    one GPU synchronisation per call (per layer backward under DGE)."""
    t = torch.abs(2.0 * x_fp32 / delta_fp32 - 1.0)
    d = (1.0 / k) * torch.pow(t, 1.0 / k - 1.0)  # t = 0 -> +inf for k > 1, capped below
    return torch.clamp(d, max=cap)


def dge_derivative_e2m1(x_scaled: torch.Tensor, *, k: float = 5.0, cap: float = 3.0) -> torch.Tensor:
    """DGE derivative of the E2M1 quantizer at scaled values ``x_scaled`` (|x| within [0, 6]).

    Each ``|x|`` falls in the grid interval ``[lo, hi)`` (widths 0.5, 1, 2); ``f'`` is evaluated at
    ``|x| - lo`` with ``δ = hi - lo`` (the quantizer is odd, so its derivative is even in x). Beyond
    the saturation point (|x| > 6) the derivative is 0: clamping passes no gradient; |x| = 6 is
    the upper end of the last interval [4, 6], so it gets f'(δ) = 1/k like every grid point.
    """
    if k <= 0 or cap <= 0:
        raise ValueError(f"dge_derivative_e2m1: k={k} and cap={cap} must be > 0 (the paper: 5, 3.0)")
    x_fp32 = x_scaled.float()
    a = x_fp32.abs()
    grid = e2m1_grid(x_fp32.device)  # made once per device: no host-to-device copy per call
    idx = torch.clamp(torch.bucketize(a, grid, right=True) - 1, 0, len(E2M1_GRID) - 2)
    lo, hi = grid[idx], grid[idx + 1]
    d = _dge_unchecked(a - lo, hi - lo, k=k, cap=cap)  # the E2M1 grid's widths: 0.5, 1, 2 > 0
    return torch.where(a > F4_E2M1_MAX, torch.zeros_like(d), d)


def _quantile_linear(v_fp32: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(v, q)`` (linear interpolation, same FP32 rank and ``lerp`` arithmetic) for
    any size, by ``torch.topk``.

    Why not ``torch.quantile``: it refuses inputs above 2^24 elements (one 12B-width activation,
    8192 tokens x 5120, has 2.5 x 2^24). ``topk`` runs under ``torch.use_deterministic_algorithms(True)``
    (``train.deterministic``; checked on the H200), its selected *values* do not depend on how
    ties are broken, and, for the
    quantiles OCC uses (α ≥ 0.9), selects only the ≈ (1-α)·n elements on the near side of the
    quantile rather than sorting all n. ``v_fp32`` is 1-D.
    """
    n = v_fp32.numel()
    rank = torch.tensor(q, dtype=torch.float32) * (n - 1)
    below = torch.floor(rank)
    weight = rank - below
    lo_i = int(below.item())  # a CPU tensor: no device synchronisation
    hi_i = min(lo_i + 1, n - 1)
    if lo_i >= n // 2:  # the top n - lo_i values, descending: ascending rank r is at n - 1 - r
        top = torch.topk(v_fp32, n - lo_i, largest=True, sorted=True).values
        lo_v, hi_v = top[n - 1 - lo_i], top[n - 1 - hi_i]
    else:  # the bottom hi_i + 1 values, ascending: rank r is at r
        bottom = torch.topk(v_fp32, hi_i + 1, largest=False, sorted=True).values
        lo_v, hi_v = bottom[lo_i], bottom[hi_i]
    # the FP32 weight as a Python scalar (exact: a double holds every float): lerp converts it
    # back to FP32, the same arithmetic as a 0-d tensor weight, without a host-to-device copy
    # (which waits for the GPU stream)
    return torch.lerp(lo_v, hi_v, float(weight))


def outlier_clamp(x: torch.Tensor, alpha: float = 0.99) -> tuple[torch.Tensor, torch.Tensor]:
    """``(clamped, residual)``: ``x`` clamped to its [1-α, α] quantiles and ``x - clamped``.

    Both are FP32 tensors of ``x``'s shape; ``residual`` is zero except at the ≈ 2(1-α) clamped
    entries (call ``.to_sparse()`` for a sparse GEMM). ``clamped + residual == x`` exactly.
    """
    check_float_input(x, min_ndim=1)
    if not 0.5 < alpha < 1.0:
        raise ValueError(f"outlier_clamp: alpha={alpha} must be in (0.5, 1) (the paper uses 0.99)")
    x_fp32 = x.float()
    if bool(torch.isnan(x_fp32).any()):
        raise ValueError("outlier_clamp: x contains NaN; quantiles are undefined")
    return outlier_clamp_unchecked(x_fp32, alpha)


def outlier_clamp_unchecked(x_fp32: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`outlier_clamp` without its checks, for the training path: the NaN check reads a
    device tensor back to the host, one GPU synchronisation per call. The caller must make a
    non-finite ``x`` visible itself (``quant.linear`` ANDs the input's finiteness into the
    quantized copy's flag, so the GEMM output is NaN): here NaN/Inf give meaningless quantiles."""
    flat = x_fp32.reshape(-1)
    hi = _quantile_linear(flat, alpha)
    lo = _quantile_linear(flat, 1.0 - alpha)
    clamped = torch.clamp(x_fp32, min=lo, max=hi)
    return clamped, x_fp32 - clamped
