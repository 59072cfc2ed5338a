"""kernels.dispatch on CPU: the reference path, identical results, no kernel needed."""

from __future__ import annotations

import logging

import pytest
import torch

from nvfp4_megatron import formats
from nvfp4_megatron.kernels import dispatch


def _x():
    return torch.randn(32, 64, generator=torch.Generator().manual_seed(0)).bfloat16()


def test_cpu_tensor_uses_reference():
    assert not dispatch.uses_kernel(_x())


@pytest.mark.parametrize("kw", [{}, {"rht": True}, {"tile": (16, 16)}])
def test_nvfp4_cpu_equals_reference(kw):
    got, want = dispatch.quantize_nvfp4(_x(), **kw), formats.quantize_nvfp4(_x(), **kw)
    assert torch.equal(got.data, want.data)
    assert torch.equal(got.scale.view(torch.uint8), want.scale.view(torch.uint8))
    assert torch.equal(got.scale_enc, want.scale_enc)


def test_mx_fp8_cpu_equal_reference():
    got, want = dispatch.quantize_mx(_x(), torch.float8_e4m3fn), formats.quantize_mx(_x(), torch.float8_e4m3fn)
    assert torch.equal(got.data.view(torch.uint8), want.data.view(torch.uint8))
    got, want = dispatch.quantize_fp8_current(_x(), torch.float8_e5m2), formats.quantize_fp8_current(_x(), torch.float8_e5m2)
    assert torch.equal(got.data.view(torch.uint8), want.data.view(torch.uint8)) and torch.equal(got.scale, want.scale)


def test_amax_cpu_matches_definition():
    x = _x()
    assert torch.equal(dispatch.amax(x), x.float().abs().amax())
    assert torch.equal(dispatch.amax(x, rht=True), formats.apply_rht(x).abs().amax())


def test_bad_shape_raises_with_rule():
    with pytest.raises(ValueError, match="block size 16"):
        dispatch.quantize_nvfp4(torch.randn(4, 24))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_case_without_kernel_logs_once(caplog):
    x = torch.randn(32, 128).bfloat16().cuda()
    with caplog.at_level(logging.WARNING, logger="nvfp4_megatron.kernels.dispatch"):
        dispatch.quantize_fp8_block(x, torch.float8_e4m3fn)
        dispatch.quantize_fp8_block(x, torch.float8_e4m3fn)
    assert sum("quantize_fp8_block" in r.message for r in caplog.records) == 1
    assert dispatch.uses_kernel(x)
