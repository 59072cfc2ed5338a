"""Megatron's gradient-accumulation fusion without Apex (``train.gradient_accumulation_fusion``).

With ``gradient_accumulation_fusion`` Megatron-Core's linear layers accumulate the weight gradient
straight into the FP32 ``main_grad`` buffer inside the Wgrad GEMM (cuBLAS ``beta = 1``) instead of
writing a BF16 ``weight.grad`` that DDP's hook then adds to ``main_grad`` in a separate pass. Megatron
gets that GEMM from Apex's ``fused_weight_gradient_mlp_cuda`` extension, which is not on PyPI
(and not used here); without it the option is refused. This module is a stand-in with the same
two functions, built on ``torch.addmm`` with ``out_dtype=float32`` (BF16/FP16 operands, FP32
accumulation, the existing ``main_grad`` added in the GEMM's epilogue), installed as the module
Megatron's ``tensor_parallel.layers`` looks up (:func:`install`).

Numerics (stated, not silent; off by default): each micro-batch's weight gradient is added to
``main_grad`` in FP32 without first being rounded to BF16 — the same as Megatron-LM and NeMo
runs with Apex or Transformer Engine. Without the option, the BF16 ``weight.grad`` is rounded
once per micro-batch before DDP adds it. The quantized linears (``quant/linear.py``) follow the
same flag: their Wgrad output stays FP32 and is added to ``main_grad`` directly.

GPU only: Megatron's backward allocates its placeholder ``weight.grad`` on the current CUDA
device. ``training.model.transformer_config`` refuses the option without a GPU.
"""

from __future__ import annotations

import sys
import types

import torch

MODULE_NAME = "fused_weight_gradient_mlp_cuda"


def _as_2d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor,
                          main_grad: torch.Tensor) -> None:
    """``main_grad += grad_outputᵀ · total_input`` with FP32 accumulation into the FP32
    ``main_grad`` (``[out, in]``; inputs ``[..., in]`` and ``[..., out]``), in one GEMM on CUDA."""
    x, g = _as_2d(total_input), _as_2d(grad_output)
    if main_grad.dtype != torch.float32:
        raise ValueError(f"wgrad_gemm_accum_fp32: main_grad must be FP32, got {main_grad.dtype}")
    if main_grad.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        torch.addmm(main_grad, g.t(), x, out_dtype=torch.float32, out=main_grad)
    elif main_grad.is_cuda and x.dtype == torch.float32:
        torch.addmm(main_grad, g.t(), x, out=main_grad)
    else:  # CPU (tests): the FP32 product of the exact operand values
        main_grad.add_(g.t().float() @ x.float())


def wgrad_gemm_accum_fp16(total_input: torch.Tensor, grad_output: torch.Tensor,
                          main_grad: torch.Tensor) -> None:
    """``main_grad += grad_outputᵀ · total_input`` for a BF16/FP16 ``main_grad`` (one GEMM)."""
    x, g = _as_2d(total_input), _as_2d(grad_output)
    torch.addmm(main_grad, g.t().to(main_grad.dtype), x.to(main_grad.dtype), out=main_grad)


def _module() -> types.ModuleType:
    mod = types.ModuleType(MODULE_NAME, __doc__)
    mod.wgrad_gemm_accum_fp32 = wgrad_gemm_accum_fp32
    mod.wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp16
    mod._nvfp4_megatron = True
    return mod


def install(log=print) -> None:
    """Make Megatron-Core's linear layers use this module's GEMMs for gradient-accumulation fusion
    (what they would import from Apex). A real Apex extension, if one is importable, is left alone."""
    from megatron.core.tensor_parallel import layers

    current = getattr(layers, MODULE_NAME, None)
    if current is not None and not getattr(current, "_nvfp4_megatron", False):
        log(f"[fusion] gradient_accumulation_fusion: Megatron uses the installed {MODULE_NAME}")
        return
    if current is None:
        layers.fused_weight_gradient_mlp_cuda = sys.modules.setdefault(MODULE_NAME, _module())
        layers._grad_accum_fusion_available = True
        log("[fusion] gradient_accumulation_fusion: weight gradients accumulate into the FP32 "
            "main_grad inside the Wgrad GEMM (torch.addmm, out_dtype=float32; not rounded to BF16 "
            "first)")


def uninstall() -> None:
    """Take this module out of Megatron again (a process that builds models with and without it)."""
    from megatron.core.tensor_parallel import layers

    current = getattr(layers, MODULE_NAME, None)
    if getattr(current, "_nvfp4_megatron", False):
        del layers.fused_weight_gradient_mlp_cuda
        layers._grad_accum_fusion_available = False
        if getattr(sys.modules.get(MODULE_NAME), "_nvfp4_megatron", False):
            del sys.modules[MODULE_NAME]
