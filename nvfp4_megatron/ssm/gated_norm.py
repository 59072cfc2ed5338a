"""Gated RMSNorm of Mamba-2 (mamba_ssm's ``RMSNormGated`` semantics), in plain PyTorch.

Mamba-2 (arXiv 2405.21060 §7.3 "normalization") multiplies the SSD output ``y`` by the gate
``silu(z)`` and normalises; with ``group_size`` the RMS is taken over each group of
``group_size`` consecutive channels (a GroupNorm without mean, so the result does not depend on
how heads are split over tensor-parallel ranks as long as groups stay whole)::

    norm_before_gate=False:  out = rmsnorm_g(y * silu(z)) * weight      (Megatron's MambaMixer)
    norm_before_gate=True:   out = rmsnorm_g(y) * weight * silu(z)      (mamba_ssm's default)
    rmsnorm_g(v) = v / sqrt(mean_{group}(v²) + eps)

As mamba_ssm's reference (``rms_norm_ref``): computed in FP32 (inputs upcast; FP64 stays FP64),
returned in the input's dtype; ``z=None`` is a plain (grouped) RMSNorm. Kept in high precision:
norms are never quantized (DESIGN.md §2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["RMSNormGated", "rms_norm_gated"]


def rms_norm_gated(x: torch.Tensor, weight: torch.Tensor, z: torch.Tensor | None = None, *,
                   eps: float = 1e-5, group_size: int | None = None,
                   norm_before_gate: bool = True) -> torch.Tensor:
    """Functional form of :class:`RMSNormGated` (normalises over the last dimension)."""
    n = x.shape[-1]
    gs = n if group_size is None else group_size
    if gs < 1 or n % gs:
        raise ValueError(f"group_size={group_size} must divide the normalised size {n}")
    if weight.shape != (n,):
        raise ValueError(f"weight must be [{n}]; got {tuple(weight.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must have x's shape {tuple(x.shape)}; got {tuple(z.shape)}")
    dtype = x.dtype
    cdt = torch.promote_types(dtype, torch.float32)
    v = x.to(cdt)
    gate = F.silu(z.to(cdt)) if z is not None else None
    if gate is not None and not norm_before_gate:
        v = v * gate
    grouped = v.reshape(*v.shape[:-1], n // gs, gs)
    rstd = torch.rsqrt(grouped.square().mean(dim=-1, keepdim=True) + eps)
    out = (grouped * rstd).reshape(v.shape) * weight.to(cdt)
    if gate is not None and norm_before_gate:
        out = out * gate
    return out.to(dtype)


class RMSNormGated(torch.nn.Module):
    """``RMSNormGated(hidden_size, eps=1e-5, group_size=None, norm_before_gate=True)``; forward
    ``(x, z=None)``. Same constructor and parameter (``weight``, ones; no bias) as mamba_ssm's."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: int | None = None,
                 norm_before_gate: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if group_size is not None and (group_size < 1 or hidden_size % group_size):
            raise ValueError(f"group_size={group_size} must divide hidden_size={hidden_size}")
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        torch.nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return rms_norm_gated(x, self.weight, z, eps=self.eps, group_size=self.group_size,
                              norm_before_gate=self.norm_before_gate)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[0]}, eps={self.eps}, group_size={self.group_size}, "
                f"norm_before_gate={self.norm_before_gate}")
