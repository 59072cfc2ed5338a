"""NVFP4 quantization kernel (arXiv 2509.25149 §2, App. B): 1x16 or 16x16 blocks, RHT, RNE or SR.

Same math and evaluation order as ``formats.nvfp4`` (DESIGN.md §1), in two launches:

1. ``kernels.amax.amax_2d``: the global amax (post-RHT when ``rht``), unless the caller passes a
   pre-reduced ``amax``.
2. ``_nvfp4_kernel``: each program takes a tile of ``BLOCK_R`` rows x ``G`` blocks of 16 columns,
   (optionally) applies the RHT and rounds its output to the input's dtype (DESIGN.md §RHT),
   computes ``S_enc = min(2688 / amax, FLT_MAX)`` (1 if amax is 0 or not finite) and
   ``S_dec = 1 / S_enc`` from the amax in device memory, the block amax
   (16x16 tiles: the max over 16 rows, replicated), the E4M3 block scale
   ``s_b = e4m3(amax_b * (S_enc * fp32(1/6)))``, ``enc_b = min(1 / (s_b * S_dec), FLT_MAX)``,
   the E2M1 codes of ``clamp(x * enc_b, -6, 6)``, and writes two codes a byte plus the scale byte.

Tiles are held chunk-major (``[G, BR, ...]``): with Triton's choice of thread order the threads
of a warp then hold neighbouring blocks of a row, which is also the order of the code and scale
stores, so for unit-stride input both stores go out from the compute layout without a round trip
through shared memory (sm_90: no shared memory and no barriers in the 1x16 and SR kernels).
Each half-block's 8 codes are written as one int32 word. With ``HALF_LOADS`` (the default; used for
unit-stride input without RHT) each thread holds whole 16-blocks (two 8-element loads with one
layout), so the block amax and scale are computed once per block without shuffles. The E2M1
encoder (``_common.e2m1_rne_code``) and the block max use integer multiply-adds and ``max.NaN``
rather than compare/select chains: on the H200 the old kernel was bound by the ALU pipe's issue
rate, not by memory (PERFORMANCE.md, "The NVFP4 quantizer off the ALU pipe"). On the GPU the E4M3
block scale comes from the hardware ``cvt.rn.satfinite.e4m3x2.f32`` (``_block_scale``). A program
may take several row tiles (``ITERS``), loading each next tile before it encodes the current one;
the tile settings of each mode (1x16, 16x16, RHT, SR) are the fastest measured (``kernel_config``).

Columnwise (Wgrad) copies: pass the transposed view ``x.t()``; the kernel reads it in place
through its strides (no transpose copy), blocks run along the token dimension, and the RHT mixes
16 consecutive tokens.

Stochastic rounding: 24-bit uniforms from Philox4x32-10 (``tl.randint4x``: counter-based, so the
same seed gives the same codes for any tile shape or grid), one call per 4 elements, the seed
read from device memory: an explicit ``seed`` tensor (the training path, ``quant.state.sr_seed_tensor``,
which a CUDA graph can replay with new seeds) or one drawn from ``generator``; or, for
draw-for-draw tests against the reference, an explicit ``rand`` tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nvfp4_megatron.formats.nvfp4 import NVFP4Quantized
from nvfp4_megatron.formats.rht import hadamard_signs
from nvfp4_megatron.kernels._common import (
    FP32_MAX,
    e2m1_rne_code,
    e2m1_sr_code,
    load_tile_3d,
    max_nan,
    max_nan_reduce,
    rht_signs_on,
    round_fp8,
    tile_program,
)
from nvfp4_megatron.kernels.amax import amax_2d

# Tile shape: BLOCK_R rows x (G x 16) columns. 32 x 128 reads 8 KiB of BF16 per tile.
# HALF_LOADS (used only for unit-stride input without RHT): 0 = one 16-wide tile load, the 16
# elements of a block in two threads; 1 = two 8-wide loads per block, so each thread holds whole
# blocks (scale computed once per block, no shuffles) at the price of half-sector loads: 143 us
# against 158 us on the 8192 x 20480 tensor (H200, PERFORMANCE.md, "The NVFP4 quantizer off the
# ALU pipe"), with 8-byte word stores (with two 4-byte stores per block it took 392 us).
# ITERS: row tiles per program, each next tile's load issued before the current one is encoded;
# COL_FASTEST: a 1-D grid whose consecutive programs take neighbouring column chunks (so the
# programs in flight read whole rows) instead of neighbouring row tiles. Neither changes the bytes.
# (Evict-first loads with streaming stores were measured too: 16-22 us slower, so not offered.)
DEFAULT_CONFIG = {"BLOCK_R": 32, "G": 8, "num_warps": 4, "HALF_LOADS": 1, "ITERS": 1, "COL_FASTEST": 0}
# Per-mode changes to DEFAULT_CONFIG, the fastest settings of the H200 sweeps (8192 x 20480 BF16,
# PERFORMANCE.md, "The quantizer's memory side", session 11; every setting gives the same bytes):
# 1x16 RNE of unit-stride input without RHT 126.7 us (144.5 with DEFAULT_CONFIG), 16x16 151.7
# (158.0), RHT without SR 199.0 (213.0). SR keeps DEFAULT_CONFIG (312 us; the others were slower).
MODE_CONFIGS = {
    "rowwise": {"BLOCK_R": 8, "G": 16, "ITERS": 8, "COL_FASTEST": 1},
    "2d": {"BLOCK_R": 16, "num_warps": 2, "ITERS": 4, "COL_FASTEST": 1},
    "rht": {"ITERS": 2},
}


def kernel_config(*, tile: tuple[int, int], rht: bool, sr: bool, unit_stride: bool,
                  config: dict | None = None) -> dict:
    """The tile settings of one launch: ``config`` over ``DEFAULT_CONFIG`` when given (a sweep or a
    test names every setting it wants), else the measured default of the launch's mode."""
    if config is not None:
        cfg = dict(DEFAULT_CONFIG, **config)
        if tile[0] != 1 and cfg["BLOCK_R"] != tile[0]:
            raise ValueError(f"kernel config BLOCK_R={cfg['BLOCK_R']} with {tile[0]}x16 tiles: use "
                             f"BLOCK_R={tile[0]} (a program holding several tile rows gave wrong "
                             "codes on the H200, PERFORMANCE.md session 13)")
        return cfg
    if tile[0] != 1:  # one tile row per program (see above), also with SR
        return dict(DEFAULT_CONFIG, **dict(MODE_CONFIGS["2d"], BLOCK_R=tile[0]))
    mode = None
    if not sr:
        if rht:
            mode = "rht"
        elif unit_stride:
            mode = "rowwise"
    return dict(DEFAULT_CONFIG, **MODE_CONFIGS.get(mode, {}))


@triton.jit
def _load_half(ptr, rows, chunks, R, C, stride_r, HALF: tl.constexpr, other):
    """Elements ``8*HALF .. 8*HALF+7`` of each 16-block of a unit-stride tile, FP32 ``[G, BR, 8]``
    (one 16-byte load per block for BF16; both halves get one layout)."""
    cols = chunks[:, None, None].to(tl.int64) * 16 + 8 * HALF + tl.arange(0, 8)[None, None, :]
    mask = (rows < R)[None, :, None] & (cols < C)
    return tl.load(ptr + rows[None, :, None].to(tl.int64) * stride_r + cols, mask=mask, other=other).to(tl.float32)


@triton.jit
def _sr_uniforms(seed_ptr, rows, chunks, C, WIDTH: tl.constexpr, HALF: tl.constexpr):
    """24-bit uniforms for ``WIDTH`` (16 or 8) elements from element ``8*HALF`` of each block: one
    Philox4x32 call per 4 elements, counter = (element index) // 4, element ``4c + 2i + j`` gets
    word ``2j + i`` of counter ``c`` (a fixed permutation inside each group of 4)."""
    q = tl.arange(0, WIDTH // 4)
    ctr = rows[None, :, None].to(tl.int64) * (C // 4) + chunks[:, None, None] * 4 + 2 * HALF + q[None, None, :]
    r0, r1, r2, r3 = tl.randint4x(tl.load(seed_ptr), ctr)
    words = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), [chunks.shape[0], rows.shape[0], WIDTH])
    return (words >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2^-24


@triton.jit
def _pack8(codes):
    """E2M1 codes ``[A, B, 8]`` -> one int32 word per group of 8: element ``k`` in bits
    ``4k..4k+3`` (in little-endian bytes: element 2i in the low nibble of byte i)."""
    shift = tl.arange(0, 8) * 4
    return tl.sum(codes << shift[None, None, :], axis=2)


@triton.jit
def _block_scale(v, ON_GPU: tl.constexpr):
    """E4M3 block scale of FP32 ``v >= 0`` (or NaN): (byte, value as FP32), RNE with saturation.

    On the GPU the hardware ``cvt.rn.satfinite.e4m3x2.f32`` (sm_89+) and the exact E4M3 -> FP32
    convert; under the interpreter the integer rounding of ``round_fp8``. Same bytes: RNE,
    saturation to 448, subnormals, and NaN -> 0x7F (``v`` is a max of ``|x|`` times a positive
    scale, so it is never negative and a NaN here is the positive canonical one).
    """
    if ON_GPU:
        s8 = v.to(tl.float8e4nv)
        return s8.to(tl.uint8, bitcast=True).to(tl.int32), s8.to(tl.float32)
    else:
        return round_fp8(v, 3, -6, 448.0)


@triton.jit
def _codes(y, u, SR: tl.constexpr, ON_GPU: tl.constexpr):
    if SR:
        return e2m1_sr_code(y, u, not ON_GPU)
    else:
        return e2m1_rne_code(y, not ON_GPU)


@triton.jit
def _load_tile(x_ptr, h_ptr, rows, chunks, R, C, stride_r, stride_c, RHT: tl.constexpr,
               HALF_LOADS: tl.constexpr, ON_GPU: tl.constexpr):
    """The input tile, chunk-major: with ``HALF_LOADS`` its two half-blocks ``[G, BR, 8]``, else
    ``[G, BR, 16]`` twice."""
    if HALF_LOADS:
        xa = _load_half(x_ptr, rows, chunks, R, C, stride_r, 0, 0.0)
        xb = _load_half(x_ptr, rows, chunks, R, C, stride_r, 1, 0.0)
    else:
        xa = tl.permute(load_tile_3d(x_ptr, rows, chunks, stride_r, stride_c, R, C, h_ptr, 16, RHT, True, ON_GPU),
                        (1, 0, 2))
        xb = xa
    return xa, xb


@triton.jit
def _quantize_tile(
    xa, xb, rows, chunks, s_enc, s_dec, rand_ptr, seed_ptr, data_ptr, scale_ptr, R, C,
    BLOCK_R: tl.constexpr, G: tl.constexpr, TILE_R: tl.constexpr, SR: tl.constexpr,
    RAND_TENSOR: tl.constexpr, ON_GPU: tl.constexpr, HALF_LOADS: tl.constexpr,
):
    """Block scales and codes of one loaded tile (``_load_tile``), stored."""
    # Block amax (NaN propagates), then 16x16 tiles take the max over 16 rows.
    if HALF_LOADS:
        bmax = max_nan(max_nan_reduce(tl.abs(xa), 2), max_nan_reduce(tl.abs(xb), 2))
    else:
        bmax = max_nan_reduce(tl.abs(xa), 2)
    if TILE_R != 1:
        t = max_nan_reduce(tl.reshape(bmax, [G, BLOCK_R // TILE_R, TILE_R]), 2)
        bmax = tl.reshape(
            tl.broadcast_to(tl.reshape(t, [G, BLOCK_R // TILE_R, 1]), [G, BLOCK_R // TILE_R, TILE_R]),
            [G, BLOCK_R],
        )

    sb_code, sb_val = _block_scale(bmax * (s_enc * 0.16666666666666666), ON_GPU)
    enc = tl.minimum(tl.div_rn(1.0, sb_val * s_dec), FP32_MAX, propagate_nan=tl.PropagateNan.ALL)

    # Codes of x * enc (the clamp to [-6, 6] happens inside the E2M1 encoders), packed eight to
    # an int32 word: two words per block ``[G, BR, 2]``, word h holding elements 8h..8h+7.
    if HALF_LOADS:
        ua = xa  # not read unless SR
        ub = xb
        if SR:
            if RAND_TENSOR:
                ua = _load_half(rand_ptr, rows, chunks, R, C, C, 0, 1.0)
                ub = _load_half(rand_ptr, rows, chunks, R, C, C, 1, 1.0)
            else:
                ua = _sr_uniforms(seed_ptr, rows, chunks, C, 8, 0)
                ub = _sr_uniforms(seed_ptr, rows, chunks, C, 8, 1)
        wa = _pack8(_codes(xa * enc[:, :, None], ua, SR, ON_GPU))
        wb = _pack8(_codes(xb * enc[:, :, None], ub, SR, ON_GPU))
        words = tl.join(wa, wb)
    else:
        u = xa  # not read unless SR
        if SR:
            if RAND_TENSOR:
                u = tl.permute(load_tile_3d(rand_ptr, rows, chunks, C, 1, R, C, rand_ptr, 16, False), (1, 0, 2))
            else:
                u = _sr_uniforms(seed_ptr, rows, chunks, C, 16, 0)
        c = _codes(xa * enc[:, :, None], u, SR, ON_GPU)
        words = tl.reshape(_pack8(tl.reshape(c, [G, 2 * BLOCK_R, 8])), [G, BLOCK_R, 2])

    # Chunk-major tiles, so a warp's threads hold neighbouring blocks of one row and both stores
    # go out from the compute layout (row-major tiles went through shared memory first).
    mask = (rows < R)[None, :] & (chunks < C // 16)[:, None]
    woff = rows[None, :, None].to(tl.int64) * (C // 8) + 2 * chunks[:, None, None] + tl.arange(0, 2)[None, None, :]
    tl.store(data_ptr.to(tl.pointer_type(tl.int32)) + woff, words, mask=mask[:, :, None])
    tl.store(scale_ptr + rows[None, :].to(tl.int64) * (C // 16) + chunks[:, None], sb_code.to(tl.uint8), mask=mask)


@triton.jit
def _nvfp4_kernel(
    x_ptr, h_ptr, amax_ptr, rand_ptr, seed_ptr,
    data_ptr, scale_ptr, gscale_ptr,
    R, C, stride_r, stride_c,
    BLOCK_R: tl.constexpr, G: tl.constexpr, TILE_R: tl.constexpr,
    RHT: tl.constexpr, SR: tl.constexpr, RAND_TENSOR: tl.constexpr, ON_GPU: tl.constexpr,
    HALF_LOADS: tl.constexpr, ITERS: tl.constexpr, COL_FASTEST: tl.constexpr,
):
    pid_r, pid_c = tile_program(tl.cdiv(C // 16, G), COL_FASTEST)
    chunks = pid_c * G + tl.arange(0, G)

    # Global scales, exactly as formats.nvfp4.nvfp4_global_scales.
    amax = tl.load(amax_ptr)
    valid = (amax > 0.0) & (amax <= FP32_MAX)
    s_enc = tl.minimum(tl.div_rn(2688.0, tl.where(valid, amax, 1.0)), FP32_MAX)
    s_enc = tl.where(valid, s_enc, 1.0)
    s_dec = tl.div_rn(1.0, s_enc)
    if (pid_r == 0) & (pid_c == 0):
        tl.store(gscale_ptr, s_enc)
        tl.store(gscale_ptr + 1, s_dec)

    # ITERS row tiles, the next tile's load issued before the current tile is encoded and stored.
    rows = pid_r * (ITERS * BLOCK_R) + tl.arange(0, BLOCK_R)
    xa, xb = _load_tile(x_ptr, h_ptr, rows, chunks, R, C, stride_r, stride_c, RHT, HALF_LOADS, ON_GPU)
    for i in tl.static_range(ITERS):
        if i + 1 < ITERS:
            na, nb = _load_tile(x_ptr, h_ptr, rows + BLOCK_R, chunks, R, C, stride_r, stride_c, RHT,
                                HALF_LOADS, ON_GPU)
        _quantize_tile(xa, xb, rows, chunks, s_enc, s_dec, rand_ptr, seed_ptr, data_ptr,
                       scale_ptr, R, C, BLOCK_R, G, TILE_R, SR, RAND_TENSOR, ON_GPU, HALF_LOADS)
        if i + 1 < ITERS:
            xa = na
            xb = nb
            rows += BLOCK_R


def _seed_from_generator(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """One int32 Philox seed on ``device``, drawn from ``generator`` (default: torch's)."""
    gen_device = generator.device if generator is not None else device
    seed = torch.randint(0, 2**31 - 1, (1,), generator=generator, device=gen_device, dtype=torch.int64)
    return seed.to(device=device, dtype=torch.int32)


def check_seed_tensor(seed: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An explicit Philox seed: int32, one element, on the quantized tensor's device (read by the
    kernel from memory, so a CUDA graph replays it with whatever the slot holds then)."""
    if not (isinstance(seed, torch.Tensor) and seed.dtype == torch.int32 and seed.numel() == 1
            and seed.device == device):
        raise ValueError(f"seed must be a one-element int32 tensor on {device}, got "
                         f"{getattr(seed, 'dtype', type(seed))} {tuple(getattr(seed, 'shape', ()))} "
                         f"on {getattr(seed, 'device', '?')}")
    return seed


def quantize_nvfp4_2d(
    x2d: torch.Tensor,
    *,
    tile: tuple[int, int],
    rht: bool,
    rht_signs,
    stochastic_rounding: bool,
    generator: torch.Generator | None,
    rand: torch.Tensor | None,
    amax: torch.Tensor | None,
    config: dict | None = None,
    seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel launch on a validated 2-D view: (data, scale_u8, amax, s_enc, s_dec)."""
    cfg = kernel_config(tile=tile, rht=rht, sr=stochastic_rounding, unit_stride=x2d.stride(1) == 1,
                        config=config)
    rows, cols = x2d.shape
    dev = x2d.device
    h = rht_signs_on(dev, rht_signs) if rht else None
    amax_fp32 = amax_2d(x2d, signs_fp32=h, config=cfg.get("amax_config")) if amax is None else amax
    data = torch.empty(rows, cols // 2, dtype=torch.uint8, device=dev)
    scale = torch.empty(rows, cols // 16, dtype=torch.uint8, device=dev)
    gscale = torch.empty(2, dtype=torch.float32, device=dev)
    if rows == 0 or cols == 0:
        from nvfp4_megatron.formats.nvfp4 import nvfp4_global_scales

        s_enc, s_dec = nvfp4_global_scales(amax_fp32)
        return data, scale, amax_fp32, s_enc, s_dec
    dummy_f = torch.empty(1, dtype=torch.float32, device=dev)
    rand_c, seed_c = dummy_f, data  # not read unless SR draws with the kernel's Philox
    if stochastic_rounding:
        if rand is not None:
            rand_c = rand.to(device=dev, dtype=torch.float32).reshape(rows, cols).contiguous()
        elif seed is not None:
            seed_c = check_seed_tensor(seed, dev)
        else:
            seed_c = _seed_from_generator(generator, dev)
    block_r = cfg["BLOCK_R"]
    n_r, n_c = triton.cdiv(rows, block_r * cfg["ITERS"]), triton.cdiv(cols // 16, cfg["G"])
    grid = (n_r * n_c,) if cfg["COL_FASTEST"] else (n_r, n_c)
    _nvfp4_kernel[grid](
        x2d, h if rht else dummy_f, amax_fp32.reshape(1), rand_c, seed_c,
        data, scale, gscale,
        rows, cols, x2d.stride(0), x2d.stride(1),
        BLOCK_R=block_r, G=cfg["G"], TILE_R=tile[0],
        RHT=rht, SR=stochastic_rounding, RAND_TENSOR=stochastic_rounding and rand is not None,
        ON_GPU=x2d.is_cuda, HALF_LOADS=bool(cfg["HALF_LOADS"]) and not rht and x2d.stride(1) == 1,
        ITERS=cfg["ITERS"], COL_FASTEST=bool(cfg["COL_FASTEST"]),
        num_warps=cfg["num_warps"],
    )
    return data, scale, amax_fp32, gscale[0], gscale[1]


def as_2d(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[prod(shape[:-1]), shape[-1]]``, a view when the strides allow (transposes included)."""
    if x.dim() == 2:
        return x
    if x.dim() == 1:
        return x.reshape(1, -1)
    return x.reshape(-1, x.shape[-1])


def quantize_nvfp4(
    x: torch.Tensor,
    *,
    tile: tuple[int, int] = (1, 16),
    rht: bool = False,
    rht_signs=None,
    stochastic_rounding: bool = False,
    generator: torch.Generator | None = None,
    rand: torch.Tensor | None = None,
    amax: torch.Tensor | float | None = None,
    config: dict | None = None,
    seed: torch.Tensor | None = None,
) -> NVFP4Quantized:
    """Triton twin of ``formats.quantize_nvfp4`` (same arguments, same ``NVFP4Quantized``, same bits for RNE)."""
    from nvfp4_megatron.formats.inputs import amax_tensor
    from nvfp4_megatron.formats.nvfp4 import check_nvfp4_args

    tile, rows, k = check_nvfp4_args(x, tile=tile, stochastic_rounding=stochastic_rounding,
                                     generator=generator, rand=rand)
    amax_fp32 = None if amax is None else amax_tensor(amax, device=x.device)
    signs = tuple(int(v) for v in hadamard_signs(rht_signs)) if rht else None
    data, scale, amax_fp32, s_enc, s_dec = quantize_nvfp4_2d(
        as_2d(x), tile=tile, rht=rht, rht_signs=rht_signs, stochastic_rounding=stochastic_rounding,
        generator=generator, rand=rand, amax=amax_fp32, config=config, seed=seed,
    )
    lead = tuple(x.shape[:-1])
    return NVFP4Quantized(
        data=data.reshape(*lead, k // 2),
        scale=scale.view(torch.float8_e4m3fn).reshape(*lead, k // 16),
        amax=amax_fp32.reshape(()),
        scale_enc=s_enc.reshape(()),
        scale_dec=s_dec.reshape(()),
        shape=torch.Size(x.shape),
        tile=tile,  # type: ignore[arg-type]
        rht=bool(rht),
        rht_signs=signs,
    )
