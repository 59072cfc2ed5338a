"""Core attention through ``torch.nn.functional.scaled_dot_product_attention`` (BF16, not quantized).

A drop-in for Megatron's unfused local ``DotProductAttention`` (same constructor and forward
signature, same math: softmax(QKᵀ·scale + mask)·V with grouped-query attention), so the local spec
gets a fused attention kernel where PyTorch has one (flash / memory-efficient on GPU) instead of
materialising the full score matrix. Attention BMMs and softmax stay high precision (DESIGN.md §2).

Mask rules follow Megatron's local path: an explicit boolean ``attention_mask`` (True = masked
out) is used as given; with no mask and ``AttnMaskType.causal`` a causal mask is applied. Dropout
runs inside Megatron's model-parallel RNG tracker fork, as in ``DotProductAttention``.
Context parallelism (``context_parallel_size > 1``, which Megatron's local attention refuses):
K/V are all-gathered over the CP group and each local query chunk attends to the global keys with
the causal mask of the global positions (``mcore/context_parallel.py``; load-balanced chunks
``r`` and ``2*CP-1-r``). Only the causal and no-mask types are supported under CP; an explicit
``attention_mask`` is refused there (it would have to be split like the sequence).
Not supported (refused at construction): sliding windows, learnable/offset softmax, packed
sequences, attention bias.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide

from nvfp4_megatron.mcore.context_parallel import cp_attention


class SDPAttention(MegatronModule):
    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None,
                 pg_collection=None):
        super().__init__(config=config)
        if getattr(config, "window_size", None) is not None:
            raise ValueError("SDPAttention: sliding-window attention (window_size) is not "
                             "supported; use the local DotProductAttention")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"SDPAttention: softmax_type={config.softmax_type!r} is not "
                             "supported; use 'vanilla'")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(
                required_pgs=["tp", "cp"] if config.context_parallel_size > 1 else ["tp"])
        tp = pg_collection.tp.size()
        self.cp_group = None
        if config.context_parallel_size > 1:
            self.cp_group = getattr(pg_collection, "cp", None)
            if self.cp_group is None or self.cp_group.size() != config.context_parallel_size:
                raise ValueError(
                    f"SDPAttention: context_parallel_size={config.context_parallel_size} but the "
                    "process-group collection has no CP group of that size; initialise Megatron's "
                    "parallel state with the same context_parallel_size")
            if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
                raise ValueError(f"SDPAttention: attn_mask_type={attn_mask_type} is not supported "
                                 "with context parallelism; use causal or no_mask")
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, tp)
        head_dim = divide(projection_size, config.num_attention_heads)
        self.num_heads = divide(config.num_attention_heads, tp)
        self.num_groups = divide(config.num_query_groups, tp)
        self.softmax_scale = (1.0 / math.sqrt(head_dim)) if softmax_scale is None else softmax_scale
        if config.apply_query_key_layer_scaling:
            self.softmax_scale /= self.layer_number
        self.dropout_p = (config.attention_dropout if attention_dropout is None
                          else attention_dropout)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention: packed sequences and attention bias are not supported")
        # [s, b, heads, d] -> [b, heads, s, d]
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        mask = None
        causal = False
        if attention_mask is not None:
            mask = ~attention_mask.bool()  # Megatron: True = masked; SDPA: True = attend
        elif mask_type == AttnMaskType.causal and q.shape[2] > 1:
            causal = True
        dropout = self.dropout_p if self.training else 0.0
        gqa = self.num_heads != self.num_groups

        def attend():
            if self.cp_group is not None:
                if mask is not None:
                    raise ValueError("SDPAttention: an explicit attention_mask is not supported "
                                     "with context parallelism; pass None (causal)")
                return cp_attention(q, k, v, cp_group=self.cp_group,
                                    causal=mask_type == AttnMaskType.causal,
                                    scale=self.softmax_scale, dropout_p=dropout, enable_gqa=gqa)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                  is_causal=causal, scale=self.softmax_scale,
                                                  enable_gqa=gqa)

        if dropout > 0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                ctx = attend()
        else:
            ctx = attend()
        # [b, heads, s, d] -> [s, b, heads * d]
        ctx = ctx.permute(2, 0, 1, 3).contiguous()
        return ctx.view(*ctx.shape[:2], self.hidden_size_per_partition)
