"""The emulated formats' GEMM on the GPU: cuBLAS + the alpha pass against the Triton kernel.

For each GEMM of one 1.2B-shape block (d=2048, FFN 6144, 16 Q / 8 KV heads of 128, 8,192 tokens
per micro-batch): Fprop, Dgrad and Wgrad of QKV, the attention projection, FC1 and FC2, as the
quantized linear calls them (``a`` [M, K] contiguous; ``b`` read as [K, N]: the transpose of an
[N, K] copy for Fprop and Wgrad, and for Dgrad the 2D-tiled weight's Fprop copy [K, N] itself, as
in the paper's recipe), BF16 output with alpha. Times (CUDA events, median of ``--iters``) of ``quant.gemm.bf16_mm`` with
``cublas`` (``torch.mm`` to FP32, then ``alpha *`` into BF16) and of ``kernels.gemm_alpha.mm_alpha``
under each tile configuration in ``CONFIGS``.

Usage (GPU): ``python scripts/bench_gemm_alpha.py --json out.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

CONFIGS = {
    "128x128x64 w8 s3": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    "128x128x64 w4 s4": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    "128x256x64 w8 s3": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    "256x128x64 w8 s3": dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    "128x256x32 w8 s4": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=4),
}


def shapes(tokens: int = 8192, d: int = 2048, ffn: int = 6144, qkv: int = 4096):
    """(name, M, N, K) of Y = A·Bᵀ for Fprop (tokens x out x in), Dgrad (tokens x in x out) and
    Wgrad (out x in x tokens) of each linear."""
    out = []
    for lin, n_out, n_in in (("qkv", qkv, d), ("proj", d, d), ("fc1", ffn, d), ("fc2", d, ffn)):
        out += [(f"{lin} fprop", tokens, n_out, n_in), (f"{lin} dgrad", tokens, n_in, n_out),
                (f"{lin} wgrad", n_out, n_in, tokens)]
    return out


def _time(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def main() -> int:
    from nvfp4_megatron.kernels.gemm_alpha import mm_alpha
    from nvfp4_megatron.quant import gemm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    gemm.set_emulated_mm("cublas")
    alpha = torch.tensor(0.00137, device="cuda")
    rows, totals = [], {"cublas": 0.0, **{c: 0.0 for c in CONFIGS}}
    for name, m, n, k in shapes():
        a = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        if name.endswith("dgrad"):
            bt = torch.randn(k, n, device="cuda").to(torch.bfloat16)
        else:
            bt = torch.randn(n, k, device="cuda").to(torch.bfloat16).t()
        row = {"gemm": name, "M": m, "N": n, "K": k, "b_layout": "KxN" if bt.is_contiguous() else "NxK^T",
               "cublas_ms": _time(lambda: gemm.bf16_mm(a, bt, alpha, torch.bfloat16), args.iters)}
        totals["cublas"] += row["cublas_ms"]
        for cname, cfg in CONFIGS.items():
            row[cname] = _time(lambda: mm_alpha(a, bt, alpha, torch.bfloat16, cfg), args.iters)
            totals[cname] += row[cname]
        rows.append(row)
        best = min(CONFIGS, key=lambda c: row[c])
        tflops = 2 * m * n * k / row[best] / 1e9
        print(f"{name:12s} {m}x{n}x{k}: cublas+alpha {row['cublas_ms']:.3f} ms, best triton "
              f"{row[best]:.3f} ms ({best}, {tflops:.0f} TFLOP/s)", flush=True)
    print("sum over one block's 12 GEMMs (ms): "
          + ", ".join(f"{k} {v:.3f}" for k, v in totals.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "rows": rows, "totals_ms": totals}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
