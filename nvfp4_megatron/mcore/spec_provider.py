"""Layer specs for quantized GPT models, through Megatron-Core's own seams.

``QuantizedLocalSpecProvider`` is a ``LocalSpecProvider`` (megatron/core/models/backends.py) whose
column/row-parallel linears are the quantized subclasses of ``mcore/layers.py`` and whose core
attention is torch SDPA. ``quantized_gpt_layer_spec`` assembles a ``TransformerLayer`` spec from
it the way Megatron's ``get_gpt_layer_local_spec`` does, for dense GPT (``linear_qkv``,
``linear_proj``, ``linear_fc1``, ``linear_fc2``) and MoE (``SequentialMLP`` experts with quantized
fc1/fc2; the router is Megatron's ``TopKRouter`` and stays high precision). Embeddings, the LM head,
norms, attention BMMs and softmax are untouched Megatron modules in BF16.
"""

from __future__ import annotations

from functools import partial

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

from nvfp4_megatron.mcore.attention import SDPAttention
from nvfp4_megatron.mcore.layers import (
    QuantizedColumnParallelLinear,
    QuantizedRowParallelLinear,
)
from nvfp4_megatron.mcore.norm import SequenceParallelTorchNorm


class QuantizedLocalSpecProvider(LocalSpecProvider):
    """Megatron's local spec provider with quantized linears and (by default) SDPA attention."""

    def __init__(self, *, sdpa_attention: bool = True) -> None:
        self.sdpa_attention = sdpa_attention

    def column_parallel_linear(self) -> type:
        return QuantizedColumnParallelLinear

    def row_parallel_linear(self) -> type:
        return QuantizedRowParallelLinear

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False,
                   has_residual: bool = False):
        # Megatron's WrappedTorchNorm refuses sequence parallelism; ours marks the parameters.
        return SequenceParallelTorchNorm

    def core_attention(self) -> type:
        return SDPAttention if self.sdpa_attention else DotProductAttention

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool):
        if moe_use_grouped_gemm:
            raise ValueError("moe_grouped_gemm=True needs Transformer Engine's grouped GEMM; the "
                             "quantized local spec uses SequentialMLP experts (set it to False)")
        return partial(
            SequentialMLP,
            submodules=MLPSubmodules(linear_fc1=QuantizedColumnParallelLinear,
                                     linear_fc2=QuantizedRowParallelLinear,
                                     activation_func=self.activation_func()),
        )


def quantized_self_attention_spec(backend: QuantizedLocalSpecProvider, *,
                                  qk_norm=IdentityOp) -> ModuleSpec:
    """Causal ``SelfAttention`` with the backend's quantized qkv/proj linears and core attention:
    the attention of the GPT layer and of the hybrid stack's attention layer."""
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=backend.column_parallel_linear(),
            core_attention=backend.core_attention(),
            linear_proj=backend.row_parallel_linear(),
            q_layernorm=qk_norm,
            k_layernorm=qk_norm,
        ),
    )


def quantized_gpt_layer_spec(*, num_experts: int | None = None, moe_grouped_gemm: bool = False,
                             qk_layernorm: bool = False, normalization: str = "LayerNorm",
                             sdpa_attention: bool = True) -> ModuleSpec:
    """A GPT ``TransformerLayer`` spec with quantized qkv/proj/fc1/fc2 (dense or MoE experts)."""
    if normalization not in ("LayerNorm", "RMSNorm"):
        raise ValueError(f"normalization={normalization!r}; use 'LayerNorm' or 'RMSNorm'")
    backend = QuantizedLocalSpecProvider(sdpa_attention=sdpa_attention)
    rms = normalization == "RMSNorm"
    layer_norm = backend.layer_norm(rms_norm=rms, for_qk=False, has_residual=True)
    qk_norm = backend.layer_norm(rms_norm=rms, for_qk=True)
    mlp = get_mlp_module_spec_for_backend(backend=backend, num_experts=num_experts,
                                          moe_grouped_gemm=moe_grouped_gemm)
    submodules = TransformerLayerSubmodules(
        input_layernorm=layer_norm,
        self_attention=quantized_self_attention_spec(
            backend, qk_norm=qk_norm if qk_layernorm else IdentityOp),
        self_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=layer_norm,
        mlp=mlp,
        mlp_bda=get_bias_dropout_add,
        sharded_state_dict_keys_map={
            "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
            "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
        },
    )
    return ModuleSpec(module=TransformerLayer, submodules=submodules)


def quantized_gpt_block_spec(config, *, qk_layernorm: bool = False, sdpa_attention: bool = True,
                             vp_stage: int | None = None,
                             pp_rank: int | None = None) -> TransformerBlockSubmodules:
    """The decoder block for this pipeline stage: quantized layers + an SP-capable final norm.

    Pass this (not the layer spec) to ``GPTModel`` when sequence parallelism is on: with a bare
    layer spec Megatron builds the final norm from its own ``LayerNormImpl``, which without TE/apex
    is ``WrappedTorchNorm`` and refuses sequence parallelism.
    """
    layer = quantized_gpt_layer_spec(num_experts=config.num_moe_experts,
                                     moe_grouped_gemm=config.moe_grouped_gemm,
                                     qk_layernorm=qk_layernorm,
                                     normalization=config.normalization,
                                     sdpa_attention=sdpa_attention)
    n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * n,
                                      layer_norm=SequenceParallelTorchNorm)
