"""Microsoft FP4 pieces: absmax E2M1 scaling, the DGE derivative, outlier clamping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from formats_oracle import e2m1_rne_codes
from nvfp4_megatron.formats import (
    dge_derivative,
    dge_derivative_e2m1,
    outlier_clamp,
    quantize_absmax_e2m1,
    quantize_per_channel,
    quantize_per_token,
)


def test_per_token_absmax_matches_formula():
    gen = torch.Generator().manual_seed(40)
    x = torch.randn(64, 48, generator=gen) * torch.exp2(torch.randint(-8, 8, (64, 1), generator=gen).float())
    x[5] = 0
    q = quantize_per_token(x)
    amax = x.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, 6.0 / amax, torch.ones_like(amax))
    assert torch.equal(q.scale, scale)
    np.testing.assert_array_equal(q.codes.numpy(), e2m1_rne_codes((x * scale).clamp(-6, 6).numpy()))
    deq = q.dequantize()
    assert torch.all(deq[5] == 0)
    # each row's absmax element is represented exactly (maps to ±6)
    idx = x.abs().argmax(-1)
    rows = torch.arange(64)
    torch.testing.assert_close(deq[rows, idx], x[rows, idx], rtol=1e-6, atol=0)


def test_per_channel_and_other_dims():
    w = torch.randn(32, 16, generator=torch.Generator().manual_seed(41))
    assert torch.equal(quantize_per_channel(w).codes, quantize_absmax_e2m1(w, dim=1).codes)
    q0 = quantize_absmax_e2m1(w, dim=0)
    assert q0.scale.shape == (1, 16)
    assert torch.equal(q0.codes.t(), quantize_absmax_e2m1(w.t().contiguous(), dim=1).codes)
    with pytest.raises(ValueError, match="dim=2"):
        quantize_absmax_e2m1(w, dim=2)


def test_dge_derivative_formula_and_cap():
    # f'(x) = (1/k) |2x/δ - 1|^(1/k - 1); at the interval ends |.| = 1 -> 1/k
    d = dge_derivative(torch.tensor([0.0, 1.0, 0.5, 0.25, 0.4999]), 1.0, k=5, cap=3.0)
    assert d[0].item() == pytest.approx(0.2) and d[1].item() == pytest.approx(0.2)
    assert d[2].item() == 3.0  # midpoint: infinite -> capped
    assert d[3].item() == pytest.approx(0.2 * 0.5 ** (-0.8))
    assert d[4].item() == 3.0  # (1/5) * 0.0002^-0.8 = 183 > cap
    assert torch.equal(dge_derivative(torch.tensor([0.3]), 1.0, k=1.0), torch.tensor([1.0]))  # k=1: STE
    with pytest.raises(ValueError, match="k=0"):
        dge_derivative(torch.zeros(1), 1.0, k=0)
    with pytest.raises(ValueError, match="delta"):
        dge_derivative(torch.zeros(1), 0.0)


def test_dge_e2m1_intervals():
    # |x| = 2.5 is the middle of [2, 3] -> capped; 4.0 starts [4, 6] -> 1/k; symmetric in sign
    d = dge_derivative_e2m1(torch.tensor([2.5, -2.5, 4.0, 5.0, 0.1, 6.0, 7.0]))
    assert d[:2].tolist() == [3.0, 3.0]
    assert d[2].item() == pytest.approx(0.2)
    assert d[3].item() == 3.0
    assert d[4].item() == pytest.approx(0.2 * abs(2 * 0.1 / 0.5 - 1) ** -0.8)
    # 6.0 is the upper end of [4, 6]: a grid point like the others (1/k); beyond saturation: 0
    assert d[5].item() == pytest.approx(0.2)
    assert d[6].item() == 0.0


def test_outlier_clamp_quantiles_and_sparsity():
    gen = torch.Generator().manual_seed(42)
    x = torch.randn(400, 256, generator=gen)
    clamped, residual = outlier_clamp(x, alpha=0.99)
    hi = torch.quantile(x.reshape(-1), 0.99)
    lo = torch.quantile(x.reshape(-1), 0.01)
    assert torch.equal(clamped, x.clamp(lo, hi))
    assert torch.equal(clamped + residual, x)
    nnz = (residual != 0).float().mean().item()
    assert 0.019 <= nnz <= 0.021  # 2 (1 - α) up to the interpolation
    with pytest.raises(ValueError, match="alpha"):
        outlier_clamp(x, alpha=1.0)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        outlier_clamp(bad)


@pytest.mark.parametrize("n", [7, 100, 1001, 65_537])
@pytest.mark.parametrize("alpha", [0.9, 0.99, 0.999])
def test_quantile_matches_torch_quantile(n, alpha):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) ** 3
    clamped, _ = outlier_clamp(x, alpha=alpha)
    assert torch.equal(clamped, x.clamp(torch.quantile(x, 1 - alpha), torch.quantile(x, alpha)))
