"""Training-step benchmark: step time, tokens/s, MFU and peak memory per precision recipe.

Model: the NVFP4 paper's 1.2B dense ablation shape (arXiv 2509.25149 App. / DESIGN.md §4): 20
blocks, d=2048, FFN 6144 squared-ReLU, 16 Q / 8 KV heads of 128, RoPE, RMSNorm, no biases,
untied embeddings, vocab 131072; Megatron-Core GPTModel with this project's layer spec (quantized
linears, SDPA attention), BF16 parameters (Float16Module), Megatron DDP (FP32 grad buffer) and
Megatron's distributed optimizer (Adam, FP32 master weights), one GPU, one micro-batch per step.

Per recipe: build, ``--warmup`` steps, then ``--steps`` timed steps (CUDA-synchronised wall clock
per step; the median is reported). Peak memory is ``torch.cuda.max_memory_allocated`` over the
timed steps; ``static`` is what is allocated before the first step (weights, grads, optimizer).

FLOPs per step (the MFU numerator), per token, forward; x3 for forward + backward:
    linears  2 * L * d * (q + 2 kv + d + 2 * ffn)         (q = 16*128, kv = 8*128)
    attention 2 * 2 * L * s * q * 1/2                     (QK^T and AV, causal: half the matrix)
    LM head  2 * d * V
MFU = FLOPs / step time / 989 TFLOP/s (H100/H200 dense BF16 peak). Quantized recipes do the same
FLOPs (the NVFP4/MXFP8 emulation runs them on BF16 tensor cores; FP8-CS on FP8 ones).

Usage (GPU): ``python scripts/bench_step.py --json out.json`` (no Hydra needed). The
``--saved-input`` option measures the memory saved by keeping the Wgrad copy of X quantized
(``quantized``) versus keeping X in BF16 (``bf16``); ``RECIPE:bf16`` in ``--recipes`` runs one
recipe that way. ``--profile RECIPES`` adds one profiled step (kernel and host-call tables).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

PEAK_BF16_FLOPS = 989e12

SHAPE = dict(num_layers=20, hidden_size=2048, ffn_hidden_size=6144, num_attention_heads=16,
             num_query_groups=8, kv_channels=128, vocab_size=131072)


def flops_per_step(tokens: int, seq: int, s=SHAPE) -> float:
    d, L, V = s["hidden_size"], s["num_layers"], s["vocab_size"]
    q = s["num_attention_heads"] * s["kv_channels"]
    kv = s["num_query_groups"] * s["kv_channels"]
    lin = 2 * L * d * (q + 2 * kv + d + 2 * s["ffn_hidden_size"])
    attn = 2 * 2 * L * seq * q * 0.5
    head = 2 * d * V
    return 3.0 * tokens * (lin + attn + head)


def build(recipe_name: str, seq: int, device: str = "cuda"):
    from megatron.core.activations import squared_relu
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from nvfp4_megatron.megatron.policy import apply_precision
    from nvfp4_megatron.megatron.spec_provider import quantized_gpt_block_spec
    from nvfp4_megatron.quant.registry import get_recipe

    tc = TransformerConfig(
        num_layers=SHAPE["num_layers"], hidden_size=SHAPE["hidden_size"],
        ffn_hidden_size=SHAPE["ffn_hidden_size"],
        num_attention_heads=SHAPE["num_attention_heads"],
        num_query_groups=SHAPE["num_query_groups"], kv_channels=SHAPE["kv_channels"],
        normalization="RMSNorm", add_bias_linear=False, activation_func=squared_relu,
        hidden_dropout=0.0, attention_dropout=0.0, bf16=True, params_dtype=torch.bfloat16,
        pipeline_dtype=torch.bfloat16, gradient_accumulation_fusion=False,
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, init_method_std=0.02,
        use_cpu_initialization=(device == "cpu"),
    )
    model = GPTModel(config=tc, transformer_layer_spec=quantized_gpt_block_spec(tc),
                     vocab_size=SHAPE["vocab_size"], max_sequence_length=seq,
                     share_embeddings_and_output_weights=False,
                     position_embedding_type="rope").to(device)
    table = apply_precision([model], get_recipe(recipe_name), log=False)
    model = Float16Module(tc, model)
    ddp = DistributedDataParallel(tc, DistributedDataParallelConfig(
        use_distributed_optimizer=True, grad_reduce_in_fp32=True, overlap_grad_reduce=False),
        model)
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-4, weight_decay=0.1, bf16=True,
                        params_dtype=torch.bfloat16, use_distributed_optimizer=True,
                        clip_grad=1.0), [ddp])
    return tc, ddp, opt, table


def run_recipe(spec: str, args, log) -> dict:
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nvfp4_megatron.quant import linear as qlinear
    from nvfp4_megatron.quant import state as qstate

    recipe_name, _, saved = spec.partition(":")
    saved = saved or args.saved_input
    prev = qlinear.set_saved_input_mode(saved)
    qstate.reset_state()
    torch.manual_seed(1234)
    tc, ddp, opt, table = build(recipe_name, args.seq)
    tc.finalize_model_grads_func = finalize_model_grads
    mb, seq = args.micro_batch, args.seq
    gen = torch.Generator(device="cuda").manual_seed(0)
    data = torch.randint(0, SHAPE["vocab_size"], (mb, seq + 1), device="cuda", generator=gen)
    tokens, labels = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    pos = torch.arange(seq, device="cuda").unsqueeze(0).expand(mb, seq)

    def forward_step(data_iterator, model):
        out = model(tokens, pos, None, labels=labels)

        def loss_func(output):
            loss = output.float().mean()
            return loss, {"lm loss": loss.detach()}

        return out, loss_func

    fb = get_forward_backward_func()

    def step(i: int) -> float:
        qstate.set_step(i)
        ddp.zero_grad_buffer()
        opt.zero_grad()
        res = fb(forward_step_func=forward_step, data_iterator=iter([None]), model=[ddp],
                 num_microbatches=1, seq_length=seq, micro_batch_size=mb, forward_only=False)
        opt.step()
        return res[0]["lm loss"]

    torch.cuda.synchronize()
    static = torch.cuda.memory_allocated()
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
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
    med = statistics.median(times)
    ntok = mb * seq
    fl = flops_per_step(ntok, seq)
    res = {
        "recipe": recipe_name, "saved_input": saved, "micro_batch": mb, "seq": seq,
        "quantized_blocks": list(table.quantized_blocks()), "bf16_blocks": list(table.bf16_blocks),
        "step_ms_median": med * 1e3, "step_ms_min": min(times) * 1e3,
        "step_ms_all": [t * 1e3 for t in times], "tokens_per_s": ntok / med,
        "tflops": fl / med / 1e12, "mfu": fl / med / PEAK_BF16_FLOPS,
        "peak_mem_gib": peak / 2**30, "static_mem_gib": static / 2**30,
        "losses": losses,
    }
    log(f"[{spec}] step {med * 1e3:.1f} ms (min {min(times) * 1e3:.1f}), "
        f"{ntok / med:,.0f} tok/s, {fl / med / 1e12:.0f} TFLOP/s, MFU {res['mfu']:.1%}, "
        f"peak {peak / 2**30:.2f} GiB (static {static / 2**30:.2f}), loss {losses[0]:.3f}"
        f"->{losses[-1]:.3f}")
    if recipe_name in args.profile:
        res["profile"] = prof = profile_step(step, args.warmup + args.steps)
        log(f"[{spec}] profiled step: wall {prof['wall_ms_profiled']:.1f} ms, GPU busy "
            f"{prof['gpu_busy_ms']:.1f} ms, sync-like calls {prof['sync_like_calls']}")
        log(prof["gpu_table"])
        log(prof["cpu_table"])
    del ddp, opt, table
    qlinear.set_saved_input_mode(prev)
    gc.collect()
    torch.cuda.empty_cache()
    return res


def profile_step(step, i: int) -> dict:
    """One profiled step: the GPU-busy time (sum of kernel times), the top GPU kernels, and the
    top host-side calls (where host/device synchronisations show up)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
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
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", default="bf16,fp8_cs,nvfp4_all_layers,mxfp8,"
                    "nvfp4_all_layers:bf16,nvfp4,fp8_cs:bf16")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--saved-input", default="quantized", choices=("quantized", "bf16"))
    ap.add_argument("--profile", default="", help="comma-separated recipes to profile one step of")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.profile = [p for p in args.profile.split(",") if p]
    if not torch.cuda.is_available():
        print("bench_step.py needs a CUDA GPU", file=sys.stderr)
        return 2

    from megatron.core import tensor_parallel

    from nvfp4_megatron.platform.distributed import init_distributed, initialize_model_parallel
    from nvfp4_megatron.quant import gemm

    init_distributed()
    initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(1234)

    def log(msg):
        print(msg, flush=True)

    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "capability": list(torch.cuda.get_device_capability()),
            "gemm_backends": gemm.describe_backends(), "shape": SHAPE,
            "flops_per_step": flops_per_step(args.micro_batch * args.seq, args.seq)}
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
            log(f"{r['recipe']:>18s} saved={r['saved_input']:9s} step x{step_x:.3f} of bf16, "
                f"peak mem x{mem_x:.3f}")
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
