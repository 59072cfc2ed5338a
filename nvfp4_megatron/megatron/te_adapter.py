"""Map a project precision recipe onto Transformer Engine's recipes (Blackwell native path).

The mapping is pure Python and returns a plain description, so it is tested on machines where TE
cannot be installed (TE and Megatron-Core do not co-install on a GPU-less machine). Only
:func:`build_te_recipe` and the wiring at the end of this file (:func:`te_autocast`,
:func:`apply_te_precision`) import TE; the wiring is tested with a fake TE module.

What maps (DESIGN.md §2; TE ``transformer_engine.common.recipe``):

=================  ====================================================  =========================
our recipe         TE recipe (constructor arguments)                     Megatron config
=================  ====================================================  =========================
nvfp4 family       ``NVFP4BlockScaling(disable_rht=, disable_stochastic  ``fp4='e2m1'``,
                   _rounding=, disable_2d_quantization=)`` from our       ``fp4_recipe='nvfp4'``
                   ``rht`` / ``stochastic_rounding`` / weight tile
mxfp8              ``MXFP8BlockScaling(fp8_format=E4M3|HYBRID)``         ``fp8_recipe='mxfp8'``
fp8_cs             ``Float8CurrentScaling(fp8_format=HYBRID|E4M3)``      ``fp8_recipe='tensorwise'``
fp8_block          ``Float8BlockScaling(fp8_format=E4M3)``               ``fp8_recipe='blockwise'``
=================  ====================================================  =========================

BF16 blocks map to Megatron's ``first_last_layers_bf16`` / ``num_layers_at_start_in_bf16`` /
``num_layers_at_end_in_bf16``. TE's RHT/SR/2D switches are only reachable through constructor
arguments (Megatron itself builds ``NVFP4BlockScaling`` with none, i.e. TE's env-var defaults), so
the TE recipe object must come from :func:`build_te_recipe`; :func:`apply_te_precision` runs each
quantized block's forward under TE's autocast with it (see the comment above the wiring for why
not through Megatron's own ``fp4``/``fp8`` config fields).

Refused (:class:`TEUnsupported`, naming what cannot be expressed): MXFP4 (no TE recipe); the MS-FP4
options; per-operand settings TE does not have (RHT outside Wgrad, SR on only one gradient copy,
different weight tiles for Fprop and Dgrad, non-power-of-two block-FP8 scales, power-of-two
current-scaling scales, mixed per-GEMM formats, a BF16 GEMM inside a quantized layer); explicit
BF16 blocks that are not a first-N / last-M selection; the ``fprop``-only precision switch.
"""

from __future__ import annotations

from typing import Any

from nvfp4_megatron.quant.recipe import PrecisionRecipe, TensorQuant, bf16_block_set

TE_FORMAT = {"e4m3": "E4M3", "e5m2": "E5M2"}


class TEUnsupported(ValueError):
    """The recipe has a setting Transformer Engine cannot express."""


def _all_operands(recipe: PrecisionRecipe) -> dict[str, TensorQuant]:
    return recipe.linear.operands()


def _fp8_format(ops: dict[str, TensorQuant], name: str) -> str:
    fwd = {ops[k].fp8_dtype for k in ("fprop.input", "fprop.weight", "dgrad.weight",
                                        "wgrad.input")}
    bwd = {ops[k].fp8_dtype for k in ("dgrad.grad_output", "wgrad.grad_output")}
    if fwd == {"e4m3"} and bwd == {"e4m3"}:
        return "E4M3"
    if fwd == {"e4m3"} and bwd == {"e5m2"}:
        return "HYBRID"
    raise TEUnsupported(f"{name}: TE formats are E4M3 everywhere or HYBRID (E4M3 forward, E5M2 "
                        f"gradients); got forward {sorted(fwd)}, gradients {sorted(bwd)}")


def _nvfp4_kwargs(ops: dict[str, TensorQuant], name: str) -> dict[str, bool]:
    w_f, w_d = ops["fprop.weight"], ops["dgrad.weight"]
    if w_f != w_d:
        raise TEUnsupported(f"{name}: TE uses one weight quantization for Fprop and Dgrad; "
                            f"got {w_f.describe()!r} vs {w_d.describe()!r}")
    if ops["fprop.input"].tile != (1, 16) or any(
            ops[k].tile != (1, 16) for k in ("dgrad.grad_output", "wgrad.grad_output",
                                               "wgrad.input")):
        raise TEUnsupported(f"{name}: TE NVFP4 quantizes activations and gradients in 1x16 blocks")
    for k in ("fprop.input", "fprop.weight", "dgrad.grad_output", "dgrad.weight"):
        if ops[k].rht:
            raise TEUnsupported(f"{name}: TE applies RHT only to the Wgrad operands; {k} has rht")
    rht = {ops["wgrad.input"].rht, ops["wgrad.grad_output"].rht}
    sr = {ops["dgrad.grad_output"].stochastic_rounding, ops["wgrad.grad_output"].stochastic_rounding}
    if len(sr) != 1:
        raise TEUnsupported(f"{name}: TE applies stochastic rounding to both gradient copies or "
                            "neither")
    return {"disable_rht": not rht.pop(),
            "disable_stochastic_rounding": not sr.pop(),
            "disable_2d_quantization": w_f.tile != (16, 16)}


def describe_te_recipe(recipe: PrecisionRecipe, *, num_layers: int) -> dict[str, Any]:
    """A plain description: TE class + constructor kwargs and the Megatron config fields.

    ``te_class`` is None for the ``bf16`` recipe (TE runs its layers unquantized).
    """
    name = recipe.name
    lin = recipe.linear
    if lin.msfp4 is not None:
        raise TEUnsupported(f"{name}: the Microsoft FP4 options (DGE/OCC) have no TE equivalent")
    sched = recipe.schedule
    if sched.enabled and sched.scope != "all":
        raise TEUnsupported(f"{name}: switch_to_bf16.scope='fprop' has no TE equivalent (TE "
                            "quantizes all GEMMs of a layer or none); use scope 'all'")
    megatron: dict[str, Any] = {}
    ops = _all_operands(recipe)
    if not recipe.is_quantized:
        return {"recipe": name, "te_class": None, "te_kwargs": {}, "megatron_config": megatron,
                "bf16_switch": None}
    formats = {t.format for t in ops.values()}
    if len(formats) != 1:
        raise TEUnsupported(f"{name}: TE recipes use one format for every GEMM operand of a "
                            f"layer; this recipe mixes {sorted(formats)}")
    fmt = formats.pop()
    if fmt == "nvfp4":
        te_class, kwargs = "NVFP4BlockScaling", _nvfp4_kwargs(ops, name)
        megatron.update(fp4="e2m1", fp4_recipe="nvfp4")
    elif fmt == "mxfp8":
        te_class, kwargs = "MXFP8BlockScaling", {"fp8_format": _fp8_format(ops, name)}
        megatron.update(fp8=kwargs["fp8_format"].lower(), fp8_recipe="mxfp8")
    elif fmt == "fp8":
        if any(t.pow2_scale for t in ops.values()):
            raise TEUnsupported(f"{name}: pow2_scale for FP8 current scaling is not set through "
                                "Megatron's TE recipe; use pow2_scale=False")
        te_class, kwargs = "Float8CurrentScaling", {"fp8_format": _fp8_format(ops, name)}
        megatron.update(fp8=kwargs["fp8_format"].lower(), fp8_recipe="tensorwise")
    elif fmt == "fp8_block":
        if not all(t.pow2_scale for t in ops.values()):
            raise TEUnsupported(f"{name}: TE's Float8BlockScaling uses power-of-two scales; set "
                                "pow2_scale=True on every operand")
        want = {"fprop.weight": (128, 128), "dgrad.weight": (128, 128)}
        for k, t in ops.items():
            if t.tile != want.get(k, (1, 128)):
                raise TEUnsupported(f"{name}: TE block FP8 uses 128x128 weights and 1x128 "
                                    f"activations/gradients; {k} has tile {t.tile}")
        te_class, kwargs = "Float8BlockScaling", {"fp8_format": _fp8_format(ops, name)}
        megatron.update(fp8=kwargs["fp8_format"].lower(), fp8_recipe="blockwise")
    else:
        raise TEUnsupported(f"{name}: Transformer Engine has no {fmt} recipe (emulate it with "
                            "backend='emulated')")
    bf16 = bf16_block_set(recipe.layers, num_layers)
    first = 0
    while first in bf16:
        first += 1
    last = 0
    while (num_layers - 1 - last) in bf16 and last < num_layers - first:
        last += 1
    expressible = set(range(first)) | set(range(num_layers - last, num_layers))
    if bf16 != expressible:
        raise TEUnsupported(f"{name}: BF16 blocks {sorted(bf16)} are not a first-N/last-M "
                            "selection; Megatron's TE path only has num_layers_at_start_in_bf16 / "
                            "num_layers_at_end_in_bf16")
    if bf16:
        megatron.update(first_last_layers_bf16=True, num_layers_at_start_in_bf16=first,
                        num_layers_at_end_in_bf16=last)
    return {"recipe": name, "te_class": te_class, "te_kwargs": kwargs,
            "megatron_config": megatron,
            "bf16_switch": None if not sched.enabled else
            {"at_step": sched.at_step, "at_tokens": sched.at_tokens,
             "how": "set the model config's fp8/fp4 fields to None at the switch"}}


def build_te_recipe(description: dict[str, Any]):
    """The TE recipe object for a description (imports Transformer Engine); None for bf16."""
    if description["te_class"] is None:
        return None
    try:
        from transformer_engine.common import recipe as te_recipe
    except ImportError as e:
        raise RuntimeError("build_te_recipe needs transformer_engine, which does not import here "
                           f"({e}); use backend='emulated'") from e
    cls = getattr(te_recipe, description["te_class"], None)
    if cls is None:
        raise RuntimeError(f"this Transformer Engine has no {description['te_class']}; upgrade "
                           "to TE >= 2.8 or use backend='emulated'")
    kwargs = dict(description["te_kwargs"])
    if "fp8_format" in kwargs:
        kwargs["fp8_format"] = getattr(te_recipe.Format, kwargs["fp8_format"])
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# Wiring for the Blackwell path (backend resolved to "te"). Not runnable on the machines this
# project is developed on (TE cannot be installed next to Megatron-Core without a GPU); tested
# with a fake ``transformer_engine`` in ``sys.modules`` (tests/megatron/test_te_wiring.py).
#
# Why per-layer autocast instead of Megatron's ``config.fp4``/``config.fp8`` fields: Megatron's
# ``get_fp4_context`` builds ``NVFP4BlockScaling(fp8_dpa=...)`` itself, i.e. with TE's
# env-var defaults for RHT/SR/2D, so the recipe's own switches would be lost. We leave those
# config fields unset (Megatron's contexts are then ``nullcontext``) and run each quantized
# ``TransformerLayer``'s forward under TE's autocast with the recipe object from
# :func:`build_te_recipe`. BF16 blocks (global index, pipeline offset included) and the
# precision schedule's BF16 switch run without autocast, i.e. TE's unquantized BF16 GEMMs.
# --------------------------------------------------------------------------------------------


_TE_EXTENSIONS = "megatron.core.extensions.transformer_engine"  # Megatron's TE module wrappers


def te_gpt_layer_spec(config, *, qk_layernorm: bool = False):
    """Megatron's own Transformer Engine GPT layer spec for ``config`` (dense or MoE)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )

    return get_gpt_layer_with_transformer_engine_spec(
        num_experts=config.num_moe_experts, moe_grouped_gemm=config.moe_grouped_gemm,
        qk_layernorm=qk_layernorm)


def te_autocast(te_recipe, amax_group=None):
    """TE's autocast context for ``te_recipe`` (``te.autocast`` on TE >= 2.8, else
    ``fp8_autocast``, which TE uses for FP8 and FP4 alike)."""
    import transformer_engine.pytorch as te

    if hasattr(te, "autocast"):
        return te.autocast(enabled=True, recipe=te_recipe, amax_reduction_group=amax_group)
    return te.fp8_autocast(enabled=True, fp8_recipe=te_recipe, fp8_group=amax_group)


def _amax_group():
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    # the group Megatron's own fp8/fp4 contexts use
    return parallel_state.get_amax_reduction_group(with_context_parallel=True)


def _autocast_forward(orig_forward, te_recipe, block: int):
    import functools

    from nvfp4_megatron.quant import state as qstate

    @functools.wraps(orig_forward)
    def forward(*args, **kwargs):
        if qstate.get_state().bf16_switch == "all":  # precision schedule: everything BF16 now
            return orig_forward(*args, **kwargs)
        with te_autocast(te_recipe, _amax_group()):
            return orig_forward(*args, **kwargs)

    forward.__nvfp4_te_block__ = block
    return forward


def apply_te_precision(model_chunks, recipe: PrecisionRecipe, *, log: bool = True):
    """Run each quantized block of a TE-spec model under TE autocast with our recipe.

    Returns the same ``PrecisionTable`` as ``policy.apply_precision`` with backend ``te``.
    Refuses a model that has no TE linear layers (it was built with the local spec) and a model
    that was already wired (double autocast).
    """
    import logging

    import torch
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from nvfp4_megatron.megatron.policy import (
        PrecisionRow, PrecisionTable, _gather_rows, _rank, _schedule_text)
    from nvfp4_megatron.quant.recipe import bf16_block_set

    chunks = [model_chunks] if isinstance(model_chunks, torch.nn.Module) else list(model_chunks)
    layers = [m for c in chunks for m in c.modules() if isinstance(m, TransformerLayer)]
    if not layers:
        raise ValueError("apply_te_precision: the model has no TransformerLayer")
    num_blocks = layers[0].config.num_layers
    desc = describe_te_recipe(recipe, num_layers=num_blocks)
    te_recipe = build_te_recipe(desc)
    bf16 = bf16_block_set(recipe.layers, num_blocks) if recipe.is_quantized else set()
    rows = []
    for layer in layers:
        block = layer.layer_number - 1
        te_linears = [n for n, m in layer.named_modules()
                      if type(m).__module__.startswith(_TE_EXTENSIONS)
                      and "Linear" in type(m).__name__]
        if not te_linears:
            raise ValueError(f"apply_te_precision: block {block} has no Transformer Engine linear "
                             "layers; build the model with te_gpt_layer_spec (backend 'te')")
        graphs = getattr(layer.config, "cuda_graph_impl", "none")
        if graphs not in (None, "none"):
            raise ValueError(f"apply_te_precision: cuda_graph_impl={graphs!r} replays captured "
                             "graphs around the per-block autocast; set cuda_graph_impl='none'")
        if hasattr(layer.forward, "__nvfp4_te_block__"):
            raise ValueError(f"apply_te_precision: block {block} is already wired")
        quantized = te_recipe is not None and block not in bf16
        if quantized:
            layer.forward = _autocast_forward(layer.forward, te_recipe, block)
        ops = recipe.linear.operands()
        for name in te_linears:
            for gemm, a, b in (("fprop", "input", "weight"), ("dgrad", "grad_output", "weight"),
                               ("wgrad", "grad_output", "input")):
                rows.append(PrecisionRow(
                    block=block, layer=name, gemm=gemm,
                    operand_a=f"{a}: {ops[f'{gemm}.{a}'].describe() if quantized else 'bf16'}",
                    operand_b=f"{b}: {ops[f'{gemm}.{b}'].describe() if quantized else 'bf16'}",
                    backend=f"te:{desc['te_class']}" if quantized else "te-bf16",
                    quantized=quantized))
    table = PrecisionTable(recipe=recipe.name, backend="te", num_blocks=num_blocks,
                           bf16_blocks=tuple(sorted(bf16)), schedule=_schedule_text(recipe),
                           rows=tuple(_gather_rows(rows)))
    if log and _rank() == 0:
        logging.getLogger(__name__).info("\n%s\nTE recipe: %s(%s)", table.format(),
                                         desc["te_class"], desc["te_kwargs"])
    return table
