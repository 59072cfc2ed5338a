"""nvfp4-megatron: NVFP4 / MXFP8 / FP8 pretraining recipes for Megatron-Core.

Layers: ``formats`` (pure-PyTorch reference codecs, the numeric contract) -> ``kernels``
(Triton fast paths, bit-exact with ``formats``) -> ``quant`` (recipes, quantized GEMM autograd)
-> ``megatron`` (layer specs, precision policy, Transformer Engine adapter) -> ``training``
(loop, data, checkpoints) -> ``cli`` (Hydra entry point).
"""

__version__ = "0.1.0"
