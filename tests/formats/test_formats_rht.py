"""Random Hadamard Transform: the matrix, orthonormality, (AH)(HᵀB) = AB, bad input."""

from __future__ import annotations

import pytest
import torch

from nvfp4_megatron.formats import DEFAULT_RHT_SIGNS, apply_rht, hadamard_matrix


def test_default_signs_are_the_design_vector():
    assert DEFAULT_RHT_SIGNS == (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)


def test_matrix_is_diag_signs_times_sylvester_over_4():
    h = hadamard_matrix()
    assert h.shape == (16, 16) and h.dtype == torch.float32
    assert torch.all(h.abs() == 0.25)
    # Sylvester entry (i, j) = (-1)^popcount(i & j); row i is multiplied by signs[i]
    for i in range(16):
        for j in range(16):
            syl = -1.0 if bin(i & j).count("1") % 2 else 1.0
            assert h[i, j].item() == DEFAULT_RHT_SIGNS[i] * syl / 4


@pytest.mark.parametrize("signs", [None, [1] * 16, [-1, 1] * 8])
def test_orthonormal(signs):
    h = hadamard_matrix(signs, dtype=torch.float64)
    assert torch.equal(h @ h.t(), torch.eye(16, dtype=torch.float64))  # exact: entries ±1/4
    assert torch.equal(h.t() @ h, torch.eye(16, dtype=torch.float64))


def test_gemm_invariance_ah_htb_equals_ab():
    gen = torch.Generator().manual_seed(20)
    a = torch.randn(24, 64, generator=gen, dtype=torch.float64)  # e.g. dYᵀ, reduce dim 64
    b = torch.randn(64, 40, generator=gen, dtype=torch.float64)  # e.g. X
    ah = apply_rht(a).double()
    htb = apply_rht(b.t().contiguous()).double().t()  # HᵀB = (BᵀH)ᵀ, transform along the reduce dim
    torch.testing.assert_close(ah @ htb, a @ b, rtol=1e-5, atol=1e-5)  # FP32 transform, FP64 GEMM


def test_apply_rht_matches_blockwise_matmul_and_nd_shapes():
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(3, 5, 48, generator=gen, dtype=torch.bfloat16)
    y = apply_rht(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    h64 = hadamard_matrix(dtype=torch.float64)
    ref = (x.double().reshape(-1, 16) @ h64).reshape(3, 5, 48)
    # FP32 butterfly (exact here: BF16 inputs, small range), then rounded to BF16 once
    assert torch.equal(apply_rht(x.float()).double(), ref)
    assert torch.equal(y, ref.float().to(torch.bfloat16).float())
    torch.testing.assert_close(y.double(), ref, rtol=2.0**-8, atol=0)
    # norm preserved per 16-chunk; the transform spreads a single spike evenly
    spike = torch.zeros(1, 16)
    spike[0, 7] = 8.0
    assert torch.all(apply_rht(spike).abs() == 2.0)


def test_bad_input():
    with pytest.raises(ValueError, match="divisible by 16"):
        apply_rht(torch.zeros(4, 24))
    with pytest.raises(ValueError, match="floating-point"):
        apply_rht(torch.zeros(4, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\+1 or -1"):
        hadamard_matrix([1, 0] * 8)


def test_apply_rht_summation_order_is_the_documented_butterfly():
    """apply_rht is fwht16(x * signs) * 0.25 with strides 1, 2, 4, 8 (the kernels' contract)."""
    import torch

    from nvfp4_megatron.formats.rht import DEFAULT_RHT_SIGNS, apply_rht, hadamard_matrix

    g = torch.Generator().manual_seed(7)
    x = torch.randn(257, 32, generator=g) * torch.logspace(-6, 6, 32)
    rows = x.reshape(-1, 16).tolist()
    expect = []
    for row in rows:  # plain-Python butterfly, FP32 rounding emulated with torch scalars
        v = [torch.tensor(a * s, dtype=torch.float32) for a, s in zip(row, DEFAULT_RHT_SIGNS)]
        h = 1
        while h < 16:
            for start in range(0, 16, 2 * h):
                for i in range(start, start + h):
                    a, b = v[i], v[i + h]
                    v[i], v[i + h] = a + b, a - b
            h *= 2
        expect.append([float(t * 0.25) for t in v])
    got = apply_rht(x).reshape(-1, 16)
    assert torch.equal(got, torch.tensor(expect, dtype=torch.float32))
    # integer-valued inputs: every partial sum is exact, so any order equals the matrix product
    xi = torch.randint(-1000, 1000, (64, 48), generator=g).float()
    assert torch.equal(apply_rht(xi), (xi.reshape(-1, 16) @ hadamard_matrix()).reshape(xi.shape))


def test_rht_output_is_rounded_to_the_input_dtype():
    """DESIGN.md §RHT: the transform is rounded to x's dtype (nearest even); FP32 is unchanged.

    Worked example (docs/formats.md): x = [0.5, 23/512, 0, ...]. With the default signs
    (s0 = s1 = +1) and Sylvester rows 0 and 1, y_j = (0.5 ± 23/512) / 4 = 279 or 233 times 2^-11.
    233 has 8 significant bits (exact in BF16); 279 = 0b100010111 needs 9: it lies halfway between
    278 and 280 and rounds to the even mantissa, 280 * 2^-11 = 0.13671875.
    """
    x = torch.zeros(1, 16)
    x[0, 0], x[0, 1] = 0.5, 23 / 512
    y_fp32 = apply_rht(x)
    assert y_fp32[0, 0::2].tolist() == [279 * 2.0**-11] * 8
    assert y_fp32[0, 1::2].tolist() == [233 * 2.0**-11] * 8
    y_bf16 = apply_rht(x.to(torch.bfloat16))
    assert y_bf16.dtype == torch.float32
    assert y_bf16[0, 0::2].tolist() == [280 * 2.0**-11] * 8  # tie -> even
    assert y_bf16[0, 1::2].tolist() == [233 * 2.0**-11] * 8
    # FP16 has 11 significant bits: 279 * 2^-11 is exact there
    assert torch.equal(apply_rht(x.to(torch.float16)), y_fp32)
    # the other tie direction: 1 + 3 * 2^-8 lies between 1 + 2^-7 (odd) and 1 + 2^-6 (even)
    t = torch.zeros(1, 16)
    t[0, 0], t[0, 1] = 1.0, 3 / 256
    assert apply_rht(t.to(torch.bfloat16))[0, 0].item() == (1 + 2.0**-6) / 4
    assert apply_rht(t)[0, 0].item() == (1 + 3 / 256) / 4


def test_round_to_dtype_nan_overflow_subnormal():
    from nvfp4_megatron.formats.rht import round_to_dtype

    nan = torch.tensor([1.0]).view(torch.int32)
    nan[0] = -4194304  # 0xFFC00000, a negative NaN: passed through unchanged (sign kept)
    y = torch.tensor([3.4e38, -3.4e38, 1e-40, -0.0, 65520.0, 1.0 + 2.0**-8]).float()
    y = torch.cat([y, nan.view(torch.float32)])
    b = round_to_dtype(y, torch.bfloat16)
    assert b[:2].tolist() == [float("inf"), float("-inf")]  # FLT_MAX-sized rounds past BF16's max
    assert b[2].item() == torch.tensor(1e-40).to(torch.bfloat16).float().item() != 0.0  # subnormal kept
    assert b[3].item() == 0.0 and torch.signbit(b[3])
    assert b[5].item() == 1.0  # tie to even
    assert b[6:].view(torch.int32).tolist() == [-4194304]
    h = round_to_dtype(y, torch.float16)
    assert h[4].item() == float("inf")  # 65520 is halfway past FP16's 65504: overflows
    assert h[6:].view(torch.int32).tolist() == [-4194304]
    assert torch.equal(round_to_dtype(y, torch.float32).view(torch.int32), y.view(torch.int32))
