"""Worker for the context-parallel tests: a tiny GPT at CP=1 and CP=2 on the same data.

Run as ``python -m torch.distributed.run --nproc_per_node=N cp_worker.py CONFIG.json OUT_DIR``.
For each run the layout is CP=``cp`` x TP=``tp`` (SP on when TP > 1) and DP = the rest, with the
*same* batch on every DP rank, which gives exactly the single-process gradients (the DP average of
equal gradients); so CP=1 on N processes is the single-device reference.
Every rank writes ``OUT_DIR/<name>.rank<R>.json`` (CP-reduced losses per step) and rank 0 saves the
step-0 ``main_grad`` of every parameter to ``OUT_DIR/<name>.grads.pt``. The model, its DDP wrapper
and the optimizer come from ``training.model.build_training_stack`` on a composed config.
"""

import json
import os
import sys

import torch


def _compose(run) -> dict:
    """The tiny RoPE GPT as the product's config: FP32 params (``train.bf16=false``), our emulated
    GEMMs without BF16 blocks, constant-lr Adam without weight decay or clipping, CPU
    initialisation (every layout starts from the same weights). The optimizer is the
    non-distributed one: its DDP all-reduces the gradients, so rank 0's ``main_grad`` (saved at
    step 0) is the whole reduced gradient; the distributed optimizer's reduce-scatter leaves only
    this rank's shard of it reduced."""
    from nvfp4_megatron.cli.compose import compose_config, to_plain

    tp = run.get("tp", 1)
    return to_plain(compose_config([
        "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=128", "model.normalization=RMSNorm",
        "model.activation=gelu", "model.vocab_size=256", f"model.seq_length={run.get('seq', 64)}",
        f"model.position_embedding_type={run.get('pos', 'rope')}", "model.add_bias_linear=false",
        "model.use_cpu_initialization=true",
        f"parallel.context_parallel_size={run['cp']}", f"parallel.tensor_model_parallel_size={tp}",
        f"parallel.sequence_parallel={str(tp > 1).lower()}",
        f"precision.recipe={run['recipe']}", "precision.backend=emulated",
        "precision.bf16_first_blocks=0", "precision.bf16_last_blocks=0",
        "train.lr=3e-3", "train.weight_decay=0.0", "train.clip_grad=0.0", "train.adam_beta1=0.9",
        "train.adam_beta2=0.999", "train.bf16=false", "train.use_distributed_optimizer=false",
        "train.save=false"]))


def run_one(run, out):
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nvfp4_megatron.mcore.context_parallel import cp_reduce_loss, get_batch_on_this_cp_rank
    from nvfp4_megatron.quant import state as qstate
    from nvfp4_megatron.training.model import build_training_stack

    cp = run["cp"]
    if run.get("amax_tp_only"):
        # Negative control: the rule before CP existed (amax over TP only), so each CP rank
        # scales its chunks of an activation / gradient by its own amax.
        from nvfp4_megatron.quant import linear as qlinear

        def amax_group(self):
            g = self.tp_group
            return g if g is not None and g.size() > 1 else None

        qlinear.LinearCall.amax_group = property(amax_group)
    seq = run.get("seq", 64)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    qstate.reset_state()
    stack = build_training_stack(_compose(run), log=lambda msg: None)
    ddp, opt = stack.ddp, stack.optimizer
    cp_group = ps.get_context_parallel_group()

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        out = model(b["tokens"], b["position_ids"], None, labels=b["labels"])

        def loss_func(output):
            mask = b["loss_mask"].float()
            loss_sum = (output.float() * mask).sum()
            num = mask.sum().to(torch.int)
            report = {"lm loss": cp_reduce_loss(loss_sum, num, cp_group)}
            if run.get("loss_form") == "two_output":
                # training/loop.py's form: this rank's sum over the CP group's token count
                # (Megatron multiplies a two-output loss by the CP size).
                total = mask.sum().detach().clone()
                torch.distributed.all_reduce(total, group=cp_group)
                return loss_sum / total, report
            return loss_sum, num, report

        return out, loss_func

    fb = get_forward_backward_func()
    losses = []
    for step in range(run.get("steps", 3)):
        qstate.set_step(step)
        data = torch.randint(0, 256, (2, seq + 1), generator=torch.Generator().manual_seed(step))
        full = {"tokens": data[:, :-1], "labels": data[:, 1:],
                "loss_mask": torch.ones(2, seq),
                "position_ids": torch.arange(seq).unsqueeze(0).expand(2, seq)}
        if run.get("split") == "contiguous":  # sensitivity check: wrong layout for the CP attention
            r, n = ps.get_context_parallel_rank(), seq // cp
            batch = {k: v[:, r * n:(r + 1) * n] for k, v in full.items()}
        else:
            batch = get_batch_on_this_cp_rank(full, cp_size=cp,
                                              cp_rank=ps.get_context_parallel_rank())
        ddp.zero_grad_buffer()
        opt.zero_grad()
        res = fb(forward_step_func=forward_step, data_iterator=iter([batch]), model=[ddp],
                 num_microbatches=1, seq_length=seq // cp, micro_batch_size=2, forward_only=False)
        if step == 0 and torch.distributed.get_rank() == 0 and run.get("tp", 1) == 1:
            torch.save({n: p.main_grad.detach().clone() for n, p in ddp.module.named_parameters()},
                       os.path.join(out, f"{run['name']}.grads.pt"))
        opt.step()
        losses.append(float(res[0]["lm loss"]))
    rank = torch.distributed.get_rank()
    with open(os.path.join(out, f"{run['name']}.rank{rank}.json"), "w") as f:
        json.dump({"losses": losses, "cp_rank": ps.get_context_parallel_rank()}, f)


def attention_check(out):
    """CP=2 attention (forward, dQ, dK, dV) against full-sequence SDPA on the same tensors."""
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps

    from nvfp4_megatron.mcore.context_parallel import cp_attention, get_batch_on_this_cp_rank

    group = ps.get_context_parallel_group()
    cp, rank = group.size(), group.rank()
    g = torch.Generator().manual_seed(7)
    b, h, kv, s, d = 2, 4, 2, 32, 8
    q, k, v = (torch.randn(b, n, s, d, generator=g, dtype=torch.float64) for n in (h, kv, kv))
    w = torch.randn(b, h, s, d, generator=g, dtype=torch.float64)  # a loss weight: grads differ
    result = {}
    for causal in (True, False):
        ref_in = [t.clone().requires_grad_(True) for t in (q, k, v)]
        ref = F.scaled_dot_product_attention(*ref_in, is_causal=causal, scale=0.3, enable_gqa=True)
        (ref * w).sum().backward()
        loc = get_batch_on_this_cp_rank({"q": q, "k": k, "v": v, "w": w}, cp_size=cp,
                                        cp_rank=rank, seq_dim=2)
        loc_in = [loc[n].clone().requires_grad_(True) for n in ("q", "k", "v")]
        o = cp_attention(*loc_in, cp_group=group, causal=causal, scale=0.3, enable_gqa=True)
        (o * loc["w"]).sum().backward()
        want = get_batch_on_this_cp_rank(
            {"o": ref.detach(), **{n: t.grad for n, t in zip("qkv", ref_in)}},
            cp_size=cp, cp_rank=rank, seq_dim=2)
        got = {"o": o.detach(), **{n: t.grad for n, t in zip("qkv", loc_in)}}
        result[f"causal={causal}"] = {n: (got[n] - want[n]).abs().max().item() for n in got}

    # The core-attention module Megatron builds from the spec ([s, b, heads, d] layout) routes to
    # the same CP attention, and refuses what CP cannot do.
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from nvfp4_megatron.mcore.attention import SDPAttention

    tc = TransformerConfig(num_layers=1, hidden_size=h * d, num_attention_heads=h,
                           num_query_groups=kv, context_parallel_size=cp,
                           use_cpu_initialization=True, attention_dropout=0.0)
    mod = SDPAttention(tc, 1, AttnMaskType.causal, "self", softmax_scale=0.3)
    loc = get_batch_on_this_cp_rank({"q": q, "k": k, "v": v}, cp_size=cp, cp_rank=rank,
                                    seq_dim=2)
    sbhd = {n: t.permute(2, 0, 1, 3).float() for n, t in loc.items()}
    o_mod = mod(sbhd["q"], sbhd["k"], sbhd["v"], None)
    ref = cp_attention(*(loc[n].float() for n in "qkv"), cp_group=group, causal=True, scale=0.3,
                       enable_gqa=True)
    result["module_equal"] = torch.equal(o_mod, ref.permute(2, 0, 1, 3).reshape(o_mod.shape))
    try:
        mod(sbhd["q"], sbhd["k"], sbhd["v"], torch.zeros(1, 1, s, s, dtype=torch.bool))
        result["mask_refused"] = False
    except ValueError as e:
        result["mask_refused"] = "context parallelism" in str(e)
    try:
        SDPAttention(tc, 1, AttnMaskType.padding, "self")
        result["padding_refused"] = False
    except ValueError as e:
        result["padding_refused"] = "attn_mask_type" in str(e)
    with open(os.path.join(out, f"attn_check.rank{torch.distributed.get_rank()}.json"), "w") as f:
        json.dump(result, f)


def main() -> None:
    cfg = json.load(open(sys.argv[1]))
    out = sys.argv[2]
    from nvfp4_megatron.runtime.distributed import init_distributed, initialize_model_parallel

    init_distributed()
    if not torch.cuda.is_available():
        from nvfp4_megatron.mcore.context_parallel import route_megatron_rope_slice_to_cpu_safe

        route_megatron_rope_slice_to_cpu_safe()
    for run in cfg["runs"]:
        initialize_model_parallel(context_parallel_size=run["cp"],
                                  tensor_model_parallel_size=run.get("tp", 1))
        if run.get("kind") == "attention_check":
            attention_check(out)
        else:
            run_one(run, out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
