"""Microsoft FP4 recipes (arXiv 2501.17116; issue 18): msfp4, msfp4_no_dge, msfp4_no_occ,
fp4_direct, and DGE / OCC composed with nvfp4 through ``precision.dge`` / ``precision.occ``.

Reference for one layer, composed from ``nvfp4_megatron.formats`` only (no code of quant/)::

    Fprop  Y  = Q(Xc)·Q(W)ᵀ (+ R·Wᵀ, FP32)        Q = per-row absmax E2M1, Xc/R = outlier_clamp(X)
    Dgrad  dX = F(dY)·Q(W) · s⁻¹(dY)                F = FP8 E5M2 current scaling
    Wgrad  dW = (F(dY)ᵀ·Q(Xc) · s⁻¹ (+ (F(dY)ᵀ·s⁻¹)·R)) ⊙ f'(clamp(W·scale_W, ±6))

and every tensor must be bit-identical (``torch.equal``) to the layer's.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nvfp4_megatron import formats
from nvfp4_megatron.quant import linear as qlinear
from nvfp4_megatron.quant import telemetry as qtel
from nvfp4_megatron.quant.linear import LinearCall, quantized_linear
from nvfp4_megatron.quant.recipe import (Dgrad, Fprop, LinearRecipe, MsFp4Options, TensorQuant,
                                         Wgrad, with_fprop_bf16)
from nvfp4_megatron.quant.registry import apply_overrides, build_recipe, get_recipe

T, K, N = 96, 64, 48  # tokens (not a multiple of 16: e2m1_vector/FP8 need no padding), in, out
MS_RECIPES = ["msfp4", "msfp4_no_dge", "msfp4_no_occ", "fp4_direct"]


def _inputs(seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g) * 2
    x[::9, ::7] *= 30.0  # outliers for OCC to clamp
    w = torch.randn(N, K, generator=g) * 0.05
    dy = torch.randn(T, N, generator=g) * 1e-3
    return x.to(dtype), w.to(dtype), dy.to(dtype)


def _run(linear, x, w, dy, key="L"):
    xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y = quantized_linear(xi, wi, None, LinearCall(recipe=linear, layer_key=key))
    y.backward(dy)
    return y.detach(), xi.grad, wi.grad


def reference(lin: LinearRecipe, x, w, dy):
    """Y, dX, dW of one layer from formats.* (see the module docstring)."""
    ms = lin.msfp4
    occ = ms is not None and ms.occ
    dge = ms is not None and ms.dge
    comp = occ and ms.occ_compensate
    if occ:
        xc, res = formats.outlier_clamp(x, ms.occ_quantile)
    else:
        xc, res = x, None
    qx = formats.quantize_per_token(xc).dequantize()
    qw_t = formats.quantize_per_channel(w)
    qw = qw_t.dequantize()
    y = qx @ qw.t()
    if comp:
        y = y + res @ w.float().t()
    y = y.to(x.dtype)
    f8 = formats.quantize_fp8_current(dy, torch.float8_e5m2)
    d8, s_inv = f8.data.float(), f8.scale_inv
    dx = ((d8 @ qw) * s_inv).to(x.dtype)
    dw = (d8.t() @ qx) * s_inv
    if comp:
        dw = dw + (d8.t() * s_inv) @ res
    if dge:
        f = formats.dge_derivative_e2m1(torch.clamp(w.float() * qw_t.scale, -6, 6),
                                        k=ms.dge_k, cap=ms.dge_cap)
        dw = dw * f
    return y, dx, dw.to(w.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", MS_RECIPES)
def test_recipe_matches_formats_reference_exactly(name, dtype):
    lin = get_recipe(name).linear
    x, w, dy = _inputs(dtype=dtype)
    y, dx, dw = _run(lin, x, w, dy)
    y_ref, dx_ref, dw_ref = reference(lin, x, w, dy)
    assert torch.equal(y, y_ref)
    assert torch.equal(dx, dx_ref)
    assert torch.equal(dw, dw_ref)
    # the quantization did something: not the BF16/FP32 result
    assert not torch.equal(y, (x.float() @ w.float().t()).to(x.dtype))


def test_the_four_recipes_differ_where_they_should():
    x, w, dy = _inputs(seed=1)
    r = {n: _run(get_recipe(n).linear, x, w, dy) for n in MS_RECIPES}
    # OCC changes Y (clamp + compensation), DGE changes only dW
    assert not torch.equal(r["msfp4"][0], r["msfp4_no_occ"][0])
    assert torch.equal(r["msfp4"][0], r["msfp4_no_dge"][0])
    assert torch.equal(r["msfp4_no_occ"][0], r["fp4_direct"][0])
    assert torch.equal(r["msfp4_no_occ"][1], r["fp4_direct"][1])
    assert not torch.equal(r["msfp4_no_occ"][2], r["fp4_direct"][2])
    # OCC + compensation gets Y closer to the exact product than the direct cast
    exact = x.float() @ w.float().t()
    err = lambda a: ((a.float() - exact).norm() / exact.norm()).item()  # noqa: E731
    assert err(r["msfp4"][0]) < err(r["fp4_direct"][0])


def test_recipe_operand_settings():
    ms = get_recipe("msfp4")
    lin = ms.linear
    assert lin.fprop.input == lin.fprop.weight == TensorQuant(format="e2m1_vector")
    assert lin.dgrad.weight == lin.fprop.weight and lin.wgrad.input == lin.fprop.input
    assert lin.dgrad.grad_output == lin.wgrad.grad_output == TensorQuant(format="fp8",
                                                                         fp8_dtype="e5m2")
    assert lin.msfp4 == MsFp4Options(dge=True, dge_k=5.0, dge_cap=3.0, occ=True,
                                     occ_quantile=0.99, occ_compensate=True)
    assert ms.layers.bf16_first_blocks == ms.layers.bf16_last_blocks == 0
    assert get_recipe("msfp4_no_dge").linear.msfp4.dge is False
    assert get_recipe("msfp4_no_occ").linear.msfp4.occ is False
    assert get_recipe("fp4_direct").linear.msfp4 is None


def test_occ_without_compensation_drops_the_clamped_part():
    lin = build_recipe("msfp4", occ={"compensate": False}).linear
    assert lin.msfp4.occ and not lin.msfp4.occ_compensate
    x, w, dy = _inputs(seed=2)
    y, dx, dw = _run(lin, x, w, dy)
    y_ref, dx_ref, dw_ref = reference(lin, x, w, dy)
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref) and torch.equal(dw, dw_ref)
    y_comp = _run(get_recipe("msfp4").linear, x, w, dy)[0]
    assert not torch.equal(y, y_comp)


def _nv_ref_operand(t, tq):
    q = formats.quantize_nvfp4(t, tile=tq.tile, rht=tq.rht)
    return q.dequantize_unscaled(), q.scale_dec


def test_nvfp4_plus_occ_and_dge_through_overrides_matches_reference():
    """precision.recipe=nvfp4_no_sr + precision.occ.enabled + precision.dge.enabled (no SR so the
    reference needs no generator replay; RHT on Wgrad stays)."""
    rec = build_recipe("nvfp4_no_sr", occ={"enabled": True, "quantile": 0.97},
                       dge={"enabled": True, "k": 3.0, "cap": 2.0})
    lin = rec.linear
    assert lin.msfp4 == MsFp4Options(dge=True, dge_k=3.0, dge_cap=2.0, occ=True,
                                     occ_quantile=0.97)
    x, w, dy = _inputs(seed=3, dtype=torch.float32)
    x = torch.cat([x, x[:32]])  # 128 tokens: the NVFP4 columnwise copies need multiples of 16
    dy = torch.cat([dy, dy[:32]])
    y, dx, dw = _run(lin, x, w, dy)

    def gemm(a, b):
        (va, sa), (vb, sb) = a, b
        return (va @ vb.t()) * (sa * sb)

    xc, res = formats.outlier_clamp(x, 0.97)
    y_ref = gemm(_nv_ref_operand(xc, lin.fprop.input), _nv_ref_operand(w, lin.fprop.weight))
    y_ref = y_ref + res @ w.t()
    assert torch.equal(y, y_ref)
    dx_ref = gemm(_nv_ref_operand(dy, lin.dgrad.grad_output),
                  _nv_ref_operand(w.t().contiguous(), lin.dgrad.weight))
    assert torch.equal(dx, dx_ref)
    # Wgrad: X's columnwise copy from the unclamped tensor; DGE on the NVFP4 weight grid
    dw_plain = gemm(_nv_ref_operand(dy.t().contiguous(), lin.wgrad.grad_output),
                    _nv_ref_operand(x.t().contiguous(), lin.wgrad.input))
    q = formats.quantize_nvfp4(w, tile=(16, 16))
    s = (q.scale.float() * q.scale_dec).repeat_interleave(16, dim=-1)
    f = formats.dge_derivative_e2m1(w / s, k=3.0, cap=2.0)
    assert torch.equal(dw, dw_plain * f)


def test_fprop_bf16_switch_keeps_the_fp4_backward_copies():
    """The precision switch's ``fprop`` scope: Fprop in BF16, DGE/OCC off, and the backward's
    e2m1_vector copies made in the backward pass equal to those the Fprop would have made."""
    lin = with_fprop_bf16(get_recipe("msfp4").linear)
    assert lin.msfp4 is None and not lin.fprop.input.is_quantized
    x, w, dy = _inputs(seed=4, dtype=torch.float32)
    y, dx, dw = _run(lin, x, w, dy)
    assert torch.equal(y, x @ w.t())
    _, dx_ref, dw_ref = reference(get_recipe("fp4_direct").linear, x, w, dy)
    assert torch.equal(dx, dx_ref) and torch.equal(dw, dw_ref)


def test_e2m1_vector_copies_are_quantized_once():
    calls = []
    remove = qlinear.add_quantize_observer(lambda k, r, tq: calls.append(r))
    try:
        x, w, dy = _inputs()
        _run(get_recipe("msfp4").linear, x, w, dy)
    finally:
        remove()
    # X and W once each (their backward copies are the Fprop copies), dY once (FP8 transpose)
    assert sorted(calls) == sorted(["fprop.input", "fprop.weight", "dgrad.grad_output",
                                    "wgrad.grad_output"])


def test_recipe_validation_errors_name_the_field():
    v = TensorQuant(format="e2m1_vector")
    g = TensorQuant(format="fp8", fp8_dtype="e5m2")
    with pytest.raises(ValueError, match="Fprop operands must be of one family"):
        Fprop(input=v, weight=TensorQuant(format="fp8"))
    with pytest.raises(ValueError, match="forward-operand format"):
        Dgrad(grad_output=v, weight=v)
    with pytest.raises(ValueError, match="dgrad.weight.*Fprop copy"):
        LinearRecipe(fprop=Fprop(input=v, weight=v), dgrad=Dgrad(grad_output=g, weight=g),
                     wgrad=Wgrad(grad_output=g, input=v))
    with pytest.raises(ValueError, match="fp8_dtype does not apply to e2m1_vector"):
        TensorQuant(format="e2m1_vector", fp8_dtype="e5m2")
    with pytest.raises(ValueError, match="tile"):
        TensorQuant(format="e2m1_vector", tile=(1, 16))


@pytest.mark.parametrize("recipe,kw,match", [
    ("mxfp8", {"dge": {"enabled": True}}, r"precision.dge.enabled=true needs a recipe whose "
                                           r"Fprop is FP4.*'mxfp8'"),
    ("bf16", {"occ": {"enabled": True}}, r"precision.occ.enabled=true needs"),
    ("fp4_direct", {"dge": {"k": 3}}, r"precision.dge.k is set but DGE is off"),
    ("msfp4", {"occ": {"enabled": False, "quantile": 0.9}}, r"precision.occ.quantile is set"),
    ("msfp4", {"dge": {"k": 1.0}}, r"precision.dge.k=1.0: must be a number > 1"),
    ("msfp4", {"dge": {"cap": 0}}, r"precision.dge.cap=0: must be a number > 0"),
    ("msfp4", {"occ": {"quantile": 1.0}}, r"precision.occ.quantile=1.0: must be a number in"),
    ("msfp4", {"occ": {"enabled": "yes"}}, r"precision.occ.enabled='yes': expected true or false"),
    ("msfp4", {"occ": {"alpha": 0.9}}, r"precision.occ has unknown key"),
])
def test_overrides_refuse_bad_values_naming_the_key(recipe, kw, match):
    with pytest.raises(ValueError, match=match):
        build_recipe(recipe, **kw)


def test_overrides_turn_components_off_and_on():
    assert build_recipe("msfp4", dge={"enabled": False}, occ={"enabled": False}).linear.msfp4 is None
    r = build_recipe("fp4_direct", occ={"enabled": True})
    assert r.linear.msfp4 == MsFp4Options(occ=True)
    assert r.name == "fp4_direct"
    r = apply_overrides(get_recipe("msfp4"), dge={"enabled": None, "k": 7})
    assert r.linear.msfp4.dge_k == 7.0 and r.linear.msfp4.occ
    assert get_recipe("msfp4").linear.msfp4.dge_k == 5.0  # registry untouched


# ---- telemetry on one layer --------------------------------------------------------------------

def test_telemetry_rows_for_every_role_and_exact_metrics():
    lin = get_recipe("msfp4").linear
    x, w, dy = _inputs(seed=5, dtype=torch.float32)
    qtel.begin_step(True)
    _run(lin, x, w, dy, key="0.mlp.linear_fc1")
    rows, t1 = qtel.end_step()
    assert t1 == []
    by_role = {r["role"]: r for r in rows}
    assert sorted(by_role) == sorted(["fprop.input", "fprop.weight", "dgrad.grad_output",
                                      "dgrad.weight", "wgrad.grad_output", "wgrad.input"])
    # fprop.input: x against Q(clamp(x)) + residual, in float64
    xc, res = formats.outlier_clamp(x, 0.99)
    q = formats.quantize_per_token(xc)
    hat = (q.dequantize() + res).double()
    xd = x.double()
    err = ((xd - hat) ** 2).sum()
    r = by_role["fprop.input"]
    assert r["mse"] == pytest.approx((err / x.numel()).item(), rel=1e-12)
    assert r["snr_db"] == pytest.approx(10 * torch.log10((xd ** 2).sum() / err).item(), rel=1e-12)
    assert r["cos"] == pytest.approx(((xd * hat).sum() / (xd.norm() * hat.norm())).item(),
                                     rel=1e-12)
    assert r["occ_clamped"] == pytest.approx((res != 0).double().mean().item())
    assert 0.015 < r["occ_clamped"] < 0.025
    flushed = ((xc != 0) & (formats.decode_e2m1(q.codes) == 0)).double().mean().item()
    assert r["underflow"] == pytest.approx(flushed) and flushed > 0
    assert r["saturation"] == 0.0  # absmax scaling: nothing above the top code
    assert by_role["wgrad.input"] == {**r, "role": "wgrad.input", "gemm": "wgrad",
                                      "operand": "input"}
    assert by_role["dgrad.weight"]["snr_db"] == by_role["fprop.weight"]["snr_db"]
    assert "OCC" in r["format"] and "occ_clamped" not in by_role["fprop.weight"]
    # off: nothing recorded, nothing returned
    qtel.begin_step(False)
    _run(lin, x, w, dy)
    assert qtel.end_step() == ([], [])


def test_telemetry_saturation_and_underflow_of_fp8_are_counted():
    """Hand-made FP8 E4M3 case: per-tensor scale from amax 448 -> scale 1: 1e-4 flushes to zero
    (below E4M3's smallest subnormal 2^-9), 448 sits on the top code without exceeding it."""
    x = torch.tensor([[448.0, 1e-4, 1.0, -2.0]])
    q = formats.quantize_fp8_current(x, torch.float8_e4m3fn)
    m = qtel.metrics(qtel.operand_sums(x, q, "fp8").tolist())
    assert m["underflow"] == 0.25 and m["saturation"] == 0.0
    # NVFP4, global amax 1: the second block's amax 0.93 gets the E4M3 block scale
    # e4m3(0.93 * 448 * 6 / 6) = 416 (RNE down from 416.6), so 0.93 scales to 6.005 > 6: the one
    # element clamped at the top (1 of 32); the first block's amax 1.0 maps to 6 exactly.
    xx = torch.zeros(2, 16)
    xx[0, 0], xx[0, 1] = 1.0, 0.7
    xx[1] = torch.linspace(0.01, 1.0, 16) * 0.93
    qn = formats.quantize_nvfp4(xx, tile=(1, 16))
    m = qtel.metrics(qtel.operand_sums(xx, qn, "nvfp4").tolist())
    assert m["saturation"] == 1 / 32
    assert qn.dequantize()[1, -1] < xx[1, -1]


def test_precision_table_shows_dge_and_occ_per_operand():
    from nvfp4_megatron.mcore.policy import operand_label

    lin = get_recipe("msfp4").linear
    assert "OCC q=0.99 comp" in operand_label(lin, "fprop", "input")
    assert "DGE k=5 cap=3" in operand_label(lin, "fprop", "weight")
    assert "Fprop copy" in operand_label(lin, "dgrad", "weight")
    assert "+OCC residual" in operand_label(lin, "wgrad", "input")
    assert "DGE" not in operand_label(get_recipe("fp4_direct").linear, "fprop", "weight")
    nv = build_recipe("nvfp4", occ={"enabled": True}).linear
    assert "OCC q=0.99 comp" in operand_label(nv, "fprop", "input")
    assert "OCC" not in operand_label(nv, "wgrad", "input")


def test_occ_threshold_avoids_kthvalue(monkeypatch):
    """kthvalue has no deterministic CUDA kernel (train.deterministic); the selection uses topk.
    Fails if outlier_clamp goes back to kthvalue (or to torch.quantile, which sorts everything
    and refuses > 2^24 elements)."""
    def boom(*a, **k):
        raise AssertionError("kthvalue/quantile used")

    x = torch.randn(4096, generator=torch.Generator().manual_seed(9)) ** 3
    ref = x.clamp(torch.quantile(x, 0.01), torch.quantile(x, 0.99))
    monkeypatch.setattr(torch, "kthvalue", boom)
    monkeypatch.setattr(torch.Tensor, "kthvalue", boom)
    monkeypatch.setattr(torch, "quantile", boom)
    torch.use_deterministic_algorithms(True)
    try:
        clamped, _ = formats.outlier_clamp(x, 0.99)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(clamped, ref)


def test_dataclass_stays_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_recipe("msfp4").linear.msfp4.occ = False


def test_dge_e2m1_without_the_width_check_is_bitwise_the_checked_formula():
    """dge_derivative_e2m1 skips dge_derivative's `delta > 0` read-back (a GPU sync per layer
    backward) because the E2M1 grid's widths are positive; the values must not change."""
    import torch

    from nvfp4_megatron.formats.msfp4 import E2M1_GRID, dge_derivative, dge_derivative_e2m1

    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(4096, generator=g) * 3, torch.tensor(E2M1_GRID),
                   -torch.tensor(E2M1_GRID), torch.tensor([6.5, -7.0, 0.0])])
    a = x.abs()
    grid = torch.tensor(E2M1_GRID)
    idx = torch.clamp(torch.bucketize(a, grid, right=True) - 1, 0, len(E2M1_GRID) - 2)
    lo, hi = grid[idx], grid[idx + 1]
    for k, cap in ((5.0, 3.0), (3.0, 10.0)):
        want = torch.where(a > 6.0, torch.zeros_like(a), dge_derivative(a - lo, hi - lo, k=k, cap=cap))
        assert torch.equal(dge_derivative_e2m1(x, k=k, cap=cap), want)
    with pytest.raises(ValueError, match="must be > 0"):
        dge_derivative_e2m1(x, k=0.0)
    with pytest.raises(ValueError, match="must be > 0"):
        dge_derivative_e2m1(x, cap=-1.0)


class _DeviceTraffic:
    """Records, while active, what would make a CUDA stream wait for the host: a device tensor
    read back (``.item()``, ``bool()``: ``aten._local_scalar_dense``), a host tensor copied to
    the device (``.to(device)``, ``copy_``), and ``torch.tensor``/``torch.as_tensor`` built on a
    device (a host-to-device copy inside the factory, which the dispatcher does not show)."""

    def __init__(self, monkeypatch):
        from torch.utils._python_dispatch import TorchDispatchMode

        aten = torch.ops.aten
        hits = self.hits = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func is aten._local_scalar_dense.default and args[0].device.type != "cpu":
                    hits.append(f"read-back of a {args[0].device.type} tensor")
                out = func(*args, **kwargs)
                if func in (aten._to_copy.default, aten.copy_.default):
                    src = args[1] if func is aten.copy_.default else args[0]
                    if src.device.type == "cpu" and out.device.type != "cpu":
                        hits.append(f"host-to-device {func}")
                return out

        self.mode = Mode()
        for name in ("tensor", "as_tensor"):
            orig = getattr(torch, name)

            def factory(*a, _orig=orig, _name=name, **k):
                dev = k.get("device")
                if dev is not None and torch.device(dev).type != "cpu":
                    hits.append(f"torch.{_name}(..., device={dev})")
                return _orig(*a, **k)
            monkeypatch.setattr(torch, name, factory)


@pytest.mark.parametrize("name", MS_RECIPES)
def test_layer_step_never_waits_for_the_device(monkeypatch, name):
    """Fprop + Dgrad + Wgrad of an msfp4-family layer run without one host/device round trip.
    On a GPU each one waits for all the work queued before it; with the study's runs sharing one
    H200, the ~4-9 of them per layer made fp4_direct/msfp4 5-10x slower than nvfp4 (2026-12-04
    profile, docs/PERFORMANCE.md). The layer runs on the ``meta`` device, where a read-back is an
    error and every copy from the host is seen; the second step is watched (the first makes the
    per-device constants). Fails on the code before this fix."""
    lin = get_recipe(name).linear
    x = torch.empty(T, K, device="meta", dtype=torch.bfloat16, requires_grad=True)
    w = torch.empty(N, K, device="meta", dtype=torch.bfloat16, requires_grad=True)
    y = quantized_linear(x, w, None, LinearCall(recipe=lin, layer_key="L"))
    y.backward(torch.empty_like(y))  # first use: per-device constants are made once, here
    traffic = _DeviceTraffic(monkeypatch)
    with traffic.mode:
        y = quantized_linear(x, w, None, LinearCall(recipe=lin, layer_key="L"))
        y.backward(torch.empty_like(y))
    assert traffic.hits == []
    assert x.grad.shape == x.shape and w.grad.shape == w.shape


def test_device_traffic_probe_sees_what_it_must():
    """The probe above is not blind: each kind of round trip it looks for is reported."""
    mp = pytest.MonkeyPatch()
    try:
        traffic = _DeviceTraffic(mp)
        with traffic.mode:
            torch.tensor([0.0, 0.5], device="meta")
            torch.tensor(2.0).to("meta")
            torch.empty(3, device="meta").copy_(torch.ones(3))
        with pytest.raises(RuntimeError, match="meta"), traffic.mode:
            bool(torch.empty((), device="meta"))
    finally:
        mp.undo()
    assert traffic.hits[:3] == ["torch.tensor(..., device=meta)",
                                "host-to-device aten._to_copy.default",
                                "host-to-device aten.copy_.default"]
    assert traffic.hits[3:] == ["read-back of a meta tensor"]


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("name", ["msfp4", "msfp4_no_dge"])
def test_occ_with_non_finite_input_gives_nan_output(name, bad):
    """OCC clamps without checking X first (no read-back); a clamp can turn an Inf into a
    finite value, so X's finiteness travels with the quantized copy: Y and dW are all NaN, as for
    every other recipe, and a finite input stays finite."""
    lin = get_recipe(name).linear
    x, w, dy = _inputs()
    y, dx, dw = _run(lin, x, w, dy)
    assert torch.isfinite(y).all() and torch.isfinite(dw).all()
    x[5, 7] = bad
    y, dx, dw = _run(lin, x, w, dy)
    assert torch.isnan(y).all() and torch.isnan(dw).all()
    assert torch.isfinite(dx).all()  # dX = dY·W does not read X
