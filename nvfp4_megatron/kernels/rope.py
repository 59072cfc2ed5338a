"""Fused rotary position embedding (RoPE) for Megatron's ``bshd`` layout, bit-exact with Megatron.

Megatron-Core without Transformer Engine applies RoPE with torch ops
(``rope_utils._apply_rotary_pos_emb_bshd``): ``t * cos + rotate_half(t) * sin`` with
``rotate_half(t) = cat(-t2, t1)`` and a final ``cat`` with the (empty) pass-through part — about
six passes over ``t`` forward and as many backward, per query and key tensor of every layer. This
kernel does one pass each way, with the same arithmetic: every product and the sum are computed
in FP32 and rounded to the tensor's dtype (BF16 or FP16) exactly where torch's elementwise ops
round, so the output and the gradient equal the unfused ones bit for bit:

    forward   out1 = r(r(t1 c1) + r(-t2 s1)),   out2 = r(r(t2 c2) + r(t1 s2))
    backward  g_t1 = r(r(g1 c1) + r(g2 s2)),    g_t2 = r(r(g2 c2) - r(g1 s1))

(``t1``/``t2`` the two halves of the last dimension, ``c``/``s`` Megatron's ``cos_``/``sin_``
already rounded to the dtype, ``r`` round-to-nearest-even; the backward is what autograd computes
through ``cat``, ``chunk``, ``neg`` and the two multiplications; IEEE addition is commutative, so
autograd's order of accumulating the two contributions does not matter; autograd then adds the
all-zero gradient of Megatron's empty pass-through slice ``t[..., rot_dim:]``, which turns a
gradient of -0.0 into +0.0, so the kernel does the same). BF16 is rounded on the
bits (``_common.round_fp32_to_bf16``), so the CPU interpreter gives the GPU's result.

``enable_fused_rope`` (``train.fused_rope=true``, GPU only) installs it in place of Megatron's
function for the cases it covers (CUDA, BF16/FP16, not interleaved, rotary dimension = head
dimension, ``freqs`` of shape ``[s, 1, 1, d]``); any other call goes to Megatron's function, with
one log line naming why.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nvfp4_megatron.kernels._common import round_to_input_dtype
from nvfp4_megatron.kernels.install import install, uninstall, warn_fallback_once


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, B, H, x_s, x_b, x_h,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BACKWARD: tl.constexpr):
    """One position ``s`` (program axis 0) x one batch row ``b`` (axis 1) x ``BLOCK_H`` heads."""
    s = tl.program_id(0)
    b = tl.program_id(1)
    heads = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    k = tl.arange(0, HALF)
    mask = (heads < H)[:, None]
    base = x_ptr + s.to(tl.int64) * x_s + b.to(tl.int64) * x_b + heads[:, None].to(tl.int64) * x_h
    x1 = tl.load(base + k[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + k[None, :], mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + s.to(tl.int64) * (2 * HALF) + k).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + s.to(tl.int64) * (2 * HALF) + HALF + k).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + s.to(tl.int64) * (2 * HALF) + k).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + s.to(tl.int64) * (2 * HALF) + HALF + k).to(tl.float32)[None, :]
    DT: tl.constexpr = out_ptr.dtype.element_ty
    if BACKWARD:
        o1 = round_to_input_dtype(x1 * c1, DT) + round_to_input_dtype(x2 * s2, DT)
        o2 = round_to_input_dtype(x2 * c2, DT) - round_to_input_dtype(x1 * s1, DT)
    else:
        o1 = round_to_input_dtype(x1 * c1, DT) + round_to_input_dtype(-x2 * s1, DT)
        o2 = round_to_input_dtype(x2 * c2, DT) + round_to_input_dtype(x1 * s2, DT)
    o1 = round_to_input_dtype(o1, DT)
    o2 = round_to_input_dtype(o2, DT)
    if BACKWARD:  # autograd adds the (zero) gradient of the empty pass-through slice: -0 -> +0
        o1 = tl.where(o1 == 0.0, 0.0, o1)
        o2 = tl.where(o2 == 0.0, 0.0, o2)
    obase = out_ptr + ((s.to(tl.int64) * B + b) * H + heads[:, None].to(tl.int64)) * (2 * HALF)
    tl.store(obase + k[None, :], o1.to(DT), mask=mask)
    tl.store(obase + HALF + k[None, :], o2.to(DT), mask=mask)


def rope_bshd(x: torch.Tensor, cos_: torch.Tensor, sin_: torch.Tensor, *, backward: bool = False,
              block_h: int | None = None) -> torch.Tensor:
    """One pass of the kernel: ``x`` ``[s, b, h, d]`` (any strides; copied if the last is not 1),
    ``cos_``/``sin_`` ``[s, 1, 1, d]`` in ``x``'s dtype; returns a contiguous ``[s, b, h, d]``.
    ``block_h``: heads per program (default: all of them up to 16)."""
    s, b, h, d = x.shape
    block_h = block_h or triton.next_power_of_2(min(h, 16))
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((s, b, h, d), dtype=x.dtype, device=x.device)
    cos2 = cos_.reshape(s, d).contiguous()
    sin2 = sin_.reshape(s, d).contiguous()
    grid = (s, b, triton.cdiv(h, block_h))
    _rope_kernel[grid](x, cos2, sin2, out, b, h, x.stride(0), x.stride(1), x.stride(2),
                       HALF=d // 2, BLOCK_H=block_h, BACKWARD=backward)
    return out


class FusedRoPE(torch.autograd.Function):
    """``t * cos_ + rotate_half(t) * sin_`` forward and backward, one kernel pass each."""

    @staticmethod
    def forward(ctx, t, cos_, sin_):
        ctx.save_for_backward(cos_, sin_)
        return rope_bshd(t, cos_, sin_)

    @staticmethod
    def backward(ctx, grad):
        cos_, sin_ = ctx.saved_tensors
        return rope_bshd(grad, cos_, sin_, backward=True), None, None


def why_not_fused(t: torch.Tensor, freqs: torch.Tensor, *, rotary_interleaved: bool,
                  mla_rotary_interleaved: bool, on_cpu_ok: bool = False) -> str | None:
    """None when the fused kernel covers this call, else the reason it does not."""
    if not (t.is_cuda or on_cpu_ok):
        return "tensor not on a GPU"
    if t.dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {t.dtype} (the kernel rounds to BF16/FP16)"
    if rotary_interleaved or mla_rotary_interleaved:
        return "interleaved rotary layout"
    if t.dim() != 4 or freqs.dim() != 4 or freqs.shape[1:3] != (1, 1) or freqs.shape[0] != t.shape[0]:
        return f"shapes t {tuple(t.shape)}, freqs {tuple(freqs.shape)} (wants [s, b, h, d], [s, 1, 1, d])"
    d = t.shape[-1]
    if freqs.shape[-1] != d:
        return f"rotary dimension {freqs.shape[-1]} != head dimension {d}"
    if d % 2 or d & (d - 1):
        return f"head dimension {d} not a power of two"
    return None


def fused_apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=False, mla_rotary_interleaved=False,
                                    mscale=1.0, multi_latent_attention=None, *, _original=None,
                                    _on_cpu_ok=False):
    """Drop-in for Megatron's ``_apply_rotary_pos_emb_bshd`` (same signature, same bits)."""
    mla = mla_rotary_interleaved or bool(multi_latent_attention)
    why = why_not_fused(t, freqs, rotary_interleaved=rotary_interleaved, mla_rotary_interleaved=mla,
                        on_cpu_ok=_on_cpu_ok)
    if why is not None:
        warn_fallback_once("fused RoPE", why)
        return _original(t, freqs, rotary_interleaved=rotary_interleaved,
                         mla_rotary_interleaved=mla_rotary_interleaved, mscale=mscale,
                         multi_latent_attention=multi_latent_attention)
    cos_ = (torch.cos(freqs) * mscale).to(t.dtype)  # as Megatron computes them
    sin_ = (torch.sin(freqs) * mscale).to(t.dtype)
    return FusedRoPE.apply(t, cos_, sin_)


def enable_fused_rope(log=print) -> None:
    """Route Megatron's ``bshd`` RoPE through the fused kernel (idempotent; GPU runs only)."""
    from megatron.core.models.common.embeddings import rope_utils

    install(rope_utils, "_apply_rotary_pos_emb_bshd", fused_apply_rotary_pos_emb_bshd, log=log,
            message="[rope] fused RoPE kernel (kernels/rope.py) in place of Megatron's unfused bshd RoPE")


def disable_fused_rope() -> None:
    """Put Megatron's own function back (a process that builds models with and without it)."""
    from megatron.core.models.common.embeddings import rope_utils

    uninstall(rope_utils, "_apply_rotary_pos_emb_bshd")
