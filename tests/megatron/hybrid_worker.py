"""Worker for the hybrid (Mamba-2 + attention + MLP) tests: gloo ranks, Megatron's own schedules.

Run as ``python -m torch.distributed.run --nproc_per_node=N hybrid_worker.py CONFIG.json OUT``.
Runs (``kind``):

* ``train``: a tiny ``HybridModel`` from ``training.model.build_training_stack`` (the product's
  builder, FP32 params, emulated GEMMs, CPU initialisation) trained a few steps; writes the
  losses, the quantizer calls of step 0 per (layer key, role) and the precision table's rows.
* ``mixer_reference``: ``LocalMambaMixer`` (TP1, FP32) against the float64 definition of
  Megatron's mixer in ``tests/ssm/ssd_reference.py``: output and every gradient.
* ``meta_builds``: the 12B / 8B hybrid recipes built by the training builder on the meta device
  (TP1): parameter count, BF16 blocks and the Mamba rows of the precision table.
* ``build_refusal``: a model the builder must refuse (the error message is written).

``train`` runs may save their initial weights by global name (``save_init``) or start from such
a file (``load_init``), so that layouts whose CPU initialisation differs (PP) compare.
"""

import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch

from _worker_common import override, prepare_run, run_all, train, write_rank_result

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ssm"))

SMALL = {  # the hybrid shape of the TP tests: 6 blocks, every kind twice
    "model.num_layers": 6, "model.hybrid_override_pattern": "M-*M-*", "model.hidden_size": 64,
    "model.num_attention_heads": 4, "model.num_query_groups": 2, "model.ffn_hidden_size": 128,
    "model.kv_channels": 16, "model.mamba_num_heads": 32, "model.mamba_head_dim": 4,
    "model.mamba_state_dim": 16, "model.mamba_num_groups": 2, "model.vocab_size": 256,
    "model.seq_length": 32, "model.activation": "gelu", "model.normalization": "RMSNorm",
    "model.position_embedding_type": "none", "model.use_cpu_initialization": True,
}


def _compose(lay, run) -> dict:
    from nvfp4_megatron.cli.compose import compose_config, to_plain

    ov = {**SMALL,
          "parallel.tensor_model_parallel_size": lay.get("tp", 1),
          "parallel.pipeline_model_parallel_size": lay.get("pp", 1),
          "parallel.sequence_parallel": lay.get("sp", False),
          "precision.recipe": run.get("recipe", "bf16"), "precision.backend": "emulated",
          "train.lr": 3e-3, "train.weight_decay": 0.0, "train.clip_grad": 0.0,
          "train.adam_beta1": 0.9, "train.adam_beta2": 0.999, "train.bf16": False,
          **{f"precision.{k}": v for k, v in run.get("precision", {}).items()},
          **run.get("model", {})}
    return to_plain(compose_config([override(k, v) for k, v in ov.items()]))


def run_train(lay, run, out):
    from nvfp4_megatron.training.model import build_training_stack

    prepare_run(run)
    stack = build_training_stack(_compose(lay, run), log=lambda msg: None)
    table = stack.table
    params = _global_params(stack.model)
    if run.get("save_init"):  # the initial weights by global name, for another layout to load
        torch.save({k: p.detach().clone() for k, p in params.items()}, run["save_init"])
    if run.get("load_init"):  # start from them: CPU initialisation differs between PP layouts
        init = torch.load(run["load_init"])
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(init[k])
    losses, calls, grads = train(stack.ddp, stack.optimizer, steps=run.get("steps", 1),
                                 repeat_batch=False, grads0=_full_grad_norms)
    blocks = {}
    for m in stack.model.modules():
        if type(m).__name__ in ("MambaLayer", "TransformerLayer", "MLPLayer"):
            blocks[m.layer_number - 1] = type(m).__name__
    write_rank_result(out, run, {
        "losses": losses, "calls": calls, "grads0": grads,
        "bf16_blocks": list(table.bf16_blocks),
        "quantized_blocks": list(table.quantized_blocks()),
        "rows": sorted({f"{r.block}.{r.layer}" for r in table.rows}),
        "blocks": {str(k): v for k, v in sorted(blocks.items())}})


def _global_params(model) -> dict:
    """Parameters keyed by a name every layout shares: ``layers.<global block>.<name>`` (a
    pipeline stage numbers its ``decoder.layers`` from 0; ``layer_number`` is global)."""
    blocks = {name: m.layer_number - 1 for name, m in model.named_modules()
              if type(m).__name__ in ("MambaLayer", "TransformerLayer", "MLPLayer")}
    out = {}
    for name, p in model.named_parameters():
        key = name
        for prefix, b in blocks.items():
            if name.startswith(prefix + "."):
                key = f"layers.{b}.{name[len(prefix) + 1:]}"
                break
        out[key] = p
    return out


def _full_grad_norms(ddp) -> dict:
    """Step-0 gradient norm of every parameter as one logical tensor, by global name: TP shards
    combined (a TP-sharded parameter's squared shard norms summed over the TP group), so TP1 and
    TP2 compare; pipeline stages hold disjoint names."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    norms = {}
    for name, p in _global_params(ddp.module).items():
        sq = p.main_grad.double().square().sum()
        if getattr(p, "tensor_model_parallel", False):
            torch.distributed.all_reduce(sq, group=group)
        norms[name] = float(sq.sqrt())
    return norms


def mixer_reference(out):
    from megatron.core import tensor_parallel
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.transformer_config import TransformerConfig

    from nvfp4_megatron.mcore.hybrid_spec import quantized_hybrid_stack_spec
    from nvfp4_megatron.mcore.layers import LinearPrecision
    from nvfp4_megatron.mcore.mamba_mixer import LocalMambaMixer
    from nvfp4_megatron.quant.recipe import BF16_LINEAR
    from ssd_reference import mamba_mixer_reference

    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    nh, hd, g, n, d = 8, 6, 2, 5, 24
    cfg = TransformerConfig(num_layers=1, hidden_size=d, num_attention_heads=4,
                            use_cpu_initialization=True, mamba_num_heads=nh, mamba_head_dim=hd,
                            mamba_num_groups=g, mamba_state_dim=n, is_hybrid_model=True)
    mixer_spec = quantized_hybrid_stack_spec(d_conv=3, chunk_size=4).submodules.mamba_layer
    mixer_spec = mixer_spec.submodules.mixer
    mixer = LocalMambaMixer(cfg, mixer_spec.submodules, d_model=d, d_conv=3, chunk_size=4,
                            layer_number=1,
                            pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    for lin in (mixer.in_proj, mixer.out_proj):
        lin.set_precision(LinearPrecision(recipe=BF16_LINEAR, layer_key="t", block=0))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # move D and the norm weight away from their all-ones init
        mixer.D.copy_(torch.randn(mixer.D.shape, generator=gen))
        mixer.norm.weight.copy_(1 + 0.3 * torch.randn(mixer.norm.weight.shape, generator=gen))
    x = torch.randn(11, 2, d, generator=gen, requires_grad=True)  # 11 steps: 3 chunks of 4
    y, bias = mixer(x)
    gy = torch.randn(y.shape, generator=gen)
    (y * gy).sum().backward()
    names = ("in_proj_w", "conv_w", "conv_b", "dt_bias", "A_log", "D", "norm_w", "out_proj_w")
    params = (mixer.in_proj.weight, mixer.conv1d_weight, mixer.conv1d_bias, mixer.dt_bias,
              mixer.A_log, mixer.D, mixer.norm.weight, mixer.out_proj.weight)
    leaves = {k: p.detach().double().requires_grad_(True) for k, p in zip(names, params)}
    xr = x.detach().double().requires_grad_(True)
    yr = mamba_mixer_reference(xr, nheads=nh, headdim=hd, ngroups=g, dstate=n, **leaves)
    (yr * gy.double()).sum().backward()

    def err(a, b):
        return float((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-30))

    result = {"out": err(y.detach(), yr.detach()), "dx": err(x.grad, xr.grad),
              "bias_is_none": bias is None,
              "grads": {k: err(p.grad, leaves[k].grad) for k, p in zip(names, params)}}
    with open(os.path.join(out, "mixer_reference.json"), "w") as f:
        json.dump(result, f)


def meta_builds(out, recipes):
    """The training builder (build_model) on the meta device for the big hybrid recipes, TP1."""
    from nvfp4_megatron.cli.compose import compose_config, to_plain
    from nvfp4_megatron.training.model import build_model, recipe_from_config

    result = {}
    for name in recipes:
        c = to_plain(compose_config([
            f"+recipe={name}", "parallel.tensor_model_parallel_size=1",
            "parallel.context_parallel_size=1", "parallel.pipeline_model_parallel_size=1",
            "parallel.sequence_parallel=false", "model.use_cpu_initialization=true",
            "precision.backend=emulated"]))
        with torch.device("meta"):
            model, config, table = build_model(c, recipe_from_config(c["precision"]),
                                               log=lambda msg: None)
        kinds = Counter(type(m).__name__ for m in model.decoder.layers)
        rows = {(r.block, r.layer): r.quantized for r in table.rows if r.gemm == "fprop"}
        result[name] = {
            "params": sum(p.numel() for p in model.parameters()),
            "bf16_blocks": list(table.bf16_blocks),
            "kinds": dict(kinds),
            "mamba_rows": sorted(f"{b}.{layer}:{'q' if q else 'bf16'}"
                                 for (b, layer), q in rows.items() if "mixer." in layer),
            "num_blocks": table.num_blocks,
        }
        del model
    with open(os.path.join(out, "meta_builds.json"), "w") as f:
        json.dump(result, f)


def build_refusal(lay, run, out):
    """Build a hybrid model that the precision policy must refuse; record the message."""
    from nvfp4_megatron.training.model import build_training_stack

    prepare_run(run)
    try:
        build_training_stack(_compose(lay, run), log=lambda msg: None)
        msg = None
    except ValueError as e:
        msg = str(e)
    write_rank_result(out, run, {"error": msg})


def _run(lay, run, out):
    kind = run.get("kind", "train")
    if kind == "build_refusal":
        build_refusal(lay, run, out)
    elif kind == "mixer_reference":
        mixer_reference(out)
    elif kind == "meta_builds":
        meta_builds(out, run["recipes"])
    else:
        run_train(lay, run, out)


if __name__ == "__main__":
    run_all(_run)
