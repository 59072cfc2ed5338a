"""MXFP8 / MXFP4, FP8 current scaling and block FP8 against torch's own float8 casts and an
independently computed E8M0 exponent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from formats_oracle import e2m1_rne_codes, e8m0_round_up_exp
from nvfp4_megatron.formats import (
    F8E4M3_MAX,
    F8E5M2_MAX,
    decode_e2m1,
    quantize_fp8_block,
    quantize_fp8_current,
    quantize_mx,
    unpack_e2m1,
)

FMAX = {torch.float8_e4m3fn: F8E4M3_MAX, torch.float8_e5m2: F8E5M2_MAX}


def _tensors(seed: int, n: int, shape=(4, 64)):
    gen = torch.Generator().manual_seed(seed)
    for i in range(n):
        x = torch.randn(*shape, generator=gen)
        kind = i % 5
        if kind == 1:
            x = x * torch.exp2(torch.randint(-60, 60, shape, generator=gen).float())
        elif kind == 2:
            x[0, 3] = 1e35
        elif kind == 3:
            x[:, : shape[1] // 2] = 0
        elif kind == 4 and i % 10 == 4:
            x = torch.zeros(shape)
        yield x.to(torch.bfloat16) if i % 3 == 0 else x


@pytest.mark.parametrize("elem", [torch.float8_e4m3fn, torch.float8_e5m2, "e2m1"])
def test_mx_matches_round_up_e8m0_and_torch_cast(elem):
    elem_max = 6.0 if elem == "e2m1" else FMAX[elem]
    for x in _tensors(30, 500):
        q = quantize_mx(x, elem)
        x32 = x.float()
        r = (x32.abs().reshape(4, 2, 32).amax(-1) * torch.tensor(1.0 / elem_max, dtype=torch.float32)).numpy()
        e = e8m0_round_up_exp(r.astype(np.float64))
        assert q.scale.dtype == torch.float8_e8m0fnu
        np.testing.assert_array_equal(q.scale.view(torch.uint8).numpy().astype(np.int64), e + 127)
        scale = torch.from_numpy(np.ldexp(1.0, e)).float()
        y = x32.reshape(4, 2, 32) / scale[..., None]
        if elem == "e2m1":
            assert q.data.dtype == torch.uint8 and q.data.shape == (4, 32)
            codes = unpack_e2m1(q.data).numpy()
            np.testing.assert_array_equal(codes, e2m1_rne_codes(y.clamp(-6, 6).reshape(4, 64).numpy()))
        else:
            assert torch.all(y.abs() <= elem_max)  # round-up scale: no element overflows
            expected = y.to(elem).reshape(4, 64)  # torch's own cast, no clamp needed
            assert torch.equal(q.data.view(torch.uint8), expected.view(torch.uint8))
        deq = q.dequantize()
        assert torch.equal(deq, (q.elements_fp32().reshape(4, 2, 32) * scale[..., None]).reshape(4, 64))
        assert not torch.isnan(deq).any()


def test_mx_scale_edge_cases():
    x = torch.zeros(1, 128)
    x[0, 32:64] = 448.0  # amax/448 = 1 -> 2^0 exactly (no spurious round up)
    x[0, 64:96] = 448.5  # just above -> 2^1
    x[0, 96:128] = 1e-45  # subnormal amax -> 2^-127 after clamping
    q = quantize_mx(x, torch.float8_e4m3fn)
    assert q.scale.view(torch.uint8).tolist() == [[0, 127, 128, 0]]
    assert q.scale.float().tolist()[0][:3] == [2.0**-127, 1.0, 2.0]
    assert torch.all(q.dequantize()[0, :32] == 0)
    huge = torch.full((1, 32), 3e38)
    assert quantize_mx(huge, torch.float8_e4m3fn).scale.view(torch.uint8).item() == 127 + 120  # 3e38 / 448 = 6.70e35 in (2^119, 2^120]
    nan = torch.zeros(1, 64)
    nan[0, 40] = float("nan")
    qn = quantize_mx(nan, torch.float8_e4m3fn)
    assert qn.scale.view(torch.uint8).tolist() == [[0, 255]]
    assert torch.isnan(qn.dequantize()[0, 32:]).all() and not torch.isnan(qn.dequantize()[0, :32]).any()
    inf = torch.ones(1, 32)
    inf[0, 0] = float("inf")
    qi = quantize_mx(inf, torch.float8_e4m3fn)
    assert qi.scale.view(torch.uint8).item() == 254 and qi.data.float()[0, 0].item() == 448.0


def test_mxfp4_values_hand_made():
    # amax 12 -> 12 * fp32(1/6) = 2 -> scale 2; elements x / 2 rounded on the E2M1 grid
    x = torch.tensor([[12.0, 1.0, -2.5, 5.0, 7.0] + [0.0] * 27])
    q = quantize_mx(x, "e2m1")
    assert q.scale.float().item() == 2.0
    assert decode_e2m1(unpack_e2m1(q.data))[0, :5].tolist() == [6.0, 0.5, -1.0, 2.0, 4.0]


@pytest.mark.parametrize("fp8_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("pow2", [False, True])
def test_fp8_current_scaling_against_torch_cast(fp8_dtype, pow2):
    fmax = FMAX[fp8_dtype]
    for x in _tensors(31, 300, shape=(8, 32)):
        q = quantize_fp8_current(x, fp8_dtype, pow2_scale=pow2)
        x32 = x.float()
        amax = x32.abs().max()
        if amax.item() == 0:
            assert q.scale.item() == 1.0 and torch.all(q.data.float() == 0)
            continue
        scale = torch.tensor(fmax, dtype=torch.float32) / amax
        if pow2:
            _, e = torch.frexp(scale)
            scale = torch.ldexp(torch.tensor(1.0), (e - 1).float())
            assert scale.item() <= fmax / amax.item() < 2 * scale.item()
        assert q.scale.item() == scale.item() and q.scale_inv.item() == (1.0 / scale).item()
        expected = torch.clamp(x32 * scale, -fmax, fmax).to(fp8_dtype)
        assert torch.equal(q.data.view(torch.uint8), expected.view(torch.uint8))
        assert torch.equal(q.dequantize(), q.data.float() * q.scale_inv)


def test_fp8_current_scale_rules_and_passed_amax():
    for bad in (0.0, float("inf"), float("nan")):
        q = quantize_fp8_current(torch.ones(4), torch.float8_e4m3fn, amax=bad)
        assert q.scale.item() == 1.0
    assert quantize_fp8_current(torch.zeros(3, 3), torch.float8_e4m3fn).scale.item() == 1.0
    q = quantize_fp8_current(torch.tensor([1.0, -2.0]), torch.float8_e4m3fn, amax=torch.tensor(4.0))
    assert q.scale.item() == 112.0 and q.data.float().tolist() == [112.0, -224.0]
    qi = quantize_fp8_current(torch.tensor([float("inf"), 1.0]), torch.float8_e4m3fn)
    assert qi.scale.item() == 1.0 and qi.data.float().tolist() == [448.0, 1.0]
    with pytest.raises(ValueError, match="fp8_dtype"):
        quantize_fp8_current(torch.ones(4), torch.float16)


@pytest.mark.parametrize("tile", [(1, 128), (128, 128)])
def test_fp8_block_against_torch_cast(tile):
    gen = torch.Generator().manual_seed(32)
    for i in range(20):
        x = torch.randn(256, 256, generator=gen) * torch.exp2(torch.randint(-20, 20, (256, 1), generator=gen).float())
        if i == 1:
            x[:128, :128] = 0
        q = quantize_fp8_block(x, torch.float8_e4m3fn, tile=tile)
        tr, tc = tile
        amax = x.abs().reshape(256 // tr, tr, 2, tc).amax(dim=(1, 3))
        scale = torch.where(amax > 0, torch.tensor(448.0) / amax, torch.ones_like(amax))
        assert torch.equal(q.scale.reshape(scale.shape), scale)
        s_rows = scale.repeat_interleave(tr, 0).repeat_interleave(tc, 1)
        expected = torch.clamp(x * s_rows, -448, 448).to(torch.float8_e4m3fn)
        assert torch.equal(q.data.view(torch.uint8), expected.view(torch.uint8))
        assert torch.equal(q.dequantize(), q.data.float() * (1.0 / s_rows))
    assert quantize_fp8_block(x, torch.float8_e4m3fn, tile=(128, 128)).scale.shape == (2, 2)
    assert quantize_fp8_block(x.reshape(2, 128, 256), torch.float8_e4m3fn).scale.shape == (2, 128, 2)


def test_fp8_block_pow2():
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(33))
    q = quantize_fp8_block(x, torch.float8_e5m2, pow2_scale=True)
    m, _ = torch.frexp(q.scale)
    assert torch.all(m == 0.5)  # powers of two
    exact = 57344.0 / x.abs().reshape(2, 2, 128).amax(-1)
    assert torch.all((q.scale <= exact) & (exact < 2 * q.scale))


@pytest.mark.parametrize(
    "fn, x, match",
    [
        (lambda x: quantize_mx(x, torch.float8_e4m3fn), torch.zeros(2, 48), r"\(2, 48\).*block size 32"),
        (lambda x: quantize_mx(x, torch.int8), torch.zeros(2, 32), "elem_dtype"),
        (lambda x: quantize_mx(x, "e2m1", block=7), torch.zeros(2, 32), "block=7"),
        (lambda x: quantize_mx(x, "e2m1"), torch.zeros(2, 32, dtype=torch.int32), "dtype torch.int32"),
        (lambda x: quantize_fp8_block(x, torch.float8_e4m3fn), torch.zeros(2, 100), "block size 128"),
        (lambda x: quantize_fp8_block(x, torch.float8_e4m3fn, tile=(128, 128)), torch.zeros(64, 128), "tile height 128"),
        (lambda x: quantize_fp8_block(x, torch.float8_e4m3fn, tile=(1, 64)), torch.zeros(64, 128), "tile="),
        (lambda x: quantize_fp8_current(x, torch.float8_e4m3fn), torch.zeros(4, dtype=torch.int64), "dtype torch.int64"),
    ],
)
def test_bad_input(fn, x, match):
    with pytest.raises(ValueError, match=match):
        fn(x)
