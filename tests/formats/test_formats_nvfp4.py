"""NVFP4 reference vs an independent NumPy computation of DESIGN.md §1 (tier 2), 2D consistency,
edge cases, NaN/Inf policy, the worked block of docs/formats.md, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from formats_oracle import e2m1_decode, e4m3_rne_satfinite, nvfp4_reference
from nvfp4_megatron.formats import apply_rht, decode_e2m1, quantize_nvfp4
from nvfp4_megatron.formats.nvfp4 import nvfp4_global_scales


def _random_tensor(gen: torch.Generator, rows: int, k: int) -> torch.Tensor:
    """One random test tensor of a randomly chosen kind (outliers, zeros, wide range, ...)."""
    kind = int(torch.randint(0, 8, (1,), generator=gen))
    x = torch.randn(rows, k, generator=gen)
    if kind == 1:  # wide dynamic range: every element scaled by 2^[-40, 40]
        x = x * torch.exp2(torch.randint(-40, 41, (rows, k), generator=gen).float())
    elif kind == 2:  # one huge outlier
        x[int(torch.randint(0, rows, (1,), generator=gen)), int(torch.randint(0, k, (1,), generator=gen))] = 1e30
    elif kind == 3:  # zero blocks and zero elements
        x = x * (torch.rand(rows, k // 16, 1, generator=gen) < 0.5).repeat_interleave(16, -1).reshape(rows, k)
        x = x * (torch.rand(rows, k, generator=gen) < 0.7)
    elif kind == 4:  # tiny values: block scales deep in the E4M3 subnormal range / underflow
        x = x * torch.exp2(torch.randint(-30, 0, (rows, k // 16), generator=gen).float()).repeat_interleave(16, -1)
        x[0, 0] = 1.0
    elif kind == 5:  # values on the E2M1 grid times powers of two (exercises ties after scaling)
        g = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0])
        x = g[torch.randint(0, len(g), (rows, k), generator=gen)] * torch.sign(x)
        x = x * 2.0 ** int(torch.randint(-10, 10, (1,), generator=gen))
    elif kind == 6:  # uniform, heavy tails
        x = torch.rand(rows, k, generator=gen) ** 8 * 1e4 * torch.sign(x)
    elif kind == 7 and int(torch.randint(0, 4, (1,), generator=gen)) == 0:
        x = torch.zeros(rows, k)
    return x


def _check_against_oracle(q, x_fp32: torch.Tensor, tile_rows: int) -> None:
    rows = x_fp32.reshape(-1, x_fp32.shape[-1]).shape[0]
    codes, s_b, s_enc, s_dec, deq = nvfp4_reference(x_fp32.reshape(rows, -1).numpy(), tile_rows)
    got_codes = q.codes().reshape(rows, -1).numpy()
    np.testing.assert_array_equal(got_codes, codes)
    np.testing.assert_array_equal(q.scale.float().reshape(rows, -1).numpy(), s_b.astype(np.float32))
    assert q.scale_enc.item() == s_enc and q.scale_dec.item() == s_dec
    np.testing.assert_array_equal(q.dequantize().reshape(rows, -1).numpy(), deq)


@pytest.mark.parametrize("tile", [(1, 16), (16, 16)])
@pytest.mark.parametrize("rht", [False, True])
def test_matches_design_formulas_on_random_tensors(tile, rht):
    gen = torch.Generator().manual_seed(10 + tile[0] + rht)
    n_tensors = 600
    for i in range(n_tensors):
        rows = 16 * int(torch.randint(1, 3, (1,), generator=gen))
        k = 16 * int(torch.randint(1, 5, (1,), generator=gen))
        x = _random_tensor(gen, rows, k)
        dtype = torch.bfloat16 if i % 3 == 0 else torch.float32
        x = x.to(dtype)
        if i % 5 == 0:
            x = x.reshape(2, rows // 2, k)  # N-d input, leading dims flattened to rows
        q = quantize_nvfp4(x, tile=tile, rht=rht)
        assert q.data.dtype == torch.uint8 and q.data.shape == (*x.shape[:-1], k // 2)
        assert q.scale.dtype == torch.float8_e4m3fn and q.scale.shape == (*x.shape[:-1], k // 16)
        x_basis = apply_rht(x) if rht else x.float()  # the oracle quantizes the RHT output
        _check_against_oracle(q, x_basis, tile[0])
        assert not torch.isnan(q.dequantize()).any()


def test_dequantize_unscaled_is_exact_in_bf16_and_alpha_form():
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(5)) * 3
    q = quantize_nvfp4(x)
    unscaled = q.dequantize_unscaled()
    assert torch.equal(unscaled.to(torch.bfloat16).float(), unscaled)  # q*s_b has <= 6 significant bits
    assert torch.equal(unscaled * q.scale_dec, q.dequantize())
    assert q.dequantize(torch.bfloat16).dtype == torch.bfloat16


def test_2d_tiles_transpose_consistency():
    gen = torch.Generator().manual_seed(6)
    for _ in range(50):
        w = _random_tensor(gen, 64, 48)
        a = quantize_nvfp4(w, tile=(16, 16))
        b = quantize_nvfp4(w.t().contiguous(), tile=(16, 16))
        assert torch.equal(a.dequantize().t(), b.dequantize())
        assert torch.equal(a.codes().t(), b.codes())
        # one scale per 16x16 tile, replicated to its 16 rows
        s = a.scale.float().reshape(4, 16, 3)
        assert torch.equal(s, s[:, :1, :].expand_as(s))


def test_all_zero_tensor_gives_zeros_never_nan():
    for dtype in (torch.float32, torch.bfloat16):
        for tile in ((1, 16), (16, 16)):
            for rht in (False, True):
                q = quantize_nvfp4(torch.zeros(16, 32, dtype=dtype), tile=tile, rht=rht)
                assert q.scale_enc.item() == 1.0 and q.amax.item() == 0.0
                assert torch.all(q.data == 0) and torch.all(q.scale.float() == 0)
                deq = q.dequantize()
                assert torch.equal(deq, torch.zeros(16, 32))


def test_zero_block_inside_nonzero_tensor():
    x = torch.randn(2, 48, generator=torch.Generator().manual_seed(7))
    x[1, 16:32] = 0
    q = quantize_nvfp4(x)
    assert q.scale.float()[1, 1].item() == 0.0
    assert torch.all(q.codes()[1, 16:32] == 0)
    assert torch.all(q.dequantize()[1, 16:32] == 0)


def test_one_huge_outlier():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(8))
    x[2, 37] = 3e30
    q = quantize_nvfp4(x)
    assert q.amax.item() == pytest.approx(3e30, rel=1e-7)
    assert q.scale.float()[2, 2].item() == 448.0
    assert decode_e2m1(q.codes())[2, 37].item() == 6.0
    assert q.dequantize()[2, 37].item() == pytest.approx(3e30, rel=1e-6)
    # the other blocks' scales underflow to 0 (amax_b * 2688 / 3e30 / 6 < 2^-10): zeros, not NaN
    deq = q.dequantize()
    assert torch.all(torch.isfinite(deq))
    _check_against_oracle(q, x, 1)


def test_block_scales_in_e4m3_subnormal_range():
    # global amax 448 * 2^8 = 114688 in block 0; S_enc = 2688 / 114688 = 6 * 2^-8.
    # block b with amax A gets s_b = e4m3(A * 2^-8): A = 2 -> 2^-7 (subnormal, 4 * 2^-9),
    # A = 1.5 -> 1.5 * 2^-8 = 3 * 2^-9 (subnormal), A = 2^-1 -> 2^-9 (smallest subnormal),
    # A = 2^-2 -> 2^-10, a tie between 0 and 2^-9: rounds to even, 0 -> whole block dequantizes to 0.
    x = torch.zeros(1, 80)
    x[0, 0] = 114688.0
    x[0, 16:32] = torch.linspace(-2.0, 1.0, 16)
    x[0, 32:48] = torch.linspace(-1.5, 0.75, 16)
    x[0, 48:64] = torch.linspace(-0.5, 0.25, 16)
    x[0, 64:80] = torch.linspace(-0.25, 0.125, 16)
    q = quantize_nvfp4(x)
    assert q.scale_enc.item() == 6 * 2.0**-8
    assert q.scale.float()[0].tolist() == [448.0, 2.0**-7, 3 * 2.0**-9, 2.0**-9, 0.0]
    assert torch.all(q.dequantize()[0, 64:80] == 0)
    _check_against_oracle(q, x, 1)
    # block maxima decode back exactly: s_b * 6 * S_dec = A for A = 2, 1.5, 0.5
    deq = q.dequantize()[0]
    assert deq[16].item() == pytest.approx(-2.0, rel=1e-6)
    assert deq[32].item() == pytest.approx(-1.5, rel=1e-6)
    assert deq[48].item() == pytest.approx(-0.5, rel=1e-6)


def test_oracle_e4m3_agrees_with_torch_cast():
    # the oracle's E4M3 rounding is itself checked against torch on every E4M3 midpoint +- 1 ulp
    vals = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (vals[1:] + vals[:-1]) / 2
    probe = torch.cat([vals, mids, torch.nextafter(mids, torch.tensor(0.0)),
                       torch.nextafter(mids, torch.tensor(1e9)), torch.tensor([448.0, 460.0, 1e9])])
    expected = torch.clamp(probe, max=448.0).to(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(e4m3_rne_satfinite(probe.numpy()).astype(np.float32), expected)


def test_nan_inf_policy():
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(9))
    x_inf = x.clone()
    x_inf[0, 3] = float("inf")
    q = quantize_nvfp4(x_inf)
    assert q.scale_enc.item() == 1.0  # non-finite amax -> S_enc = 1
    assert q.scale.float()[0, 0].item() == 448.0
    assert decode_e2m1(q.codes())[0, 3].item() == 6.0
    assert torch.all(torch.isfinite(q.dequantize()))
    x_nan = x.clone()
    x_nan[1, 20] = float("nan")
    q = quantize_nvfp4(x_nan)
    assert q.scale_enc.item() == 1.0
    assert torch.isnan(q.scale.float()[1, 1])
    deq = q.dequantize()
    assert torch.all(torch.isnan(deq[1, 16:32]))  # the NaN block is visible as NaN
    assert not torch.isnan(deq[:, :16]).any() and not torch.isnan(deq[0]).any()
    assert q.codes()[1, 20].item() & 0x7 == 0x7


def test_global_scale_rules():
    s_enc, s_dec = nvfp4_global_scales(torch.tensor([0.0, float("inf"), float("nan"), 2688.0, 1e-45]))
    assert s_enc.tolist()[:4] == [1.0, 1.0, 1.0, 1.0]
    assert s_enc[4].item() == torch.finfo(torch.float32).max  # capped at FLT_MAX
    assert torch.all(s_dec == 1.0 / s_enc)


def test_passed_amax_is_used():
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(11))
    q = quantize_nvfp4(x, amax=torch.tensor(100.0))
    assert q.amax.item() == 100.0 and q.scale_enc.item() == np.float32(2688.0) / np.float32(100.0)
    _codes, s_b, *_ = nvfp4_reference(x.numpy(), 1, amax=100.0)
    np.testing.assert_array_equal(q.scale.float().numpy(), s_b.astype(np.float32))
    assert torch.equal(quantize_nvfp4(x, amax=float(x.abs().max())).data, quantize_nvfp4(x).data)
    with pytest.raises(ValueError, match="scalar"):
        quantize_nvfp4(x, amax=torch.ones(2))


def test_rht_dequantize_is_in_rht_basis():
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(64, 64, generator=gen)
    x[3, 5] = 40.0  # an outlier the RHT spreads
    q = quantize_nvfp4(x, rht=True)
    basis = apply_rht(x)
    assert q.amax.item() == basis.abs().max().item()
    err_basis = (q.dequantize() - basis).norm() / basis.norm()
    err_orig = (q.dequantize() - x).norm() / x.norm()
    assert err_basis < 0.15 < err_orig
    # GEMM with both operands in the RHT basis reproduces the original product
    w = torch.randn(32, 64, generator=gen)
    qw = quantize_nvfp4(w, rht=True)
    y = q.dequantize() @ qw.dequantize().t()
    ref = x @ w.t()
    qerr = ((quantize_nvfp4(x).dequantize() @ quantize_nvfp4(w).dequantize().t() - ref).norm() / ref.norm()).item()
    assert ((y - ref).norm() / ref.norm()).item() < 1.5 * qerr  # same order as without RHT
    mixed = q.dequantize() @ w.t()  # forgetting that the result is in the RHT basis is wrong
    assert ((mixed - ref).norm() / ref.norm()).item() > 0.5


def test_stochastic_rounding_draws_neighbours_and_is_unbiased():
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(4, 64, generator=gen)
    rne = quantize_nvfp4(x)
    # the same scales; per element the two neighbours of y = x * enc_b
    enc_b = 1.0 / (rne.scale.float() * rne.scale_dec)
    y = (x.reshape(4, 4, 16) * enc_b[..., None]).reshape(4, 64).clamp(-6, 6)
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    lo_i = torch.bucketize(y.abs(), grid, right=True) - 1
    lo = grid[lo_i] * torch.sign(y)
    hi = grid[torch.clamp(lo_i + 1, max=7)] * torch.sign(y)
    n = 1000
    total = torch.zeros(4, 64, dtype=torch.float64)
    g = torch.Generator().manual_seed(14)
    for _ in range(n):
        q = quantize_nvfp4(x, stochastic_rounding=True, generator=g)
        assert torch.equal(q.scale.float(), rne.scale.float())
        v = decode_e2m1(q.codes())
        assert torch.all((v == lo) | (v == hi))
        total += q.dequantize().double()
    mean = total / n
    # E[q] = y for |y| <= 6: the target is the clamped y in dequantized units (the block maximum
    # can exceed 6 by the E4M3 rounding of s_b and is clamped deterministically).
    target = y.double() / enc_b.repeat_interleave(16, -1).double()
    # std of one draw <= gap/2 (gap in dequantized units); 5 standard errors over n draws
    gap = ((hi - lo).abs() / enc_b.repeat_interleave(16, -1)).double()
    bound = 5 * (gap / 2) / n**0.5 + 1e-6 * target.abs()  # + FP32 rounding of the product
    assert torch.all((mean - target).abs() <= bound)
    a = quantize_nvfp4(x, stochastic_rounding=True, generator=torch.Generator().manual_seed(1))
    b = quantize_nvfp4(x, stochastic_rounding=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.data, b.data)
    u = torch.rand(4, 64, generator=torch.Generator().manual_seed(1))
    c = quantize_nvfp4(x, stochastic_rounding=True, rand=u)
    assert torch.equal(c.data, a.data)  # generator draws == explicit rand of the same stream


def test_worked_block_from_docs():
    # docs/formats.md walks through this block by hand; the numbers there are asserted here.
    block = [0.1, -0.3, 0.7, 1.2, -2.5, 3.3, 0.0, 4.9, -6.1, 0.25, 10.0, -0.05, 1.75, 2.0, -3.0, 8.0]
    x = torch.tensor([block + [24.0] + [1.0] * 15])
    q = quantize_nvfp4(x)
    assert q.amax.item() == 24.0
    assert q.scale_enc.item() == 112.0
    assert q.scale.float().tolist() == [[192.0, 448.0]]
    assert q.scale.view(torch.uint8).tolist() == [[0x74, 0x7E]]
    # block 1: enc = 1 / (448 * S_dec) = 0.25 exactly, so each 1.0 hits the E2M1 tie 0.25 -> 0
    assert (1.0 / (q.scale.float()[0, 1] * q.scale_dec)).item() == 0.25
    assert q.codes()[0, 16:].tolist() == [0x7] + [0x0] * 15
    assert q.dequantize()[0, 16].item() == pytest.approx(24.000002, abs=1e-6)
    assert (1.0 / (q.scale.float()[0, 0] * q.scale_dec)).item() == pytest.approx(0.58333331, abs=1e-8)
    assert [hex(c) for c in q.codes()[0, :16].tolist()] == [
        "0x0", "0x8", "0x1", "0x1", "0xb", "0x4", "0x0", "0x5",
        "0xe", "0x0", "0x7", "0x8", "0x2", "0x2", "0xc", "0x6"]
    assert q.data[0, :8].tolist() == [0x80, 0x11, 0x4B, 0x50, 0x0E, 0x87, 0x22, 0x6C]
    assert decode_e2m1(q.codes()[0, :16]).tolist() == [
        0.0, -0.0, 0.5, 0.5, -1.5, 2.0, 0.0, 3.0, -4.0, 0.0, 6.0, -0.0, 1.0, 1.0, -2.0, 4.0]
    # dequantized = code * 192 / 112 = code * 12/7
    expected = torch.tensor([0.0, -0.0, 0.5, 0.5, -1.5, 2.0, 0.0, 3.0, -4.0, 0.0, 6.0, -0.0,
                             1.0, 1.0, -2.0, 4.0]) * 192.0 * q.scale_dec
    assert torch.equal(q.dequantize()[0, :16], expected)
    assert q.dequantize()[0, 10].item() == pytest.approx(10.285714, abs=1e-5)


@pytest.mark.parametrize(
    "kwargs, x, match",
    [
        ({}, torch.zeros(4, 20), r"\(4, 20\).*multiple of the block size 16"),
        ({}, torch.zeros(4, 0), r"\(4, 0\).*positive multiple of the block size 16"),
        ({}, torch.zeros(4, 16, dtype=torch.int32), "dtype torch.int32"),
        ({}, torch.zeros(4, 16, dtype=torch.float64), "dtype torch.float64"),
        ({"tile": (16, 16)}, torch.zeros(24, 32), r"\(24, 32\) has 24 rows.*tile height 16"),
        ({"tile": (16, 16)}, torch.zeros(32), "at least 2 dimensions"),
        ({"tile": (2, 16)}, torch.zeros(32, 32), r"tile=\(2, 16\)"),
        ({"generator": torch.Generator()}, torch.zeros(4, 16), "stochastic_rounding=True"),
        ({"stochastic_rounding": True, "rand": torch.zeros(3)}, torch.zeros(4, 16), "rand must"),
        ({"rht": True, "rht_signs": [1] * 15}, torch.zeros(4, 16), "16 values"),
    ],
)
def test_bad_input_raises_value_error(kwargs, x, match):
    with pytest.raises(ValueError, match=match):
        quantize_nvfp4(x, **kwargs)


def test_worked_oracle_decode_sanity():
    assert e2m1_decode([0x7, 0xF, 0x8]).tolist() == [6.0, -6.0, -0.0]


def test_rht_bf16_worked_example_from_docs():
    """docs/formats.md "RHT output in the input's dtype": a 16-token BF16 column through the Wgrad
    (columnwise + RHT) copy. The BF16-rounded transform moves the amax from 279 to 280 * 2^-11,
    which moves the odd elements from just above the E2M1 decision point 5 to just below it."""
    x = torch.zeros(16, 1, dtype=torch.bfloat16)  # [tokens, features]
    x[0, 0], x[1, 0] = 0.5, 23 / 512
    q = quantize_nvfp4(x.t(), rht=True)
    assert q.amax.item() == 0.13671875  # 280 * 2^-11, the BF16 tie rounded to even
    assert q.scale_enc.item() == np.float32(2688.0) / np.float32(0.13671875) == 19660.80078125
    assert q.scale.view(torch.uint8).tolist() == [[0x7E]]  # s_b = 448
    enc = (1.0 / (q.scale.float() * q.scale_dec)).item()
    assert enc == pytest.approx(43.885715, abs=1e-6)
    assert 233 * 2.0**-11 * enc == pytest.approx(4.9928575, abs=1e-6)  # odd elements: < 5 -> 4
    assert q.codes()[0].tolist() == [0x7, 0x6] * 8
    assert q.data[0].tolist() == [0x67] * 8
    # the same column in FP32 (or the old rule, an FP32 transform of the BF16 input): 5.01 -> 6
    old = quantize_nvfp4(x.t().float(), rht=True)
    assert old.amax.item() == 279 * 2.0**-11 == 0.13623046875
    assert old.scale_enc.item() == 19731.26953125
    assert old.codes()[0].tolist() == [0x7] * 16
    assert old.data[0].tolist() == [0x77] * 8
