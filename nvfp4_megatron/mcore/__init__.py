"""Megatron-Core integration through its own seams (DESIGN.md §2–§3).

- ``layers``: quantized ColumnParallelLinear / RowParallelLinear (override ``_forward_impl``).
- ``spec_provider``: ``QuantizedLocalSpecProvider``, ``quantized_gpt_layer_spec``,
  ``quantized_gpt_block_spec`` (dense GPT and SequentialMLP MoE experts),
  ``quantized_self_attention_spec`` (also the hybrid stack's attention).
- ``attention``: core attention through torch SDPA; ``norm``: SP-capable torch norms.
- ``policy``: ``apply_precision(model_chunks, recipe) -> PrecisionTable``.
- ``te_adapter`` / ``backend``: Transformer Engine mapping and the auto|te|emulated policy.

Submodules import Megatron-Core; this package file does not, so importing it is cheap.
"""
