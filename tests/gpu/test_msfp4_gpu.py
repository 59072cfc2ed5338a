"""Microsoft FP4 recipes on the GPU (marker ``gpu``, the lent H200), under
``torch.use_deterministic_algorithms(True)`` as ``train.deterministic`` runs them:

* OCC's quantile selection (``formats.outlier_clamp``, topk-based) runs in strict mode and picks
  exactly the CPU's (and ``torch.quantile``'s) thresholds, also above torch.quantile's 2^24 limit.
* The msfp4 layer (Fprop, Dgrad, Wgrad) runs in strict mode, twice bit-identically, and matches
  the CPU layer up to FP32 accumulation order; the telemetry records every copy.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from nvfp4_megatron.formats import outlier_clamp  # noqa: E402
from nvfp4_megatron.quant import telemetry as qtel  # noqa: E402
from nvfp4_megatron.quant.linear import LinearCall, quantized_linear  # noqa: E402
from nvfp4_megatron.quant.registry import get_recipe  # noqa: E402


@pytest.fixture
def strict():
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(prev)


@pytest.mark.parametrize("n", [4099, 1 << 20, (1 << 24) + 5])
@pytest.mark.parametrize("alpha", [0.97, 0.99, 0.999])
def test_outlier_clamp_strict_mode_matches_cpu(strict, n, alpha):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) ** 3
    c_gpu, r_gpu = outlier_clamp(x.cuda(), alpha)
    c_cpu, r_cpu = outlier_clamp(x, alpha)
    assert torch.equal(c_gpu.cpu(), c_cpu) and torch.equal(r_gpu.cpu(), r_cpu)
    if n < (1 << 24):  # torch.quantile refuses larger inputs
        lo, hi = torch.quantile(x, 1 - alpha), torch.quantile(x, alpha)
        assert torch.equal(c_cpu, x.clamp(lo, hi))


def _run(lin, x, w, dy):
    xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y = quantized_linear(xi, wi, None, LinearCall(recipe=lin, layer_key="0.fc"))
    y.backward(dy)
    return y.detach(), xi.grad, wi.grad


@pytest.mark.parametrize("name", ["msfp4", "fp4_direct"])
def test_msfp4_layer_strict_mode_deterministic_and_close_to_cpu(strict, name):
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(2048, 1024, generator=g) * 2).bfloat16()
    x[::13, ::11] *= 20
    w = (torch.randn(1536, 1024, generator=g) * 0.02).bfloat16()
    dy = (torch.randn(2048, 1536, generator=g) * 1e-3).bfloat16()
    lin = get_recipe(name).linear
    qtel.begin_step(True)
    a = _run(lin, x.cuda(), w.cuda(), dy.cuda())
    rows, _ = qtel.end_step()
    assert len(rows) == 6 and all(r["cos"] > 0.9 for r in rows)
    b = _run(lin, x.cuda(), w.cuda(), dy.cuda())
    for ta, tb in zip(a, b):
        assert torch.equal(ta, tb)
    c = _run(lin, x, w, dy)
    for tg, tc in zip(a, c):
        torch.testing.assert_close(tg.cpu().float(), tc.float(), rtol=2e-2, atol=1e-2 * tc.float().abs().max().item())


def test_e2m1_encode_on_cuda_equals_the_cpu_encode():
    """The CUDA encoder counts thresholds with bucketize, the CPU one with compares: same codes
    for every 2^12-th FP32 bit pattern (both signs, Inf, NaN) and the thresholds' neighbours."""
    from nvfp4_megatron.formats import encode_e2m1_rne

    bits = torch.arange(0, 1 << 32, 1 << 12, dtype=torch.int64)
    x = (bits - (1 << 31)).to(torch.int32).view(torch.float32)
    t = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    x = torch.cat([x, t, -t, torch.nextafter(t, t + 1), torch.nextafter(t, t - 1)])
    assert torch.equal(encode_e2m1_rne(x.cuda()).cpu(), encode_e2m1_rne(x))
