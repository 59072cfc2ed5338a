"""``mcore/grad_accum.py``: the stand-in for Apex's ``fused_weight_gradient_mlp_cuda`` that
``train.gradient_accumulation_fusion`` installs into Megatron-Core (the GEMM itself runs on the GPU:
tests/gpu/test_gemm_gpu.py; the training run: tests/gpu/test_pretrain_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from nvfp4_megatron.mcore import grad_accum


def test_accumulates_the_fp32_weight_gradient_into_main_grad():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 24, 32, generator=g).to(torch.bfloat16)  # [s, b, in]
    dy = torch.randn(2, 24, 16, generator=g).to(torch.bfloat16)  # [s, b, out]
    main = torch.randn(16, 32, generator=g)
    dw = dy.reshape(-1, 16).t().float() @ x.reshape(-1, 32).float()
    want = main + dw
    grad_accum.wgrad_gemm_accum_fp32(x, dy, main)
    assert torch.equal(main, want)
    with pytest.raises(ValueError, match="main_grad must be FP32"):
        grad_accum.wgrad_gemm_accum_fp32(x, dy, main.bfloat16())
    main16 = torch.zeros(16, 32, dtype=torch.bfloat16)
    grad_accum.wgrad_gemm_accum_fp16(x, dy, main16)
    assert torch.allclose(main16.float(), dw, rtol=2e-2, atol=5e-2)


def test_install_makes_megatron_accept_the_option_and_uninstall_undoes_it():
    from megatron.core.tensor_parallel import layers

    assert getattr(layers, "fused_weight_gradient_mlp_cuda", None) is None  # no Apex here
    assert layers._grad_accum_fusion_available is False
    logs = []
    try:
        grad_accum.install(logs.append)
        grad_accum.install(logs.append)  # twice: one install, one log line
        assert layers._grad_accum_fusion_available is True
        assert layers.fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32 is grad_accum.wgrad_gemm_accum_fp32
        assert len(logs) == 1 and "gradient_accumulation_fusion" in logs[0]
    finally:
        grad_accum.uninstall()
    assert getattr(layers, "fused_weight_gradient_mlp_cuda", None) is None
    assert layers._grad_accum_fusion_available is False
