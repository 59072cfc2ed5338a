"""Worker for the tiny-GPT tests: train a few steps with Megatron's own DDP, optimizer and schedules.

The model, its DDP wrapper and the optimizer come from ``training.model.build_training_stack`` on
a config composed like ``pretrain.py``'s (the product's distributed Adam, FP32 parameters).

Run as ``python -m torch.distributed.run --nproc_per_node=N gpt_worker.py CONFIG.json OUT_DIR``.
Every rank writes ``OUT_DIR/rank<R>.json`` with its losses (last pipeline stage), the quantizer
calls it saw in step 0 per (layer key, role), and the precision table's block lists.
"""

import contextlib
import functools
import json
import os

import torch

from _worker_common import override as _ov
from _worker_common import prepare_run, run_all, train, write_rank_result


def _compose(cfg, run) -> dict:
    """The tiny GPT (or MoE) as the product's config: FP32 params (``train.bf16=false``), our
    emulated GEMMs, constant-lr Adam without weight decay or clipping, CPU initialisation (every
    layout starts from the same weights)."""
    from nvfp4_megatron.cli.compose import compose_config, to_plain

    moe = run.get("moe", False)
    ov = [_ov("model.num_layers", run.get("num_layers", 4)), "model.hidden_size=64",
          "model.num_attention_heads=4", "model.num_query_groups=2", "model.ffn_hidden_size=128",
          "model.normalization=RMSNorm", "model.activation=gelu", "model.vocab_size=256",
          "model.seq_length=32", "model.position_embedding_type=learned_absolute",
          _ov("model.add_bias_linear", not moe), "model.use_cpu_initialization=true",
          _ov("parallel.tensor_model_parallel_size", cfg["tp"]),
          _ov("parallel.pipeline_model_parallel_size", cfg["pp"]),
          _ov("parallel.expert_model_parallel_size", cfg.get("ep", 1)),
          _ov("parallel.expert_tensor_parallel_size", cfg.get("etp")),
          _ov("parallel.sequence_parallel", cfg.get("sp", False)),
          "parallel.moe_token_dispatcher_type=alltoall",
          _ov("precision.recipe", run.get("recipe") or "bf16"), "precision.backend=emulated",
          *[_ov(f"precision.{k}", v) for k, v in run.get("overrides", {}).items()],
          _ov("train.lr", run.get("lr", 3e-3)), "train.weight_decay=0.0", "train.clip_grad=0.0",
          "train.adam_beta1=0.9", "train.adam_beta2=0.999", "train.bf16=false"]
    if moe:
        ov += ["model.num_moe_experts=4", "model.moe_router_topk=2",
               "model.moe_ffn_hidden_size=64", "model.moe_aux_loss_coeff=0.0"]
    return to_plain(compose_config(ov))


@contextlib.contextmanager
def _spec_hooks(run):
    """Test-only layer specs, set for one build: ``spec='local'`` builds Megatron's own local
    spec (the reference for the bf16 recipe: no quantized layers, no precision table);
    ``sdpa=False`` our quantized spec with Megatron's local attention instead of SDPA."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from nvfp4_megatron.mcore import backend, spec_provider

    saved = (backend.gpt_layer_spec_for, backend.apply_backend_precision,
             spec_provider.quantized_gpt_block_spec)
    if run.get("spec", "quantized") == "local":
        backend.gpt_layer_spec_for = lambda choice, config, **kw: get_gpt_layer_local_spec(
            num_experts=config.num_moe_experts, normalization=config.normalization)
        backend.apply_backend_precision = lambda *a, **kw: None
    if not run.get("sdpa", True):
        spec_provider.quantized_gpt_block_spec = functools.partial(saved[2], sdpa_attention=False)
    try:
        yield
    finally:
        (backend.gpt_layer_spec_for, backend.apply_backend_precision,
         spec_provider.quantized_gpt_block_spec) = saved


def _build(cfg, run):
    """Model, DDP wrapper and optimizer from the training stack's builder (pretrain.py's)."""
    from nvfp4_megatron.training.model import build_training_stack

    with _spec_hooks(run):
        return build_training_stack(_compose(cfg, run), log=lambda msg: None)


def run_one(cfg, run, out):
    prepare_run(run)
    stack = _build(cfg, run)
    model, ddp = stack.model, stack.ddp
    table = stack.table  # None for Megatron's local spec
    losses, calls, _ = train(ddp, stack.optimizer, steps=run.get("steps", 1),
                             repeat_batch=run.get("repeat_batch", True))
    write_rank_result(out, run, {
        "losses": losses, "calls": calls,
        "bf16_blocks": list(table.bf16_blocks) if table else None,
        "quantized_blocks": list(table.quantized_blocks()) if table else None,
        "local_blocks": sorted(m.layer_number - 1 for m in model.modules()
                               if type(m).__name__ == "TransformerLayer"),
        "grads": {n: p.main_grad.float().norm().item() for n, p in ddp.module.named_parameters()}
        if run.get("dump_grads") else None,
    })


def layer_checks(out):
    """Layer-level checks: bf16 recipe == Megatron's layers bit for bit; SDPA vs local attention."""
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from nvfp4_megatron.mcore.attention import SDPAttention
    from nvfp4_megatron.mcore.layers import (
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
    from nvfp4_megatron.mcore.policy import apply_precision
    from nvfp4_megatron.quant.registry import get_recipe

    layer = QuantizedColumnParallelLinear(64, 96, config=tc, init_method=torch.nn.init.normal_,
                                          bias=False)
    try:
        layer(torch.randn(4, 1, 64))
        result["unconfigured_refused"] = False
    except RuntimeError as e:
        result["unconfigured_refused"] = "apply_precision" in str(e)
    plain = _build({"tp": 1, "pp": 1}, {"spec": "local", "num_layers": 2}).model
    try:
        apply_precision(plain, get_recipe("nvfp4_all_layers"))
        result["plain_spec_refused"] = False
    except ValueError as e:
        result["plain_spec_refused"] = "quantized_gpt_layer_spec" in str(e)
    with open(os.path.join(out, "layer_checks.json"), "w") as f:
        json.dump(result, f)


def _run(lay, run, out):
    if run.get("kind") == "layer_checks":
        layer_checks(out)
    else:
        run_one({"tp": 1, "pp": 1, **lay}, run, out)


if __name__ == "__main__":
    run_all(_run)
