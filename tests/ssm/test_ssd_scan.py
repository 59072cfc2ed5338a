"""The chunked SSD scan against the sequential Mamba-2 recurrence (``ssd_reference.py``, float64).

Reference (Dao & Gu 2024, arXiv 2405.21060, the SSM recurrence), one step at a time::

    dt_t = clamp(softplus(dt_t + dt_bias), lo, hi);  h_t = exp(dt_t A) h_{t-1} + dt_t x_t ⊗ B_t
    y_t  = h_t C_t + D x_t;  out_t = y_t * silu(z_t)

Outputs, the final state and the gradients of every input (autograd through both forms) must
agree to float64 round-off; FP32 / BF16 inputs to their precision.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

from nvfp4_megatron.ssm import mamba_chunk_scan_combined
from nvfp4_megatron.ssm.ssd import segsum

from ssd_reference import sequential_scan  # tests/ssm/ssd_reference.py


def make_inputs(*, b=2, L=37, h=4, g=2, p=3, n=5, D=None, z=False, dt_bias=False, init=False,
                dtype=torch.float64, seed=0, softplus=True):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    args = {
        "x": rnd(b, L, h, p),
        # pre-softplus values around 0 (some negative: exercises the clamp without softplus)
        "dt": rnd(b, L, h, scale=1.0) if softplus else rnd(b, L, h).abs().mul(0.3).to(dtype),
        "A": -torch.rand(h, generator=gen, dtype=torch.float64).mul(2).add(0.2).to(dtype),
        "B": rnd(b, L, g, n, scale=0.7),
        "C": rnd(b, L, g, n, scale=0.7),
    }
    kw = {"dt_softplus": softplus}
    if D == "head":
        kw["D"] = rnd(h)
    elif D == "hdim":
        kw["D"] = rnd(h, p)
    if z:
        kw["z"] = rnd(b, L, h, p)
    if dt_bias:
        kw["dt_bias"] = rnd(h, scale=0.5)
    if init:
        kw["initial_states"] = rnd(b, h, p, n)
    return args, kw


def _grads(fn, tensors: dict, *, with_state: bool, seed: int = 7):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in tensors.items()}
    out = fn(leaves)
    gen = torch.Generator().manual_seed(seed)
    y, final = out
    loss = (y.double() * torch.randn(y.shape, generator=gen, dtype=torch.float64)).sum()
    if with_state:
        loss = loss + (final.double() * torch.randn(final.shape, generator=gen,
                                                      dtype=torch.float64)).sum()
    loss.backward()
    return y.detach(), final.detach(), {k: v.grad for k, v in leaves.items()}


CASES = [
    # (chunk_size, L, D, z, dt_bias, init): L not a multiple of the chunk, shorter than one chunk,
    # exactly one chunk, several chunks
    (8, 37, None, False, False, False),
    (8, 37, "head", True, True, True),
    (16, 37, "hdim", False, True, True),
    (5, 20, "head", True, False, False),
    (64, 23, "head", True, True, True),
    (7, 7, None, True, False, True),
    (4, 1, "hdim", True, True, True),
]


@pytest.mark.parametrize("chunk,L,D,z,bias,init", CASES)
def test_matches_sequential_recurrence_float64(chunk, L, D, z, bias, init):
    args, kw = make_inputs(L=L, D=D, z=z, dt_bias=bias, init=init)
    tensors = {**args, **{k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}}

    def ours(t):
        extra = {k: t[k] for k in ("D", "z", "dt_bias", "initial_states") if k in t}
        return mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk,
                                         dt_softplus=kw["dt_softplus"], return_final_states=True,
                                         **extra)

    def ref(t):
        extra = {k: t[k] for k in ("D", "z", "dt_bias", "initial_states") if k in t}
        return sequential_scan(t["x"], t["dt"], t["A"], t["B"], t["C"],
                               dt_softplus=kw["dt_softplus"], **extra)

    y, s, g = _grads(ours, tensors, with_state=True)
    y_ref, s_ref, g_ref = _grads(ref, tensors, with_state=True)
    assert y.dtype == torch.float64 and s.dtype == torch.float64
    assert y.shape == args["x"].shape and s.shape == (2, 4, 3, 5)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)
    assert set(g) == set(tensors)
    for k in tensors:
        assert g[k] is not None, k
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-9, atol=1e-9, msg=k)


def test_heads_per_group_use_their_own_group():
    # 6 heads over 3 groups: perturbing group 1's B may change heads 2 and 3 only
    args, kw = make_inputs(h=6, g=3, L=12)
    y0 = mamba_chunk_scan_combined(**args, chunk_size=4, **kw)
    args["B"] = args["B"].clone()
    args["B"][:, :, 1] += 1.0
    y1 = mamba_chunk_scan_combined(**args, chunk_size=4, **kw)
    changed = (y1 - y0).abs().amax(dim=(0, 1, 3)) > 1e-9
    assert changed.tolist() == [False, False, True, True, False, False]


def test_final_state_continues_the_scan():
    # scanning [0, L1) then [L1, L) from the returned state equals one scan over [0, L)
    args, kw = make_inputs(L=30, D="head", z=True, dt_bias=True, init=True)
    full, s_full = mamba_chunk_scan_combined(**args, chunk_size=8, return_final_states=True, **kw)
    cut = 13
    first = {k: v[:, :cut] for k, v in args.items() if k != "A"}
    second = {k: v[:, cut:] for k, v in args.items() if k != "A"}
    kw1 = {**kw, "z": kw["z"][:, :cut]}
    kw2 = {**kw, "z": kw["z"][:, cut:]}
    y1, s1 = mamba_chunk_scan_combined(A=args["A"], **first, chunk_size=8,
                                       return_final_states=True, **kw1)
    kw2["initial_states"] = s1
    y2, s2 = mamba_chunk_scan_combined(A=args["A"], **second, chunk_size=8,
                                       return_final_states=True, **kw2)
    torch.testing.assert_close(torch.cat([y1, y2], 1), full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2, s_full, rtol=1e-10, atol=1e-10)


def test_return_convention_and_dtypes():
    args, kw = make_inputs(L=10, D="head", z=True, dt_bias=True, dtype=torch.bfloat16)
    out = mamba_chunk_scan_combined(**args, chunk_size=4, **kw)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16
    out, final = mamba_chunk_scan_combined(**args, chunk_size=4, return_final_states=True, **kw)
    assert final.dtype == torch.float32 and final.shape == (2, 4, 3, 5)
    # BF16 inputs are computed in FP32: the result is the FP64 reference of the same (rounded)
    # inputs, rounded once to BF16
    ref, _ = sequential_scan(**args, **kw)
    torch.testing.assert_close(out.double(), ref, rtol=1.6e-2, atol=1e-2)


def test_float32_close_to_float64_reference():
    args, kw = make_inputs(L=50, D="hdim", z=True, dt_bias=True, init=True, dtype=torch.float32)
    out, final = mamba_chunk_scan_combined(**args, chunk_size=16, return_final_states=True, **kw)
    ref, ref_final = sequential_scan(**args, **kw)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(final.double(), ref_final, rtol=1e-4, atol=1e-5)


def test_z_gates_inside_after_D():
    # out = (y + D x) * silu(z): with z given the result is the ungated output times silu(z)
    args, kw = make_inputs(L=9, D="head", z=True)
    z = kw.pop("z")
    ungated = mamba_chunk_scan_combined(**args, chunk_size=4, **kw)
    gated = mamba_chunk_scan_combined(**args, chunk_size=4, z=z, **kw)
    torch.testing.assert_close(gated, ungated * F.silu(z), rtol=1e-12, atol=1e-12)


def test_dt_limit_and_softplus_threshold():
    args, kw = make_inputs(L=11, softplus=False)
    args["dt"] = args["dt"] - 0.2  # some dt < 0: the default limit (0, inf) clamps them to 0
    for limit in ((0.0, float("inf")), (0.05, 0.2)):
        y = mamba_chunk_scan_combined(**args, chunk_size=4, dt_limit=limit, **kw)
        ref, _ = sequential_scan(**args, dt_limit=limit, **kw)
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    # above 20 softplus is the identity (mamba_ssm's threshold)
    args, kw = make_inputs(L=6)
    args["dt"] = args["dt"] * 0 + 25.0
    args["A"] = args["A"] * 1e-3
    y = mamba_chunk_scan_combined(**args, chunk_size=4, **kw)
    ref, _ = sequential_scan(**args, **kw)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


def test_gradcheck_small():
    args, kw = make_inputs(b=1, L=6, h=2, g=1, p=2, n=3, D="head", z=True, dt_bias=True, init=True)
    names = ["x", "dt", "A", "B", "C"]
    extra = ["D", "z", "dt_bias", "initial_states"]
    leaves = [args[k].clone().requires_grad_(True) for k in names] + \
        [kw[k].clone().requires_grad_(True) for k in extra]

    def fn(*ts):
        a = dict(zip(names + extra, ts))
        y, s = mamba_chunk_scan_combined(a["x"], a["dt"], a["A"], a["B"], a["C"], 4, D=a["D"],
                                         z=a["z"], dt_bias=a["dt_bias"],
                                         initial_states=a["initial_states"], dt_softplus=True,
                                         return_final_states=True)
        return y, s

    assert torch.autograd.gradcheck(fn, leaves)


def test_segsum_is_stable_and_lower_triangular():
    x = -torch.rand(2, 50, dtype=torch.float64) * 30  # long, strongly decaying
    s = segsum(x)
    i, j = 9, 3
    torch.testing.assert_close(s[:, i, j], x[:, j + 1:i + 1].sum(-1))
    assert torch.isinf(s[:, 3, 9]).all() and (s.diagonal(dim1=-2, dim2=-1) == 0).all()
    e = torch.exp(s)
    assert torch.isfinite(e).all() and (e.triu(1) == 0).all()


@pytest.mark.parametrize("bad,match", [
    ({"seq_idx": torch.zeros(2, 37, dtype=torch.int32)}, "packed sequences"),
    ({"return_varlen_states": True}, "packed sequences"),
    ({"D": torch.ones(3)}, "D must be"),
    ({"chunk_size": 0}, "chunk_size"),
])
def test_refuses_what_it_does_not_support(bad, match):
    args, kw = make_inputs()
    call = {**args, **kw, "chunk_size": 8, **bad}
    with pytest.raises(ValueError, match=match):
        mamba_chunk_scan_combined(**call)


def test_heads_not_multiple_of_groups_refused():
    args, kw = make_inputs(h=4, g=2)
    args["B"] = args["B"][:, :, :1].expand(-1, -1, 3, -1)
    args["C"] = args["B"]
    with pytest.raises(ValueError, match="multiple of ngroups"):
        mamba_chunk_scan_combined(**args, chunk_size=8, **kw)


def test_every_chunk_size_gives_the_same_result():
    args, kw = make_inputs(L=19, D="head", z=True, dt_bias=True, init=True)
    outs = [mamba_chunk_scan_combined(**args, chunk_size=c, return_final_states=True, **kw)
            for c in (1, 3, 8, 19, 32)]
    for (y, s), (y0, s0) in itertools.pairwise(outs):
        torch.testing.assert_close(y, y0, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(s, s0, rtol=1e-10, atol=1e-10)


def _compiled_vs_eager(device: str, dtype, tol: float):
    """The torch.compile'd scan (``model.mamba_scan=compiled``) against the eager oracle: output,
    final state and every input gradient, within ``tol`` relative to the largest value."""
    from nvfp4_megatron.ssm import chunk_scan_fn

    args, kw = make_inputs(b=2, L=45, h=8, g=2, p=4, n=8, D="head", z=True, dt_bias=True,
                           init=True, dtype=dtype, seed=5)
    results = []
    for impl in ("eager", "compiled"):
        leaves = {k: v.detach().to(device).requires_grad_(True) for k, v in args.items()}
        kw_dev = {k: (v.detach().to(device).requires_grad_(True) if torch.is_tensor(v) else v)
                  for k, v in kw.items()}
        out, final = chunk_scan_fn(impl)(**leaves, **kw_dev, chunk_size=16,
                                         return_final_states=True)
        (out.float().square().sum() + final.float().sum()).backward()
        grads = {k: v.grad for k, v in {**leaves, **kw_dev}.items() if torch.is_tensor(v)}
        results.append((out.detach(), final.detach(), grads))
    (o1, f1, g1), (o2, f2, g2) = results

    def rel(a, b):
        return float((a.double() - b.double()).abs().max() / b.double().abs().max())

    assert rel(o2, o1) < tol and rel(f2, f1) < tol
    for k in g1:
        assert rel(g2[k], g1[k]) < tol, k


@pytest.mark.slow
def test_compiled_scan_matches_eager_on_cpu():
    _compiled_vs_eager("cpu", torch.float32, 1e-5)


@pytest.mark.gpu
def test_compiled_scan_matches_eager_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _compiled_vs_eager("cuda", torch.float32, 1e-5)
    _compiled_vs_eager("cuda", torch.bfloat16, 2e-2)


def test_unknown_scan_impl_is_refused():
    from nvfp4_megatron.ssm import chunk_scan_fn

    with pytest.raises(ValueError, match="'fast'; use one of"):
        chunk_scan_fn("fast")
