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
- ``mxfp4``: E2M1 with E8M0 scales over 32 (comparison point), same BF16 blocks as ``nvfp4``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nvfp4_megatron.quant.recipe import (
    BACKENDS,
    Dgrad,
    Fprop,
    LayerPolicy,
    LinearRecipe,
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
    mx4 = TensorQuant(format="mxfp4")
    register_recipe(PrecisionRecipe(name="mxfp4", linear=_uniform_linear(mx4, mx4),
                                    layers=_PAPER_BF16_BLOCKS,
                                    description="MXFP4 (E2M1, E8M0 over 32) comparison point"))


_register_builtins()

_OVERRIDE_KEYS = ("bf16_first_blocks", "bf16_last_blocks", "bf16_blocks", "switch_to_bf16",
                  "backend")
_SWITCH_KEYS = ("at_step", "at_tokens", "scope")


def apply_overrides(recipe: PrecisionRecipe, **overrides: Any) -> PrecisionRecipe:
    """Apply the ``precision.*`` Hydra fields to a registry recipe; ``None`` keeps the default.

    Fields: ``bf16_first_blocks`` (int), ``bf16_last_blocks`` (int), ``bf16_blocks`` (list of
    global 0-based block indices), ``switch_to_bf16`` (mapping with ``at_step``/``at_tokens``/
    ``scope``), ``backend`` (auto|te|emulated). Each replaces the recipe's own value.
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
    return recipe


def build_recipe(name: str, **overrides: Any) -> PrecisionRecipe:
    """``get_recipe(name)`` with :func:`apply_overrides` applied."""
    return apply_overrides(get_recipe(name), **overrides)
