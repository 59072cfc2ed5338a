"""GEMM backends on the GPU (``quant.gemm``): run on the lent H200 (marker ``gpu``).

* The dequantize kernel is bit-exact with the reference ``q * s_b`` (BF16) on random inputs,
  token counts that are not powers of two included.
* Each backend's GEMM against the exact product (FP64 matmul of the same exact operand values,
  times alpha). Tolerance, per output element, relative to ``alpha * (|A| · |B|ᵀ)`` (the sum of
  the absolute products, which bounds any accumulation-order error):
  - FP32 reference and BF16-dequant (FP32 accumulation): ``K * 2^-23`` (a sum of K FP32 terms in
    any order has error <= (K - 1) * 2^-24 of that sum, plus the alpha rounding).
  - FP8 ``_scaled_mm``: ``2^-10`` flat. Hopper's FP8 tensor cores add inside one MMA with fewer
    than FP32's bits (DeepSeek-V3 report, §3.3.2: ~14 bits), and cuBLAS promotes to FP32 only
    between MMAs, so the FP32 bound does not hold; the measured maximum is printed.
* The quantized linear (forward, Dgrad, Wgrad) on the GPU against the same call on the CPU (same
  inputs, same fixed output gradient; quantizers are bit-exact, so only the GEMM differs).
* Non-finite input gives NaN everywhere on every backend.
* The BF16-dequant backend's two GEMMs (``precision.emulated_gemm``: cuBLAS + an alpha pass, or the
  Triton kernel with alpha in its epilogue) pass the same bounds, and give the same bits where the
  accumulation order cannot matter (operands whose partial sums are exact in FP32).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

import gemm_cases as gc  # noqa: E402  (tests/quant on sys.path through conftest)

from nvfp4_megatron.quant import gemm  # noqa: E402
from nvfp4_megatron.quant import linear as qlinear  # noqa: E402
from nvfp4_megatron.quant import state as qstate  # noqa: E402
from nvfp4_megatron.quant.recipe import TensorQuant  # noqa: E402
from nvfp4_megatron.quant.registry import get_recipe  # noqa: E402


def test_dequant_kernel_bit_exact_gpu():
    n = gc.run_all("cuda", [((1000, 4096), False), ((4104, 512), True), ((1040, 256), True),
                            ((256, 2048), False)])
    assert n > 20


def _operands(fmt_a: TensorQuant, fmt_b: TensorQuant, m: int, n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=g).to(torch.bfloat16).cuda()
    b = (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16).cuda()
    qa = qlinear.quantize_operand(a, fmt_a)
    qb = qlinear.quantize_operand(b, fmt_b)
    return qa, qb


def _exact(qa, qb):
    va, vb = qa.values().double(), qb.values().double()
    alpha = qlinear._alpha(qa, qb)
    alpha = 1.0 if alpha is None else alpha.double()
    return (va @ vb.t()) * alpha, (va.abs() @ vb.abs().t()) * alpha


@pytest.fixture(params=["cublas", "triton"])
def emulated_mm(request):
    prev = gemm.set_emulated_mm(request.param)
    yield request.param
    gemm.set_emulated_mm(prev)


E4M3 = TensorQuant(format="fp8", fp8_dtype="e4m3")
E5M2 = TensorQuant(format="fp8", fp8_dtype="e5m2")
NV = TensorQuant(format="nvfp4", tile=(1, 16))
NV2D = TensorQuant(format="nvfp4", tile=(16, 16))
MX8 = TensorQuant(format="mxfp8", fp8_dtype="e4m3")


@pytest.mark.parametrize("shape", [(1024, 512, 2048), (1000, 200, 200), (8192, 2048, 6144)])
@pytest.mark.parametrize("pair,backend", [((E4M3, E4M3), "fp8_scaled_mm"),
                                          ((E5M2, E4M3), "fp8_scaled_mm"),
                                          ((NV, NV2D), "bf16_dequant"),
                                          ((MX8, MX8), "bf16_dequant")])
def test_gemm_backend_vs_exact(pair, backend, shape, emulated_mm):
    m, n, k = shape
    if backend != "bf16_dequant" and emulated_mm != "cublas":
        pytest.skip("precision.emulated_gemm is the bf16_dequant backend's GEMM")
    if pair[0].format in ("nvfp4", "mxfp8") and k % 32:
        pytest.skip("block formats need K divisible by the block")
    qa, qb = _operands(pair[0], pair[1], m, n, k, seed=m + n + k)
    dev = torch.device("cuda")
    assert gemm.select_gemm_kernel(qa.tq.format, qb.tq.format, dev,
                               fp8_dtypes=(qa.tq.fp8_dtype, qb.tq.fp8_dtype)) == backend
    got = qlinear.quantized_gemm(qa, qb, out_dtype=torch.float32).double()
    exact, absum = _exact(qa, qb)
    ratio = ((got - exact).abs() / absum.clamp_min(1e-30)).max().item()
    tol = 2.0 ** -10 if backend == "fp8_scaled_mm" else k * 2.0 ** -23
    print(f"{backend} {pair[0].describe()} x {pair[1].describe()} {shape}: max |err|/sum|ab| "
          f"= {ratio:.3e} (tolerance {tol:.3e})")
    assert ratio <= tol
    # BF16 output: the backend rounds once after alpha, within one BF16 ulp of the exact value
    # plus the accumulation error above
    got16 = qlinear.quantized_gemm(qa, qb, out_dtype=torch.bfloat16).double()
    err16 = (got16 - exact).abs() - exact.abs() * 2.0 ** -8 - absum * tol
    assert err16.max().item() <= 0


def _linear(recipe_name: str, device: str, x, w, gy):
    qstate.reset_state()
    recipe = get_recipe(recipe_name).linear
    xi = x.detach().clone().to(device).requires_grad_(True)
    wi = w.detach().clone().to(device).requires_grad_(True)
    y = qlinear.quantized_linear(xi, wi, None, qlinear.LinearCall(recipe=recipe, layer_key="l"))
    y.backward(gy.to(device))
    return [t.detach().cpu().float() for t in (y, xi.grad, wi.grad)]


@pytest.mark.parametrize("recipe", ["fp8_cs", "mxfp8", "nvfp4_no_sr", "mxfp4"])
@pytest.mark.parametrize("tokens", [1008, 4096])
def test_linear_gpu_vs_cpu(recipe, tokens, emulated_mm):
    if recipe == "fp8_cs" and emulated_mm != "cublas":
        pytest.skip("fp8_cs runs _scaled_mm")
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 1, 512, generator=g).to(torch.bfloat16)
    w = (torch.randn(768, 512, generator=g) * 0.05).to(torch.bfloat16)
    gy = (torch.randn(tokens, 1, 768, generator=g) * 1e-3).to(torch.bfloat16)
    cpu = _linear(recipe, "cpu", x, w, gy)
    gpu = _linear(recipe, "cuda", x, w, gy)
    for name, c, d in zip(("y", "dx", "dw"), cpu, gpu):
        scale = c.abs().max().item()
        err = (d - c).abs().max().item()
        print(f"{recipe} tokens={tokens} {name}: max |gpu-cpu| = {err:.3e} (max |cpu| {scale:.3e})")
        torch.testing.assert_close(d, c, rtol=2.0 ** -7, atol=scale * 2.0 ** -9)


@pytest.mark.parametrize("bad", ["x_inf", "w_nan"])
@pytest.mark.parametrize("recipe", ["fp8_cs", "mxfp8", "nvfp4_no_sr"])
def test_nonfinite_input_gives_nan_everywhere_gpu(recipe, bad, emulated_mm):
    """A non-finite X (W) makes every element of Y and dW (dX) NaN, and leaves the GEMM that does
    not read it finite (the FP8 GEMMs take a NaN scale from the operand's own quantizer)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 256, generator=g).to(torch.bfloat16)
    w = (torch.randn(128, 256, generator=g) * 0.05).to(torch.bfloat16)
    gy = torch.randn(64, 1, 128, generator=g).to(torch.bfloat16)
    if recipe == "fp8_cs" and emulated_mm != "cublas":
        pytest.skip("fp8_cs runs _scaled_mm")
    if bad == "x_inf":
        x[3, 0, 7] = float("inf")
    else:
        w[5, 9] = float("nan")
    y, dx, dw = _linear(recipe, "cuda", x, w, gy)
    assert torch.isnan(y).all()
    hit, clean = (dw, dx) if bad == "x_inf" else (dx, dw)
    assert torch.isnan(hit).all()    # Wgrad reads X, Dgrad reads W
    assert torch.isfinite(clean).all()


def test_fp8_cast_transpose_path_is_bit_identical_gpu(monkeypatch):
    """fp8_cs linear: X, W and dY each go through the cast-transpose kernel once (3 calls), and
    y, dX, dW are bit-identical to the run whose transposed bytes come from a strided copy of the
    rowwise bytes (what the GEMMs used before the kernel)."""
    from nvfp4_megatron.kernels import dispatch, fp8 as k_fp8

    g = torch.Generator().manual_seed(11)
    x = torch.randn(1008, 1, 512, generator=g).to(torch.bfloat16)
    w = (torch.randn(768, 512, generator=g) * 0.05).to(torch.bfloat16)
    gy = (torch.randn(1008, 1, 768, generator=g) * 1e-3).to(torch.bfloat16)
    calls = []
    real = dispatch.quantize_fp8_current_transposed

    def counting(*a, **k):
        calls.append(tuple(a[0].shape))
        return real(*a, **k)

    monkeypatch.setattr(dispatch, "quantize_fp8_current_transposed", counting)
    fast = _linear("fp8_cs", "cuda", x, w, gy)
    assert sorted(calls) == sorted([(1008, 512), (768, 512), (1008, 768)]), calls

    def strided(x2d, fp8_dtype, **k):
        q = k_fp8.quantize_fp8_current(x2d, fp8_dtype, **k)
        return q, q.data.view(torch.uint8).t().contiguous().view(q.data.dtype)

    monkeypatch.setattr(dispatch, "quantize_fp8_current_transposed", strided)
    slow = _linear("fp8_cs", "cuda", x, w, gy)
    for name, a, b in zip(("y", "dx", "dw"), fast, slow):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), name


@pytest.mark.parametrize("m,n,k", [(8192, 6144, 2048), (1000, 200, 208), (2048, 8192, 4096)])
def test_triton_alpha_gemm_same_bits_as_cublas_on_exact_sums(m, n, k):
    """Operands with values k/4, |k| <= 8 (exact in BF16): every partial sum is a multiple of 1/16
    below 2^13, exact in FP32 in any order, so cuBLAS + the alpha pass and the Triton kernel must
    give the same bits (BF16 and FP32 outputs, B read transposed as the linear reads it)."""
    from nvfp4_megatron.kernels.gemm_alpha import mm_alpha

    g = torch.Generator(device="cuda").manual_seed(m + n + k)
    a = (torch.randint(-8, 9, (m, k), device="cuda", generator=g) / 4).to(torch.bfloat16)
    bn = (torch.randint(-8, 9, (n, k), device="cuda", generator=g) / 4).to(torch.bfloat16)
    alpha = torch.tensor(0.0013718, device="cuda")
    prev = gemm.set_emulated_mm("cublas")
    try:
        for out_dtype, view in ((torch.bfloat16, torch.int16), (torch.float32, torch.int32)):
            want = gemm.bf16_mm(a, bn.t(), alpha, out_dtype)
            got = mm_alpha(a, bn.t(), alpha, out_dtype)
            assert torch.equal(got.view(view), want.view(view)), out_dtype
        want = gemm.bf16_mm(a, bn.t(), None, torch.bfloat16)  # no alpha (MX): BF16 straight out
        assert torch.equal(mm_alpha(a, bn.t(), None, torch.bfloat16).view(torch.int16),
                           want.view(torch.int16))
    finally:
        gemm.set_emulated_mm(prev)


def test_gradient_accumulation_fusion_gemm_adds_into_main_grad():
    """``mcore/grad_accum.py`` (``train.gradient_accumulation_fusion``): ``torch.addmm`` with
    ``out_dtype=float32`` into the FP32 ``main_grad`` itself (``out=`` its own input) adds the FP32
    weight gradient of BF16 operands, within the FP32 accumulation bound of the exact product, and
    the same for FP32 operands; on operands whose partial sums are exact in FP32 (multiples of 1/4)
    it equals the exact sum bit for bit."""
    from nvfp4_megatron.mcore import grad_accum

    g = torch.Generator().manual_seed(3)
    for tokens, n_in, n_out in ((8192, 2048, 512), (1000, 384, 96)):
        x = torch.randn(tokens, n_in, generator=g).to(torch.bfloat16)
        dy = torch.randn(tokens, n_out, generator=g).to(torch.bfloat16)
        main = torch.randn(n_out, n_in, generator=g)
        exact = main.double() + dy.double().t() @ x.double()
        bound = main.double().abs() * 2**-24 + (dy.double().abs().t() @ x.double().abs()) * tokens * 2**-23
        got = main.cuda()
        grad_accum.wgrad_gemm_accum_fp32(x.cuda(), dy.cuda(), got)
        err = (got.cpu().double() - exact).abs()
        assert (err <= bound).all(), float((err / bound.clamp_min(1e-30)).max())
        got32 = main.cuda()
        grad_accum.wgrad_gemm_accum_fp32(x.float().cuda(), dy.float().cuda(), got32)
        assert ((got32.cpu().double() - exact).abs() <= bound).all()
    xq = (torch.randint(-8, 9, (256, 64), generator=g) / 4).to(torch.bfloat16)
    dq = (torch.randint(-8, 9, (256, 32), generator=g) / 4).to(torch.bfloat16)
    m = (torch.randint(-8, 9, (32, 64), generator=g) / 4).float()
    want = m + dq.float().t() @ xq.float()
    got = m.cuda()
    grad_accum.wgrad_gemm_accum_fp32(xq.cuda(), dq.cuda(), got)
    assert torch.equal(got.cpu(), want)
