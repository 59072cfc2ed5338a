"""nvfp4-megatron: NVFP4 / MXFP8 / FP8 pretraining recipes for Megatron-Core.

Layers, bottom first (each imports only from those before it; docs/ARCHITECTURE.md draws them):
``formats`` (pure-PyTorch reference codecs, the numeric contract) -> ``kernels`` (Triton fast
paths, bit-exact with ``formats``) -> ``quant`` (recipes, quantized GEMM autograd) -> ``ssm``
(Mamba-2 ops) -> ``mcore`` (layer specs, precision policy, Transformer Engine adapter) ->
``parallel`` (layout rules, model shape, planner) -> ``runtime`` (distributed start-up, CPU
adapter) -> ``training`` (loop, data, checkpoints) -> ``cli`` (Hydra entry point).
"""

__version__ = "0.1.0"
