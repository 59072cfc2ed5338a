"""Training-step benchmark: step time, tokens/s, MFU and peak memory per precision recipe.

Measures the product: the model, its DDP wrapper and the optimizer come from
``training.model.build_training_stack`` (what ``pretrain.py`` trains) on a config composed like
``pretrain.py``'s (``--recipe-yaml`` + ``precision.recipe=R`` + ``--set`` overrides), the step is
the training loop's (``training.loop.make_forward_step`` under Megatron's schedule, then the
distributed optimizer). Only the data differ: one fixed batch of random tokens, so no data loader
or tokenizer is in the timing.

Default model: the NVFP4 paper's 1.2B dense ablation shape (``recipes/bf16_1p2b.yaml``: 20 blocks,
d=2048, FFN 6144 squared-ReLU, 16 Q / 8 KV heads of 128, RoPE, RMSNorm, vocab 131072) at seq 4096,
micro-batch 2, one GPU. Each recipe keeps its own BF16-block policy (``nvfp4``: the paper's first 2
+ last 8 blocks BF16; ``nvfp4_all_layers``: none).

Per recipe: build, ``--warmup`` steps, then ``--steps`` timed steps (CUDA-synchronised wall clock
per step; the median is reported). Peak memory is ``torch.cuda.max_memory_allocated`` over the
timed steps (for ``+graph``: over every step from the first, the capture included, since the
graph's pool holds a step's activations from then on); ``reserved`` is what the caching
allocator holds at the end; ``static`` is what is allocated before the first step (weights,
grads, optimizer).
FLOPs per step and MFU: ``training/throughput.py`` (the same formula as the training loop's
progress line; MFU against the GPU's dense BF16 peak).

Usage (GPU): ``python scripts/bench_step.py --json out.json``. ``--saved-input`` measures the
memory saved by keeping the Wgrad copy of X quantized (``quantized``) versus in BF16 (``bf16``);
``RECIPE:bf16`` in ``--recipes`` runs one recipe that way. ``--profile RECIPES`` adds one profiled
step (kernel and host-call tables). ``--fp8-transpose copy`` makes the transposed FP8 copies by a
strided copy before the GEMM instead of the cast-transpose kernel (same bytes), to measure the
kernel; ``RECIPE@copy`` in ``--recipes`` runs one recipe that way. ``--microbatches N`` runs N
micro-batches per step (the same batch N times; the global batch is N x ``--micro-batch``), inside
the training loop's ``reuse_weight_copies`` scope (each weight quantized once per step);
``--weight-copies fresh``, or ``RECIPE#fresh`` in ``--recipes``, quantizes the weights in every
micro-batch instead (same numbers), to measure the reuse. ``RECIPE+graph`` (after any other
suffix) trains it with ``train.cuda_graph=true``: the step's forward/backward captured once as a
CUDA graph after ``training.graphs.WARMUP_STEPS`` eager steps and replayed (``training/graphs.py``;
``--warmup`` must be larger than that, so the step that captures is not timed). ``RECIPE+tgemm``
runs it with ``precision.emulated_gemm=triton`` (the emulated formats' GEMM with alpha in a Triton
kernel's epilogue, ``kernels/gemm_alpha.py``); both: ``RECIPE+graph+tgemm``. ``RECIPE+rope``:
with ``train.fused_rope=true`` (``kernels/rope.py``; same bits, so the same losses). ``RECIPE+ce``:
with ``train.fused_cross_entropy=true`` (``kernels/cross_entropy.py``; the loss differs in its
last bits). ``RECIPE+gaf``: with ``train.gradient_accumulation_fusion=true`` (``mcore/grad_accum.py``;
weight gradients added to ``main_grad`` in FP32 inside the Wgrad GEMM). ``RECIPE+amax2``: each quantized copy of X and dY reads the tensor for its own amax,
as before ``quant.linear.set_copy_amax_sharing`` (same bits), to measure the shared read.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch


def compose(args, recipe_name: str, extra: tuple[str, ...] = ()) -> dict:
    from nvfp4_megatron.cli.compose import compose_config, to_plain

    overrides = [f"+recipe={args.recipe_yaml}", f"precision.recipe={recipe_name}",
                 f"model.seq_length={args.seq}", f"train.micro_batch_size={args.micro_batch}",
                 f"train.global_batch_size={args.micro_batch * args.microbatches}",
                 "train.train_iters=100",
                 "train.train_tokens=null", *args.set, *extra]
    return to_plain(compose_config(overrides))


def run_recipe(spec: str, args, log) -> dict:
    from nvfp4_megatron.training.graphs import graph_stream

    base, _, suffixes = spec.partition("+")
    flags = set(suffixes.split("+")) if suffixes else set()
    if flags - {"graph", "tgemm", "rope", "ce", "amax2", "gaf"}:
        raise ValueError(f"{spec}: the parts after '+' may be 'graph', 'tgemm', 'rope', 'ce', 'amax2' "
                         "and 'gaf'")
    from nvfp4_megatron.kernels.cross_entropy import disable_fused_cross_entropy
    from nvfp4_megatron.kernels.rope import disable_fused_rope
    from nvfp4_megatron.quant import linear as qlinear

    prev_share = qlinear.set_copy_amax_sharing("amax2" not in flags)
    try:
        with graph_stream("graph" in flags):  # a graphed model is built and trained on the capture stream
            res = _run_recipe(base, "graph" in flags, "tgemm" in flags, args, log, rope="rope" in flags,
                              ce="ce" in flags, gaf="gaf" in flags)
        # the whole --recipes entry: "recipe" alone does not tell bf16+graph from bf16+graph+rope
        res.update(spec=spec, fused_rope="rope" in flags, fused_cross_entropy="ce" in flags,
                   copy_amax_sharing="amax2" not in flags, gradient_accumulation_fusion="gaf" in flags)
        return res
    finally:
        from nvfp4_megatron.mcore import grad_accum

        grad_accum.uninstall()
        # train.fused_rope / fused_cross_entropy patch Megatron's modules: not for the next recipe
        disable_fused_rope()
        disable_fused_cross_entropy()
        qlinear.set_copy_amax_sharing(prev_share)


def _run_recipe(spec: str, graphed: bool, tgemm: bool, args, log, rope: bool = False,
                ce: bool = False, gaf: bool = False) -> dict:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nvfp4_megatron.quant import gemm as qgemm
    from nvfp4_megatron.quant import linear as qlinear
    from nvfp4_megatron.quant import state as qstate
    from nvfp4_megatron.training.graphs import WARMUP_STEPS, StepGraph, check_graph_config
    from nvfp4_megatron.training.loop import make_forward_step, start_run_state
    from nvfp4_megatron.training.model import build_training_stack
    from nvfp4_megatron.training.throughput import StepMeter

    spec_w, _, copies = spec.partition("#")
    copies = copies or args.weight_copies
    if copies not in ("reuse", "fresh"):
        raise ValueError(f"{spec}: the part after '#' must be 'reuse' or 'fresh'")
    spec_, _, transpose = spec_w.partition("@")
    recipe_name, _, saved = spec_.partition(":")
    saved = saved or args.saved_input
    transpose = transpose or args.fp8_transpose
    if transpose not in ("kernel", "copy"):
        raise ValueError(f"{spec}: the part after '@' must be 'kernel' or 'copy'")
    prev = qlinear.set_saved_input_mode(saved)
    prev_t = qlinear.set_fp8_cast_transpose(transpose == "kernel")
    torch.manual_seed(1234)
    cfg = compose(args, recipe_name, (*(("train.cuda_graph=true",) if graphed else ()),
                                      *(("precision.emulated_gemm=triton",) if tgemm else ()),
                                      *(("train.fused_rope=true",) if rope else ()),
                                      *(("train.fused_cross_entropy=true",) if ce else ()),
                                      *(("train.gradient_accumulation_fusion=true",) if gaf else ())))
    # as pretrain.py: every recipe starts from the same weights (the model-parallel CUDA RNG
    # initialises them; without reseeding, each recipe after the first got other weights)
    prev_mm = start_run_state(cfg)
    stack = build_training_stack(cfg, log=lambda msg: None)
    ddp, opt, table = stack.ddp, stack.optimizer, stack.table
    meter = StepMeter.for_run(cfg, world_size=1)
    mb, seq, vocab = args.micro_batch, args.seq, cfg["model"]["vocab_size"]
    nmb = args.microbatches
    gen = torch.Generator(device="cuda").manual_seed(0)
    # token ids uniform over the vocabulary, or over [0, --token-ids) (the byte tokenizer of
    # pretrain.py's default corpus uses 256 ids: repeated ids change the embedding backward's cost)
    data = torch.randint(0, args.token_ids or vocab, (mb, seq + 1), device="cuda", generator=gen)
    batch = {"tokens": data[:, :-1].contiguous(), "labels": data[:, 1:].contiguous(),
             "loss_mask": torch.ones(mb, seq, device="cuda"),
             "position_ids": torch.arange(seq, device="cuda").unsqueeze(0).expand(mb, seq)}
    forward_step = make_forward_step()
    fb = get_forward_backward_func()
    step_graph = None
    if graphed:
        if args.warmup <= WARMUP_STEPS:
            raise ValueError(f"{spec}+graph: --warmup must be >= {WARMUP_STEPS + 1} (the eager "
                             "steps before the capture, and the capturing step)")
        check_graph_config(cfg, world_size=1)
        step_graph = StepGraph(fb=fb, forward_step=forward_step, model=ddp, num_microbatches=nmb,
                               seq_length=seq, micro_batch_size=mb,
                               reuse_weight_copies=copies == "reuse", log=log)

    def step(i: int) -> float:
        qstate.set_step(i)
        ddp.zero_grad_buffer()
        opt.zero_grad()
        if step_graph is not None and i >= WARMUP_STEPS:  # as the training loop
            res = step_graph.run([batch] * nmb)
        else:
            with qlinear.reuse_weight_copies(enabled=copies == "reuse"):  # as the training loop
                res = fb(forward_step_func=forward_step, data_iterator=iter([batch] * nmb),
                         model=[ddp], num_microbatches=nmb, seq_length=seq, micro_batch_size=mb,
                         forward_only=False)
        opt.step()
        return res[0]["lm loss"]

    torch.cuda.synchronize()
    static = torch.cuda.memory_allocated()
    # a graphed run's activations live in the graph's private pool from the capture on (a replay
    # allocates nothing): its peak counts from the first step, capture included
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        if i == args.warmup and step_graph is None:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        loss = step(i)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        losses.append(float(loss))
        if i >= args.warmup:
            times.append(dt)
    peak = torch.cuda.max_memory_allocated()
    reserved = torch.cuda.memory_reserved()
    med = statistics.median(times)
    ntok = mb * seq * nmb
    fl = meter.flops_per_step
    res = {
        "recipe": recipe_name, "cuda_graph": graphed,
        "emulated_gemm": cfg["precision"]["emulated_gemm"], "saved_input": saved, "fp8_transpose": transpose,
        "weight_copies": copies, "micro_batch": mb, "microbatches": nmb, "seq": seq,
        "quantized_blocks": list(table.quantized_blocks()), "bf16_blocks": list(table.bf16_blocks),
        "step_ms_median": med * 1e3, "step_ms_min": min(times) * 1e3,
        "step_ms_all": [t * 1e3 for t in times], "tokens_per_s": ntok / med,
        "tflops": fl / med / 1e12, "mfu": meter.mfu(med),
        "peak_mem_gib": peak / 2**30, "static_mem_gib": static / 2**30,
        "reserved_gib": reserved / 2**30,
        "losses": losses,
    }
    label = spec + ("+graph" if graphed else "") + ("+tgemm" if tgemm else "")
    log(f"[{label}] step {med * 1e3:.1f} ms (min {min(times) * 1e3:.1f}), "
        f"{ntok / med:,.0f} tok/s, {fl / med / 1e12:.0f} TFLOP/s, MFU {res['mfu']:.1%}, "
        f"peak {peak / 2**30:.2f} GiB (static {static / 2**30:.2f}), loss {losses[0]:.3f}"
        f"->{losses[-1]:.3f}")
    if label in args.profile:
        res["profile"] = prof = profile_step(step, args.warmup + args.steps, ops=args.profile_ops)
        log(f"[{label}] profiled step: wall {prof['wall_ms_profiled']:.1f} ms, GPU busy "
            f"{prof['gpu_busy_ms']:.1f} ms, sync-like calls {prof['sync_like_calls']}")
        log(prof["gpu_table"])
        log(prof["cpu_table"])
    del ddp, opt, table, stack, step_graph
    qlinear.set_saved_input_mode(prev)
    qlinear.set_fp8_cast_transpose(prev_t)
    qgemm.set_emulated_mm(prev_mm)
    gc.collect()
    torch.cuda.empty_cache()
    return res


def profile_step(step, i: int, ops: bool = False) -> dict:
    """One profiled step: the GPU-busy time (sum of kernel times), the top GPU kernels, and the
    top host-side calls (where host/device synchronisations show up). ``ops`` (``--profile-ops``)
    also records input shapes and adds ``op_table``: GPU time by the torch op (and its input
    shapes) that launched the kernels, which names the op behind each generic elementwise kernel
    (without CUDA graphs: a replayed graph has no ops to attribute to)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=ops) as prof:
        t0 = time.perf_counter()
        step(i)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    ka = prof.key_averages()
    busy = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))
               for e in ka)
    syncs = {e.key: e.count for e in ka
             if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync",
                          "cudaEventSynchronize", "aten::item", "aten::_local_scalar_dense")}
    return {
        "wall_ms_profiled": wall * 1e3, "gpu_busy_ms": busy / 1e3, "sync_like_calls": syncs,
        "gpu_table": ka.table(sort_by="self_device_time_total", row_limit=22,
                              max_name_column_width=60),
        "cpu_table": ka.table(sort_by="self_cpu_time_total", row_limit=12,
                              max_name_column_width=60),
        **({"op_table": prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_device_time_total", row_limit=60, max_name_column_width=40,
            max_shapes_column_width=100)} if ops else {}),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", default="bf16,fp8_cs,nvfp4_all_layers,mxfp8,"
                    "nvfp4_all_layers:bf16,nvfp4,fp8_cs:bf16")
    ap.add_argument("--recipe-yaml", default="bf16_1p2b",
                    help="recipes/NAME.yaml giving the model (precision.recipe is set per run)")
    ap.add_argument("--set", action="append", default=[],
                    help="extra config override, as on pretrain.py's command line (repeatable)")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--token-ids", type=int, default=None,
                    help="draw the batch's token ids from [0, N) (default: the whole vocabulary)")
    ap.add_argument("--saved-input", default="quantized", choices=("quantized", "bf16"))
    ap.add_argument("--fp8-transpose", default="kernel", choices=("kernel", "copy"))
    ap.add_argument("--microbatches", type=int, default=1, help="micro-batches per step")
    ap.add_argument("--weight-copies", default="reuse", choices=("reuse", "fresh"))
    ap.add_argument("--profile", default="", help="comma-separated --recipes entries to profile one step of")
    ap.add_argument("--profile-ops", action="store_true",
                    help="with --profile: record input shapes and add the GPU time by launching op "
                         "and shapes (op_table); profile a recipe without +graph for this")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.profile = [p for p in args.profile.split(",") if p]
    if args.microbatches < 1:
        ap.error(f"--microbatches {args.microbatches}: expected a positive number")
    if not torch.cuda.is_available():
        print("bench_step.py needs a CUDA GPU", file=sys.stderr)
        return 2

    from megatron.core import tensor_parallel

    from nvfp4_megatron.runtime.distributed import (configure_determinism, init_distributed,
                                                      initialize_model_parallel)
    from nvfp4_megatron.quant import gemm
    from nvfp4_megatron.training.throughput import model_flops_per_step

    init_distributed()
    initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    cfg0 = compose(args, "bf16")
    configure_determinism(cfg0["train"]["deterministic"], log=print)  # as pretrain.py does

    def log(msg):
        print(msg, flush=True)

    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "capability": list(torch.cuda.get_device_capability()),
            "gemm_kernels": gemm.describe_backends(), "model": cfg0["model"],
            "flops_per_step": model_flops_per_step(cfg0)}
    log(json.dumps(meta, indent=1))
    results = []
    for spec in [r for r in args.recipes.split(",") if r]:
        try:
            results.append(run_recipe(spec, args, log))
        except Exception as e:  # record and go on: one failing recipe must not hide the others
            import traceback

            traceback.print_exc()
            results.append({"recipe": spec, "error": f"{type(e).__name__}: {e}"})
        # outside the except block: the traceback (and the failed run's model) is gone by now
        gc.collect()
        torch.cuda.empty_cache()
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "results": results}, f, indent=1)
    base = next((r for r in results if r.get("recipe") == "bf16" and "error" not in r), None)
    if base:
        for r in results:
            if "error" in r:
                continue
            step_x = r["step_ms_median"] / base["step_ms_median"]
            mem_x = r["peak_mem_gib"] / base["peak_mem_gib"]
            log(f"{r['recipe']:>18s} saved={r['saved_input']:9s} fp8T={r['fp8_transpose']:6s} "
                f"W={r['weight_copies']:5s} step x{step_x:.3f} of bf16, "
                f"peak mem x{mem_x:.3f}")
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
