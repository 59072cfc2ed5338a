"""Megatron-Core column/row-parallel linear layers whose three GEMMs follow a precision recipe.

The subclasses keep everything Megatron's ``ColumnParallelLinear`` / ``RowParallelLinear`` do
(parameter creation and initialisation, TP/SP/expert communication around the GEMM, checkpoint
sharding) and override only ``_forward_impl``, the seam where Megatron calls its GEMM autograd
function (``LinearWithGradAccumulationAndAsyncCommunication``). There they call
:func:`nvfp4_megatron.quant.linear.quantized_linear`, which does the same in-GEMM communication
(SP all-gather of the input, dX all-reduce / reduce-scatter, ``main_grad`` accumulation) on
quantized operands.

A layer's precision is set after the model is built by ``megatron.policy.apply_precision``; a
layer whose effective recipe is all-BF16 (a BF16 block, the ``bf16`` recipe, or the BF16 switch of
the precision schedule) runs Megatron's own code path, bit for bit. A layer that was never
configured refuses to run, so a model can never silently train in BF16 when a recipe was asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from nvfp4_megatron.quant import state as qstate
from nvfp4_megatron.quant.linear import LinearCall, quantized_linear
from nvfp4_megatron.quant.recipe import BF16_LINEAR, LinearRecipe, with_fprop_bf16


@dataclass(frozen=True, kw_only=True)
class LinearPrecision:
    """What one quantized linear runs: its recipe (BF16_LINEAR for BF16 blocks) and identity."""

    recipe: LinearRecipe
    layer_key: str
    block: int
    backend: str = "emulated"


def effective_recipe(recipe: LinearRecipe, bf16_switch: str | None) -> LinearRecipe:
    """The recipe after the precision schedule's BF16 switch (None | 'all' | 'fprop')."""
    if bf16_switch is None:
        return recipe
    if bf16_switch == "all":
        return BF16_LINEAR
    if bf16_switch == "fprop":
        return with_fprop_bf16(recipe)
    raise ValueError(f"bf16_switch={bf16_switch!r}; use None, 'all' or 'fprop'")


def _cp_amax_group(layer):
    """The TP x CP group when context parallelism splits this layer's tokens, else None (TP).

    A non-expert layer's activation / gradient tensor is one sequence split over the CP ranks,
    so its per-tensor amax must span them (quant/linear.py, "Distributed rules"). Expert layers
    keep their expert-TP group: their tokens arrive through the MoE dispatcher, not by CP chunks.
    """
    from megatron.core import parallel_state as ps

    if getattr(layer, "is_expert", False) or ps.get_context_parallel_world_size() == 1:
        return None
    group = ps.get_tensor_and_context_parallel_group()
    tp = layer.tp_group.size() if layer.tp_group is not None else 1
    if group.size() != tp * ps.get_context_parallel_world_size():
        raise RuntimeError(
            f"the TP x CP group has {group.size()} ranks but this layer's TP group has {tp} and "
            f"CP is {ps.get_context_parallel_world_size()}: a layer built with its own process "
            "groups (pg_collection) needs its amax group passed explicitly")
    return group


class _QuantizedForwardMixin:
    """Shared ``_forward_impl`` for the two subclasses."""

    quant_precision: LinearPrecision | None = None

    def set_precision(self, precision: LinearPrecision) -> None:
        self.quant_precision = precision

    def _forward_impl(self, input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad,
                      sequence_parallel, grad_output_buffer=None, wgrad_deferral_limit=None,
                      tp_group=None, gtp_remat_size=1):
        prec = self.quant_precision
        if prec is None:
            raise RuntimeError(
                f"{type(self).__name__} has no precision configured; call "
                "nvfp4_megatron.mcore.policy.apply_precision(model, recipe) after building the "
                "model (a quantized layer never runs in BF16 by default)")
        recipe = effective_recipe(prec.recipe, qstate.get_state().bf16_switch)
        if not recipe.is_quantized:
            return super()._forward_impl(
                input=input, weight=weight, bias=bias,
                gradient_accumulation_fusion=gradient_accumulation_fusion,
                allreduce_dgrad=allreduce_dgrad, sequence_parallel=sequence_parallel,
                grad_output_buffer=grad_output_buffer, wgrad_deferral_limit=wgrad_deferral_limit,
                tp_group=tp_group, gtp_remat_size=gtp_remat_size)
        if grad_output_buffer is not None:
            raise ValueError(f"{prec.layer_key}: deferred embedding wgrad "
                             "(defer_embedding_wgrad_compute) is not supported by quantized layers")
        if gtp_remat_size > 1:
            raise ValueError(f"{prec.layer_key}: GTP weight rematerialisation is not supported by "
                             "quantized layers; disable it")
        call = LinearCall(recipe=recipe, layer_key=prec.layer_key, tp_group=self.tp_group,
                          sequence_parallel=sequence_parallel, allreduce_dgrad=allreduce_dgrad,
                          gradient_accumulation_fusion=gradient_accumulation_fusion,
                          amax_reduce_group=_cp_amax_group(self))
        return quantized_linear(input, weight, bias, call)


class QuantizedColumnParallelLinear(_QuantizedForwardMixin, ColumnParallelLinear):
    """``ColumnParallelLinear`` whose Fprop/Dgrad/Wgrad GEMMs follow a precision recipe."""


class QuantizedRowParallelLinear(_QuantizedForwardMixin, RowParallelLinear):
    """``RowParallelLinear`` whose Fprop/Dgrad/Wgrad GEMMs follow a precision recipe."""


QUANTIZED_LINEAR_TYPES = (QuantizedColumnParallelLinear, QuantizedRowParallelLinear)
