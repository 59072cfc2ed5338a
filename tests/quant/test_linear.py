"""The quantized linear against a hand-written reference built from ``nvfp4_megatron.formats``.

Reference for one GEMM: quantize both operands with the formats quantizers (the columnwise copies
from the transposed high-precision tensor, W's Dgrad copy independently from Wᵀ), take the exact
block-scaled values, matmul in FP32 and multiply the per-tensor decode scales once.
"""

import dataclasses

import pytest
import torch

from nvfp4_megatron import formats
from nvfp4_megatron.quant import linear as qlinear
from nvfp4_megatron.quant import state as qstate
from nvfp4_megatron.quant.linear import LinearCall, quantized_linear
from nvfp4_megatron.quant.recipe import TensorQuant, with_fprop_bf16
from nvfp4_megatron.quant.registry import get_recipe, list_recipes

FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
T, K, N = 128, 128, 256  # tokens, in, out: multiples of every block/tile in the registry


def ref_operand(x, tq: TensorQuant, generator=None):
    if tq.format == "nvfp4":
        q = formats.quantize_nvfp4(x, tile=tq.tile, rht=tq.rht,
                                   stochastic_rounding=tq.stochastic_rounding, generator=generator)
        return q.dequantize_unscaled(), q.scale_dec
    if tq.format == "mxfp8":
        return formats.quantize_mx(x, FP8[tq.fp8_dtype]).dequantize(), None
    if tq.format == "mxfp4":
        return formats.quantize_mx(x, "e2m1").dequantize(), None
    if tq.format == "fp8":
        q = formats.quantize_fp8_current(x, FP8[tq.fp8_dtype], pow2_scale=tq.pow2_scale)
        return q.data.float(), q.scale_inv
    q = formats.quantize_fp8_block(x, FP8[tq.fp8_dtype], tile=tq.tile, pow2_scale=tq.pow2_scale)
    return q.dequantize(), None


def ref_gemm(a, b):
    (va, sa), (vb, sb) = a, b
    out = va @ vb.t()
    if sa is not None:
        out = out * (sa * sb)
    return out


def _inputs(seed=0, dtype=torch.bfloat16, t=T):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(t, K, generator=g) * 2).to(dtype)
    w = (torch.randn(N, K, generator=g) * 0.05).to(dtype)
    dy = (torch.randn(t, N, generator=g) * 1e-3).to(dtype)
    return x, w, dy


def _run(linear, x, w, dy, key="L", bias=None, **call_kw):
    xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y = quantized_linear(xi, wi, bias, LinearCall(recipe=linear, layer_key=key, **call_kw))
    y.backward(dy)
    return y.detach(), xi.grad, wi.grad


def _sr_gen(key, role):
    return qstate.sr_generator(key, role, torch.device("cpu"))


def _generic(name: str) -> bool:
    """Recipes whose copies are independent quantizations (the reference below); the Microsoft
    FP4 recipes (e2m1_vector, DGE/OCC) have their own reference in test_msfp4.py."""
    r = get_recipe(name)
    return r.is_quantized and r.linear.msfp4 is None and all(
        t.format != "e2m1_vector" for t in r.linear.operands().values())


def ref_linear_gemm(a, b, tq_a: TensorQuant, tq_b: TensorQuant, gen=None, *, plain=None):
    """One GEMM of the linear: a BF16 GEMM is ``plain``, the torch.matmul in the input dtype that
    the layer runs, with the layer's operand layouts (CPU BF16 matmul kernels round differently
    for other strides on some machines); a quantized one the formats reference in FP32."""
    if not tq_a.is_quantized:
        return plain
    return ref_gemm(ref_operand(a, tq_a, gen), ref_operand(b, tq_b)).to(a.dtype)


@pytest.mark.parametrize("name", [n for n in list_recipes() if _generic(n)])
def test_matches_formats_reference_exactly(name):
    """Every registry recipe (test_msfp4.py: the msfp4 family); SR recipes replay the same
    seeds, so they are exact too. A GEMM the recipe leaves in BF16 (nvfp4_fwd_only's backward,
    nvfp4_bwd_only's Fprop) must be the plain BF16 matmul."""
    lin = get_recipe(name).linear
    x, w, dy = _inputs()
    qstate.reset_state()
    qstate.set_step(11)
    y, dx, dw = _run(lin, x, w, dy)
    qstate.reset_state()
    qstate.set_step(11)
    # the layer's BF16 GEMMs: Y = X·Wᵀ, dX = dY·W, dW = dYᵀ·X (same calls, same strides)
    bf16 = (torch.matmul(x, w.t()), torch.matmul(dy, w), torch.matmul(dy.t(), x))
    y_ref = ref_linear_gemm(x, w, lin.fprop.input, lin.fprop.weight, plain=bf16[0])
    g_d = _sr_gen("L", "dgrad.grad_output") if lin.dgrad.grad_output.stochastic_rounding else None
    dx_ref = ref_linear_gemm(dy, w.t().contiguous(), lin.dgrad.grad_output, lin.dgrad.weight, g_d,
                             plain=bf16[1])
    g_w = _sr_gen("L", "wgrad.grad_output") if lin.wgrad.grad_output.stochastic_rounding else None
    dw_ref = ref_linear_gemm(dy.t().contiguous(), x.t().contiguous(), lin.wgrad.grad_output,
                             lin.wgrad.input, g_w, plain=bf16[2])
    assert torch.equal(y, y_ref)
    assert torch.equal(dx, dx_ref)
    assert torch.equal(dw, dw_ref)
    # and each quantized GEMM did something: not the BF16 result
    for gemm, out, plain in zip((lin.fprop, lin.dgrad, lin.wgrad), (y, dx, dw), bf16):
        quantized = next(iter(dataclasses.asdict(gemm).values()))["format"] != "bf16"
        assert torch.equal(out, plain) != quantized, (name, type(gemm).__name__)
    assert any(t.is_quantized for t in lin.operands().values())
    qstate.reset_state()


def test_sr_gradients_are_unbiased():
    """E[dX] over SR draws equals dY·Ŵ with unquantized dY (SR is unbiased on E2M1).

    Bound: the mean of n=64 draws must be at least 3x closer to the expectation than the
    round-to-nearest result (SR noise shrinks as 1/sqrt(n) ~ 0.125; RNE error does not average).
    Also every draw differs from RNE and from the others (draws are live and seeded per step).
    """
    lin = get_recipe("nvfp4").linear
    x, w, dy = _inputs(seed=3, dtype=torch.float32)
    w_hat = ref_operand(w.t().contiguous(), lin.dgrad.weight)
    expect = (dy @ (w_hat[0] * w_hat[1]).t())
    rne = _run(get_recipe("nvfp4_no_sr").linear, x, w, dy)[1]
    draws = []
    for step in range(64):
        qstate.reset_state()
        qstate.set_step(step)
        draws.append(_run(lin, x, w, dy)[1])
    mean = torch.stack(draws).mean(0)
    err_mean = (mean - expect).norm() / expect.norm()
    err_rne = (rne - expect).norm() / expect.norm()
    assert err_mean < err_rne / 3, (err_mean.item(), err_rne.item())
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], rne)
    qstate.reset_state()


def test_2d_weight_dgrad_copy_is_the_fprop_copy():
    lin = get_recipe("nvfp4").linear
    x, w, dy = _inputs()
    calls = []
    remove = qlinear.add_quantize_observer(lambda k, r, tq: calls.append(r))
    try:
        _run(lin, x, w, dy)
    finally:
        remove()
    assert sorted(calls) == sorted(["fprop.input", "fprop.weight", "wgrad.input",
                                    "dgrad.grad_output", "wgrad.grad_output"])
    a = formats.quantize_nvfp4(w, tile=(16, 16))
    b = formats.quantize_nvfp4(w.t().contiguous(), tile=(16, 16))
    assert torch.equal(a.dequantize_unscaled().t(), b.dequantize_unscaled())
    assert torch.equal(a.scale_dec, b.scale_dec)


@pytest.mark.parametrize("name", ["nvfp4_no_sr", "mxfp8", "fp8_block"])
def test_token_count_not_a_block_multiple_is_zero_padded(name):
    lin = get_recipe(name).linear
    x, w, dy = _inputs(t=40)
    y, dx, dw = _run(lin, x, w, dy)
    m = lin.wgrad.input.tile[1]
    pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, (-t.shape[0]) % m))  # noqa: E731
    dw_ref = ref_gemm(ref_operand(pad(dy).t().contiguous(), lin.wgrad.grad_output),
                      ref_operand(pad(x).t().contiguous(), lin.wgrad.input)).to(w.dtype)
    assert torch.equal(dw, dw_ref)
    assert y.shape == (40, N) and dx.shape == (40, K)


def test_non_finite_input_gives_nan_output_finite_input_stays_finite():
    lin = get_recipe("nvfp4_no_sr").linear
    x, w, dy = _inputs()
    big = x.clone()
    big[0, 0] = 3e38  # finite, huge: saturating quantizers keep everything finite
    y, dx, dw = _run(lin, big.to(torch.float32), w.float(), dy.float())
    assert torch.isfinite(y).all() and torch.isfinite(dx).all() and torch.isfinite(dw).all()
    bad = x.clone()
    bad[5, 7] = float("inf")
    y, _, dw = _run(lin, bad, w, dy)
    assert torch.isnan(y).all() and torch.isnan(dw).all()


def test_main_grad_accumulation_in_fp32():
    lin = get_recipe("nvfp4_no_sr").linear
    x, w, dy = _inputs()
    xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    wi.main_grad = torch.full((N, K), 0.5, dtype=torch.float32)
    y = quantized_linear(xi, wi, None, LinearCall(recipe=lin, layer_key="L",
                                                  gradient_accumulation_fusion=True))
    y.backward(dy)
    dw_ref = ref_gemm(ref_operand(dy.t().contiguous(), lin.wgrad.grad_output),
                      ref_operand(x.t().contiguous(), lin.wgrad.input))
    assert wi.grad is None
    assert torch.equal(wi.main_grad, 0.5 + dw_ref)


def test_fprop_switch_runs_fprop_in_bf16_only():
    lin = with_fprop_bf16(get_recipe("nvfp4_no_sr").linear)
    x, w, dy = _inputs()
    y, dx, _ = _run(lin, x, w, dy)
    assert torch.equal(y, torch.matmul(x, w.t()))
    full = _run(get_recipe("nvfp4_no_sr").linear, x, w, dy)
    assert torch.equal(dx, full[1])


def test_bias_and_3d_input():
    lin = get_recipe("mxfp8").linear
    x, w, dy = _inputs()
    b = torch.randn(N, dtype=x.dtype)
    y3, dx3, dw3 = _run(lin, x.view(32, 4, K), w, dy.view(32, 4, N), bias=b)
    y2, dx2, dw2 = _run(lin, x, w, dy)
    assert torch.equal(y3.view(T, N), (y2 + b))
    assert torch.equal(dx3.view(T, K), dx2) and torch.equal(dw3, dw2)


@pytest.mark.parametrize("name", ["nvfp4_no_sr", "mxfp4"])
def test_msfp4_dge_scales_dw_by_the_derivative(name):
    import dataclasses

    from nvfp4_megatron.quant.recipe import MsFp4Options

    base = get_recipe(name).linear
    lin = dataclasses.replace(base, msfp4=MsFp4Options(dge=True))
    x, w, dy = _inputs(seed=5, dtype=torch.float32)
    _, dx_plain, dw_plain = _run(base, x, w, dy)
    _, dx, dw = _run(lin, x, w, dy)
    assert torch.equal(dx, dx_plain)  # DGE touches only the weight gradient
    if name == "mxfp4":
        q = formats.quantize_mx(w, "e2m1")
        s = q.scale.float().repeat_interleave(32, dim=-1)
    else:
        q = formats.quantize_nvfp4(w, tile=(16, 16))
        s = (q.scale.float() * q.scale_dec).repeat_interleave(16, dim=-1)
    f = formats.dge_derivative_e2m1(w / s, k=5.0, cap=3.0)
    assert torch.equal(dw, dw_plain * f)
    assert 0 <= f.min() and f.max() <= 3.0 and not torch.equal(dw, dw_plain)


def test_msfp4_occ_compensates_clamped_outliers():
    import dataclasses

    from nvfp4_megatron.quant.recipe import MsFp4Options

    base = get_recipe("nvfp4_no_sr").linear
    lin = dataclasses.replace(base, msfp4=MsFp4Options(occ=True, occ_quantile=0.99))
    x, w, dy = _inputs(seed=6, dtype=torch.float32)
    x[::7, ::5] *= 40.0  # outliers
    y, _, dw = _run(lin, x, w, dy)
    clamped, residual = formats.outlier_clamp(x, 0.99)
    y_ref = ref_gemm(ref_operand(clamped, lin.fprop.input), ref_operand(w, lin.fprop.weight))
    assert torch.equal(y, y_ref + residual @ w.t())
    assert torch.equal(dw, _run(base, x, w, dy)[2])  # Wgrad copy of X is the unclamped tensor
    exact = x @ w.t()
    err = lambda a: ((a - exact).norm() / exact.norm()).item()  # noqa: E731
    assert err(y) < err(_run(base, x, w, dy)[0])


def test_empty_expert_input_gives_empty_output_and_zero_weight_grad():
    """Megatron's SequentialMLP calls every local expert, also one that received no tokens."""
    import torch

    from nvfp4_megatron.quant.linear import LinearCall, quantized_linear
    from nvfp4_megatron.quant.registry import get_recipe

    for name in ("nvfp4", "mxfp8", "fp8_cs", "fp8_block"):
        recipe = get_recipe(name).linear
        w = torch.randn(32, 64, requires_grad=True)
        x = torch.zeros(0, 64, requires_grad=True)
        call = LinearCall(recipe=recipe, layer_key="0.mlp.experts.local_experts.3.linear_fc1")
        y = quantized_linear(x, w, None, call)
        assert y.shape == (0, 32)
        y.sum().backward()
        assert torch.equal(w.grad, torch.zeros_like(w)) and x.grad.shape == (0, 64)


def test_wgrad_rht_copies_follow_the_input_dtype_rule():
    """DESIGN.md §RHT (issue 21): in a BF16 layer the Wgrad copies are quantized from the RHT
    output rounded to BF16. dW equals the reference built from the BF16 operands and differs
    from the one built from FP32 transforms of them (the rule before issue 21)."""
    lin = get_recipe("nvfp4_no_sr").linear
    assert lin.wgrad.input.rht and lin.wgrad.grad_output.rht
    x, w, dy = _inputs(seed=4)
    _, _, dw = _run(lin, x, w, dy)

    def dw_from(dy_t, x_t):
        return ref_gemm(ref_operand(dy_t, lin.wgrad.grad_output),
                        ref_operand(x_t, lin.wgrad.input)).to(w.dtype)

    assert torch.equal(dw, dw_from(dy.t().contiguous(), x.t().contiguous()))
    assert not torch.equal(dw, dw_from(dy.t().float().contiguous(), x.t().float().contiguous()))


def test_wgrad_operand_equals_te_reference_fixture():
    """The linear's Wgrad (columnwise 1x16 + RHT) operand of a BF16 activation is TE's
    reference_nvfp4.py columnwise output bit for bit (fixture: tests/formats/data, made by
    scripts/make_te_fixture.py)."""
    import pathlib

    import numpy as np

    path = pathlib.Path(__file__).parents[1] / "formats" / "data" / "te_reference_fixture.npz"
    with np.load(path) as f:
        x = torch.from_numpy(f["48x80_normal__x"]).to(torch.bfloat16)  # [tokens, features]
        te = {k: f[f"48x80_normal__bf16__colrht_{k}"] for k in ("data", "scale", "amax")}
    op = qlinear.quantize_operand(x.t(), TensorQuant(format="nvfp4", tile=(1, 16), rht=True))
    assert np.array_equal(op.q.data.numpy(), te["data"])
    assert np.array_equal(op.q.scale.view(torch.uint8).numpy(), te["scale"])
    assert op.q.amax.numpy().tobytes() == te["amax"].tobytes()


def test_fp8_operand_with_both_orientations_transposes_by_swapping():
    """A per-tensor FP8 operand carrying the other orientation's bytes (``fp8_t``, the CUDA
    cast-transpose path): ``t()`` swaps the copies, and every view of it equals the flag-transposed
    operand without ``fp8_t`` (values, bytes, alpha); ``one_orientation`` drops the other copy."""
    from nvfp4_megatron.kernels import dispatch

    x = torch.randn(48, 80, generator=torch.Generator().manual_seed(3)).bfloat16()
    tq = TensorQuant(format="fp8", fp8_dtype="e4m3")
    q, data_t = dispatch.quantize_fp8_current_transposed(x, torch.float8_e4m3fn)
    assert torch.equal(data_t.view(torch.uint8), q.data.view(torch.uint8).t())
    finite = torch.tensor(True)
    both = qlinear.QuantizedOperand(q=q, tq=tq, finite=finite, fp8_t=data_t)
    plain = qlinear.QuantizedOperand(q=q, tq=tq, finite=finite)
    for a, b in ((both, plain), (both.t(), plain.t()), (both.t().t(), plain.t().t())):
        assert torch.equal(a.values(), b.values())
        assert torch.equal(a.fp8_data().view(torch.uint8), b.fp8_data().view(torch.uint8))
        assert torch.equal(a.alpha(), b.alpha())
    t = both.t()
    assert not t.transposed and t.q.data is data_t and t.q.shape == (80, 48)
    assert t.fp8_t.data_ptr() == q.data.data_ptr()
    assert t.one_orientation().fp8_t is None and plain.one_orientation() is plain


def _microbatches(linear, w, scope: bool, n: int = 3):
    """``n`` micro-batches (different X, dY) through one weight, gradients accumulated, inside a
    :func:`qlinear.reuse_weight_copies` scope or not; the SR state starts the same either way."""
    qstate.reset_state()
    qstate.set_step(0)
    wi = w.clone().requires_grad_(True)
    ys, dxs, calls = [], [], []
    remove = qlinear.add_quantize_observer(lambda k, r, tq: calls.append(r))
    try:
        with qlinear.reuse_weight_copies(enabled=scope) as copies:
            for m in range(n):
                x, _, dy = _inputs(seed=10 + m)
                xi = x.clone().requires_grad_(True)
                y = quantized_linear(xi, wi, None, LinearCall(recipe=linear, layer_key="L"))
                y.backward(dy)
                ys.append(y.detach())
                dxs.append(xi.grad)
                if m == 0 and copies is not None:
                    first = copies.made
    finally:
        remove()
    stats = (first, copies.made, copies.reused) if copies is not None else None
    return ys, dxs, wi.grad, calls, stats


@pytest.mark.parametrize("name", [n for n in list_recipes() if get_recipe(n).is_quantized])
def test_weight_copies_reused_across_microbatches_give_the_same_bits(name):
    """Issue 16: inside ``reuse_weight_copies`` each weight is quantized once and its copies are
    reused by the later micro-batches. Y, dX and the accumulated dW are bit-identical to
    quantizing in every micro-batch, the observers see the same calls, and the copies made by
    the first micro-batch are all that is made."""
    linear = get_recipe(name).linear
    _, w, _ = _inputs()
    ys0, dxs0, dw0, calls0, _ = _microbatches(linear, w, scope=False)
    ys1, dxs1, dw1, calls1, (first, made, reused) = _microbatches(linear, w, scope=True)
    for a, b in zip(ys0 + dxs0 + [dw0], ys1 + dxs1 + [dw1]):
        assert torch.equal(a, b)
    assert calls1 == calls0
    weight_roles = [r for r in calls0[:len(calls0) // 3] if r.endswith(".weight")]
    quantized_weight = linear.fprop.weight.is_quantized or linear.dgrad.weight.is_quantized
    assert first >= 1 if quantized_weight else first == 0
    assert made == first and reused == 2 * first
    assert first <= len(weight_roles)


def test_weight_copies_scope_is_explicit_and_does_not_nest():
    """Outside a scope nothing is kept (a changed weight is quantized anew); scopes do not nest;
    ``enabled=False`` yields no cache; the copies are dropped on exit."""
    linear = get_recipe("nvfp4").linear
    x, w, _ = _inputs()
    y1 = quantized_linear(x, w, None, LinearCall(recipe=linear, layer_key="L"))
    w.mul_(2)  # in place: same tensor object, same storage
    y2 = quantized_linear(x, w, None, LinearCall(recipe=linear, layer_key="L"))
    assert not torch.equal(y1, y2)
    with qlinear.reuse_weight_copies() as copies:
        quantized_linear(x, w, None, LinearCall(recipe=linear, layer_key="L"))
        assert copies.made == 1
        with pytest.raises(RuntimeError, match="do not nest"):
            with qlinear.reuse_weight_copies():
                pass
    with qlinear.reuse_weight_copies() as fresh:
        quantized_linear(x, w, None, LinearCall(recipe=linear, layer_key="L"))
        assert fresh.made == 1 and fresh.reused == 0  # the previous scope's copy is gone
    with qlinear.reuse_weight_copies(enabled=False) as none:
        assert none is None
