"""Precision recipes and the quantized linear GEMM (DESIGN.md §2–§3).

- ``recipe``: frozen dataclasses (TensorQuant, Fprop/Dgrad/Wgrad, LinearRecipe, LayerPolicy,
  PrecisionSchedule, MsFp4Options, PrecisionRecipe).
- ``registry``: named recipes (``get_recipe``, ``list_recipes``, ``build_recipe``,
  ``apply_overrides``).
- ``state``: runtime step / BF16 switch / run seed; stochastic-rounding seeds.
- ``linear``: the autograd function running Fprop, Dgrad and Wgrad on quantized operand copies.
"""

from nvfp4_megatron.quant.recipe import (
    LayerPolicy,
    LinearRecipe,
    PrecisionRecipe,
    PrecisionSchedule,
    TensorQuant,
)
from nvfp4_megatron.quant.registry import (
    apply_overrides,
    build_recipe,
    get_recipe,
    list_recipes,
    register_recipe,
)

__all__ = ["LayerPolicy", "LinearRecipe", "PrecisionRecipe", "PrecisionSchedule", "TensorQuant",
           "apply_overrides", "build_recipe", "get_recipe", "list_recipes", "register_recipe"]
