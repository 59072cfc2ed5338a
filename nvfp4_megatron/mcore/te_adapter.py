"""The Transformer Engine backend, wired through Megatron-Core's own quantization seams.

On the TE path (Blackwell, ``precision.backend=te``) the model is Megatron's TE layer spec and
Megatron itself decides, per layer, whether a forward runs under TE's autocast. This module only
tells Megatron what to do, through the fields and the hook it already has:

1. ``TransformerConfig`` fields (set when the config is built, :func:`megatron_config_fields`):
   ``fp4='e2m1'``/``fp4_recipe='nvfp4'`` or ``fp8``/``fp8_recipe`` (``tensorwise`` | ``mxfp8`` |
   ``blockwise``), ``first_last_layers_bf16`` / ``num_layers_at_start_in_bf16`` /
   ``num_layers_at_end_in_bf16`` (the BF16 blocks), ``moe_router_padding_for_quantization`` for
   MoE, and ``fp8_param``/``fp4_param``/``fp8_dot_product_attention``/``fp8_multi_head_attention``
   off. Everything in Megatron that keys on them then follows: the per-layer contexts of
   ``TransformerBlock`` and ``HybridStack``, ``TransformerLayer.get_inner_quantization_context``
   (what the fine-grained and EP-overlap schedules call instead of ``forward``), MoE token padding
   to the quantized GEMM's alignment (``moe_utils.get_align_size_for_quantization``, the experts'
   ``Fp8Padding``) and the recompute checks.
2. The recipe *object*: Megatron builds it in ``fp4_utils.get_fp4_recipe(config)`` /
   ``fp8_utils.get_fp8_recipe(config)`` with only ``fp8_format``/``fp8_dpa``, so RHT, SR, 2D and
   everything else would come from TE's defaults -- which TE reads from ``NVTE_*`` environment
   variables when it is imported. :func:`install_te_recipe` replaces those two module functions
   (both ``get_*_context`` and the CUDA-graph code look them up at call time) with a hook that
   returns the object :func:`build_te_recipe` made. Why this hook and not ``fp4_recipe='custom'``
   with a quantizer factory: see docs/recipes.md ("The TE adapter").

:func:`build_te_recipe` passes **every** dataclass field of the installed TE recipe class
explicitly (``dataclasses.fields``); a field this module does not know (a new TE knob) or a
field it relies on that TE no longer has is a :class:`TEAPIMismatch` naming the TE version. The
quantization parameters TE derives from them (per-role ``QParams``, some of them class attributes
computed from the environment at import) are read back and compared with what the recipe asks.
Capability comes from TE's own ``check_*_support()`` (:func:`te_support`).

The BF16 switch near the end of training acts through the same fields: :func:`apply_te_precision`
registers a listener on ``quant.state``; ``set_bf16_switch('all')`` sets ``fp8``/``fp4`` to None
and turns the MoE padding off on every ``TransformerConfig`` of the model, ``None`` restores them.

No forward is patched. What maps (DESIGN.md §2; TE ``transformer_engine/common/recipe``):

============  ==============================================  ==============================
our recipe    TE recipe (every field passed; see the doc)     Megatron config
============  ==============================================  ==============================
nvfp4 family  ``NVFP4BlockScaling(disable_rht=,               ``fp4='e2m1'``,
              disable_stochastic_rounding=,                   ``fp4_recipe='nvfp4'``
              disable_2d_quantization=, ...)``
mxfp8         ``MXFP8BlockScaling(fp8_format=E4M3, ...)``     ``fp8_recipe='mxfp8'``
fp8_cs        ``Float8CurrentScaling(fp8_format=HYBRID)``       ``fp8_recipe='tensorwise'``
fp8_block     ``Float8BlockScaling(fp8_format=E4M3, ...)``    ``fp8_recipe='blockwise'``
bf16          none (TE modules unquantized)                   ``fp8=None``, ``fp4=None``
============  ==============================================  ==============================

Refused (:class:`TEUnsupported`): MXFP4 and the Microsoft-FP4 formats/options (no TE recipe);
per-operand settings TE has no knob for (RHT outside the Wgrad operands or on only one of them,
SR outside the gradient or on one gradient copy only, different Fprop/Dgrad weight quantization,
non-pow2 block-FP8 scales, pow2 current-scaling scales, mixed formats in a layer); BF16 blocks
that are not a first-N/last-M selection (Megatron 0.19.2 has no per-layer list); the
``fprop``-only precision switch. Nothing here has run on Blackwell yet (docs/recipes.md).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import os
from dataclasses import dataclass
from typing import Any

from nvfp4_megatron.quant.recipe import PrecisionRecipe, TensorQuant, bf16_block_set

TE_MIN_VERSION = (2, 8)  # first release with NVFP4BlockScaling
# dispatchers that can pad the routing map (TransformerConfig refuses allgather / alltoall_seq)
_ROUTER_PADDING_DISPATCHERS = ("alltoall", "flex")

_log = logging.getLogger(__name__)


class TEUnsupported(ValueError):
    """The recipe has a setting Transformer Engine cannot express."""


class TEAPIMismatch(RuntimeError):
    """The installed Transformer Engine (or Megatron-Core) differs from the API this adapter
    was written against; the message names the version and what differs."""


# --------------------------------------------------------------------------- the description

@dataclass(frozen=True)
class TEFormat:
    """A member of ``transformer_engine.common.recipe.Format`` (by name)."""

    name: str


@dataclass(frozen=True)
class TEMMParams:
    """``transformer_engine.common.recipe.MMParams`` (GEMM options of the FP8 recipes)."""

    use_split_accumulator: bool


@dataclass(frozen=True)
class TEField:
    """The value we pass for one TE recipe field, and the first TE release that has it.

    A field that exists since ``TE_MIN_VERSION`` must be in the installed TE; a later one may be
    absent from an older TE, whose behaviour then is the value given here (the neutral one)."""

    value: Any
    since: tuple[int, int] = TE_MIN_VERSION


def _backward_override() -> dict[str, TEField]:
    # TE 2.15+: None = the backward GEMMs quantize as the recipe says (NVTE_BACKWARD_OVERRIDE
    # unset)
    return {"backward_override": TEField(None, since=(2, 15))}


def _no_fp8_attention() -> dict[str, TEField]:
    # attention BMMs stay high precision (DESIGN.md §2)
    return {"fp8_dpa": TEField(False), "fp8_mha": TEField(False)}


def _fp32_accumulation() -> dict[str, TEField]:
    # FP32 (split) accumulation in all three GEMMs: the numeric contract the emulation computes
    # (TE's Float8CurrentScaling default is fast accumulation for Fprop on Hopper)
    return {g: TEField(TEMMParams(use_split_accumulator=True))
            for g in ("fp8_gemm_fprop", "fp8_gemm_dgrad", "fp8_gemm_wgrad")}


def _nvfp4_fields(rht: bool, sr: bool, two_d: bool) -> dict[str, TEField]:
    # every field of NVFP4BlockScaling in TE 2.8 .. 2.18
    # (transformer_engine/common/recipe/__init__.py at tags v2.8 .. v2.18)
    return {
        "disable_rht": TEField(not rht),
        "disable_stochastic_rounding": TEField(not sr),
        "disable_2d_quantization": TEField(not two_d),
        "row_scaled_activation": TEField(False, since=(2, 16)),  # one global amax per tensor
        "nvfp4_4over6": TEField("none", since=(2, 17)),          # no adaptive 4-or-6 scaling
        "nvfp4_4over6_e4m3_use_256": TEField("none", since=(2, 17)),  # the 448 E4M3 bound
        "nvfp4_4over6_err_mode": TEField("MAE", since=(2, 17)),  # unused without 4over6
        "fp4_format": TEField(TEFormat("E2M1")),
        "fp8_format": TEField(TEFormat("E4M3")),
        **_no_fp8_attention(),
        **_backward_override(),
    }


def _qparams_expect(**roles: dict[str, Any]) -> dict[str, Any]:
    return {f"{role}.{k}": v for role, kv in roles.items() for k, v in kv.items()}


def _operands(recipe: PrecisionRecipe) -> dict[str, TensorQuant]:
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


def _nvfp4_switches(ops: dict[str, TensorQuant], name: str) -> tuple[bool, bool, bool]:
    """(rht, sr, 2d) of a recipe TE's NVFP4BlockScaling can express, else TEUnsupported."""
    w_f, w_d = ops["fprop.weight"], ops["dgrad.weight"]
    if w_f != w_d:
        raise TEUnsupported(f"{name}: TE uses one weight quantization for Fprop and Dgrad; "
                            f"got {w_f.describe()!r} vs {w_d.describe()!r}")
    if any(ops[k].tile != (1, 16) for k in ("fprop.input", "dgrad.grad_output",
                                             "wgrad.grad_output", "wgrad.input")):
        raise TEUnsupported(f"{name}: TE NVFP4 quantizes activations and gradients in 1x16 blocks")
    for k in ("fprop.input", "fprop.weight", "dgrad.grad_output", "dgrad.weight"):
        if ops[k].rht:
            raise TEUnsupported(f"{name}: TE applies RHT only to the Wgrad operands; {k} has rht")
    if ops["wgrad.input"].rht != ops["wgrad.grad_output"].rht:
        raise TEUnsupported(f"{name}: TE's disable_rht switches RHT on both Wgrad operands "
                            "(input and grad_output columnwise copies) or neither")
    for k in ("fprop.input", "fprop.weight", "dgrad.weight", "wgrad.input"):
        if ops[k].stochastic_rounding:
            raise TEUnsupported(f"{name}: TE applies stochastic rounding to gradients only; "
                                f"{k} has it")
    if ops["dgrad.grad_output"].stochastic_rounding != ops["wgrad.grad_output"].stochastic_rounding:
        raise TEUnsupported(f"{name}: TE applies stochastic rounding to both gradient copies or "
                            "neither")
    return (ops["wgrad.input"].rht, ops["dgrad.grad_output"].stochastic_rounding,
            w_f.tile == (16, 16))


def _bf16_first_last(recipe: PrecisionRecipe, num_layers: int) -> tuple[int, int]:
    bf16 = bf16_block_set(recipe.layers, num_layers)
    first = 0
    while first in bf16:
        first += 1
    last = 0
    while (num_layers - 1 - last) in bf16 and last < num_layers - first:
        last += 1
    if bf16 != set(range(first)) | set(range(num_layers - last, num_layers)):
        raise TEUnsupported(f"{recipe.name}: BF16 blocks {sorted(bf16)} are not a first-N/last-M "
                            "selection; Megatron-Core 0.19.2 selects BF16 layers only by "
                            "num_layers_at_start_in_bf16 / num_layers_at_end_in_bf16 (no per-layer "
                            "list). Use precision.bf16_first_blocks / bf16_last_blocks, or "
                            "precision.backend=emulated")
    return first, last


def describe_te_recipe(recipe: PrecisionRecipe, *, num_layers: int,
                       num_moe_experts: int | None = None,
                       moe_token_dispatcher_type: str | None = None) -> dict[str, Any]:
    """A plain description (no TE import): the TE class and a value for every field of it that
    any supported TE release has (``te_fields``), what TE must derive from them (``te_expect``),
    and Megatron's ``TransformerConfig`` fields (``megatron_config``). ``te_class`` is None for
    ``bf16`` (Megatron's TE modules then run unquantized)."""
    name = recipe.name
    lin = recipe.linear
    if lin.msfp4 is not None:
        raise TEUnsupported(f"{name}: the Microsoft FP4 options (DGE/OCC) have no TE equivalent")
    sched = recipe.schedule
    if sched.enabled and sched.scope != "all":
        raise TEUnsupported(f"{name}: switch_to_bf16.scope='fprop' has no TE equivalent (Megatron "
                            "quantizes all GEMMs of a layer or none); use scope 'all'")
    ops = _operands(recipe)
    te_class, fields, expect, env_hint = None, {}, {}, None
    megatron: dict[str, Any] = {"fp8": None, "fp4": None}
    if recipe.is_quantized:
        formats = {t.format for t in ops.values()}
        if len(formats) != 1:
            raise TEUnsupported(f"{name}: TE recipes use one format for every GEMM operand of a "
                                f"layer; this recipe mixes {sorted(formats)}")
        fmt = formats.pop()
        if fmt == "nvfp4":
            rht, sr, two_d = _nvfp4_switches(ops, name)
            te_class, fields = "NVFP4BlockScaling", _nvfp4_fields(rht, sr, two_d)
            expect = _qparams_expect(
                fp4_quant_fwd_inp={"random_hadamard_transform": rht, "stochastic_rounding": False,
                                   "fp4_2d_quantization": False},
                fp4_quant_fwd_weight={"random_hadamard_transform": False,
                                      "stochastic_rounding": False, "fp4_2d_quantization": two_d},
                fp4_quant_bwd_grad={"random_hadamard_transform": rht, "stochastic_rounding": sr,
                                    "fp4_2d_quantization": False})
            megatron.update(fp4="e2m1", fp4_recipe="nvfp4")
        elif fmt == "mxfp8":
            if any(t.tile != (1, 32) for t in ops.values()):
                raise TEUnsupported(f"{name}: TE MXFP8 uses 1x32 blocks for every operand")
            f8 = _fp8_format(ops, name)
            te_class = "MXFP8BlockScaling"
            fields = {"margin": TEField(0), "fp8_format": TEField(TEFormat(f8)),
                      **_no_fp8_attention(), **_backward_override()}
            megatron.update(fp8=f8.lower(), fp8_recipe="mxfp8")
        elif fmt == "fp8":
            if any(t.pow2_scale for t in ops.values()):
                raise TEUnsupported(f"{name}: TE's Float8CurrentScaling takes power-of-two scales "
                                    "from NVTE_FP8_CURRENT_SCALING_POWER_2_SCALES at import (its "
                                    "per-role QParams are class attributes); use pow2_scale=False")
            f8 = _fp8_format(ops, name)
            te_class = "Float8CurrentScaling"
            fields = {"use_power_2_scales": TEField(False), "fp8_format": TEField(TEFormat(f8)),
                      **_fp32_accumulation(), **_no_fp8_attention(), **_backward_override()}
            expect = _qparams_expect(**{r: {"power_2_scale": False, "amax_epsilon": 0.0}
                                        for r in ("fp8_quant_fwd_inp", "fp8_quant_fwd_weight",
                                                  "fp8_quant_bwd_grad")})
            env_hint = "NVTE_FP8_CURRENT_SCALING_POWER_2_SCALES"
            megatron.update(fp8=f8.lower(), fp8_recipe="tensorwise")
        elif fmt == "fp8_block":
            if not all(t.pow2_scale for t in ops.values()):
                raise TEUnsupported(f"{name}: this adapter runs TE's Float8BlockScaling with "
                                    "power-of-two scales; set pow2_scale=True on every operand")
            want = {"fprop.weight": (128, 128), "dgrad.weight": (128, 128)}
            for k, t in ops.items():
                if t.tile != want.get(k, (1, 128)):
                    raise TEUnsupported(f"{name}: TE block FP8 uses 128x128 weights and 1x128 "
                                        f"activations/gradients; {k} has tile {t.tile}")
            f8 = _fp8_format(ops, name)
            te_class = "Float8BlockScaling"
            fields = {"use_f32_scales": TEField(False), "fp8_format": TEField(TEFormat(f8)),
                      "x_block_scaling_dim": TEField(1), "w_block_scaling_dim": TEField(2),
                      "grad_block_scaling_dim": TEField(1), **_fp32_accumulation(),
                      **_no_fp8_attention(), **_backward_override()}
            expect = _qparams_expect(**{r: {"power_2_scale": True, "amax_epsilon": 0.0}
                                        for r in ("fp8_quant_fwd_inp", "fp8_quant_fwd_weight",
                                                  "fp8_quant_bwd_grad")})
            env_hint = "NVTE_FP8_BLOCK_SCALING_FP32_SCALES"
            megatron.update(fp8=f8.lower(), fp8_recipe="blockwise")
        else:
            raise TEUnsupported(f"{name}: Transformer Engine has no {fmt} recipe (emulate it with "
                                "precision.backend=emulated)")
        first, last = _bf16_first_last(recipe, num_layers)
    else:
        first = last = 0
    moe_padding = bool(recipe.is_quantized and num_moe_experts
                       and (moe_token_dispatcher_type or "alltoall") in _ROUTER_PADDING_DISPATCHERS)
    megatron.update(
        fp8_param=False, fp4_param=False,  # BF16 primary weights (FP32 master in the optimizer)
        fp8_dot_product_attention=False, fp8_multi_head_attention=False,
        first_last_layers_bf16=bool(first or last), num_layers_at_start_in_bf16=first,
        num_layers_at_end_in_bf16=last,
        # pad each expert's tokens to the quantized GEMM's alignment in the router (allgather
        # cannot; there Megatron's experts pad themselves because fp8/fp4 is set)
        moe_router_padding_for_quantization=moe_padding)
    return {"recipe": name, "te_class": te_class, "te_fields": fields, "te_expect": expect,
            "env_hint": env_hint, "megatron_config": megatron,
            "bf16_switch": None if not sched.enabled else
            {"at_step": sched.at_step, "at_tokens": sched.at_tokens,
             "how": "fp8/fp4 -> None and moe_router_padding_for_quantization -> False on every "
                    "TransformerConfig of the model"}}


# -------------------------------------------------------------------- the installed TE

def _parse_version(text: str) -> tuple[int, int]:
    from packaging.version import Version

    release = Version(text).release
    return release[0], release[1] if len(release) > 1 else 0


def te_version() -> str:
    """The installed Transformer Engine's version string (imports TE)."""
    try:
        import transformer_engine
    except ImportError as e:
        raise RuntimeError(f"transformer_engine does not import here ({e}); use "
                           "precision.backend=emulated") from e
    v = getattr(transformer_engine, "__version__", None)
    if v is None:
        from importlib import metadata

        v = metadata.version("transformer_engine")
    return str(v)


def _te_recipe_module():
    version = te_version()
    if _parse_version(version) < TE_MIN_VERSION:
        raise TEAPIMismatch(f"Transformer Engine {version} is older than "
                            f"{'.'.join(map(str, TE_MIN_VERSION))} (no NVFP4BlockScaling); "
                            "upgrade it or use precision.backend=emulated")
    return importlib.import_module("transformer_engine.common.recipe"), version


def _to_te(value: Any, rec) -> Any:
    if isinstance(value, TEFormat):
        return getattr(rec.Format, value.name)
    if isinstance(value, TEMMParams):
        return rec.MMParams(use_split_accumulator=value.use_split_accumulator)
    return value


def _from_te(value: Any) -> Any:
    """TE value -> our description's terms (for comparing a built object with the intent)."""
    if type(value).__name__ == "Format":
        return TEFormat(value.name)
    if type(value).__name__ == "MMParams":
        return TEMMParams(use_split_accumulator=value.use_split_accumulator)
    return value


def te_recipe_kwargs(description: dict[str, Any]) -> dict[str, Any]:
    """The constructor keywords for the installed TE: every field of its recipe class, each
    explicit. An unknown or missing field is a :class:`TEAPIMismatch` naming the TE version."""
    rec, version = _te_recipe_module()
    te_class = description["te_class"]
    cls = getattr(rec, te_class, None)
    if cls is None or not dataclasses.is_dataclass(cls):
        raise TEAPIMismatch(f"Transformer Engine {version} has no recipe dataclass {te_class} "
                            "in transformer_engine.common.recipe; use precision.backend=emulated")
    ours: dict[str, TEField] = description["te_fields"]
    installed = [f for f in dataclasses.fields(cls) if f.init]
    names = {f.name for f in installed}
    unknown = sorted(names - set(ours))
    ver = _parse_version(version)
    missing = sorted(n for n, f in ours.items() if n not in names and f.since <= ver)
    if unknown or missing:
        what = []
        if unknown:
            what.append(f"field(s) {unknown} this adapter does not set (their values would come "
                        "from TE's defaults or NVTE_* variables)")
        if missing:
            what.append(f"no field(s) {missing} that this adapter relies on")
        raise TEAPIMismatch(f"Transformer Engine {version}: {te_class} has " + " and ".join(what)
                            + "; read its transformer_engine/common/recipe/__init__.py and update "
                            "nvfp4_megatron/mcore/te_adapter.py, or use "
                            "precision.backend=emulated")
    return {f.name: _to_te(ours[f.name].value, rec) for f in installed}


def build_te_recipe(description: dict[str, Any]):
    """The TE recipe object for a description (imports TE); None for ``bf16``.

    Every field is passed explicitly, then what TE derives from the fields (per-role quantization
    parameters, some computed from ``NVTE_*`` variables when TE was imported) is compared with
    the recipe; a difference is a :class:`TEAPIMismatch` naming the TE version."""
    if description["te_class"] is None:
        return None
    kwargs = te_recipe_kwargs(description)
    rec, version = _te_recipe_module()
    te_class = description["te_class"]
    try:
        obj = getattr(rec, te_class)(**kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise TEAPIMismatch(f"Transformer Engine {version} refused {te_class}(**{kwargs}): "
                            f"{e}") from e
    wrong = []
    for name, want in kwargs.items():
        if _from_te(getattr(obj, name)) != _from_te(want):
            wrong.append(f"{name}={getattr(obj, name)!r} (passed {want!r})")
    for path, want in description["te_expect"].items():
        got = obj
        for part in path.split("."):
            got = getattr(got, part, _ABSENT)
        if got is _ABSENT or got != want:
            wrong.append(f"{path}={'absent' if got is _ABSENT else repr(got)} (recipe needs "
                         f"{want!r})")
    if wrong:
        hint = description.get("env_hint")
        env = (f"; TE computes these from {hint} when it is imported (it is "
               f"{os.environ.get(hint)!r} here): unset it" if hint else "")
        raise TEAPIMismatch(f"Transformer Engine {version} {te_class} does not quantize as "
                            f"recipe {description['recipe']!r} needs: " + "; ".join(wrong) + env)
    return obj


_ABSENT = object()

# TE's capability check per recipe class (transformer_engine.pytorch.quantization since 2.9,
# transformer_engine.pytorch.fp8 in 2.8)
TE_SUPPORT_CHECKS = {"NVFP4BlockScaling": "check_nvfp4_support",
                     "MXFP8BlockScaling": "check_mxfp8_support",
                     "Float8BlockScaling": "check_fp8_block_scaling_support",
                     "Float8CurrentScaling": "check_fp8_support"}


def te_support(te_class: str | None) -> tuple[bool, str]:
    """TE's own answer (``check_*_support()``) whether this GPU runs ``te_class``; ``None``
    (BF16) is supported wherever TE runs."""
    if te_class is None:
        return True, ""
    version = te_version()
    try:
        mod = importlib.import_module("transformer_engine.pytorch.quantization")
    except ImportError:
        mod = importlib.import_module("transformer_engine.pytorch.fp8")  # TE 2.8
    fn = getattr(mod, TE_SUPPORT_CHECKS[te_class], None)
    if fn is None:
        raise TEAPIMismatch(f"Transformer Engine {version} has no {TE_SUPPORT_CHECKS[te_class]}() "
                            f"in {mod.__name__}; update nvfp4_megatron/mcore/te_adapter.py")
    ok, reason = fn()
    return bool(ok), str(reason)


# Megatron-Core 0.19.2's get_fp8_context / get_fp4_context enter TE's autocast as
# transformer_engine.pytorch.fp8_autocast(enabled=, fp8_recipe=, fp8_group=); TE 2.9+ keeps that
# name as a deprecated alias of te.pytorch.autocast(recipe=, amax_reduction_group=).
_MEGATRON_AUTOCAST_ARGS = ("enabled", "fp8_recipe", "fp8_group")


def check_megatron_autocast_entry() -> None:
    """Refuse a TE whose ``fp8_autocast`` (what Megatron calls) is gone or takes other names."""
    version = te_version()
    pt = importlib.import_module("transformer_engine.pytorch")
    fn = getattr(pt, "fp8_autocast", None)
    from megatron.core import package_info

    if fn is None:
        raise TEAPIMismatch(f"Transformer Engine {version} has no transformer_engine.pytorch."
                            f"fp8_autocast, which Megatron-Core {package_info.__version__} calls "
                            "for every quantized layer; use a TE that still has it")
    params = inspect.signature(fn).parameters
    lacking = [a for a in _MEGATRON_AUTOCAST_ARGS if a not in params]
    if lacking:
        raise TEAPIMismatch(f"Transformer Engine {version}: fp8_autocast has no parameter(s) "
                            f"{lacking}, which Megatron-Core {package_info.__version__} passes")


# -------------------------------------------------------------- Megatron's recipe hook

_HOOK_SITES = {"fp8": ("megatron.core.fp8_utils", "get_fp8_recipe"),
               "fp4": ("megatron.core.fp4_utils", "get_fp4_recipe")}


class _RecipeHook:
    """Takes the place of ``megatron.core.{fp8,fp4}_utils.get_{fp8,fp4}_recipe``.

    With a recipe installed it returns that TE object for a config whose fp8/fp4 fields are the
    ones the adapter set (anything else is an error: a config the adapter did not build); with
    none installed it is Megatron's own function."""

    def __init__(self, kind: str, original):
        self.kind, self.original = kind, original
        self.te_recipe = None
        self.fields: dict[str, Any] = {}

    def __call__(self, config):
        if self.te_recipe is None:
            return self.original(config)
        got = {k: getattr(config, k, None) for k in self.fields}
        if got != self.fields:
            raise ValueError(f"Megatron asked for the {self.kind} recipe of a TransformerConfig "
                             f"with {got}; the TE adapter configured {self.fields}. Build the "
                             "config through nvfp4_megatron.mcore.backend.backend_config_fields")
        return self.te_recipe


def _hook(kind: str) -> _RecipeHook:
    modname, attr = _HOOK_SITES[kind]
    mod = importlib.import_module(modname)
    current = getattr(mod, attr)
    if not isinstance(current, _RecipeHook):
        current = _RecipeHook(kind, current)
        setattr(mod, attr, current)
    return current


def install_te_recipe(te_recipe, megatron_config: dict[str, Any]) -> None:
    """Make Megatron's ``get_fp4_recipe`` / ``get_fp8_recipe`` return ``te_recipe``."""
    kind = "fp4" if megatron_config.get("fp4") else "fp8" if megatron_config.get("fp8") else None
    for k in _HOOK_SITES:
        hook = _hook(k)
        if k == kind:
            hook.te_recipe = te_recipe
            hook.fields = {k: megatron_config[k], f"{k}_recipe": megatron_config[f"{k}_recipe"]}
        else:
            hook.te_recipe, hook.fields = None, {}


def installed_te_recipe(kind: str):
    """The TE object Megatron's ``get_{kind}_recipe`` returns now (None: Megatron's own)."""
    modname, attr = _HOOK_SITES[kind]
    current = getattr(importlib.import_module(modname), attr)
    return current.te_recipe if isinstance(current, _RecipeHook) else None


def uninstall_te_recipe_hooks() -> None:
    """Give Megatron back its own ``get_*_recipe`` functions (tests; a fresh run)."""
    for modname, attr in _HOOK_SITES.values():
        mod = importlib.import_module(modname)
        current = getattr(mod, attr)
        if isinstance(current, _RecipeHook):
            setattr(mod, attr, current.original)


@dataclass(frozen=True, kw_only=True)
class TEPlan:
    """What :func:`prepare_te` set up: the description, the TE object, the TE version."""

    description: dict[str, Any]
    te_recipe: Any
    te_version: str

    @property
    def megatron_config(self) -> dict[str, Any]:
        return dict(self.description["megatron_config"])


def _check_megatron_fields(fields: dict[str, Any]) -> None:
    from megatron.core import package_info
    from megatron.core.transformer.transformer_config import TransformerConfig

    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    lacking = sorted(set(fields) - known)
    if lacking:
        raise TEAPIMismatch(f"Megatron-Core {package_info.__version__}'s TransformerConfig has no "
                            f"field(s) {lacking}; the TE adapter is written for 0.19.2")


def prepare_te(recipe: PrecisionRecipe, *, num_layers: int, num_moe_experts: int | None = None,
               moe_token_dispatcher_type: str | None = None) -> TEPlan:
    """Before the model is built: describe, build the TE recipe object, check TE's and
    Megatron's APIs, and install the recipe in Megatron's hook. The caller builds the
    ``TransformerConfig`` with ``plan.megatron_config``."""
    desc = describe_te_recipe(recipe, num_layers=num_layers, num_moe_experts=num_moe_experts,
                              moe_token_dispatcher_type=moe_token_dispatcher_type)
    te_recipe = build_te_recipe(desc)
    check_megatron_autocast_entry()
    _check_megatron_fields(desc["megatron_config"])
    install_te_recipe(te_recipe, desc["megatron_config"])
    return TEPlan(description=desc, te_recipe=te_recipe, te_version=te_version())


def megatron_config_fields(recipe: PrecisionRecipe, *, num_layers: int,
                           num_moe_experts: int | None = None,
                           moe_token_dispatcher_type: str | None = None) -> dict[str, Any]:
    """``prepare_te(...)`` and return the ``TransformerConfig`` fields to build the model with."""
    return prepare_te(recipe, num_layers=num_layers, num_moe_experts=num_moe_experts,
                      moe_token_dispatcher_type=moe_token_dispatcher_type).megatron_config


# ------------------------------------------------------------------------ after the build

_TE_EXTENSIONS = "megatron.core.extensions.transformer_engine"  # Megatron's TE module wrappers
_SWITCH_FIELDS = ("fp8", "fp4", "moe_router_padding_for_quantization")


def te_gpt_layer_spec(config, *, qk_layernorm: bool = False):
    """Megatron's own Transformer Engine GPT layer spec for ``config`` (dense or MoE)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )

    return get_gpt_layer_with_transformer_engine_spec(
        num_experts=config.num_moe_experts, moe_grouped_gemm=config.moe_grouped_gemm,
        qk_layernorm=qk_layernorm)


class TEBF16Switch:
    """Acts on ``quant.state.set_bf16_switch`` through Megatron's config fields.

    ``'all'``: ``fp8``/``fp4`` None and no MoE router padding on every ``TransformerConfig`` of
    the model (including the experts' deep copies), so Megatron enters no TE autocast; ``None``:
    the fields the adapter configured. Held by the model (``quant.state`` keeps it weakly)."""

    def __init__(self, configs: list, megatron_config: dict[str, Any]):
        self.configs = configs
        self.on = {k: megatron_config[k] for k in _SWITCH_FIELDS}
        self.off = {"fp8": None, "fp4": None, "moe_router_padding_for_quantization": False}

    def on_bf16_switch(self, scope: str | None) -> None:
        if scope is None:
            values = self.on
        elif scope == "all":
            values = self.off
        else:
            raise TEUnsupported(f"the TE backend cannot switch only {scope!r} GEMMs to BF16 "
                                "(Megatron quantizes all GEMMs of a layer or none); use "
                                "switch_to_bf16.scope=all")
        for config in self.configs:
            for k, v in values.items():
                setattr(config, k, v)


def _model_configs(chunks) -> list:
    from megatron.core.transformer.transformer_config import TransformerConfig

    seen: dict[int, Any] = {}
    for chunk in chunks:
        for mod in chunk.modules():
            cfg = getattr(mod, "config", None)
            if isinstance(cfg, TransformerConfig):
                seen.setdefault(id(cfg), cfg)
    return list(seen.values())


def apply_te_precision(model_chunks, recipe: PrecisionRecipe, *, log: bool = True):
    """Check a TE-spec model built with :func:`prepare_te`'s fields, hook the BF16 switch to
    its configs, and return the precision table (Megatron decides per layer; nothing is patched).

    Refuses: a model without TE linear layers (built with the local spec), a config without the
    adapter's fields, a missing recipe hook, CUDA graphs, a model already wired."""
    import torch
    from megatron.core.fp8_utils import is_first_last_bf16_layer

    from nvfp4_megatron.mcore.policy import (
        BLOCK_TYPES, PrecisionRow, PrecisionTable, gather_rows, process_rank)
    from nvfp4_megatron.quant import state as qstate

    chunks = [model_chunks] if isinstance(model_chunks, torch.nn.Module) else list(model_chunks)
    # blocks: TransformerLayer, and in hybrid models every pattern symbol (policy.BLOCK_TYPES)
    layers = [m for c in chunks for m in c.modules() if isinstance(m, BLOCK_TYPES)]
    if not layers:
        raise ValueError("apply_te_precision: the model has no TransformerLayer")
    if any(hasattr(c, "_nvfp4_te_bf16_switch") for c in chunks):
        raise ValueError("apply_te_precision: this model is already wired")
    config = layers[0].config
    num_blocks = config.num_layers
    desc = describe_te_recipe(recipe, num_layers=num_blocks,
                              num_moe_experts=getattr(config, "num_moe_experts", None),
                              moe_token_dispatcher_type=getattr(config,
                                                                "moe_token_dispatcher_type", None))
    want = desc["megatron_config"]
    configs = _model_configs(chunks)
    for cfg in configs:
        got = {k: getattr(cfg, k, None) for k in want}
        if got != want:
            diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
            raise ValueError(f"apply_te_precision: the model's TransformerConfig does not carry "
                             f"the TE adapter's fields ((has, needs): {diff}); build it with "
                             "nvfp4_megatron.mcore.backend.backend_config_fields")
    kind = "fp4" if want["fp4"] else "fp8" if want["fp8"] else None
    te_recipe = installed_te_recipe(kind) if kind else None
    if kind and (te_recipe is None or type(te_recipe).__name__ != desc["te_class"]):
        raise ValueError(f"apply_te_precision: Megatron's get_{kind}_recipe does not return the "
                         f"adapter's {desc['te_class']} (got {te_recipe!r}); call "
                         "te_adapter.prepare_te before building the model")
    graphs = getattr(config, "cuda_graph_impl", "none")
    if graphs not in (None, "none"):
        raise ValueError(f"apply_te_precision: cuda_graph_impl={graphs!r} is not validated on the "
                         "TE path (captured graphs keep the precision they were captured with, "
                         "so the BF16 switch could not reach them); set cuda_graph_impl='none'")
    ops = recipe.linear.operands()
    rows = []
    for layer in layers:
        block = layer.layer_number - 1
        te_linears = [n for n, m in layer.named_modules()
                      if type(m).__module__.startswith(_TE_EXTENSIONS)
                      and "Linear" in type(m).__name__]
        if not te_linears:
            raise ValueError(f"apply_te_precision: block {block} has no Transformer Engine linear "
                             "layers; build the model with te_gpt_layer_spec (backend 'te')")
        # Megatron's own rule (get_fp8_context / get_fp4_context use the same test)
        quantized = kind is not None and not is_first_last_bf16_layer(layer.config, block)
        for name in te_linears:
            for gemm, a, b in (("fprop", "input", "weight"), ("dgrad", "grad_output", "weight"),
                               ("wgrad", "grad_output", "input")):
                rows.append(PrecisionRow(
                    block=block, layer=name, gemm=gemm,
                    operand_a=f"{a}: {ops[f'{gemm}.{a}'].describe() if quantized else 'bf16'}",
                    operand_b=f"{b}: {ops[f'{gemm}.{b}'].describe() if quantized else 'bf16'}",
                    backend=f"te:{desc['te_class']}" if quantized else "te-bf16",
                    quantized=quantized))
    switch = TEBF16Switch(configs, want)
    object.__setattr__(chunks[0], "_nvfp4_te_bf16_switch", switch)  # the model keeps it alive
    qstate.add_bf16_switch_listener(switch)
    switch.on_bf16_switch(qstate.get_state().bf16_switch)
    bf16 = tuple(b for b in range(num_blocks) if is_first_last_bf16_layer(config, b)) if kind \
        else ()
    te_text = ""
    if te_recipe is not None:
        nvte = sorted(k for k in os.environ if k.startswith("NVTE_"))
        te_text = (f"transformer_engine {te_version()}: {' '.join(repr(te_recipe).split())}"
                   + (f" (NVTE_* set: {nvte})" if nvte else ""))
    table = PrecisionTable(recipe=recipe.name,
                           backend=f"te:{desc['te_class']}" if kind else "te-bf16",
                           num_blocks=num_blocks, bf16_blocks=bf16,
                           schedule=recipe.schedule.describe(), rows=tuple(gather_rows(rows)),
                           te_recipe=te_text)
    if log and process_rank() == 0:
        _log.info("\n%s", table.format())
    return table
