"""Mamba-2 SSD scan in plain PyTorch: ``mamba_chunk_scan_combined`` with mamba_ssm's convention.

The selective state-space model of Mamba-2 (Dao & Gu 2024, arXiv 2405.21060, §6 "SSD algorithm")
per head ``h`` (``P`` channels, state size ``N``, heads share ``B``/``C`` within a group)::

    dt_t  = clamp(softplus(dt_t + dt_bias), *dt_limit)      (softplus only with dt_softplus)
    h_t   = exp(dt_t · A) · h_{t-1} + dt_t · x_t ⊗ B_t        h_t: [P, N]
    y_t   = h_t · C_t + D · x_t                          (then y_t · silu(z_t) when z is given)

The chunked form computes the same thing with matrix products. The sequence is cut into chunks
of ``Q = chunk_size`` steps (the last chunk zero-padded: a padded step has ``dt = 0``, so it
neither decays nor feeds the state and the final state is the state after step ``L``):

1. *intra-chunk* (the "diagonal blocks", a masked attention-like product):
   ``y_t += Σ_{s≤t in chunk} (C_t·B_s) · exp(Σ_{k=s+1..t} dt_k A) · dt_s · x_s``;
2. *chunk states*: the state each chunk produces from its own inputs,
   ``S_c = Σ_s exp(Σ_{k=s+1..end} dt_k A) · dt_s · x_s ⊗ B_s``;
3. *state passing*: the state entering chunk ``c`` is the decayed sum of the initial state and
   every earlier chunk's ``S`` (a (chunks+1)² lower-triangular decay matrix, not a Python loop);
4. *state-to-output*: ``y_t += exp(Σ_{k≤t in chunk} dt_k A) · C_t · S_in(c)``.

Decays are ``exp`` of *segment sums* computed by a masked cumulative sum (never as the difference
of two long cumulative sums, which loses precision), and the entries above the diagonal are
``-inf`` before the ``exp``, so nothing overflows and autograd sees no NaN. Everything is
differentiable by autograd (outputs, final state, and every input including ``A``, ``D``,
``dt_bias`` and the initial state).

Convention (mamba_ssm ``mamba_ssm/ops/triton/ssd_combined.py``, read for the interface only):
arguments and shapes as documented on :func:`mamba_chunk_scan_combined`; ``z`` gates *inside*
the function as ``out = (y + D·x) · silu(z)``; ``dt`` is always clamped to ``dt_limit``
(default ``(0, inf)``, so a negative ``dt`` without softplus becomes 0), and softplus passes
values above 20 through unchanged (PyTorch's ``threshold=20`` has the same rule). The output has
``x``'s dtype; the final state is FP32 (FP64 for FP64 inputs); internal arithmetic is FP32
(FP64 for FP64 inputs). Not supported (refused with a ``ValueError``): ``seq_idx`` /
``cu_seqlens`` (packed sequences) and ``return_varlen_states``.

This is the CPU / reference path and the oracle. On a GPU the same function runs through
``torch.compile`` (:func:`mamba_chunk_scan_combined_compiled`, ``model.mamba_scan=compiled``):
Inductor fuses the elementwise work around the einsums; the arithmetic is the same chunked form
(equal to the eager path within FP32 round-off, tested in ``tests/ssm/test_ssd_scan.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["SCAN_IMPLS", "chunk_scan_fn", "mamba_chunk_scan_combined",
           "mamba_chunk_scan_combined_compiled", "segsum"]

SCAN_IMPLS = ("eager", "compiled")

SOFTPLUS_THRESHOLD = 20.0  # mamba_ssm: softplus(dt) for dt <= 20, dt itself above


def segsum(x: torch.Tensor) -> torch.Tensor:
    """Segment sums along the last dimension: ``out[..., i, j] = Σ_{k=j+1..i} x[..., k]`` for
    ``j <= i`` (0 on the diagonal) and ``-inf`` above it, so ``exp(segsum(x))`` is the
    lower-triangular decay matrix. Computed by a masked cumulative sum (stable, no differences of
    long prefix sums)."""
    t = x.shape[-1]
    strict = torch.ones(t, t, dtype=torch.bool, device=x.device).tril(-1)   # k > j
    rep = x.unsqueeze(-1).expand(*x.shape, t)                                 # rep[..., k, j] = x_k
    sums = rep.masked_fill(~strict, 0.0).cumsum(dim=-2)                      # Σ_{j<k<=i} x_k
    lower = torch.ones(t, t, dtype=torch.bool, device=x.device).tril(0)
    return sums.masked_fill(~lower, float("-inf"))


def _check(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be [batch, seqlen, nheads, headdim]; got shape {tuple(x.shape)}")
    b, L, h, p = x.shape
    if B.dim() != 4 or B.shape[:2] != (b, L):
        raise ValueError(f"B must be [batch={b}, seqlen={L}, ngroups, dstate]; "
                         f"got {tuple(B.shape)}")
    g, n = B.shape[2:]
    if C.shape != B.shape:
        raise ValueError(f"C must have B's shape {tuple(B.shape)}; got {tuple(C.shape)}")
    if h % g:
        raise ValueError(f"nheads={h} must be a multiple of ngroups={g}")
    if dt.shape != (b, L, h):
        raise ValueError(f"dt must be [batch, seqlen, nheads] = {(b, L, h)}; got {tuple(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"A must be [nheads={h}]; got {tuple(A.shape)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
    if D is not None and D.shape not in ((h,), (h, p)):
        raise ValueError(f"D must be [nheads={h}] or [nheads, headdim]={(h, p)}; "
                         f"got {tuple(D.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must have x's shape {tuple(x.shape)}; got {tuple(z.shape)}")
    if dt_bias is not None and dt_bias.shape != (h,):
        raise ValueError(f"dt_bias must be [nheads={h}]; got {tuple(dt_bias.shape)}")
    if initial_states is not None and initial_states.shape != (b, h, p, n):
        raise ValueError(f"initial_states must be [batch, nheads, headdim, dstate] = "
                         f"{(b, h, p, n)}; got {tuple(initial_states.shape)}")


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
                              initial_states=None, seq_idx=None, cu_seqlens=None,
                              dt_softplus=False, dt_limit=(0.0, float("inf")),
                              return_final_states=False, return_varlen_states=False,
                              state_dtype=None):
    """The Mamba-2 SSD scan (same arguments and return convention as mamba_ssm's).

    Args:
        x: ``[batch, seqlen, nheads, headdim]``; dt: ``[batch, seqlen, nheads]``;
        A: ``[nheads]`` (negative for a decaying state); B, C: ``[batch, seqlen, ngroups,
        dstate]`` (head ``h`` uses group ``h // (nheads // ngroups)``); chunk_size: int (any
        ``seqlen`` works, the tail chunk is padded); D: ``[nheads]`` or ``[nheads, headdim]``;
        z: like x, gates the output ``out * silu(z)``; dt_bias: ``[nheads]``;
        initial_states: ``[batch, nheads, headdim, dstate]``; dt_softplus; dt_limit (min, max).
        state_dtype: accepted for signature compatibility; states are always FP32 here (FP64
        for FP64 inputs), at least as precise as any value mamba_ssm takes.
    Returns:
        ``out`` ``[batch, seqlen, nheads, headdim]`` in x's dtype, or ``(out, final_states)``
        with ``return_final_states`` (``final_states``: ``[batch, nheads, headdim, dstate]``).
    """
    del state_dtype
    if seq_idx is not None or cu_seqlens is not None or return_varlen_states:
        raise ValueError("mamba_chunk_scan_combined (nvfp4_megatron.ssm): packed sequences "
                         "(seq_idx / cu_seqlens / return_varlen_states) are not supported; pass "
                         "one sequence per batch row")
    _check(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states)
    out_dtype = x.dtype
    cdt = torch.promote_types(x.dtype, torch.float32)  # FP32, or FP64 for FP64 inputs
    b, L, h, p = x.shape
    g, n = B.shape[2:]
    r = h // g  # heads per group
    q = min(chunk_size, L) if L else chunk_size  # shorter than a chunk: one chunk, no padding
    nc = max(1, math.ceil(L / q))
    pad = nc * q - L

    # ---- discretisation step: dt (+ bias) -> softplus -> clamp (mamba_ssm's order)
    dt = dt.to(cdt)
    if dt_bias is not None:
        dt = dt + dt_bias.to(cdt)
    if dt_softplus:
        dt = F.softplus(dt, beta=1.0, threshold=SOFTPLUS_THRESHOLD)
    dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])

    def chunks(t: torch.Tensor) -> torch.Tensor:  # [b, L, ...] -> [b, nc, q, ...] (zero tail)
        t = t.to(cdt)
        if pad:
            t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(b, nc, q, *t.shape[2:])

    xc = chunks(x).reshape(b, nc, q, g, r, p)        # heads as (group, head-in-group)
    dtc = chunks(dt).reshape(b, nc, q, g, r)          # padded steps have dt = 0
    Bc, Cc = chunks(B), chunks(C)                      # [b, nc, q, g, n]
    a = A.to(cdt).reshape(g, r)

    dA = (dtc * a).permute(0, 1, 3, 4, 2)             # [b, nc, g, r, q]
    dA_cs = dA.cumsum(dim=-1)                         # decay from the chunk start to step t

    # 1. intra-chunk: y_t = Σ_{s<=t} (C_t·B_s) exp(segsum) dt_s x_s
    decay = torch.exp(segsum(dA))                                     # [b, nc, g, r, t, s]
    cb = torch.einsum("bctgn,bcsgn->bcgts", Cc, Bc)                    # [b, nc, g, t, s]
    weights = cb.unsqueeze(3) * decay * dtc.permute(0, 1, 3, 4, 2).unsqueeze(-2)
    y = torch.einsum("bcgrts,bcsgrp->bctgrp", weights, xc)

    # 2. each chunk's own contribution to the state at its end
    to_end = torch.exp(dA_cs[..., -1:] - dA_cs) * dtc.permute(0, 1, 3, 4, 2)   # [b,nc,g,r,s]
    states = torch.einsum("bcsgn,bcgrs,bcsgrp->bcgrpn", Bc, to_end, xc)        # [b,nc,g,r,p,n]

    # 3. state passing across chunks: S_in(c) = Σ_{j<=c} exp(Σ chunk decays) · [init, S_0..]
    if initial_states is None:
        init = torch.zeros(b, 1, g, r, p, n, dtype=cdt, device=x.device)
    else:
        init = initial_states.to(cdt).reshape(b, 1, g, r, p, n)
    states = torch.cat([init, states], dim=1)                                 # [b, nc+1, ...]
    chunk_decay = F.pad(dA_cs[..., -1].permute(0, 2, 3, 1), (1, 0))          # [b, g, r, nc+1]
    chunk_decay = torch.exp(segsum(chunk_decay))                              # [b,g,r,nc+1,nc+1]
    passed = torch.einsum("bgrij,bjgrpn->bigrpn", chunk_decay, states)
    entering, final = passed[:, :-1], passed[:, -1]

    # 4. the entering state read out by C, decayed to step t
    from_start = torch.exp(dA_cs)                                              # [b, nc, g, r, t]
    y = y + torch.einsum("bctgn,bcgrpn,bcgrt->bctgrp", Cc, entering, from_start)

    y = y.reshape(b, nc * q, h, p)[:, :L]
    if D is not None:
        d = D.to(cdt)
        y = y + x.to(cdt) * (d[:, None] if d.dim() == 1 else d)
    if z is not None:
        y = y * F.silu(z.to(cdt))
    out = y.to(out_dtype)
    if return_final_states:
        return out, final.reshape(b, h, p, n)
    return out


_COMPILED = None


def mamba_chunk_scan_combined_compiled(*args, **kwargs):
    """:func:`mamba_chunk_scan_combined` through ``torch.compile`` (compiled once per process,
    recompiled by Dynamo for new shapes); the eager function stays the oracle."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(mamba_chunk_scan_combined, dynamic=False)
    return _COMPILED(*args, **kwargs)


def chunk_scan_fn(impl: str):
    """The scan for ``model.mamba_scan``: ``eager`` (plain PyTorch) or ``compiled``."""
    if impl == "eager":
        return mamba_chunk_scan_combined
    if impl == "compiled":
        return mamba_chunk_scan_combined_compiled
    raise ValueError(f"mamba scan implementation {impl!r}; use one of {SCAN_IMPLS}")
