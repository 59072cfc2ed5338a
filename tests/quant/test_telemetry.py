"""Quantization telemetry (quant/telemetry.py): metrics from sums, the reduction over ranks and
micro-batches, the Table-1 settings, and that it is off (records nothing) by default."""

from __future__ import annotations

import math

import pytest
import torch

from nvfp4_megatron import formats
from nvfp4_megatron.quant import telemetry as qtel
from nvfp4_megatron.quant.linear import LinearCall, quantized_linear
from nvfp4_megatron.quant.registry import get_recipe


def _layer(recipe: str, key: str, seed: int = 0, t: int = 64, n: int = 48):
    g = torch.Generator().manual_seed(seed)
    k = 128 if n == 128 else 32  # block FP8 needs 128-multiples
    x = (torch.randn(t, k, generator=g) * 2).requires_grad_(True)
    w = (torch.randn(n, k, generator=g) * 0.05).requires_grad_(True)
    y = quantized_linear(x, w, None, LinearCall(recipe=get_recipe(recipe).linear, layer_key=key))
    y.backward(torch.randn(t, n, generator=g) * 1e-3)


def test_metrics_from_sums_by_hand():
    x = torch.tensor([3.0, -1.0, 0.0, 2.0])
    h = torch.tensor([2.5, -1.0, 0.5, 2.0])
    s = qtel._sums(x, h, q_zero=torch.tensor([False, False, True, False]))
    m = qtel.metrics(s.tolist())
    assert m["mse"] == pytest.approx((0.25 + 0.25) / 4)
    assert m["snr_db"] == pytest.approx(10 * math.log10(14 / 0.5))
    assert m["cos"] == pytest.approx((7.5 + 1 + 4) / math.sqrt(14 * (6.25 + 1 + 0.25 + 4)))
    assert m["underflow"] == 0.0  # the zero-coded element was 0 in x: not flushed
    assert qtel.metrics([0, 0, 0, 0, 4, 0, 0, 0])["snr_db"] == 0.0  # all-zero tensor


def test_off_by_default_records_nothing():
    qtel.end_step()  # reset whatever a previous test left
    _layer("nvfp4", "0.a")
    assert not qtel.is_active() and qtel.end_step() == ([], [])


def test_every_recipe_reports_all_six_copies_with_sane_values():
    for name in ("nvfp4", "mxfp8", "fp8_cs", "fp8_block", "mxfp4", "msfp4"):
        qtel.begin_step(True)
        _layer(name, "3.mlp.linear_fc2", t=128, n=128)
        rows, _ = qtel.end_step()
        assert [r["role"] for r in rows] == ["fprop.input", "fprop.weight", "dgrad.grad_output",
                                             "dgrad.weight", "wgrad.grad_output", "wgrad.input"]
        for r in rows:
            assert 0.9 < r["cos"] <= 1.0 and r["snr_db"] > 5 and r["mse"] > 0, (name, r)
            assert 0 <= r["underflow"] < 0.5 and 0 <= r["saturation"] < 0.1, (name, r)


def test_micro_batches_and_ranks_add_their_sums(monkeypatch):
    """Two calls of one layer in a step (micro-batches) and a second rank: the row is the metrics
    of the summed sums, i.e. of the concatenated tensors (not an average of ratios)."""
    qtel.begin_step(True)
    _layer("fp8_cs", "0.fc", seed=1)
    _layer("fp8_cs", "0.fc", seed=2)
    local = {k: v.clone() for k, v in qtel._c.sums.items()}
    other = {"ops": {("0.fc", "fprop.input"): ([1.0, 4.0, 0.25, 3.0, 8.0, 2.0, 1.0, 0.0], "x")},
             "t1": {}}
    real_gather = qtel._gather
    monkeypatch.setattr(qtel, "_gather", lambda obj: real_gather(obj) + [other])
    rows, _ = qtel.end_step()
    r = next(r for r in rows if r["role"] == "fprop.input")
    summed = local[("0.fc", "fprop.input")].tolist()
    summed = [a + b for a, b in zip(summed, other["ops"][("0.fc", "fprop.input")][0])]
    assert r["mse"] == pytest.approx(qtel.metrics(summed)["mse"], rel=1e-12)
    assert r["underflow"] == pytest.approx(qtel.metrics(summed)["underflow"], rel=1e-12)
    # the two micro-batches: sums of both tensors, i.e. one concatenated tensor
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(64, 32, generator=g1) * 2, torch.randn(64, 32, generator=g2) * 2])
    assert local[("0.fc", "fprop.input")][4].item() == x.numel()


def test_table1_settings_match_formats():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 16, 64, generator=g)
    x.view(-1)[torch.randperm(x.numel(), generator=g)[:4]] *= 40  # 4 outliers (0.05 %)
    sums = qtel.table1_sums(x)
    assert sorted(sums) == ["tensor", "token"]
    x2 = x.reshape(-1, 64)
    for gran, s in sums.items():
        assert s.shape == (5, len(qtel.FIELDS))
        for i, (_, _, alpha, comp) in enumerate(qtel.TABLE1_SETTINGS):
            xc, res = (x2, None) if alpha is None else formats.outlier_clamp(x2, alpha)
            if gran == "token":
                hat = formats.quantize_per_token(xc).dequantize()
            else:
                hat = formats.quantize_absmax_e2m1(xc.reshape(1, -1)).dequantize().reshape(x2.shape)
            if comp:
                hat = hat + res
            err = ((x2.double() - hat.double()) ** 2).sum().item()
            assert s[i, 3].item() == pytest.approx(err, rel=1e-12), (gran, i)
            clamped = 0 if res is None else (res != 0).sum().item()
            assert s[i, 7].item() == clamped
    # per-tensor scaling with a few huge outliers: the paper's pattern, SNR rising down the table
    snr = [qtel.metrics(r)["snr_db"] for r in sums["tensor"].tolist()]
    assert all(b > a for a, b in zip(snr, snr[1:])) and snr[1] > snr[0] + 3, snr


def test_table1_rows_from_the_collector():
    qtel.begin_step(True, table1=True)
    qtel.record_table1("0.mlp.linear_fc2", torch.randn(4, 2, 32))
    qtel.record_table1("0.mlp.linear_fc2", torch.randn(4, 2, 32))  # second micro-batch: summed
    rows, t1 = qtel.end_step()
    assert rows == [] and len(t1) == 10
    assert {(r["granularity"], r["setting"]) for r in t1} == {
        (g, s[0]) for g in qtel.TABLE1_GRANULARITIES for s in qtel.TABLE1_SETTINGS}
    qtel.begin_step(True, table1=False)
    qtel.record_table1("0.mlp.linear_fc2", torch.randn(4, 2, 32))
    assert qtel.end_step() == ([], [])
