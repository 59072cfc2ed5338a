"""Benchmark the quantization kernels on the 12B model's FFN activation (8192 x 20480 BF16).

For each kernel: median time (``triton.testing.do_bench``), the bytes it must move (BF16 read
once, outputs written once), the achieved GB/s and its fraction of the device copy bandwidth
measured in the same run. The issue's targets: NVFP4 rowwise <= 0.125 ms, columnwise + RHT
<= 0.15 ms. A few tile configurations are swept for the NVFP4 kernels; the table shows each.
torchao, when importable, is timed too (its NVFP4 quantizer eager and under ``torch.compile``,
its MXFP8 quantizer compiled; note torchao's default MX scale rounds DOWN, ours UP).

    PYTHONPATH=. python3 scripts/bench_kernels.py [--rows 8192 --cols 20480] [--json out.json]

Needs only torch + Triton (no megatron/hydra), so it runs on a bare GPU image.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def _bench(fn, reps_ms=200):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=reps_ms, return_mode="median")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--cols", type=int, default=20480)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--no-sweep", action="store_true", help="default tile configs only")
    p.add_argument("--no-torchao", action="store_true", help="skip torchao even when it is importable")
    p.add_argument("--configs", default=None,
                   help="JSON list of NVFP4 tile settings to time (rowwise, columnwise+RHT, 2D, SR) "
                        "instead of the built-in sweep, e.g. '[{\"ITERS\": 4, \"BLOCK_R\": 16}]'")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU", file=sys.stderr)
        return 2

    from nvfp4_megatron import formats
    from nvfp4_megatron.kernels import amax as k_amax
    from nvfp4_megatron.kernels import fp8 as k_fp8
    from nvfp4_megatron.kernels import mx as k_mx
    from nvfp4_megatron.kernels import nvfp4 as k_nvfp4

    R, C = args.rows, args.cols
    n = R * C
    dev = torch.device("cuda")
    torch.manual_seed(0)
    x = torch.randn(R, C, device=dev, dtype=torch.bfloat16)
    xt = x.t()
    y = torch.empty_like(x)
    results = []

    t_copy = _bench(lambda: y.copy_(x))
    copy_gbs = 2 * n * 2 / t_copy / 1e6
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"copy {R}x{C} bf16: {t_copy * 1e3:.1f} us, {copy_gbs:.0f} GB/s (read + write)")

    nv_bytes = n * 2 + n // 2 + n // 16  # read BF16, write packed codes + E4M3 scales
    amax_row = k_amax.amax_2d(x)
    signs = torch.tensor(formats.DEFAULT_RHT_SIGNS, dtype=torch.float32, device=dev)
    amax_col = k_amax.amax_2d(xt, signs_fp32=signs)

    def add(name, fn, nbytes, target_ms=None):
        t = _bench(fn)
        gbs = nbytes / t / 1e6
        row = {"kernel": name, "ms": t, "GB/s": gbs, "frac_copy": gbs / copy_gbs, "target_ms": target_ms}
        results.append(row)
        tgt = f"  target {target_ms} ms: {'MET' if t <= target_ms else 'missed'} ({t / target_ms:.2f}x)" if target_ms else ""
        print(f"{name:58s} {t * 1e3:8.1f} us {gbs:7.0f} GB/s {100 * gbs / copy_gbs:5.1f}% copy{tgt}", flush=True)
        return t

    amax_ok = True
    for cfg in k_amax.CONFIGS if not args.no_sweep else [k_amax.DEFAULT_CONFIG]:
        tag = f"[{cfg['BLOCK_R']}x{cfg['G'] * 16} x{cfg['ITERS']} w{cfg['num_warps']}{' col-fastest' if cfg.get('COL_FASTEST') else ''}]"
        add(f"amax (global, rowwise) {tag}", lambda cfg=cfg: k_amax.amax_2d(x, config=cfg), n * 2)
        amax_ok &= torch.equal(k_amax.amax_2d(x, config=cfg), amax_row)
        add(f"amax (post-RHT along tokens, x.t()) {tag}",
            lambda cfg=cfg: k_amax.amax_2d(xt, signs_fp32=signs, config=cfg), n * 2)
        amax_ok &= torch.equal(k_amax.amax_2d(xt, signs_fp32=signs, config=cfg), amax_col)
    # both amaxes of the quantized linear's X / dY from one read (row-wise copy + RHT'd Wgrad copy),
    # against the two launches above
    for over in ({}, {"ITERS": 2}):
        cfg = dict(k_amax.DEFAULT_CONFIG, **over)
        tag = f"[{cfg['BLOCK_R']}x{cfg['G'] * 16} x{cfg['ITERS']} w{cfg['num_warps']}{' col-fastest' if cfg.get('COL_FASTEST') else ''}]"
        add(f"amax both (plain + post-RHT of x.t(), one read) {tag}",
            lambda cfg=cfg: k_amax.amax_2d_both(xt, signs_fp32=signs, config=cfg), n * 2)
        got_col, got_row = k_amax.amax_2d_both(xt, signs_fp32=signs, config=cfg)
        amax_ok &= torch.equal(got_col, amax_col) and torch.equal(got_row, amax_row)
    if not amax_ok:
        print("  !! a swept amax tile (or the one-read pair) gives another amax than the default tile", flush=True)

    # None: the product's default for the launch's mode (kernels.nvfp4.kernel_config); {}: the
    # base DEFAULT_CONFIG; other dicts: settings over the base
    row_cfgs = [None, {}]
    col_cfgs = [None, {}]
    given = json.loads(args.configs) if args.configs else None
    if given is not None:
        row_cfgs += given
        col_cfgs += given
    elif not args.no_sweep:
        row_cfgs += [  # elements per thread = BLOCK_R * G * 16 / (32 * num_warps)
            {"BLOCK_R": 16, "G": 16, "num_warps": 4},  # 32
            {"BLOCK_R": 64, "G": 8, "num_warps": 4},  # 64
            {"BLOCK_R": 32, "G": 8, "num_warps": 4, "HALF_LOADS": 0},  # 32, a block in two threads
            # grid order, row tiles per program (next tile prefetched)
            {"COL_FASTEST": 1},
            {"BLOCK_R": 16, "G": 16, "COL_FASTEST": 1},
            {"ITERS": 2, "COL_FASTEST": 1},
            {"ITERS": 4, "COL_FASTEST": 1},
            {"BLOCK_R": 16, "ITERS": 4, "COL_FASTEST": 1},
            {"HALF_LOADS": 0, "BLOCK_R": 16, "G": 16},
        ]
        col_cfgs += [  # columnwise: BLOCK_R runs along the contiguous (original column) axis
            {"BLOCK_R": 64, "G": 4, "num_warps": 4},
            {"BLOCK_R": 128, "G": 2, "num_warps": 4},
            {"BLOCK_R": 128, "G": 4, "num_warps": 8},
            {"BLOCK_R": 64, "G": 8, "num_warps": 8},
            {"COL_FASTEST": 1},
            {"ITERS": 2},
            {"BLOCK_R": 64, "G": 4, "ITERS": 2},
        ]

    def tag(cfg, tile=(1, 16), rht=False, sr=False):
        c = k_nvfp4.kernel_config(tile=tile, rht=rht, sr=sr, unit_stride=True, config=cfg)
        extra = "".join([" half-loads" if c["HALF_LOADS"] else "", f" x{c['ITERS']}" if c["ITERS"] != 1 else "",
                         " col-fastest" if c["COL_FASTEST"] else ""])
        return f"[{'default: ' if cfg is None else ''}{c['BLOCK_R']}x{c['G'] * 16} w{c['num_warps']}{extra}]"

    def same_bits(fn, cfg, ref):
        """Each swept tile must give the default tile's bytes (the GPU tests check the default)."""
        q = fn(cfg)
        ok = torch.equal(q.data, ref.data) and torch.equal(q.scale.view(torch.uint8), ref.scale.view(torch.uint8))
        results[-1]["same_bits_as_default"] = ok
        if not ok:
            print(f"  !! {tag(cfg)} gives other bits than the default tile", flush=True)
        return ok

    def row(cfg):
        return k_nvfp4.quantize_nvfp4(x, amax=amax_row, config=cfg)

    def col(cfg):
        return k_nvfp4.quantize_nvfp4(xt, rht=True, amax=amax_col, config=cfg)

    ref_row, ref_col = row(None), col(None)
    bits_ok = True
    for cfg in row_cfgs:
        add(f"nvfp4 rowwise 1x16, amax given {tag(cfg)}", lambda cfg=cfg: row(cfg), nv_bytes, 0.125)
        bits_ok &= same_bits(row, cfg, ref_row)
    for cfg in col_cfgs:
        add(f"nvfp4 columnwise+RHT (x.t()), amax given {tag(cfg, rht=True)}", lambda cfg=cfg: col(cfg), nv_bytes, 0.15)
        bits_ok &= same_bits(col, cfg, ref_col)
    add("nvfp4 rowwise 1x16 incl. amax pass", lambda: k_nvfp4.quantize_nvfp4(x), nv_bytes, 0.125)
    add("nvfp4 columnwise+RHT incl. post-RHT amax pass", lambda: k_nvfp4.quantize_nvfp4(xt, rht=True), nv_bytes, 0.15)
    add("nvfp4 columnwise no RHT (x.t()), amax given",
        lambda: k_nvfp4.quantize_nvfp4(xt, amax=amax_row), nv_bytes)
    for cfg in [None, {}] + (given if given is not None else [] if args.no_sweep else [{"COL_FASTEST": 1}, {"ITERS": 2, "COL_FASTEST": 1}]):
        if cfg is not None and dict(k_nvfp4.DEFAULT_CONFIG, **cfg)["BLOCK_R"] != 16:
            continue  # 16x16 tiles need BLOCK_R = 16 (kernels/nvfp4.kernel_config)
        add(f"nvfp4 2D 16x16 (weights), amax given {tag(cfg, tile=(16, 16))}",
            lambda cfg=cfg: k_nvfp4.quantize_nvfp4(x, tile=(16, 16), amax=amax_row, config=cfg), nv_bytes)
        bits_ok &= same_bits(lambda c: k_nvfp4.quantize_nvfp4(x, tile=(16, 16), amax=amax_row, config=c), cfg,
                             k_nvfp4.quantize_nvfp4(x, tile=(16, 16), amax=amax_row))
    seed = torch.tensor([1234], dtype=torch.int32, device=dev)
    for cfg in [None] + (given if given is not None else [] if args.no_sweep else [{"COL_FASTEST": 1}, {"ITERS": 2, "COL_FASTEST": 1}]):
        add(f"nvfp4 rowwise SR (Philox), amax given {tag(cfg, sr=True)}",
            lambda cfg=cfg: k_nvfp4.quantize_nvfp4(x, stochastic_rounding=True, amax=amax_row, seed=seed, config=cfg),
            nv_bytes)
        bits_ok &= same_bits(lambda c: k_nvfp4.quantize_nvfp4(x, stochastic_rounding=True, amax=amax_row, seed=seed,
                                                              config=c), cfg,
                             k_nvfp4.quantize_nvfp4(x, stochastic_rounding=True, amax=amax_row, seed=seed))
    add("nvfp4 columnwise+RHT+SR, amax given",
        lambda: k_nvfp4.quantize_nvfp4(xt, rht=True, stochastic_rounding=True, amax=amax_col), nv_bytes)
    for cfg in [k_mx.DEFAULT_CONFIG] + ([] if args.no_sweep else [{"BLOCK_R": 16, "G": 8, "num_warps": 4},
                                                                   {"BLOCK_R": 64, "G": 4, "num_warps": 8}]):
        add(f"mxfp8 e4m3 1x32 [{cfg['BLOCK_R']}x{cfg['G'] * 32} w{cfg['num_warps']}]",
            lambda cfg=cfg: k_mx.quantize_mx(x, torch.float8_e4m3fn, config=cfg), n * 2 + n + n // 32)
    add("fp8-cs e4m3 incl. amax pass", lambda: k_fp8.quantize_fp8_current(x, torch.float8_e4m3fn), n * 2 + n)
    add("fp8-cs e4m3 cast, amax given",
        lambda: k_fp8.quantize_fp8_current(x, torch.float8_e4m3fn, amax=amax_row), n * 2 + n)
    add("reference formats.quantize_nvfp4 (eager torch, GPU)", lambda: formats.quantize_nvfp4(x), nv_bytes)

    # the emulated NVFP4 GEMM's alpha pass on an FP32 GEMM output of this size: torch's multiply by
    # a 0-d tensor into BF16 (what quant/gemm.bf16_mm did) against the Triton pass it uses now
    from nvfp4_megatron.kernels.gemm_alpha import scale_by_alpha

    acc = torch.randn(R, C, device=dev)
    alpha_t = torch.tensor(0.3712345, device=dev)
    out_bf = torch.empty(R, C, device=dev, dtype=torch.bfloat16)
    add("alpha pass FP32 -> BF16: torch.mul(acc, 0-d alpha, out=bf16)",
        lambda: torch.mul(acc, alpha_t, out=out_bf), n * 6)
    add("alpha pass FP32 -> BF16: kernels.gemm_alpha.scale_by_alpha",
        lambda: scale_by_alpha(acc, alpha_t, torch.bfloat16), n * 6)
    if not torch.equal(scale_by_alpha(acc, alpha_t, torch.bfloat16), torch.mul(acc, alpha_t, out=out_bf)):
        bits_ok = False
        print("  !! scale_by_alpha differs from torch.mul", flush=True)
    del acc, out_bf

    if not args.no_torchao:
        try:
            from torchao.prototype.mx_formats.mx_tensor import MXTensor as AOMX
            from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor as AONVFP4
            from torchao.prototype.mx_formats.nvfp4_tensor import per_tensor_amax_to_scale

            def ao_nvfp4(t):
                return AONVFP4.to_nvfp4(t, per_tensor_scale=per_tensor_amax_to_scale(t.abs().amax()))

            add("torchao 0.17 NVFP4Tensor.to_nvfp4 + per-tensor scale, eager", lambda: ao_nvfp4(x), nv_bytes)
            ao_nvfp4_c = torch.compile(ao_nvfp4)
            add("torchao 0.17 NVFP4Tensor.to_nvfp4 + per-tensor scale, torch.compile", lambda: ao_nvfp4_c(x), nv_bytes)
            ao_mx_c = torch.compile(lambda t: AOMX.to_mx(t, torch.float8_e4m3fn, 32))
            add("torchao 0.17 MXTensor.to_mx e4m3 (FLOOR scales), torch.compile", lambda: ao_mx_c(x), n * 2 + n + n // 32)
        except Exception as e:  # torchao is optional; say why it was not timed
            print(f"torchao not timed: {type(e).__name__}: {str(e)[:200]}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_GBps": copy_gbs, "copy_ms": t_copy, "shape": [R, C],
                       "device": torch.cuda.get_device_name(), "swept_tiles_same_bits": bits_ok,
                       "swept_amax_tiles_same_amax": amax_ok,
                       "results": results}, f, indent=1)
    print(f"swept NVFP4 tiles give the default tile's bits: {bits_ok}; swept amax tiles the same amax: {amax_ok}")
    return 0 if bits_ok and amax_ok else 1


if __name__ == "__main__":
    sys.exit(main())
