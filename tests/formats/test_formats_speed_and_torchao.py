"""The reference speed bound of issue 2, and an optional cross-check with torchao's NVFP4/MX
reference (skipped unless torchao is importable; it is not a dependency)."""

from __future__ import annotations

import time

import pytest
import torch

from nvfp4_megatron.formats import encode_e2m1_rne, quantize_mx, quantize_nvfp4


@pytest.mark.slow
def test_nvfp4_4096_squared_under_2s_on_one_core():
    x = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(50))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        quantize_nvfp4(x[:256])  # warm-up
        best = min(_timed(lambda: quantize_nvfp4(x)) for _ in range(2))
    finally:
        torch.set_num_threads(threads)
    assert best < 2.0, f"quantize_nvfp4 on 4096x4096 took {best:.2f} s on one core"


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _torchao_mx():
    """torchao is a pinned test dependency (pyproject.toml ``test`` extra): no skip when missing."""
    import torchao.prototype.mx_formats as mx

    return mx


def test_torchao_e2m1_encoder_agrees_bit_for_bit():
    _torchao_mx()
    from torchao.prototype.mx_formats.kernels import f32_to_f4_unpacked

    sweep = torch.arange(-7 * 4096, 7 * 4096 + 1, dtype=torch.float32) / 4096
    special = torch.tensor([float("inf"), -float("inf"), 1e30, -1e30, -0.0, 1e-40])
    x = torch.cat([sweep, torch.randn(20_000, generator=torch.Generator().manual_seed(52)) * 3, special])
    assert torch.equal(f32_to_f4_unpacked(x), encode_e2m1_rne(x))
    # NaN is where the policies differ: torchao gives magnitude code 3 (1.5), we saturate to 6.


@pytest.mark.parametrize("elem", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_torchao_mxfp8_rceil_agrees_bit_for_bit(elem):
    _torchao_mx()
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.mx_tensor import to_mx

    gen = torch.Generator().manual_seed(53)
    x = torch.randn(256, 256, generator=gen) * torch.exp2(torch.randint(-30, 30, (256, 1), generator=gen).float())
    scale_e8m0, data_lp = to_mx(x, elem, 32, scaling_mode=ScaleCalculationMode.RCEIL)
    ours = quantize_mx(x, elem)
    assert torch.equal(scale_e8m0.view(torch.uint8).reshape(256, 8), ours.scale.view(torch.uint8))
    assert torch.equal(data_lp.view(torch.uint8), ours.data.view(torch.uint8))


def test_torchao_nvfp4_agrees_where_block_scales_are_normal():
    _torchao_mx()
    from torchao.prototype.mx_formats.nvfp4_tensor import nvfp4_quantize, per_tensor_amax_to_scale

    gen = torch.Generator().manual_seed(54)
    x = torch.randn(256, 256, generator=gen) * torch.exp2(torch.randint(-10, 10, (256, 1), generator=gen).float())
    scales, packed = nvfp4_quantize(x, 16, per_tensor_amax_to_scale(x.abs().max()))
    ours = quantize_nvfp4(x)
    # torchao clamps block scales up to the smallest normal E4M3 (2^-6); we keep E4M3 subnormals
    # as the DESIGN formula (and Transformer Engine) do. Everywhere else: identical bits.
    normal = ours.scale.float() >= 2.0**-6
    assert 0.5 < normal.float().mean().item() < 1.0  # the seed exercises both cases
    assert torch.equal(scales.float()[normal], ours.scale.float()[normal])
    assert torch.all(scales.float()[~normal] == 2.0**-6)
    codes_blocks_equal = (packed.reshape(256, 16, 8) == ours.data.reshape(256, 16, 8)).all(-1)
    assert torch.all(codes_blocks_equal[normal])


def test_torchao_nvfp4_all_zero_tensor_diverges_as_documented():
    """The second known divergence (docs/formats.md "Cross-checks"): for an all-zero tensor
    torchao's per-tensor scale is 0 and its block scales NaN; ours quantize to zero codes and zero
    scales with S_enc = 1, and dequantize to exact zeros."""
    _torchao_mx()
    from torchao.prototype.mx_formats.nvfp4_tensor import nvfp4_quantize, per_tensor_amax_to_scale

    x = torch.zeros(4, 32)
    scales, _ = nvfp4_quantize(x, 16, per_tensor_amax_to_scale(x.abs().max()))
    assert torch.isnan(scales.float()).all()
    ours = quantize_nvfp4(x)
    assert torch.equal(ours.scale.float(), torch.zeros(4, 2))
    assert torch.equal(ours.data, torch.zeros(4, 16, dtype=torch.uint8))
    assert ours.scale_enc.item() == 1.0
    assert torch.equal(ours.dequantize(), x)
