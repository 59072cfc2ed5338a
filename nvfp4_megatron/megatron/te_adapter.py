"""Map a project precision recipe onto Transformer Engine's recipes (Blackwell native path).

The mapping is pure Python and returns a plain description, so it is tested on machines where TE
cannot be installed (TE and Megatron-Core do not co-install on a GPU-less machine). Only
:func:`build_te_recipe` imports TE.

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
the TE recipe object must come from :func:`build_te_recipe`; the training code hands it to TE's
autocast for the quantized blocks.

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
