"""Per-layer benchmark of the hybrid model: forward + backward time and peak memory of ONE layer
of each kind (``M`` Mamba-2, ``*`` attention, ``-`` MLP) per precision recipe, and the SSD scan
alone, eager against ``torch.compile``.

Measures the product: each layer is built by ``training.model.build_model`` (the training
builder: Megatron's ``HybridModel`` with the project's local hybrid spec and the precision policy)
from a config composed like ``pretrain.py``'s: ``--recipe-yaml`` (default ``nvfp4_12b``, the 12B
shape: d=5120, Mamba 128 heads x 80, 8 groups, state 128, conv 4; 40 Q / 8 KV heads of 128; FFN
20480 squared-ReLU) with ``model.num_layers=1``, ``model.hybrid_override_pattern=<kind>``, one GPU
(TP = CP = PP = 1), ``precision.recipe=R`` and no BF16 blocks (the layer is quantized), BF16
parameters. The layer (``model.decoder.layers[0]``) runs on random BF16 hidden states
``[seq, micro_batch, d]``; the embedding and LM head are built but not timed.

Per (recipe, kind): ``--warmup`` then ``--steps`` timed iterations; each times the forward and
the backward separately (CUDA-synchronised wall clock; the medians are reported). Peak memory:
``torch.cuda.max_memory_allocated`` over the timed iterations minus what was allocated before
them (the layer's weights, its gradients after the first iteration, the input): the activations
and workspaces of one layer. The Mamba layer uses ``--layer-scan`` (eager or compiled).

Scan: ``nvfp4_megatron.ssm.mamba_chunk_scan_combined`` at the layer's shapes (``x [b, L, H, P]``,
``B/C [b, L, G, N]``, chunk 128, D, dt_bias, softplus as the mixer calls it), BF16 inputs,
forward + backward, eager and ``torch.compile``'d (``model.mamba_scan=compiled``); the first
compiled call (compilation) is reported apart.

Writes ``--json PATH``: ``meta``, ``layers`` (one row per recipe and kind), ``scan``, and
``layer_times``: the measured forward+backward milliseconds per layer kind and recipe in the
format ``parallel/planner.py`` reads (``planner.layer_times=PATH``, docs/planner.md).

Usage (H200): ``python scripts/bench_layer.py --json $OUT/layers.json``. A CPU smoke run at tiny
width: ``python scripts/bench_layer.py --device cpu --recipes bf16,nvfp4 --scan eager
--recipe-yaml nvfp4_hybrid_tiny --seq 64 --steps 1 --warmup 0``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch

KIND_NAMES = {"M": "mamba", "*": "attention", "-": "mlp"}


def compose(args, recipe: str, kind: str, scan: str) -> dict:
    from nvfp4_megatron.cli.compose import compose_config, to_plain

    overrides = [f"+recipe={args.recipe_yaml}", f"precision.recipe={recipe}",
                 "model.num_layers=1", f"model.hybrid_override_pattern={kind}",
                 f"model.seq_length={args.seq}", f"model.vocab_size={args.vocab}",
                 f"model.mamba_scan={scan}",
                 "parallel.tensor_model_parallel_size=1", "parallel.context_parallel_size=1",
                 "parallel.pipeline_model_parallel_size=1", "parallel.sequence_parallel=false",
                 "precision.bf16_first_blocks=0", "precision.bf16_last_blocks=0",
                 "precision.bf16_blocks=[]", "precision.switch_to_bf16.at_tokens=null",
                 f"train.micro_batch_size={args.micro_batch}",
                 f"train.global_batch_size={args.micro_batch}", "train.train_iters=1000",
                 "train.train_tokens=null", f"train.bf16={str(args.dtype == 'bf16').lower()}",
                 *args.set]
    return to_plain(compose_config(overrides))


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _peak_start(dev: torch.device) -> int:
    if dev.type != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _peak_mib(dev: torch.device, base: int) -> float | None:
    return None if dev.type != "cuda" else (torch.cuda.max_memory_allocated() - base) / 2**20


def time_fwd_bwd(fn, dev: torch.device, warmup: int, steps: int):
    """``fn()`` -> (output, grad for it); forward and backward timed apart. Returns the medians
    in ms (fwd, bwd, total), every total, and the peak MiB above the pre-timing allocation."""
    for _ in range(warmup):
        out, g = fn()
        out.backward(g)
    base = _peak_start(dev)
    fwd, bwd = [], []
    for _ in range(steps):
        _sync(dev)
        t0 = time.perf_counter()
        out, g = fn()
        _sync(dev)
        t1 = time.perf_counter()
        out.backward(g)
        _sync(dev)
        t2 = time.perf_counter()
        fwd.append((t1 - t0) * 1e3)
        bwd.append((t2 - t1) * 1e3)
        del out, g
    tot = [a + b for a, b in zip(fwd, bwd)]
    return (statistics.median(fwd), statistics.median(bwd), statistics.median(tot), tot,
            _peak_mib(dev, base))


def bench_layer(args, recipe: str, kind: str, dev: torch.device, log) -> dict:
    from nvfp4_megatron.quant import state as qstate
    from nvfp4_megatron.training.model import build_model, recipe_from_config

    qstate.reset_state()
    scan = args.layer_scan if kind == "M" else "eager"
    cfg = compose(args, recipe, kind, scan)
    model, config, table = build_model(cfg, recipe_from_config(cfg["precision"]),
                                       log=lambda msg: None)
    model.to(dev)
    layer = model.decoder.layers[0]
    d, s, b = cfg["model"]["hidden_size"], args.seq, args.micro_batch
    dtype = config.params_dtype
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(s, b, d, device=dev, dtype=dtype, generator=gen).requires_grad_(True)
    gy = torch.randn(s, b, d, device=dev, dtype=dtype, generator=gen)
    step = [0]

    def fn():
        qstate.set_step(step[0])
        step[0] += 1
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        out = layer(hidden_states=x, attention_mask=None)
        return (out[0] if isinstance(out, tuple) else out), gy

    fwd, bwd, tot, all_ms, peak = time_fwd_bwd(fn, dev, args.warmup, args.steps)
    quantized = [r.layer for r in table.rows if r.quantized and r.gemm == "fprop"]
    row = {"recipe": recipe, "kind": kind, "layer": KIND_NAMES[kind], "scan": scan,
           "module": type(layer).__name__, "params": sum(p.numel() for p in layer.parameters()),
           "quantized_linears": sorted(set(quantized)), "fwd_ms": fwd, "bwd_ms": bwd,
           "fwd_bwd_ms": tot, "fwd_bwd_ms_all": all_ms, "peak_mib": peak,
           "gemm_kernels": sorted({r.backend for r in table.rows if r.quantized})}
    log(f"[{recipe} {KIND_NAMES[kind]}] fwd {fwd:.2f} ms, bwd {bwd:.2f} ms, fwd+bwd {tot:.2f} "
        f"ms, peak {'-' if peak is None else f'{peak:.0f} MiB'}")
    del model, layer, x, gy, table
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


def bench_scan(args, impl: str, dev: torch.device, log) -> dict:
    from nvfp4_megatron.ssm import chunk_scan_fn

    from nvfp4_megatron.cli.compose import compose_config, to_plain

    m = to_plain(compose_config([f"+recipe={args.recipe_yaml}", *args.set]))["model"]
    h, p, g, n = m["mamba_num_heads"], m["mamba_head_dim"], m["mamba_num_groups"], \
        m["mamba_state_dim"]
    b, L = args.micro_batch, args.seq
    gen = torch.Generator(device=dev).manual_seed(0)
    dt = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev, generator=gen) * scale).to(dt)

    leaves = {"x": rnd(b, L, h, p), "dt": rnd(b, L, h, scale=0.5), "B": rnd(b, L, g, n, scale=0.3),
              "C": rnd(b, L, g, n, scale=0.3)}
    A = -torch.linspace(1, 16, h, device=dev)
    D = torch.ones(h, device=dev)
    dt_bias = torch.zeros(h, device=dev)
    for v in leaves.values():
        v.requires_grad_(True)
    gy = rnd(b, L, h, p)
    scan = chunk_scan_fn(impl)

    def fn():
        for v in leaves.values():
            v.grad = None
        return scan(**leaves, A=A, chunk_size=128, D=D, dt_bias=dt_bias, dt_softplus=True), gy

    t0 = time.perf_counter()
    out, g0 = fn()
    out.backward(g0)
    _sync(dev)
    first = (time.perf_counter() - t0) * 1e3
    fwd, bwd, tot, all_ms, peak = time_fwd_bwd(fn, dev, args.warmup, args.steps)
    log(f"[scan {impl}] first call {first:.0f} ms; fwd {fwd:.2f} ms, bwd {bwd:.2f} ms, fwd+bwd "
        f"{tot:.2f} ms, peak {'-' if peak is None else f'{peak:.0f} MiB'}")
    return {"impl": impl, "shape": {"b": b, "L": L, "H": h, "P": p, "G": g, "N": n, "chunk": 128},
            "dtype": str(dt), "first_call_ms": first, "fwd_ms": fwd, "bwd_ms": bwd,
            "fwd_bwd_ms": tot, "fwd_bwd_ms_all": all_ms, "peak_mib": peak}


def layer_times(rows: list[dict], meta: dict) -> dict:
    """The planner's input (``planner.layer_times``): forward+backward ms of one layer per kind
    and recipe, with the shape and GPU they were measured at."""
    times: dict[str, dict[str, float]] = {}
    for r in rows:
        if "error" not in r:
            times.setdefault(r["recipe"], {})[r["kind"]] = r["fwd_bwd_ms"]
    return {"format": "nvfp4_megatron.layer_times.v1", "gpu": meta["device"],
            "seq_length": meta["seq"], "micro_batch_size": meta["micro_batch"],
            "tensor_model_parallel_size": 1, "model": meta["model"], "fwd_bwd_ms": times,
            "source": "scripts/bench_layer.py"}


def table(rows: list[dict], scans: list[dict]) -> str:
    lines = ["| layer | recipe | fwd ms | bwd ms | fwd+bwd ms | x bf16 | peak MiB | x bf16 |",
             "|---|---|---|---|---|---|---|---|"]
    base = {r["kind"]: r for r in rows if r["recipe"] == "bf16" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {KIND_NAMES[r['kind']]} | {r['recipe']} | error: {r['error']} |"
                         " | | | | |")
            continue
        b = base.get(r["kind"])
        tx = f"{r['fwd_bwd_ms'] / b['fwd_bwd_ms']:.2f}" if b else "-"
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        mx = (f"{r['peak_mib'] / b['peak_mib']:.2f}"
              if b and r["peak_mib"] is not None and b["peak_mib"] else "-")
        lines.append(f"| {r['layer']} | {r['recipe']} | {r['fwd_ms']:.2f} | {r['bwd_ms']:.2f} | "
                     f"{r['fwd_bwd_ms']:.2f} | {tx} | {peak} | {mx} |")
    if scans:
        lines += ["", "| SSD scan | first call ms | fwd ms | bwd ms | fwd+bwd ms | peak MiB |",
                  "|---|---|---|---|---|---|"]
        for s in scans:
            if "error" in s:
                lines.append(f"| {s['impl']} | error: {s['error']} | | | | |")
                continue
            peak = "-" if s["peak_mib"] is None else f"{s['peak_mib']:.0f}"
            lines.append(f"| {s['impl']} | {s['first_call_ms']:.0f} | {s['fwd_ms']:.2f} | "
                         f"{s['bwd_ms']:.2f} | {s['fwd_bwd_ms']:.2f} | {peak} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe-yaml", default="nvfp4_12b", help="the model shape (recipe file)")
    ap.add_argument("--recipes", default="bf16,nvfp4,fp8_cs")
    ap.add_argument("--kinds", default="M*-", help="layer symbols: M Mamba, * attention, - MLP")
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=1024, help="embedding / LM head (not timed)")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--scan", default="eager,compiled", help="scan implementations to time")
    ap.add_argument("--layer-scan", default="compiled", choices=("eager", "compiled"),
                    help="the scan inside the timed Mamba layer")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--set", action="append", default=[], help="extra Hydra override")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None, help="write the table (markdown) here too")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_layer.py: no CUDA GPU (use --device cpu for a smoke run)", file=sys.stderr)
        return 2
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.cuda.set_device(0)

    from megatron.core import tensor_parallel

    from nvfp4_megatron.cli.compose import compose_config, to_plain
    from nvfp4_megatron.runtime.distributed import init_distributed, initialize_model_parallel

    init_distributed()
    initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(1234)

    def log(msg):
        print(msg, flush=True)

    model_cfg = to_plain(compose_config([f"+recipe={args.recipe_yaml}", *args.set]))["model"]
    meta = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "seq": args.seq, "micro_batch": args.micro_batch,
            "dtype": args.dtype, "layer_scan": args.layer_scan, "recipe_yaml": args.recipe_yaml,
            "model": {k: model_cfg[k] for k in (
                "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "kv_channels", "mamba_num_heads", "mamba_head_dim", "mamba_num_groups",
                "mamba_state_dim", "mamba_conv_kernel", "activation")}}
    log(json.dumps(meta))
    rows, scans = [], []

    def dump():
        out = {"meta": meta, "layers": rows, "scan": scans, "layer_times": layer_times(rows, meta)}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        if args.md:
            with open(args.md, "w") as f:
                f.write(table(rows, scans) + "\n")

    for impl in [s for s in args.scan.split(",") if s]:
        try:
            scans.append(bench_scan(args, impl, dev, log))
        except Exception as e:  # one failure must not hide the other rows
            import traceback

            traceback.print_exc()
            scans.append({"impl": impl, "error": f"{type(e).__name__}: {e}"})
        dump()
    for recipe in [r for r in args.recipes.split(",") if r]:
        for kind in args.kinds:
            try:
                rows.append(bench_layer(args, recipe, kind, dev, log))
            except Exception as e:
                import traceback

                traceback.print_exc()
                rows.append({"recipe": recipe, "kind": kind, "error": f"{type(e).__name__}: {e}"})
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            dump()
    log(table(rows, scans))
    torch.distributed.destroy_process_group()
    return 0 if all("error" not in r for r in rows + scans) else 1


if __name__ == "__main__":
    sys.exit(main())
