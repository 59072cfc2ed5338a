"""Worker for the tiny-GPT tests: train a few steps with Megatron's own DDP, optimizer and schedules.

Run as ``python -m torch.distributed.run --nproc_per_node=N gpt_worker.py CONFIG.json OUT_DIR``.
Every rank writes ``OUT_DIR/rank<R>.json`` with its losses (last pipeline stage), the quantizer
calls it saw in step 0 per (layer key, role), and the precision table's block lists.
"""

import json
import os
import sys
from collections import Counter

import torch


def _build(cfg, run):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from nvfp4_megatron.megatron.spec_provider import quantized_gpt_block_spec

    moe = run.get("moe", False)
    tc = TransformerConfig(
        num_layers=run.get("num_layers", 4), hidden_size=64, num_attention_heads=4,
        num_query_groups=2, ffn_hidden_size=128, normalization="RMSNorm",
        tensor_model_parallel_size=cfg["tp"], pipeline_model_parallel_size=cfg["pp"],
        expert_model_parallel_size=cfg.get("ep", 1),
        expert_tensor_parallel_size=cfg.get("etp"),
        sequence_parallel=cfg.get("sp", False), use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, params_dtype=torch.float32,
        pipeline_dtype=torch.float32, add_bias_linear=not moe,
        num_moe_experts=4 if moe else None, moe_router_topk=2 if moe else 2,
        moe_ffn_hidden_size=64 if moe else None,
        moe_token_dispatcher_type="alltoall", moe_aux_loss_coeff=0.0,
    )
    if run.get("spec", "quantized") == "quantized":
        spec = quantized_gpt_block_spec(tc, sdpa_attention=run.get("sdpa", True))
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm", num_experts=tc.num_moe_experts)
    model = GPTModel(config=tc, transformer_layer_spec=spec, vocab_size=256,
                     max_sequence_length=32,
                     pre_process=parallel_state.is_pipeline_first_stage(),
                     post_process=parallel_state.is_pipeline_last_stage())
    return tc, model


def run_one(cfg, run, out):
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nvfp4_megatron.megatron.policy import apply_precision
    from nvfp4_megatron.quant import linear as qlinear
    from nvfp4_megatron.quant import state as qstate
    from nvfp4_megatron.quant.registry import build_recipe

    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    qstate.reset_state()
    if run.get("bf16_switch"):
        qstate.set_bf16_switch(run["bf16_switch"])
    if run.get("break_amax_reduction"):  # sensitivity check: the TP test must notice this
        qlinear.LinearCall.amax_group = property(lambda self: None)
    tc, model = _build(cfg, run)
    table = None
    if run.get("recipe"):
        table = apply_precision(model, build_recipe(run["recipe"], **run.get("overrides", {})))
    ddp = DistributedDataParallel(
        config=tc, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
        module=model)
    tc.finalize_model_grads_func = finalize_model_grads
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=run.get("lr", 3e-3), weight_decay=0.0,
                        params_dtype=torch.float32, clip_grad=0.0),
        [ddp])

    def forward_step(data_iterator, model):
        tokens, labels = next(data_iterator)
        pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        out = model(tokens, pos, None, labels=labels)

        def loss_func(output):
            loss = output.float().mean()
            return loss, {"lm loss": loss.detach()}

        return out, loss_func

    calls = Counter()
    remove = qlinear.add_quantize_observer(lambda key, role, tq: calls.update([f"{key}|{role}"]))
    fb = get_forward_backward_func()
    losses = []
    for step in range(run.get("steps", 1)):
        qstate.set_step(step)
        seed = 0 if run.get("repeat_batch", True) else step
        data = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(seed))
        ddp.zero_grad_buffer()
        opt.zero_grad()
        res = fb(forward_step_func=forward_step, data_iterator=iter([(data[:, :-1], data[:, 1:])]),
                 model=[ddp], num_microbatches=1, seq_length=32, micro_batch_size=2,
                 forward_only=False)
        opt.step()
        if step == 0:
            remove()
        if parallel_state.is_pipeline_last_stage():
            losses.append(float(res[0]["lm loss"]))
    rank = torch.distributed.get_rank()
    result = {
        "losses": losses, "calls": dict(calls),
        "bf16_blocks": list(table.bf16_blocks) if table else None,
        "quantized_blocks": list(table.quantized_blocks()) if table else None,
        "local_blocks": sorted(m.layer_number - 1 for m in model.modules()
                               if type(m).__name__ == "TransformerLayer"),
        "grads": {n: p.main_grad.float().norm().item() for n, p in ddp.module.named_parameters()}
        if run.get("dump_grads") else None,
    }
    with open(os.path.join(out, f"{run['name']}.rank{rank}.json"), "w") as f:
        json.dump(result, f)


def layer_checks(out):
    """Layer-level checks: bf16 recipe == Megatron's layers bit for bit; SDPA vs local attention."""
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from nvfp4_megatron.megatron.attention import SDPAttention
    from nvfp4_megatron.megatron.layers import (
        LinearPrecision, QuantizedColumnParallelLinear, QuantizedRowParallelLinear)
    from nvfp4_megatron.quant.recipe import BF16_LINEAR

    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    result = {}
    for dtype in (torch.float32, torch.bfloat16):
        tc = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4,
                               use_cpu_initialization=True, params_dtype=dtype)
        for name, ref_cls, q_cls, kw in (
                ("column", ColumnParallelLinear, QuantizedColumnParallelLinear,
                 dict(gather_output=False)),
                ("row", RowParallelLinear, QuantizedRowParallelLinear,
                 dict(input_is_parallel=True, skip_bias_add=False))):
            ref = ref_cls(64, 96, config=tc, init_method=torch.nn.init.normal_, bias=True, **kw)
            q = q_cls(64, 96, config=tc, init_method=torch.nn.init.normal_, bias=True, **kw)
            q.load_state_dict(ref.state_dict())
            q.set_precision(LinearPrecision(recipe=BF16_LINEAR, layer_key="t", block=0))
            x = torch.randn(8, 2, 64, dtype=dtype, generator=torch.Generator().manual_seed(1))
            outs = []
            for layer in (ref, q):
                xi = x.clone().requires_grad_(True)
                y, _ = layer(xi)
                y.float().pow(2).sum().backward()
                outs.append((y.detach(), xi.grad, layer.weight.grad, layer.bias.grad))
            result[f"{name}_{dtype}"] = all(torch.equal(a, b) for a, b in zip(*outs))
    tc = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4,
                           num_query_groups=2, use_cpu_initialization=True,
                           attention_dropout=0.0)
    local = DotProductAttention(tc, 1, AttnMaskType.causal, "self")
    sdpa = SDPAttention(tc, 1, AttnMaskType.causal, "self")
    g = torch.Generator().manual_seed(2)
    q = torch.randn(16, 2, 4, 16, generator=g)
    k = torch.randn(16, 2, 2, 16, generator=g)
    v = torch.randn(16, 2, 2, 16, generator=g)
    res = []
    for mod in (local, sdpa):
        qi, ki, vi = (t.clone().requires_grad_(True) for t in (q, k, v))
        o = mod(qi, ki, vi, None)
        o.pow(2).sum().backward()
        res.append((o.detach(), qi.grad, ki.grad, vi.grad))
    result["sdpa_max_abs_diff"] = max((a - b).abs().max().item() for a, b in zip(*res))

    # No silent BF16: an unconfigured quantized layer refuses to run, and a quantized recipe on
    # a model built with Megatron's plain local spec is an error.
    from nvfp4_megatron.megatron.policy import apply_precision
    from nvfp4_megatron.quant.registry import get_recipe

    layer = QuantizedColumnParallelLinear(64, 96, config=tc, init_method=torch.nn.init.normal_,
                                          bias=False)
    try:
        layer(torch.randn(4, 1, 64))
        result["unconfigured_refused"] = False
    except RuntimeError as e:
        result["unconfigured_refused"] = "apply_precision" in str(e)
    plain = _build({"tp": 1, "pp": 1}, {"spec": "local", "num_layers": 2})[1]
    try:
        apply_precision(plain, get_recipe("nvfp4_all_layers"))
        result["plain_spec_refused"] = False
    except ValueError as e:
        result["plain_spec_refused"] = "quantized_gpt_layer_spec" in str(e)
    with open(os.path.join(out, "layer_checks.json"), "w") as f:
        json.dump(result, f)


def main() -> None:
    cfg = json.load(open(sys.argv[1]))
    out = sys.argv[2]
    from nvfp4_megatron.platform.distributed import init_distributed, initialize_model_parallel

    init_distributed()
    layout = None
    for run in cfg["runs"]:
        lay = {**cfg.get("layout", {}), **run.get("layout", {})}
        if lay != layout:
            initialize_model_parallel(tensor_model_parallel_size=lay.get("tp", 1),
                                      pipeline_model_parallel_size=lay.get("pp", 1),
                                      expert_model_parallel_size=lay.get("ep", 1),
                                      expert_tensor_parallel_size=lay.get("etp"))
            layout = lay
        if run.get("kind") == "layer_checks":
            layer_checks(out)
        else:
            run_one({"tp": 1, "pp": 1, **lay}, run, out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
