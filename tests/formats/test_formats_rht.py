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
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=1e-6)
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
