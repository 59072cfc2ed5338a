"""Gated RMSNorm: mamba_ssm's RMSNormGated semantics, checked against a float64 formula here."""

import pytest
import torch
import torch.nn.functional as F

from nvfp4_megatron.ssm import RMSNormGated, rms_norm_gated


def reference(x, w, z, eps, group_size, norm_before_gate):
    x, w = x.double(), w.double()
    z = None if z is None else z.double()
    if z is not None and not norm_before_gate:
        x = x * z * torch.sigmoid(z)
    n = x.shape[-1]
    gs = group_size or n
    out = torch.empty_like(x)
    for g0 in range(0, n, gs):
        part = x[..., g0:g0 + gs]
        out[..., g0:g0 + gs] = part / torch.sqrt((part * part).mean(-1, keepdim=True) + eps)
    out = out * w
    if z is not None and norm_before_gate:
        out = out * z * torch.sigmoid(z)
    return out


@pytest.mark.parametrize("group_size", [None, 4, 6])
@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_matches_formula_float64(group_size, norm_before_gate, gated):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 12, generator=g, dtype=torch.float64)
    z = torch.randn(5, 3, 12, generator=g, dtype=torch.float64) if gated else None
    norm = RMSNormGated(12, eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate,
                        dtype=torch.float64)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(12, generator=g, dtype=torch.float64))
    torch.testing.assert_close(norm(x, z), reference(x, norm.weight, z, 1e-5, group_size,
                                                      norm_before_gate), rtol=1e-12, atol=1e-12)


def test_gate_order_matters_and_groups_are_independent():
    g = torch.Generator().manual_seed(1)
    x, z = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    w = torch.ones(8)
    before = rms_norm_gated(x, w, z, group_size=4, norm_before_gate=True)
    after = rms_norm_gated(x, w, z, group_size=4, norm_before_gate=False)
    assert not torch.allclose(before, after)
    # changing group 0 leaves group 1's output unchanged
    x2 = x.clone()
    x2[:, :4] *= 3.0
    out1 = rms_norm_gated(x, w, z, group_size=4, norm_before_gate=False)
    out2 = rms_norm_gated(x2, w, z, group_size=4, norm_before_gate=False)
    torch.testing.assert_close(out1[:, 4:], out2[:, 4:])
    assert not torch.allclose(out1[:, :4], out2[:, :4])


def test_bf16_in_bf16_out_computed_in_fp32():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 16, generator=g).bfloat16()
    z = torch.randn(4, 16, generator=g).bfloat16()
    norm = RMSNormGated(16, group_size=8, norm_before_gate=False, dtype=torch.bfloat16)
    out = norm(x, z)
    assert out.dtype == torch.bfloat16
    ref = reference(x.float(), norm.weight.float(), z.float(), 1e-5, 8, False)
    torch.testing.assert_close(out.double(), ref.bfloat16().double(), rtol=0, atol=0)


def test_gradients_flow_to_x_z_and_weight():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: rms_norm_gated(a, c, b, group_size=4, norm_before_gate=False), (x, z, w))


def test_bad_group_size_refused():
    with pytest.raises(ValueError, match="group_size"):
        RMSNormGated(10, group_size=4)


def test_defaults_match_mamba_ssm():
    norm = RMSNormGated(6)
    assert norm.norm_before_gate is True and norm.eps == 1e-5 and norm.group_size is None
    assert norm.bias is None and torch.equal(norm.weight.data, torch.ones(6))
    x = torch.randn(2, 6)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (6,), eps=1e-5))
