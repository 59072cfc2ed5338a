"""Triton GEMM for the emulated block-scaled formats: ``alpha * (A · B)`` with the alpha in the epilogue.

The BF16-dequant emulation (``quant/gemm.py``) multiplies the exact BF16 operand values ``q * s_b``
with FP32 accumulation and then applies the per-tensor decode scale alpha = S_dec(A)·S_dec(B) to
the FP32 accumulator before the one rounding to the output dtype. With cuBLAS that takes two
passes: the GEMM writes an FP32 output, a second kernel reads it, multiplies by alpha and writes
BF16 (on the 1.2B shape about 9 % of an all-NVFP4 step, docs/PERFORMANCE.md). This kernel does it
in one: FP32 accumulation on the BF16 tensor cores (``tl.dot``), then ``acc * alpha`` in FP32 and
one round-to-nearest-even store in the output dtype -- the same contract; only the FP32
accumulation order differs from cuBLAS's (the operand values and products are exact, so on inputs
whose partial sums are exact in FP32 both give the same bits: tests/kernels).

``scale_by_alpha`` is the other half of the cuBLAS path: the pass that multiplies cuBLAS's FP32
output by alpha and rounds it to the output dtype. Torch's ``mul`` with a 0-d CUDA tensor operand
(a stride-0 broadcast, so not the vectorised path) and a BF16 ``out=`` ran as the generic
``elementwise_kernel<128, 4>`` at about half the copy bandwidth (78 ms of the graphed
nvfp4_all_layers 1.2B step, PERFORMANCE.md); this kernel reads the FP32 tile with 16-byte loads,
multiplies by alpha in FP32 and rounds once to nearest even: torch's bits (NaN aside: the
hardware convert gives the canonical NaN, torch keeps the payload; both are NaN).

No autotuning: the tile configuration is a fixed function of nothing but the kernel, so a run
computes the same bits every time and after a resume (an autotuner could pick another tile, i.e.
another accumulation order, in another process).

Under Triton's CPU interpreter (tests) the tiles are converted to FP32 before ``tl.dot`` (its BF16
dot multiplies bit patterns); BF16 values are exact in FP32, so the products are the same, and the
GPU tests check the BF16 dot itself; and a BF16 output is rounded to nearest even from the FP32
bits (the interpreter's conversion truncates; the GPU's rounds to nearest even).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nvfp4_megatron.kernels._common import round_fp32_to_bf16

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages); measured on the H200
# (docs/PERFORMANCE.md, "The alpha in the GEMM's epilogue")
CONFIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


@triton.jit
def _mm_alpha_kernel(a_ptr, b_ptr, c_ptr, alpha_ptr, M, N, K,
                     stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                     HAS_ALPHA: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M row-tiles share their B column tiles in L2
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        kmask = (kt * BLOCK_K + rk) < K
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & (rn[None, :] < N), other=0.0)
        if DOT_FP32:  # the CPU interpreter multiplies BF16 bit patterns as integers in tl.dot
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if HAS_ALPHA:
        acc = acc * tl.load(alpha_ptr)
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    if DOT_FP32 and c_ptr.dtype.element_ty == tl.bfloat16:
        # the interpreter truncates FP32 -> BF16: round to nearest even from the bits, as the GPU
        tl.store(c_ptrs.to(tl.pointer_type(tl.int16)), bf16_bits_rne(acc),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))
    else:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def bf16_bits_rne(v):
    """The BF16 bit patterns (int16) of FP32 ``v`` rounded to nearest even, NaN -> 0x7FC0 (torch's
    CPU conversion). Under the interpreter only: its FP32 -> BF16 convert truncates, and it
    garbles BF16 subnormals, so the bits are stored through an int16 pointer instead."""
    bits = round_fp32_to_bf16(v).to(tl.int32, bitcast=True) >> 16
    return tl.where(v != v, 0x7FC0, bits).to(tl.int16)


def mm_alpha(a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor | None,
             out_dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    """``round_out_dtype(alpha * (a @ b))``: ``a`` [M, K] and ``b`` [K, N] BF16 (any strides),
    FP32 accumulation, ``alpha`` an FP32 0-d device tensor or None."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"mm_alpha: need A [M, K] and B [K, N], got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16:
        raise ValueError(f"mm_alpha: BF16 operands only, got {a.dtype} and {b.dtype}")
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"mm_alpha: output BF16, FP16 or FP32, got {out_dtype}")
    cfg = dict(CONFIG, **(config or {}))
    m, k = a.shape
    n = b.shape[1]
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    if alpha is not None:
        alpha = alpha.reshape(1).float()
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _mm_alpha_kernel[grid](
        a, b, c, alpha if alpha is not None else c, m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        HAS_ALPHA=alpha is not None, DOT_FP32=not a.is_cuda, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return c


SCALE_BLOCK = 4096  # elements per program of ``scale_by_alpha`` (16 per thread at 8 warps)


@triton.jit
def _scale_kernel(x_ptr, alpha_ptr, out_ptr, n, BLOCK: tl.constexpr, ROUND_BITS: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    v = tl.load(x_ptr + offs, mask=mask, other=0.0) * tl.load(alpha_ptr)
    if ROUND_BITS:  # BF16 output under the interpreter (see bf16_bits_rne)
        tl.store(out_ptr.to(tl.pointer_type(tl.int16)) + offs, bf16_bits_rne(v), mask=mask)
    else:
        tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


def scale_by_alpha(x: torch.Tensor, alpha: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``round_out_dtype(x * alpha)`` for a contiguous FP32 ``x`` (the GEMM's FP32 output) and an
    FP32 0-d ``alpha`` on its device, in one pass; FP32 output in place (returns ``x``)."""
    if x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError(f"scale_by_alpha: need a contiguous FP32 tensor, got {x.dtype} with strides "
                         f"{tuple(x.stride())}")
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"scale_by_alpha: output BF16, FP16 or FP32, got {out_dtype}")
    if alpha.numel() != 1 or alpha.device != x.device:
        raise ValueError(f"scale_by_alpha: alpha must be one element on {x.device}, got "
                         f"{tuple(alpha.shape)} on {alpha.device}")
    out = x if out_dtype == torch.float32 else torch.empty(x.shape, dtype=out_dtype, device=x.device)
    n = x.numel()
    if n:
        _scale_kernel[(triton.cdiv(n, SCALE_BLOCK),)](
            x, alpha.reshape(1).float(), out, n, BLOCK=SCALE_BLOCK,
            ROUND_BITS=not x.is_cuda and out_dtype == torch.bfloat16, num_warps=8)
    return out
