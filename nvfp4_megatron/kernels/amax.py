"""Global amax reduction kernel (NVFP4 per-tensor scale, FP8 current scaling).

One pass over a 2-D view ``[R, C]`` (any strides, so a transposed view is read in place):
``max |x|`` or, with RHT signs, ``max |apply_rht(x)|`` over 16-element chunks of each row (the
post-RHT amax that the NVFP4 columnwise copy needs, DESIGN.md §1; the max of the transform
rounded to the input's dtype, DESIGN.md §RHT, which each program gets by rounding its unrounded
max once: rounding is monotone and symmetric). Each program
reduces ``ITERS`` tiles of ``BLOCK_R x 16G`` elements to the max of the FP32 bit patterns (int32,
order-preserving for ``|x|``, NaN propagates) and folds it into the result with one
``atomic_max`` on a zeroed int32 word (fewer programs, fewer atomics on one address). The result
is an FP32 0-d tensor on the input's device; nothing syncs with the host. Measured on the H200
(docs/PERFORMANCE.md, session 11): 108 us for 8192 x 20480 BF16 (75% of copy bandwidth), 134 us
post-RHT of its transpose.

``amax_2d_both``: the post-RHT amax and the plain ``max |x|`` of the same view from one read (the
quantized linear needs both of each activation and gradient: the row-wise Fprop/Dgrad copy takes
the plain amax, the RHT'd Wgrad copy of the transpose the post-RHT one). The plain max comes from
the loaded elements before the butterflies, each already multiplied by its RHT sign (±1, so its
magnitude is exact); both maxima are the same bits as the two single launches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nvfp4_megatron.kernels._common import abs_bits, load_tile_3d, rht16, round_to_input_dtype, tile_program

# Tile of BLOCK_R x (G x 16) elements, ITERS row-tiles per program (one atomic per program);
# COL_FASTEST: a 1-D grid whose consecutive programs take neighbouring column chunks.
# The default: 108 / 134 us (rowwise / post-RHT of x.t()) on the 8192 x 20480 BF16 tensor, against
# 112 / 151 us for the row-fastest [32x128 x8] tile before it (H200, PERFORMANCE.md, session 11).
DEFAULT_CONFIG = {"BLOCK_R": 32, "G": 8, "ITERS": 4, "num_warps": 4, "COL_FASTEST": 1}
# amax_2d_both: ITERS=2 (80 registers instead of 168): 131.4 us against 141.2 at ITERS=4 on the
# 8192 x 20480 tensor (H200, PERFORMANCE.md session 13), the two single launches 107.9 + 120.7
BOTH_CONFIG = dict(DEFAULT_CONFIG, ITERS=2)
CONFIGS = [
    {"BLOCK_R": 32, "G": 8, "ITERS": 8, "num_warps": 4, "COL_FASTEST": 0},
    {"BLOCK_R": 32, "G": 8, "ITERS": 8, "num_warps": 4, "COL_FASTEST": 1},
    {"BLOCK_R": 32, "G": 8, "ITERS": 4, "num_warps": 4, "COL_FASTEST": 1},
    {"BLOCK_R": 16, "G": 16, "ITERS": 16, "num_warps": 4, "COL_FASTEST": 0},
    {"BLOCK_R": 64, "G": 8, "ITERS": 4, "num_warps": 8, "COL_FASTEST": 0},
    {"BLOCK_R": 64, "G": 8, "ITERS": 4, "num_warps": 8, "COL_FASTEST": 1},
    {"BLOCK_R": 64, "G": 4, "ITERS": 4, "num_warps": 4, "COL_FASTEST": 0},
]


@triton.jit
def _amax_kernel(
    x_ptr, out_ptr, h_ptr, R, C, stride_r, stride_c,
    BLOCK_R: tl.constexpr, G: tl.constexpr, ITERS: tl.constexpr, RHT: tl.constexpr,
    COL_FASTEST: tl.constexpr, ON_GPU: tl.constexpr, BOTH: tl.constexpr = False,
):
    """``out_ptr[0]``: max |x| (post-RHT with ``RHT``); with ``BOTH`` (needs ``RHT``) also
    ``out_ptr[1]``: the plain max |x| of the same elements."""
    pid_r, pid_c = tile_program(tl.cdiv(C, 16 * G), COL_FASTEST)
    chunks = pid_c * G + tl.arange(0, G)
    running = tl.zeros([BLOCK_R, G, 16], dtype=tl.int32)
    plain = tl.zeros([BLOCK_R, G], dtype=tl.int32)  # axis 2 (the chunk) is in-thread: reduced per tile
    for i in tl.static_range(ITERS):
        rows = (pid_r * ITERS + i) * BLOCK_R + tl.arange(0, BLOCK_R)
        # the RHT output unrounded: the max below is rounded once instead
        if BOTH:
            mask2 = (rows < R)[:, None] & (chunks * 16 < C)[None, :]
            base = x_ptr + rows[:, None].to(tl.int64) * stride_r
            x, raw = rht16(base, chunks[None, :].to(tl.int64) * 16, stride_c, mask2, h_ptr, True)
            plain = tl.maximum(plain, tl.max(abs_bits(raw), axis=2))
        else:
            x = load_tile_3d(x_ptr, rows, chunks, stride_r, stride_c, R, C, h_ptr, 16, RHT, False)
        running = tl.maximum(running, abs_bits(x))
    if BOTH:
        tl.atomic_max(out_ptr + 1, tl.max(tl.max(plain, axis=1), axis=0))
    m = tl.max(tl.max(tl.max(running, axis=2), axis=1), axis=0)
    if RHT:
        # max |round(v)| = round(max |v|): rounding to the input dtype is monotone and symmetric
        # (NaN: the same payload either way), so one rounding of the program's max gives the
        # amax of the rounded transform (DESIGN.md §RHT)
        mf = round_to_input_dtype(m.to(tl.float32, bitcast=True), x_ptr.dtype.element_ty, ON_GPU)
        m = mf.to(tl.int32, bitcast=True)
    tl.atomic_max(out_ptr, m)


def _launch(x2d: torch.Tensor, signs_fp32: torch.Tensor | None, config: dict | None,
            both: bool) -> torch.Tensor:
    """int32 ``[2 if both else 1]`` maxima (FP32 bit patterns) of one launch."""
    rows, cols = x2d.shape
    out_i32 = torch.zeros(2 if both else 1, dtype=torch.int32, device=x2d.device)
    if x2d.numel() == 0:
        return out_i32
    rht = signs_fp32 is not None
    if rht and cols % 16 != 0:
        raise ValueError(f"amax_2d: rht needs the last dimension ({cols}) divisible by 16")
    h = signs_fp32 if rht else torch.empty(1, dtype=torch.float32, device=x2d.device)
    cfg = dict(DEFAULT_CONFIG, **(config or {}))
    n_r, n_c = triton.cdiv(rows, cfg["BLOCK_R"] * cfg["ITERS"]), triton.cdiv(cols, 16 * cfg["G"])
    grid = (n_r * n_c,) if cfg["COL_FASTEST"] else (n_r, n_c)
    _amax_kernel[grid](
        x2d, out_i32, h, rows, cols, x2d.stride(0), x2d.stride(1),
        BLOCK_R=cfg["BLOCK_R"], G=cfg["G"], ITERS=cfg["ITERS"], RHT=rht,
        COL_FASTEST=bool(cfg["COL_FASTEST"]), ON_GPU=x2d.is_cuda, BOTH=both, num_warps=cfg["num_warps"],
    )
    return out_i32


def amax_2d(x2d: torch.Tensor, *, signs_fp32: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """FP32 0-d ``max |x2d|``; with ``signs_fp32`` (16 RHT signs) the max of ``|apply_rht(x2d)|`` along dim 1."""
    return _launch(x2d, signs_fp32, config, both=False).view(torch.float32).reshape(())


def amax_2d_both(x2d: torch.Tensor, *, signs_fp32: torch.Tensor, config: dict | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(``max |apply_rht(x2d)|`` along dim 1, ``max |x2d|``), FP32 0-d each, from one read: the
    same bits as ``amax_2d`` with and without ``signs_fp32``."""
    out = _launch(x2d, signs_fp32, BOTH_CONFIG if config is None else config, both=True).view(torch.float32)
    return out[0], out[1]
