"""Layer specs for Megatron-Core's hybrid Mamba-Transformer model (``HybridModel``), no TE needed.

Megatron-Core 0.19.2 ships only a Transformer Engine hybrid spec
(``models/hybrid/hybrid_layer_specs.py``: TE linears with fused norms, TE attention, and
``HybridStack`` builds a ``TENorm`` final norm). :func:`quantized_hybrid_stack_spec` is the local
counterpart through the same seams (``ModuleSpec`` + ``HybridStackSubmodules``), for the three
layer kinds of the Nemotron-H pattern (``hybrid_override_pattern`` letters; NVFP4 paper
arXiv 2509.25149 §4 / DESIGN.md §4):

* ``M`` Mamba-2: Megatron's ``MambaLayer`` (pre-norm + residual) around
  :class:`~nvfp4_megatron.mcore.mamba_mixer.LocalMambaMixer`, whose ``in_proj`` / ``out_proj``
  are the project's quantized column/row-parallel linears; conv1d, the SSD scan and the gated
  RMSNorm stay high precision;
* ``*`` attention: a ``TransformerLayer`` with only the attention half (quantized ``linear_qkv`` /
  ``linear_proj``, SDPA core attention, as the GPT spec);
* ``-`` MLP: Megatron's ``MLPLayer`` (quantized ``linear_fc1`` / ``linear_fc2``).

Norms are ``SequenceParallelTorchNorm`` (SP-capable), including the final norm
(:class:`LocalHybridStack`). The sharded-state-dict key maps follow the TE spec's fused names
(``input_layernorm.`` -> ``self_attention.linear_qkv.layer_norm_``, Mamba ``norm.`` ->
``mixer.in_proj.layer_norm_``), so checkpoints line up with Megatron's TE hybrid checkpoints.

Every symbol is one block with a global 0-based index (``layer_number - 1``, pipeline offset
included) for the BF16 block policy (``mcore/policy.py``). ``E`` (MoE), ``G``, ``D``, ``+``
are refused by this spec (:func:`check_local_hybrid_pattern`) rather than built as identities.

With Transformer Engine *and* mamba_ssm installed (Blackwell; never on the development machines)
the backend policy uses Megatron's own TE hybrid spec instead: :func:`te_hybrid_stack_spec`.
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from nvfp4_megatron.mcore.mamba_mixer import LocalMambaMixer, MambaMixerSubmodules
from nvfp4_megatron.mcore.norm import SequenceParallelTorchNorm
from nvfp4_megatron.mcore.spec_provider import (QuantizedLocalSpecProvider,
                                                   quantized_self_attention_spec)

LOCAL_HYBRID_SYMBOLS = frozenset("M*-")
PIPE = "|"


def check_local_hybrid_pattern(pattern: str) -> None:
    """Refuse layer symbols the local hybrid spec does not build (instead of an identity layer)."""
    bad = sorted(set(pattern) - LOCAL_HYBRID_SYMBOLS - {PIPE})
    if bad:
        raise ValueError(
            f"hybrid_override_pattern {pattern!r} has layer symbols {bad} that the local hybrid "
            "spec does not build; it has M (Mamba-2), * (attention), - (MLP) and | (pipeline "
            "boundary)")


class LocalHybridStack(HybridStack):
    """Megatron's ``HybridStack`` with an SP-capable torch final norm (it hard-codes ``TENorm``,
    which needs Transformer Engine). Everything else, forward included, is Megatron's."""

    def __init__(self, config, submodules: HybridStackSubmodules, pre_process: bool = True,
                 layer_type_list=None, pp_layer_offset: int = 0, post_layer_norm: bool = True,
                 post_process: bool = True, device=None, dtype=None, pg_collection=None,
                 is_mtp_layer: bool = False, name: str | None = None) -> None:
        if layer_type_list is not None:
            check_local_hybrid_pattern("".join(layer_type_list))
        super().__init__(config, submodules, pre_process=pre_process,
                         layer_type_list=layer_type_list, pp_layer_offset=pp_layer_offset,
                         post_layer_norm=False, post_process=post_process, device=device,
                         dtype=dtype, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer,
                         name=name)
        self.post_layer_norm = post_layer_norm
        if post_process and post_layer_norm:
            self.final_norm = SequenceParallelTorchNorm(config, config.hidden_size,
                                                        eps=config.layernorm_epsilon)


def quantized_hybrid_stack_spec(*, d_conv: int = 4, expand: int = 2, chunk_size: int = 128,
                                sdpa_attention: bool = True,
                                scan_impl: str = "eager") -> ModuleSpec:
    """The ``HybridStack`` spec for ``HybridModel`` with quantized linears (see module doc).

    ``d_conv`` / ``expand`` / ``chunk_size`` are the Mamba mixer's constructor arguments
    (``model.mamba_conv_kernel`` / ``model.mamba_expand``; the SSD chunk length).
    """
    backend = QuantizedLocalSpecProvider(sdpa_attention=sdpa_attention)
    norm = backend.layer_norm(rms_norm=True, for_qk=False, has_residual=True)
    col, row = backend.column_parallel_linear(), backend.row_parallel_linear()
    mamba_layer = ModuleSpec(
        module=MambaLayer,
        submodules=MambaLayerSubmodules(
            norm=norm,
            mixer=ModuleSpec(module=LocalMambaMixer,
                             params={"d_conv": d_conv, "expand": expand,
                                     "chunk_size": chunk_size, "scan_impl": scan_impl},
                             submodules=MambaMixerSubmodules(in_proj=col, out_proj=row)),
            mamba_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={"norm.": "mixer.in_proj.layer_norm_"},
        ),
    )
    attention_layer = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=quantized_self_attention_spec(backend),
            self_attn_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_"},
        ),
    )
    mlp_layer = ModuleSpec(
        module=MLPLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=norm,
            mlp=get_mlp_module_spec_for_backend(backend=backend, num_experts=None),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"},
        ),
    )
    return ModuleSpec(module=LocalHybridStack,
                      submodules=HybridStackSubmodules(mamba_layer=mamba_layer,
                                                       attention_layer=attention_layer,
                                                       mlp_layer=mlp_layer))


def te_hybrid_stack_spec():
    """TE path (backend resolved to ``te``; needs Transformer Engine and mamba_ssm): Megatron's
    own hybrid spec, unchanged. Per-block precision then comes from
    ``te_adapter.apply_te_precision`` (TE autocast around each quantized block, Mamba layers
    included); Megatron's mixer keeps conv1d and the scan outside TE, i.e. high precision."""
    from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec

    return hybrid_stack_spec
