"""Time the language-model cross-entropy alone: Megatron's ``vocab_parallel_cross_entropy`` (what
``pretrain.py`` runs by default), Megatron's native fused one (``train.cross_entropy_fusion``) and
our kernels (``train.fused_cross_entropy``, ``kernels/cross_entropy.py``), forward + backward on
BF16 logits of the 1.2B benchmark's micro-batch (2 x 4096 tokens x 131072 vocabulary) by default.

For each: median milliseconds of forward+backward (CUDA events, after warm-up), the peak memory
the call adds over the logits themselves, and how our loss and gradient compare with Megatron's
(largest relative loss difference; share of gradient elements that differ).

    PYTHONPATH=. python3 scripts/bench_cross_entropy.py [--tokens 8192 --vocab 131072] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=131072)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cross_entropy: needs a CUDA GPU", file=sys.stderr)
        return 2
    import torch.distributed as dist
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy as native
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy as megatron

    from nvfp4_megatron.kernels import cross_entropy as ce

    dist.init_process_group("nccl", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    group = dist.group.WORLD
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(args.tokens, 1, args.vocab, device="cuda", generator=g) * 2).to(torch.bfloat16)
    target = torch.randint(0, args.vocab, (args.tokens, 1), device="cuda", generator=g)
    up = torch.full((args.tokens, 1), 1.0 / args.tokens, device="cuda")
    fns = {
        "megatron (default)": lambda x: megatron(x, target, tp_group=group),
        "megatron native fused (train.cross_entropy_fusion)": lambda x: native(x, target, group),
        "ours (train.fused_cross_entropy)": lambda x: ce.fused_vocab_parallel_cross_entropy(
            x, target, tp_group=group, _original=megatron),
    }
    results, outs = [], {}
    for name, fn in fns.items():
        def step():
            x = logits.detach().requires_grad_(True)
            loss = fn(x)
            loss.backward(up)
            return loss.detach(), x.grad
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = step()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
            del out
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        outs[name] = step()
        ms = sorted(times)[len(times) // 2]
        results.append({"impl": name, "ms_fwd_bwd": ms, "extra_peak_gib": peak})
        print(f"{name:52s} {ms:8.2f} ms fwd+bwd   +{peak:5.2f} GiB peak", flush=True)
    (l0, g0), (l1, g1) = outs["megatron (default)"], outs["ours (train.fused_cross_entropy)"]
    agree = {"loss_max_rel_diff": ((l1 - l0).abs() / l0.abs()).max().item(),
             "grad_elements_differing": (g1 != g0).float().mean().item()}
    print(f"ours vs megatron: loss max rel diff {agree['loss_max_rel_diff']:.2e}, gradient elements "
          f"differing {100 * agree['grad_elements_differing']:.4f} %")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "tokens": args.tokens, "vocab": args.vocab, "results": results, "agreement": agree},
                      f, indent=1)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
