"""Tier 1 (hand-made bit patterns) and tier 3 (statistics) for the E2M1 element codec."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from formats_oracle import GRID, e2m1_rne_codes
from nvfp4_megatron.formats import (
    decode_e2m1,
    encode_e2m1_rne,
    encode_e2m1_sr,
    pack_e2m1,
    unpack_e2m1,
)

# (input, expected code) for every tie, both sides of every tie, grid points and saturation.
RNE_CASES = [
    (0.0, 0x0), (-0.0, 0x8),
    (0.25, 0x0), (0.2500001, 0x1), (0.2499999, 0x0),
    (0.5, 0x1),
    (0.75, 0x2), (0.7499999, 0x1),
    (1.0, 0x2),
    (1.25, 0x2), (1.2500001, 0x3),
    (1.5, 0x3),
    (1.75, 0x4), (1.7499999, 0x3),
    (2.0, 0x4),
    (2.5, 0x4), (2.5000002, 0x5),
    (3.0, 0x5),
    (3.5, 0x6), (3.4999998, 0x5),
    (4.0, 0x6),
    (5.0, 0x6), (5.0000005, 0x7),
    (6.0, 0x7), (6.5, 0x7), (1e30, 0x7), (math.inf, 0x7),
    (-0.25, 0x8), (-0.75, 0xA), (-1.25, 0xA), (-1.75, 0xC), (-2.5, 0xC), (-3.5, 0xE),
    (-5.0, 0xE), (-5.5, 0xF), (-6.0, 0xF), (-1e30, 0xF), (-math.inf, 0xF),
    (1e-40, 0x0), (-1e-40, 0x8),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rne_hand_made_bit_patterns(dtype):
    xs = torch.tensor([c[0] for c in RNE_CASES], dtype=torch.float32)
    expected = torch.tensor([c[1] for c in RNE_CASES], dtype=torch.uint8)
    if dtype == torch.bfloat16:
        # keep only cases that BF16 represents exactly (the near-tie probes do not survive the cast)
        keep = xs.to(dtype).float() == xs
        keep |= torch.isinf(xs)
        xs, expected = xs[keep], expected[keep]
        assert len(xs) >= 25
    got = encode_e2m1_rne(xs.to(dtype))
    assert got.tolist() == expected.tolist()


def test_rne_nan_policy_is_saturate_with_sign():
    nan = torch.tensor([float("nan")])
    assert encode_e2m1_rne(nan).item() == 0x7
    assert encode_e2m1_rne(-nan).item() == 0xF
    assert encode_e2m1_sr(nan, generator=torch.Generator().manual_seed(0)).item() == 0x7
    assert encode_e2m1_sr(-nan, generator=torch.Generator().manual_seed(0)).item() == 0xF


def test_rne_matches_oracle_on_dense_sweep():
    # every FP32 step of 2^-12 in [-7, 7] plus random values: the grid search oracle agrees
    sweep = torch.arange(-7 * 4096, 7 * 4096 + 1, dtype=torch.float32) / 4096
    rnd = torch.randn(100_000, generator=torch.Generator().manual_seed(1)) * 3
    x = torch.cat([sweep, rnd])
    assert encode_e2m1_rne(x).numpy().tolist() == e2m1_rne_codes(x.numpy()).tolist()


def test_decode_table_and_negative_zero():
    codes = torch.arange(16, dtype=torch.uint8)
    vals = decode_e2m1(codes)
    assert vals.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                             -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    assert torch.signbit(vals[8]).item()
    # decode(encode(v)) == v for every representable value
    assert torch.equal(decode_e2m1(encode_e2m1_rne(vals)), vals)


def test_pack_layout_low_nibble_first():
    codes = torch.tensor([[0x1, 0xF, 0x7, 0x8]], dtype=torch.uint8)
    packed = pack_e2m1(codes)
    assert packed.tolist() == [[0xF1, 0x87]]
    assert torch.equal(unpack_e2m1(packed), codes)
    every = torch.arange(256, dtype=torch.int32)
    pairs = torch.stack([every & 0xF, every >> 4], dim=-1).to(torch.uint8).reshape(1, 512)
    assert pack_e2m1(pairs).reshape(-1).tolist() == list(range(256))


def test_pack_rejects_odd_length_and_wrong_dtype():
    with pytest.raises(ValueError, match="even"):
        pack_e2m1(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        pack_e2m1(torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="uint8"):
        decode_e2m1(torch.zeros(4, dtype=torch.int64))


def _neighbours(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.minimum(np.abs(y), 6.0)
    lo_i = np.searchsorted(GRID, a, side="right") - 1
    hi_i = np.minimum(lo_i + 1, 7)
    return GRID[lo_i] * np.sign(y), GRID[hi_i] * np.sign(y)


def test_sr_every_draw_is_a_neighbour_and_same_seed_same_codes():
    y = torch.empty(4096).uniform_(-7, 7, generator=torch.Generator().manual_seed(2))
    lo, hi = _neighbours(y.numpy())
    seen_up = np.zeros(len(y), dtype=bool)
    for seed in range(20):
        codes = encode_e2m1_sr(y, generator=torch.Generator().manual_seed(seed))
        v = decode_e2m1(codes).numpy()
        assert np.all((v == lo) | (v == hi))
        seen_up |= (v == hi) & (hi != lo)
        again = encode_e2m1_sr(y, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(codes, again)
    assert seen_up.mean() > 0.5  # it is not silently RNE/truncation
    a = encode_e2m1_sr(y, generator=torch.Generator().manual_seed(0))
    b = encode_e2m1_sr(y, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a, b)


def test_sr_explicit_rand_rule_is_u_less_than_p():
    # y = 1.25: lo 1, hi 1.5, p = 0.5.  y = 4.5: lo 4, hi 6, p = 0.25.  y = 3: on the grid, p = 0.
    # y = 0.1: lo 0, hi 0.5, p = fp32(0.1) / 0.5 = fp32(0.2), so u = fp32(0.2) rounds down.
    y = torch.tensor([1.25, 1.25, 1.25, 4.5, 4.5, -4.5, 3.0, 6.0, 7.0, 0.1, 0.1])
    u = torch.tensor([0.0, 0.4999999, 0.5, 0.2499999, 0.25, 0.1, 0.0, 0.0, 0.0, 0.2, 0.1999999])
    got = decode_e2m1(encode_e2m1_sr(y, rand=u)).tolist()
    assert got == [1.5, 1.5, 1.0, 6.0, 4.0, -6.0, 3.0, 6.0, 6.0, 0.0, 0.5]
    with pytest.raises(ValueError, match="shape"):
        encode_e2m1_sr(y, rand=u[:3])
    # u in [0, 1) never rounds a grid point up, and u -> 1 still rounds p ~ 1 up
    assert decode_e2m1(encode_e2m1_sr(torch.tensor([0.5, 0.9999999]), rand=torch.tensor([0.0, 0.9999]))).tolist() == [0.5, 1.0]
    with pytest.raises(ValueError, match="either"):
        encode_e2m1_sr(y, rand=u, generator=torch.Generator())


def test_sr_mean_is_unbiased_within_five_standard_errors():
    # N draws of a value between lo and hi (gap d = hi - lo, p = (|y| - lo) / d) have mean error
    # with standard error SE = d * sqrt(p (1 - p) / N). We test |mean - y| <= 5 SE with p kept in
    # [0.05, 0.95] so the normal approximation holds; per element P(fail) ~ 6e-7, over 512
    # elements ~ 3e-4 for a random seed (and this seed is fixed, so the test is deterministic).
    n = 2000
    gen = torch.Generator().manual_seed(3)
    a = torch.empty(512).uniform_(0, 6, generator=gen)
    lo, hi = _neighbours(a.numpy())
    d = hi - lo
    p = (a.numpy() - lo) / d
    keep = (p > 0.05) & (p < 0.95)
    y = (a * torch.where(torch.rand(512, generator=gen) < 0.5, -1.0, 1.0))[torch.from_numpy(keep)]
    d, p = d[keep], p[keep]
    draws = encode_e2m1_sr(y.expand(n, -1).contiguous(), generator=torch.Generator().manual_seed(4))
    mean = decode_e2m1(draws).double().mean(dim=0).numpy()
    se = d * np.sqrt(p * (1 - p) / n)
    err = np.abs(mean - y.double().numpy())
    assert np.all(err <= 5 * se), float((err / se).max())
    # and it really is better than RNE on average (RNE is biased per element)
    rne = decode_e2m1(encode_e2m1_rne(y)).double().numpy()
    assert err.mean() < np.abs(rne - y.double().numpy()).mean() / 5


def test_bucketize_count_equals_the_compare_count():
    """encode_e2m1_rne counts thresholds with bucketize on CUDA and with compares on the CPU;
    both formulas run here on the CPU over every 2^16-th FP32 bit pattern (both signs, every
    exponent, Inf, NaN) and the thresholds with their FP32 neighbours."""
    from nvfp4_megatron.formats.e2m1 import (_RNE_ABOVE, _RNE_AT_OR_ABOVE,
                                             _rne_magnitude_bucketize, _rne_magnitude_compare)

    bits = torch.arange(0, 1 << 32, 1 << 16, dtype=torch.int64)
    patterns = (bits - (1 << 31)).to(torch.int32).view(torch.float32)
    t = torch.tensor(_RNE_ABOVE + _RNE_AT_OR_ABOVE + (0.0, 6.0, 7.0))
    edges = torch.cat([t, torch.nextafter(t, t + 1), torch.nextafter(t, t - 1)])
    a = torch.cat([patterns, edges]).abs()
    a = a[~torch.isnan(a)]  # NaN's count is overwritten by the caller (code 7)
    assert len(a) > 60_000
    assert torch.equal(_rne_magnitude_bucketize(a), _rne_magnitude_compare(a))
