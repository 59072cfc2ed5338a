"""Registry of named precision recipes and the Hydra overrides applied on top of them.

Recipes (DESIGN.md §2; NVFP4 paper arXiv 2509.25149 §4 and App. E for the ablations):

- ``bf16``: every GEMM in BF16 (the reference).
- ``fp8_cs``: FP8 per-tensor current scaling, "hybrid": E4M3 forward operands, E5M2 gradients;
  first and last block BF16 (Megatron-Bridge Llama-3 recipe).
- ``fp8_block``: DeepSeek-V3-style blockwise FP8 (E4M3), 1x128 activations and gradients, 128x128
  weights, power-of-two scales (Transformer Engine's Float8BlockScaling default); the paper's FP8
  baseline.
- ``mxfp8``: MXFP8, E4M3 everywhere (E5M2 gradients diverged in Megatron-Bridge tests), 1x32 blocks.
- ``nvfp4``: the paper's recipe: 2D 16x16 weight tiles (Fprop and Dgrad see the same numbers),
  1x16 activations and gradients, RHT on both Wgrad operands, SR on gradients, first 2 and last 8
  blocks BF16 (the 12B run; override with ``bf16_first_blocks`` / ``bf16_last_blocks``).
- ablations ``nvfp4_no_rht``, ``nvfp4_no_sr``, ``nvfp4_no_2d`` (1x16 weights, Dgrad copy quantized
  independently along out), ``nvfp4_all_layers`` (no BF16 blocks).
- ``nvfp4_fwd_only`` / ``nvfp4_bwd_only``: the ``nvfp4`` recipe on the Fprop GEMM only (Dgrad and
  Wgrad in BF16), or on the backward GEMMs only (Fprop in BF16; Dgrad's W copy keeps the 2D tiles,
  gradients keep SR and Wgrad keeps RHT), same BF16 blocks as ``nvfp4`` (Quartet-II's forward-only /
  backward-only arms, arXiv 2601.22813).
- ``mxfp4``: E2M1 with E8M0 scales over 32 (comparison point), same BF16 blocks as ``nvfp4``.
- ``msfp4``: Microsoft's FP4 training (Wang et al., arXiv 2501.17116): E2M1 Fprop with absmax
  scaling per token (X) and per output channel (W) (``e2m1_vector``), DGE on the weights (k = 5,
  f' capped at 3.0), OCC on the activations (α = 0.99, the clamped residual multiplied in high
  precision); backward GEMMs: FP8 E5M2 gradients (per-tensor current scaling) times the forward's
  FP4 copies of W (Dgrad) and X (Wgrad), the paper's MS-AMP base. No BF16 blocks.
- ablations ``msfp4_no_dge``, ``msfp4_no_occ`` and ``fp4_direct`` (neither: the paper's "direct
  cast" baseline).

The ``precision.dge`` / ``precision.occ`` overrides turn DGE and OCC on or off (and set k, the
cap, the quantile, compensation) on any recipe with an FP4 Fprop, e.g. ``nvfp4`` + OCC.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

from nvfp4_megatron.quant.recipe import (
    BACKENDS,
    FP4_FORMATS,
    Dgrad,
    Fprop,
    LayerPolicy,
    LinearRecipe,
    MsFp4Options,
    PrecisionRecipe,
    PrecisionSchedule,
    TensorQuant,
    Wgrad,
    with_backend,
    with_layer_policy,
    with_schedule,
)

_REGISTRY: dict[str, PrecisionRecipe] = {}


def register_recipe(recipe: PrecisionRecipe, *, overwrite: bool = False) -> PrecisionRecipe:
    """Add ``recipe`` under ``recipe.name``; a second registration of a name is an error."""
    if not isinstance(recipe, PrecisionRecipe):
        raise TypeError(f"register_recipe expects a PrecisionRecipe, got {type(recipe).__name__}")
    if recipe.name in _REGISTRY and not overwrite:
        raise ValueError(f"recipe {recipe.name!r} is already registered; pass overwrite=True")
    _REGISTRY[recipe.name] = recipe
    return recipe


def list_recipes() -> list[str]:
    return sorted(_REGISTRY)


def get_recipe(name: str) -> PrecisionRecipe:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown precision recipe {name!r}; known recipes: "
                         f"{', '.join(list_recipes())}") from None


def _nvfp4_linear(*, rht: bool = True, sr: bool = True, weight_2d: bool = True) -> LinearRecipe:
    act = TensorQuant(format="nvfp4", tile=(1, 16))
    act_col = TensorQuant(format="nvfp4", tile=(1, 16), rht=rht)
    grad = TensorQuant(format="nvfp4", tile=(1, 16), stochastic_rounding=sr)
    grad_col = TensorQuant(format="nvfp4", tile=(1, 16), rht=rht, stochastic_rounding=sr)
    w = TensorQuant(format="nvfp4", tile=(16, 16) if weight_2d else (1, 16))
    return LinearRecipe(
        fprop=Fprop(input=act, weight=w),
        dgrad=Dgrad(grad_output=grad, weight=w),
        wgrad=Wgrad(grad_output=grad_col, input=act_col),
    )


def _uniform_linear(fwd: TensorQuant, grad: TensorQuant, weight: TensorQuant | None = None
                    ) -> LinearRecipe:
    w = fwd if weight is None else weight
    return LinearRecipe(
        fprop=Fprop(input=fwd, weight=w),
        dgrad=Dgrad(grad_output=grad, weight=w),
        wgrad=Wgrad(grad_output=grad, input=fwd),
    )


_PAPER_BF16_BLOCKS = LayerPolicy(bf16_first_blocks=2, bf16_last_blocks=8)

# Microsoft FP4 paper defaults (arXiv 2501.17116 §3.1, §3.2 and §4).
MSFP4_DGE_K = 5.0
MSFP4_DGE_CAP = 3.0
MSFP4_OCC_QUANTILE = 0.99


def _msfp4_linear(*, dge: bool, occ: bool) -> LinearRecipe:
    """E2M1 per-token X / per-channel W in Fprop; FP8 E5M2 gradients times those FP4 copies in
    Dgrad and Wgrad (the copies are the Fprop ones: same TensorQuant, reused, not requantized)."""
    fp4 = TensorQuant(format="e2m1_vector")
    grad = TensorQuant(format="fp8", fp8_dtype="e5m2")
    ms = None
    if dge or occ:
        ms = MsFp4Options(dge=dge, dge_k=MSFP4_DGE_K, dge_cap=MSFP4_DGE_CAP, occ=occ,
                          occ_quantile=MSFP4_OCC_QUANTILE, occ_compensate=True)
    return LinearRecipe(fprop=Fprop(input=fp4, weight=fp4), dgrad=Dgrad(grad_output=grad, weight=fp4),
                        wgrad=Wgrad(grad_output=grad, input=fp4), msfp4=ms)


def _register_builtins() -> None:
    register_recipe(PrecisionRecipe(name="bf16", description="all GEMMs in BF16"))
    e4m3 = TensorQuant(format="fp8", fp8_dtype="e4m3")
    e5m2 = TensorQuant(format="fp8", fp8_dtype="e5m2")
    register_recipe(PrecisionRecipe(
        name="fp8_cs", linear=_uniform_linear(e4m3, e5m2),
        layers=LayerPolicy(bf16_first_blocks=1, bf16_last_blocks=1),
        description="FP8 current scaling, E4M3 forward / E5M2 gradients, first+last block BF16"))
    blk_act = TensorQuant(format="fp8_block", tile=(1, 128), pow2_scale=True)
    blk_w = TensorQuant(format="fp8_block", tile=(128, 128), pow2_scale=True)
    register_recipe(PrecisionRecipe(
        name="fp8_block", linear=_uniform_linear(blk_act, blk_act, blk_w),
        description="blockwise FP8 E4M3: 1x128 activations/gradients, 128x128 weights"))
    mx8 = TensorQuant(format="mxfp8", fp8_dtype="e4m3")
    register_recipe(PrecisionRecipe(name="mxfp8", linear=_uniform_linear(mx8, mx8),
                                    description="MXFP8 E4M3 everywhere, 1x32 blocks"))
    register_recipe(PrecisionRecipe(
        name="nvfp4", linear=_nvfp4_linear(), layers=_PAPER_BF16_BLOCKS,
        description="paper recipe: 2D weights, RHT on Wgrad, SR on gradients, BF16 blocks"))
    register_recipe(PrecisionRecipe(
        name="nvfp4_no_rht", linear=_nvfp4_linear(rht=False), layers=_PAPER_BF16_BLOCKS,
        description="nvfp4 without the random Hadamard transform"))
    register_recipe(PrecisionRecipe(
        name="nvfp4_no_sr", linear=_nvfp4_linear(sr=False), layers=_PAPER_BF16_BLOCKS,
        description="nvfp4 with round-to-nearest gradients"))
    register_recipe(PrecisionRecipe(
        name="nvfp4_no_2d", linear=_nvfp4_linear(weight_2d=False), layers=_PAPER_BF16_BLOCKS,
        description="nvfp4 with 1x16 weight blocks (Fprop and Dgrad copies differ)"))
    register_recipe(PrecisionRecipe(
        name="nvfp4_all_layers", linear=_nvfp4_linear(), layers=LayerPolicy(),
        description="nvfp4 in every block (no BF16 blocks)"))
    nv = _nvfp4_linear()
    register_recipe(PrecisionRecipe(
        name="nvfp4_fwd_only", linear=dataclasses.replace(nv, dgrad=Dgrad(), wgrad=Wgrad()),
        layers=_PAPER_BF16_BLOCKS,
        description="nvfp4 on Fprop only; Dgrad and Wgrad in BF16"))
    register_recipe(PrecisionRecipe(
        name="nvfp4_bwd_only", linear=dataclasses.replace(nv, fprop=Fprop()),
        layers=_PAPER_BF16_BLOCKS,
        description="nvfp4 on Dgrad and Wgrad only (2D W, RHT, SR); Fprop in BF16"))
    mx4 = TensorQuant(format="mxfp4")
    register_recipe(PrecisionRecipe(name="mxfp4", linear=_uniform_linear(mx4, mx4),
                                    layers=_PAPER_BF16_BLOCKS,
                                    description="MXFP4 (E2M1, E8M0 over 32) comparison point"))
    register_recipe(PrecisionRecipe(
        name="msfp4", linear=_msfp4_linear(dge=True, occ=True),
        description="Microsoft FP4 (arXiv 2501.17116): per-token/per-channel E2M1, DGE, OCC, "
                    "FP8 E5M2 gradients"))
    register_recipe(PrecisionRecipe(
        name="msfp4_no_dge", linear=_msfp4_linear(dge=False, occ=True),
        description="msfp4 without the differentiable gradient estimator"))
    register_recipe(PrecisionRecipe(
        name="msfp4_no_occ", linear=_msfp4_linear(dge=True, occ=False),
        description="msfp4 without outlier clamping and compensation"))
    register_recipe(PrecisionRecipe(
        name="fp4_direct", linear=_msfp4_linear(dge=False, occ=False),
        description="msfp4 without DGE and OCC: the paper's direct-cast FP4 baseline"))


_register_builtins()

_OVERRIDE_KEYS = ("bf16_first_blocks", "bf16_last_blocks", "bf16_blocks", "switch_to_bf16",
                  "backend", "dge", "occ")
_SWITCH_KEYS = ("at_step", "at_tokens", "scope")
_DGE_KEYS = ("enabled", "k", "cap")
_OCC_KEYS = ("enabled", "quantile", "compensate")


def _sub(name: str, value: Any, keys: tuple[str, ...]) -> dict:
    """A ``precision.dge`` / ``precision.occ`` mapping with its ``None`` entries dropped."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"precision.{name}={value!r}: expected a mapping with keys {keys}")
    bad = sorted(set(value) - set(keys))
    if bad:
        raise ValueError(f"precision.{name} has unknown key(s) {bad}; allowed: {keys}")
    return {k: value[k] for k in keys if value.get(k) is not None}


def _number(key: str, v: Any, *, gt: float, lt: float | None = None, why: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
            v > gt and (lt is None or v < lt)):
        rng = f"> {gt}" if lt is None else f"in ({gt}, {lt})"
        raise ValueError(f"precision.{key}={v!r}: must be a number {rng} ({why})")
    return float(v)


def _flag(key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"precision.{key}={v!r}: expected true or false")
    return v


def apply_msfp4_overrides(recipe: PrecisionRecipe, dge: Any = None, occ: Any = None
                          ) -> PrecisionRecipe:
    """``precision.dge.{enabled,k,cap}`` and ``precision.occ.{enabled,quantile,compensate}``.

    ``None`` keeps the recipe's value. ``enabled`` turns the component on or off; the other keys
    set its parameters and are refused when the component ends up off (a knob that would do
    nothing). Turning either on needs an FP4 Fprop (``msfp4*``, ``fp4_direct``, ``nvfp4*``,
    ``mxfp4``); the error names the key and the recipe.
    """
    d, o = _sub("dge", dge, _DGE_KEYS), _sub("occ", occ, _OCC_KEYS)
    if not d and not o:
        return recipe
    base = recipe.linear.msfp4
    cur = {"dge": base.dge if base else False, "dge_k": base.dge_k if base else MSFP4_DGE_K,
           "dge_cap": base.dge_cap if base else MSFP4_DGE_CAP, "occ": base.occ if base else False,
           "occ_quantile": base.occ_quantile if base else MSFP4_OCC_QUANTILE,
           "occ_compensate": base.occ_compensate if base and base.occ else True}
    if "enabled" in d:
        cur["dge"] = _flag("dge.enabled", d["enabled"])
    if "k" in d:
        cur["dge_k"] = _number("dge.k", d["k"], gt=1, why="the paper uses 5")
    if "cap" in d:
        cur["dge_cap"] = _number("dge.cap", d["cap"], gt=0, why="the paper uses 3.0")
    if "enabled" in o:
        cur["occ"] = _flag("occ.enabled", o["enabled"])
    if "quantile" in o:
        cur["occ_quantile"] = _number("occ.quantile", o["quantile"], gt=0.5, lt=1.0,
                                      why="the paper uses 0.99")
    if "compensate" in o:
        cur["occ_compensate"] = _flag("occ.compensate", o["compensate"])
    for name, on, keys in (("dge", cur["dge"], [k for k in d if k != "enabled"]),
                           ("occ", cur["occ"], [k for k in o if k != "enabled"])):
        if keys and not on:
            raise ValueError(
                f"precision.{name}.{keys[0]} is set but {name.upper()} is off for recipe "
                f"{recipe.name!r} (precision.{name}.enabled=false or the recipe has no "
                f"{name.upper()}); set precision.{name}.enabled=true or drop the key")
    ms = None
    if cur["dge"] or cur["occ"]:
        if not cur["occ"]:
            cur["occ_compensate"] = True
        fmt = recipe.linear.fprop.weight.format
        if fmt not in FP4_FORMATS:
            key = "precision.dge.enabled" if cur["dge"] else "precision.occ.enabled"
            raise ValueError(
                f"{key}=true needs a recipe whose Fprop is FP4 ({', '.join(FP4_FORMATS)}: e.g. "
                f"msfp4, fp4_direct, nvfp4, mxfp4); precision.recipe={recipe.name!r} runs Fprop "
                f"in {fmt}")
        ms = MsFp4Options(**cur)
    return dataclasses.replace(recipe, linear=dataclasses.replace(recipe.linear, msfp4=ms))


def apply_overrides(recipe: PrecisionRecipe, **overrides: Any) -> PrecisionRecipe:
    """Apply the ``precision.*`` Hydra fields to a registry recipe; ``None`` keeps the default.

    Fields: ``bf16_first_blocks`` (int), ``bf16_last_blocks`` (int), ``bf16_blocks`` (list of
    global 0-based block indices), ``switch_to_bf16`` (mapping with ``at_step``/``at_tokens``/
    ``scope``), ``backend`` (auto|te|emulated), ``dge`` / ``occ`` (mappings, see
    :func:`apply_msfp4_overrides`). Each replaces the recipe's own value.
    """
    unknown = sorted(set(overrides) - set(_OVERRIDE_KEYS))
    if unknown:
        raise ValueError(f"unknown precision override(s) {unknown}; allowed: {_OVERRIDE_KEYS}")
    layers = recipe.layers
    changes = {}
    for key in ("bf16_first_blocks", "bf16_last_blocks"):
        v = overrides.get(key)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"precision.{key}={v!r}: expected an integer >= 0")
            changes[key] = v
    blocks = overrides.get("bf16_blocks")
    if blocks is not None:
        if isinstance(blocks, (str, bytes)) or not hasattr(blocks, "__iter__"):
            raise ValueError(f"precision.bf16_blocks={blocks!r}: expected a list of block indices")
        changes["bf16_blocks"] = tuple(blocks)
    if changes:
        fields = {"bf16_first_blocks": layers.bf16_first_blocks,
                  "bf16_last_blocks": layers.bf16_last_blocks,
                  "bf16_blocks": layers.bf16_blocks, **changes}
        recipe = with_layer_policy(recipe, LayerPolicy(**fields))
    switch = overrides.get("switch_to_bf16")
    if switch is not None:
        if not isinstance(switch, Mapping):
            raise ValueError(f"precision.switch_to_bf16={switch!r}: expected a mapping with keys "
                             f"{_SWITCH_KEYS}")
        bad = sorted(set(switch) - set(_SWITCH_KEYS))
        if bad:
            raise ValueError(f"precision.switch_to_bf16 has unknown key(s) {bad}; allowed: "
                             f"{_SWITCH_KEYS}")
        kw = {k: switch[k] for k in _SWITCH_KEYS if k in switch and switch[k] is not None}
        recipe = with_schedule(recipe, PrecisionSchedule(**kw))
    backend = overrides.get("backend")
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"precision.backend={backend!r}; use one of {BACKENDS}")
        recipe = with_backend(recipe, backend)
    return apply_msfp4_overrides(recipe, overrides.get("dge"), overrides.get("occ"))


def build_recipe(name: str, **overrides: Any) -> PrecisionRecipe:
    """``get_recipe(name)`` with :func:`apply_overrides` applied."""
    return apply_overrides(get_recipe(name), **overrides)


def _plain(value: Any) -> Any:
    """A config value as plain Python: enums (structured configs) as their value, mappings as
    dicts, other iterables (lists, ListConfig) as lists."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return value
    return [_plain(v) for v in value]


def recipe_from_config(precision: Mapping) -> PrecisionRecipe:
    """The recipe the ``precision`` config group names, with its overrides applied (BF16 blocks,
    switch, backend, the Microsoft FP4 ``dge`` / ``occ`` knobs): the one reading of that group,
    used by training and by the dry-run planner. A missing key or None keeps the registered
    recipe's value; ``switch_to_bf16.at_tokens`` may be a float holding a whole number (8.2e12).
    """
    p = _plain(precision)
    sw = p.get("switch_to_bf16")
    if sw is not None and sw.get("at_tokens") is not None:
        tok = sw["at_tokens"]
        if float(tok) != int(tok):
            raise ValueError(f"precision.switch_to_bf16.at_tokens={tok} must be a whole number")
        sw = dict(sw, at_tokens=int(tok))
    return build_recipe(
        p.get("recipe", "bf16"),
        **{k: p.get(k) for k in ("bf16_first_blocks", "bf16_last_blocks", "bf16_blocks",
                                 "backend", "dge", "occ")},
        switch_to_bf16=sw,
    )
