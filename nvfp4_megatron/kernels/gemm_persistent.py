"""Persistent, TMA-based Triton GEMM with the alpha in the epilogue: ``round_out_dtype(alpha * (A · B))``.

The same contract as ``gemm_alpha.mm_alpha`` (BF16 operands, FP32 accumulation with ``tl.dot``,
``acc * alpha`` in FP32, one round-to-nearest-even store in BF16 / FP16 / FP32), built the way
GEMMs reach cuBLAS speed on Hopper instead of ``mm_alpha``'s one-program-per-tile pointer loads
(10-25 % slower than cuBLAS on the H200, docs/PERFORMANCE.md "The alpha in the GEMM's epilogue"):

* persistent: the grid is ``min(#SMs, #tiles)`` programs; program ``p`` computes output tiles
  ``p, p + #SMs, p + 2·#SMs, ...`` in the same grouped order as ``mm_alpha`` (``GROUP_M`` row
  tiles share their B column tiles in L2). The tile loop and the K loop are flattened
  (``tl.range(..., flatten=True)``) so the software pipeline keeps issuing the next tile's loads
  while the current tile's epilogue runs;
* operands through TMA: host-side tensor descriptors (``triton.tools.tensor_descriptor``, passed
  as ``__grid_constant__`` kernel parameters: no device scratch, so no ``triton.set_allocator``)
  on the operands' own storage, so ``tl.dot`` lowers to asynchronous wgmma reading the swizzled
  shared-memory tiles TMA wrote, with ``num_stages`` tiles of A and B in flight. Out-of-range rows
  and columns (M, N, K not multiples of the tile) are zero-filled by TMA on load and clipped on
  store, so there are no masks in the main loop;
* either orientation of each operand without a copy: a descriptor is made on whichever of the
  tensor or its transpose has unit inner stride, and the kernel transposes the loaded tile
  (``A_T`` / ``B_T``; wgmma reads 16-bit operands from shared memory in either major order). The
  quantized linear's Fprop/Wgrad pass B as the transpose view of an [N, K] tensor (``B_T``), its
  Dgrad a contiguous [K, N] one;
* the epilogue: ``acc * alpha`` in FP32, convert, and a TMA store of two [BLOCK_M, BLOCK_N / 2]
  halves (``SUBTILE``; halves the shared-memory staging buffer). When the output's row is not a
  multiple of 16 bytes (N odd for BF16, ...) TMA cannot store it and the epilogue stores through
  masked pointers instead (``C_TMA=False``); the values are the same.

Operands TMA cannot read (no unit-stride dimension, the other stride not a multiple of 16 bytes,
a base address not 16-byte aligned) raise ``ValueError`` -- the caller decides whether to fall back
to ``gemm_alpha.mm_alpha`` (which takes any strides); nothing is copied silently.

Fixed configuration, no autotuning (``CONFIG``): 128x256x64 tiles, 8 warps (two consumer warp
groups of 64x256 each: 128 FP32 accumulator registers per thread), 3 stages (3 · 48 KiB of A/B
tiles + a 32 KiB BF16 epilogue half-tile, 176 KiB of the H200's 227 KiB; 208 KiB for an FP32
output), GROUP_M = 8: the fixed FP16 configuration of earlier versions of the Triton tutorial
"09-persistent-matmul" (H100; later versions autotune over a set containing it), and on the target shapes (M, N, K in {2048, 4096, 6144, 8192}) 128 to 1,536 tiles, i.e.
0.97-11.6 waves of 132 SMs. As in ``mm_alpha``, an autotuner could choose another tile (another
accumulation order) in another process; here each output tile's accumulation order depends only on
BLOCK_K and the K loop, not on the number of SMs or which program computes the tile, so the bits
are the same on any GPU with the same tile configuration. Not used: Triton 3.6's automatic warp
specialization (``tl.range(..., warp_specialize=True)``, documented for Blackwell): compiled for
sm_90 it produced no warp partitions at 128x256 / 8 warps and crashed the compiler at 128x128 / 4
warps. ``compile_sm90_launch`` compiles the launch for sm_90 on a CPU machine (SASS checks:
tests/kernels/test_gemm_persistent.py).

Under Triton's CPU interpreter (tests) the tensor descriptors are emulated (zero-filled
out-of-range loads, clipped stores), so the same kernel runs, with the interpreter quirks of
``gemm_alpha``: the tiles are converted to FP32 before ``tl.dot`` (``DOT_FP32``; its BF16 dot
multiplies bit patterns; BF16 values are exact in FP32, so the products are the same), and a BF16
output is rounded to nearest even from the FP32 bits and stored as int16 bit patterns through a
descriptor on an int16 view of the output (``ROUND_BITS``; the interpreter's conversion
truncates). The number of SMs is ``config["NUM_SMS"]`` when given (tests use a small one so each
program runs several tiles), else the device's multiprocessor count (4 on CPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from nvfp4_megatron.kernels.gemm_alpha import bf16_bits_rne, mm_output

# tile configuration (see the module docstring). FLATTEN: one software-pipelined loop over all
# (tile, K step) pairs of a program (else each tile's K loop is pipelined on its own, draining at
# every tile). PROGRAMS_PER_SM: programs launched per SM (2 only fits small tiles: two CTAs of one
# SM then overlap one's epilogue with the other's main loop). NUM_SMS: None = the device's SM count
# (tests set a small one). None of these changes an output tile's accumulation order.
CONFIG = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, SUBTILE=True,
              FLATTEN=True, PROGRAMS_PER_SM=1, NUM_SMS=None)

_NUM_SMS: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


@triton.jit
def _tile_coords(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of linear tile index ``tile`` in grouped order (as ``mm_alpha``)."""
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % group_m, (tile % per_group) // group_m


@triton.jit
def _store_tile(c_desc, v, off_m, off_n, ROUND_BITS: tl.constexpr):
    if ROUND_BITS:  # interpreter, BF16 output: c_desc is on an int16 view (see bf16_bits_rne)
        c_desc.store([off_m, off_n], bf16_bits_rne(v))
    else:
        c_desc.store([off_m, off_n], v.to(c_desc.dtype))


@triton.jit
def _mm_alpha_persistent_kernel(a_desc, b_desc, c_desc, c_ptr, alpha_ptr, M, N, K, stride_cm,
                                HAS_ALPHA: tl.constexpr, DOT_FP32: tl.constexpr, ROUND_BITS: tl.constexpr,
                                A_T: tl.constexpr, B_T: tl.constexpr, C_TMA: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, SUBTILE: tl.constexpr,
                                FLATTEN: tl.constexpr):
    # a_desc: A [M, K] (block [BLOCK_M, BLOCK_K]), or with A_T its transpose [K, M] (block
    # [BLOCK_K, BLOCK_M]); b_desc: B [K, N] ([BLOCK_K, BLOCK_N]), or with B_T [N, K]
    # ([BLOCK_N, BLOCK_K]); c_desc: C [M, N] (block [BLOCK_M, BLOCK_N // 2] with SUBTILE, else
    # [BLOCK_M, BLOCK_N]) when C_TMA, else None and C is stored through c_ptr (row stride stride_cm)
    start = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_m * num_n
    if HAS_ALPHA:
        alpha = tl.load(alpha_ptr)
    # the epilogue recomputes its tile from its own counter rather than reusing the main loop's
    # coordinates (keeps the flattened pipeline's prologue and epilogue values separate)
    tile_out = start - NUM_SMS
    for tile in tl.range(start, num_tiles, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(k_tiles):
            off_k = kt * BLOCK_K
            if A_T:
                a = a_desc.load([off_k, off_m]).T
            else:
                a = a_desc.load([off_m, off_k])
            if B_T:
                b = b_desc.load([off_n, off_k]).T
            else:
                b = b_desc.load([off_k, off_n])
            if DOT_FP32:  # the CPU interpreter multiplies BF16 bit patterns as integers in tl.dot
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc)

        tile_out += NUM_SMS
        pid_m, pid_n = _tile_coords(tile_out, num_m, num_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        if HAS_ALPHA:
            acc = acc * alpha
        if C_TMA:
            if SUBTILE:
                halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
                lo, hi = tl.split(halves)
                _store_tile(c_desc, lo, off_m, off_n, ROUND_BITS)
                _store_tile(c_desc, hi, off_m, off_n + BLOCK_N // 2, ROUND_BITS)
            else:
                _store_tile(c_desc, acc, off_m, off_n, ROUND_BITS)
        else:
            rm = (off_m + tl.arange(0, BLOCK_M)).to(tl.int64)
            rn = off_n + tl.arange(0, BLOCK_N)
            mask = (rm[:, None] < M) & (rn[None, :] < N)
            c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :]
            if ROUND_BITS:
                tl.store(c_ptrs.to(tl.pointer_type(tl.int16)), bf16_bits_rne(acc), mask=mask)
            else:
                tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


def _tma_view(x: torch.Tensor, name: str, block_rows: int, block_cols: int) -> tuple[bool, TensorDescriptor]:
    """(transposed, descriptor) for reading the 2-D operand ``x`` [R, C] in [block_rows, block_cols]
    tiles through TMA, on ``x``'s own storage: a descriptor on ``x`` when its inner stride is 1,
    else on ``x.t()`` (block [block_cols, block_rows], the kernel transposes the tile) when its outer
    stride is 1; the other stride must be a multiple of 16 bytes and the base 16-byte aligned
    (TMA's rules). ``ValueError`` when neither works (the stride of a size-1 dimension is moot)."""
    es = x.element_size()
    for transposed, (rows, cols), (s_out, s_in) in ((False, x.shape, x.stride()),
                                                     (True, x.shape[::-1], x.stride()[::-1])):
        if (s_in == 1 or cols == 1) and (rows == 1 or (s_out * es) % 16 == 0) and x.data_ptr() % 16 == 0:
            block = [block_cols, block_rows] if transposed else [block_rows, block_cols]
            return transposed, TensorDescriptor(x, [rows, cols], [s_out if rows > 1 else 16 // es, 1], block)
    raise ValueError(f"mm_alpha_persistent: operand {name} {tuple(x.shape)} with strides {tuple(x.stride())} "
                     f"and base address {x.data_ptr():#x} cannot be read through TMA (it needs one unit-stride "
                     f"dimension, the other stride a multiple of 16 bytes and a 16-byte-aligned base); "
                     f"use gemm_alpha.mm_alpha, which takes any strides")


def mm_alpha_persistent(a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor | None,
                        out_dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    """``round_out_dtype(alpha * (a @ b))``: ``a`` [M, K] and ``b`` [K, N] BF16 with one unit-stride
    dimension each and the other stride a multiple of 16 bytes (else ``ValueError``), FP32
    accumulation, ``alpha`` an FP32 0-d device tensor or None. ``config`` overrides ``CONFIG``."""
    c, alpha = mm_output("mm_alpha_persistent", a, b, alpha, out_dtype)
    unknown = set(config or {}) - set(CONFIG)
    if unknown:
        raise ValueError(f"mm_alpha_persistent: unknown config keys {sorted(unknown)}")
    if c.numel() == 0:
        return c
    cfg = dict(CONFIG, **(config or {}))
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    (m, k), n = a.shape, b.shape[1]
    if k == 0:  # TMA needs non-empty extents; the empty sum is 0 (times alpha, as the kernel would)
        acc = torch.zeros((m, n), dtype=torch.float32, device=a.device)
        return c.copy_(acc * alpha if alpha is not None else acc)
    a_t, a_desc = _tma_view(a, "A", bm, bk)
    b_t, b_desc = _tma_view(b, "B", bk, bn)
    round_bits = not a.is_cuda and out_dtype == torch.bfloat16
    c_store = c.view(torch.int16) if round_bits else c
    c_tma = (n * c.element_size()) % 16 == 0 and c.data_ptr() % 16 == 0
    c_block = [bm, bn // 2 if cfg["SUBTILE"] else bn]
    c_desc = TensorDescriptor(c_store, [m, n], [n, 1], c_block) if c_tma else None
    num_sms = (cfg["NUM_SMS"] or _num_sms(a.device)) * cfg["PROGRAMS_PER_SM"]
    grid = (min(num_sms, triton.cdiv(m, bm) * triton.cdiv(n, bn)),)
    _mm_alpha_persistent_kernel[grid](
        a_desc, b_desc, c_desc, c_store, alpha if alpha is not None else c, m, n, k, c.stride(0),
        HAS_ALPHA=alpha is not None, DOT_FP32=not a.is_cuda, ROUND_BITS=round_bits, A_T=a_t, B_T=b_t,
        C_TMA=c_tma, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"], NUM_SMS=num_sms,
        SUBTILE=bool(cfg["SUBTILE"]), FLATTEN=bool(cfg["FLATTEN"]), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return c


def compile_sm90_launch(config: dict | None = None, out_dtype: str = "bf16", *, a_t: bool = False,
                        b_t: bool = True, c_tma: bool = True, has_alpha: bool = True):
    """``_mm_alpha_persistent_kernel`` compiled for sm_90 without a GPU (``kernels/sm90.py``), as
    ``mm_alpha_persistent`` would launch it with ``config`` on an H100/H200 (132 SMs): host tensor
    descriptors for A (``a_t``: A is the transpose of a [K, M] tensor), B (``b_t``: B is the
    transpose of an [N, K] tensor, as in Fprop/Wgrad; else [K, N], as in Dgrad) and, with ``c_tma``,
    C; ``out_dtype`` a Triton type name (bf16, fp16, fp32). For the SASS checks of tests and
    scripts (``sm90.sass_summary``)."""
    from nvfp4_megatron.kernels.sm90 import compile_sm90

    cfg = dict(CONFIG, **(config or {}))
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    cx = dict(HAS_ALPHA=has_alpha, DOT_FP32=False, ROUND_BITS=False, A_T=a_t, B_T=b_t, C_TMA=c_tma,
              BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"], NUM_SMS=(cfg["NUM_SMS"] or 132) * cfg["PROGRAMS_PER_SM"],
              SUBTILE=bool(cfg["SUBTILE"]), FLATTEN=bool(cfg["FLATTEN"]))
    c_block = (bm, bn // 2 if cfg["SUBTILE"] else bn)
    types = {"a_desc": f"tensordesc<bf16[{bk},{bm}]>" if a_t else f"tensordesc<bf16[{bm},{bk}]>",
             "b_desc": f"tensordesc<bf16[{bn},{bk}]>" if b_t else f"tensordesc<bf16[{bk},{bn}]>",
             "c_desc": f"tensordesc<{out_dtype}[{c_block[0]},{c_block[1]}]>", "c_ptr": f"*{out_dtype}",
             "alpha_ptr": "*fp32"}
    if not c_tma:
        cx["c_desc"] = None
    if not has_alpha:
        cx["alpha_ptr"] = None
    # as at run time: aligned pointers, and M, N, K, the row stride multiples of 16 on the target shapes
    aligned = [n for n in ("c_ptr", "alpha_ptr", "M", "N", "K", "stride_cm") if n not in cx]
    return compile_sm90(_mm_alpha_persistent_kernel, types,
                        dict(cx, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]),
                        divisible_by_16=aligned)
