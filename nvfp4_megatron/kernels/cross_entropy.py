"""Fused vocab-parallel cross-entropy for Megatron's language-model loss (``train.fused_cross_entropy``).

Megatron-Core's ``tensor_parallel.vocab_parallel_cross_entropy`` makes an FP32 copy of the logits
(``.float()``), then takes the row max, subtracts it in place, exponentiates in place, sums,
divides in place and keeps that FP32 softmax for the backward, which subtracts 1 at the targets,
multiplies by the loss gradient and is cast back to the logits' dtype: about eight passes over 4
bytes a logit (for the 1.2B benchmark's 8192 x 131072 logits a micro-batch, 4 GiB each) and 4 GiB
kept from forward to backward. Here: two reading passes over the logits forward (row max; then the
sum of exponentials and the target's logit), one pass backward that writes the gradient in the
logits' dtype; kept for the backward are the logits themselves (already allocated) and three FP32
numbers a row.

The arithmetic is Megatron's, operation for operation, so only one thing can differ:

    M    = max_j float(l_j)                          (all-reduced MAX over the TP group)
    S    = sum_j exp(float(l_j) - M)                 (all-reduced SUM)
    loss = log(S) - (float(l_t) - M)                 (the target's term 0 on ranks not holding t,
                                                      all-reduced SUM)
    dl_j = dtype(((exp(float(l_j) - M) / S) - [j == t]) * g)

with ``exp`` the CUDA math library's ``expf`` (libdevice; torch's ``exp`` on the GPU is the same
function; NumPy's ``exp`` under the interpreter), IEEE division, and ``dtype`` round-to-nearest-even
(autograd's cast of Megatron's FP32 gradient). What differs:

* the order in which the FP32 sum ``S`` is added up (per-lane partial sums over the row, then a
  tree, against torch's reduction), so the loss can differ from Megatron's in its last bits, a
  gradient element where ``e / S`` lands next to a rounding boundary of the logits' dtype by one
  unit in its last place, and the target's ``p - 1``, which cancels where ``p`` is near 1, by a
  few FP32 ulps of 1 times the loss gradient;
* Triton links libdevice in its flush-to-zero flavour, so an ``exp`` below FP32's normal range (a
  logit more than ~87 below its row's max) is 0 here where torch gives a subnormal: gradient
  elements below 2^-126 can differ (nothing a BF16 GEMM can feel).

``tests/kernels/test_cross_entropy_interpreter.py`` holds the kernels to these bounds against
Megatron's function (one process and two tensor-parallel ranks) and the loss to an FP64
reference; the GPU test does the same on the H200. Label smoothing is not covered: such calls go
to Megatron's function, with one log line.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from nvfp4_megatron.kernels._common import max_nan, max_nan_reduce, round_to_input_dtype
from nvfp4_megatron.kernels.install import install, uninstall, warn_fallback_once

# vocabulary entries per loop step of a program (one program per row); the vocabulary size is a
# compile-time constant of the kernels (one compilation per model)
BLOCK_V = 4096


@triton.jit
def _exp(x, ON_GPU: tl.constexpr):
    """``expf``: the CUDA math library's on the GPU (as torch's ``exp``), NumPy's in the interpreter."""
    if ON_GPU:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _to_dtype(v, DT: tl.constexpr, ON_GPU: tl.constexpr):
    """FP32 -> ``DT`` with round-to-nearest-even: the hardware convert on the GPU; under the
    interpreter (whose FP32 -> BF16 conversion truncates) the bits are rounded first."""
    if ON_GPU:
        return v.to(DT)
    else:
        return round_to_input_dtype(v, DT).to(DT)


@triton.jit
def _row_max_kernel(x_ptr, max_ptr, stride_row, V: tl.constexpr, BLOCK: tl.constexpr):
    """``M[row] = max_j float(l[row, j])`` (NaN propagates, as ``torch.max`` does)."""
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_row
    acc = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        v = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        acc = max_nan(acc, v)
    tl.store(max_ptr + row, max_nan_reduce(acc, 0))


@triton.jit
def _row_sum_kernel(x_ptr, max_ptr, tgt_ptr, sum_ptr, pred_ptr, stride_row, vocab_start,
                    V: tl.constexpr, BLOCK: tl.constexpr, ON_GPU: tl.constexpr):
    """``S[row] = sum_j exp(float(l) - M)`` and ``pred[row] = float(l[t]) - M`` (0 if this rank
    does not hold the target ``t``)."""
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_row
    m = tl.load(max_ptr + row)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        v = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
        acc += tl.where(cols < V, _exp(v - m, ON_GPU), 0.0)
    tl.store(sum_ptr + row, tl.sum(acc, 0))
    t = tl.load(tgt_ptr + row) - vocab_start
    owned = (t >= 0) & (t < V)
    lt = tl.load(base + tl.where(owned, t, 0)).to(tl.float32)
    tl.store(pred_ptr + row, tl.where(owned, lt - m, 0.0))


@triton.jit
def _grad_kernel(x_ptr, max_ptr, sum_ptr, tgt_ptr, g_ptr, out_ptr, stride_row, g_stride, vocab_start,
                 V: tl.constexpr, BLOCK: tl.constexpr, ON_GPU: tl.constexpr):
    """``dl = dtype(((exp(float(l) - M) / S) - [j == t]) * g)`` for one row."""
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_row
    obase = out_ptr + row * V
    m = tl.load(max_ptr + row)
    s = tl.load(sum_ptr + row)
    g = tl.load(g_ptr + row * g_stride)
    t = tl.load(tgt_ptr + row) - vocab_start  # outside [0, V) on ranks without the target
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        v = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.div_rn(_exp(v - m, ON_GPU), s)
        p = tl.where(cols == t, p - 1.0, p)
        tl.store(obase + cols, _to_dtype(p * g, out_ptr.dtype.element_ty, ON_GPU), mask=mask)


def _rows(logits: torch.Tensor) -> torch.Tensor:
    x = logits.reshape(-1, logits.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


class FusedVocabParallelCrossEntropy(torch.autograd.Function):
    """Megatron's ``_VocabParallelCrossEntropy`` (no label smoothing) in three kernel passes."""

    @staticmethod
    def forward(ctx, logits, target, tp_group):
        x = _rows(logits)
        rows, v = x.shape
        on_gpu = x.is_cuda
        tgt = target.reshape(-1).to(torch.int64).contiguous()
        if tgt.numel() != rows:
            raise ValueError(f"fused cross-entropy: {tgt.numel()} targets for {rows} logit rows")
        rank, world = _group_rank_size(tp_group)
        vocab_start = rank * v  # Megatron's VocabUtility: equal partitions in rank order
        m = torch.empty(rows, dtype=torch.float32, device=x.device)
        s = torch.empty_like(m)
        pred = torch.empty_like(m)
        if rows:
            _row_max_kernel[(rows,)](x, m, x.stride(0), V=v, BLOCK=BLOCK_V)
        if world > 1:
            torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=tp_group)
        if rows:
            _row_sum_kernel[(rows,)](x, m, tgt, s, pred, x.stride(0), vocab_start,
                                     V=v, BLOCK=BLOCK_V, ON_GPU=on_gpu)
        if world > 1:
            torch.distributed.all_reduce(pred, op=torch.distributed.ReduceOp.SUM, group=tp_group)
            torch.distributed.all_reduce(s, op=torch.distributed.ReduceOp.SUM, group=tp_group)
        loss = torch.log(s) - pred
        ctx.save_for_backward(x, tgt, m, s)
        ctx.vocab_start, ctx.shape, ctx.dtype = vocab_start, logits.shape, logits.dtype
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        x, tgt, m, s = ctx.saved_tensors
        rows, v = x.shape
        g = grad_loss.reshape(-1).float()
        out = torch.empty((rows, v), dtype=ctx.dtype, device=x.device)
        if rows:
            _grad_kernel[(rows,)](x, m, s, tgt, g, out, x.stride(0), g.stride(0), ctx.vocab_start,
                                  V=v, BLOCK=BLOCK_V, ON_GPU=x.is_cuda)
        return out.view(ctx.shape), None, None


def _group_rank_size(group) -> tuple[int, int]:
    if group is None or not torch.distributed.is_initialized():
        return 0, 1
    return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)


def why_not_fused(logits: torch.Tensor, label_smoothing: float, *, on_cpu_ok: bool = False) -> str | None:
    """None when the kernels cover this call, else the reason they do not."""
    if not (logits.is_cuda or on_cpu_ok):
        return "logits not on a GPU"
    if label_smoothing:
        return f"label_smoothing={label_smoothing} (the kernels compute the plain cross-entropy)"
    if logits.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"logits dtype {logits.dtype}"
    return None


def fused_vocab_parallel_cross_entropy(vocab_parallel_logits, target, label_smoothing=0.0, tp_group=None,
                                       *, _original=None, _on_cpu_ok=False):
    """Drop-in for Megatron's ``tensor_parallel.vocab_parallel_cross_entropy`` (same signature)."""
    why = why_not_fused(vocab_parallel_logits, label_smoothing, on_cpu_ok=_on_cpu_ok)
    if why is not None:
        warn_fallback_once("fused cross-entropy", why)
        return _original(vocab_parallel_logits, target, label_smoothing=label_smoothing, tp_group=tp_group)
    if tp_group is None:
        from megatron.core.parallel_state import get_tensor_model_parallel_group

        tp_group = get_tensor_model_parallel_group()
    return FusedVocabParallelCrossEntropy.apply(vocab_parallel_logits, target, tp_group)


def enable_fused_cross_entropy(log=print) -> None:
    """Route Megatron's LM loss through the fused kernels (idempotent; GPU runs only)."""
    from megatron.core import tensor_parallel

    install(tensor_parallel, "vocab_parallel_cross_entropy", fused_vocab_parallel_cross_entropy, log=log,
            message="[loss] fused cross-entropy kernels (kernels/cross_entropy.py) in place of "
                    "Megatron's vocab_parallel_cross_entropy")


def disable_fused_cross_entropy() -> None:
    """Put Megatron's own function back (a process that builds models with and without it)."""
    from megatron.core import tensor_parallel

    uninstall(tensor_parallel, "vocab_parallel_cross_entropy")
