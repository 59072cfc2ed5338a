"""PyTorch LayerNorm/RMSNorm for the local spec, usable with sequence parallelism (kept BF16).

Megatron's ``WrappedTorchNorm`` refuses ``sequence_parallel`` only because it does not mark its
parameters: under SP each tensor-parallel rank normalises its own slice of the tokens, so the norm
weight gradient is a partial sum that must be all-reduced over the TP group. Megatron's
``finalize_model_grads`` does exactly that for every parameter whose ``sequence_parallel``
attribute is True; this builder sets it. The normalisation itself is ``torch.nn.LayerNorm`` /
``torch.nn.RMSNorm``, as in ``WrappedTorchNorm``.
"""

from __future__ import annotations

import torch


class SequenceParallelTorchNorm:
    """Builder with Megatron's ``LayerNormBuilder`` signature; returns a torch norm module."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str | None = None):
        if config.layernorm_zero_centered_gamma:
            raise ValueError("layernorm_zero_centered_gamma=True is not supported by the torch "
                             "norm of the quantized local spec")
        kind = config.normalization
        if kind == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        elif kind == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"normalization={kind!r}; the quantized local spec supports "
                             "'LayerNorm' and 'RMSNorm'")
        for p in norm.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)
        return norm
