"""GEMM backends (``quant.gemm``) on CPU: backend choice, the dequantize kernel in Triton's
interpreter (bit-exact), its sm_90 compilation, and the saved-input modes of the linear."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch

from nvfp4_megatron.quant import gemm
from nvfp4_megatron.quant import linear as qlinear
from nvfp4_megatron.quant import state as qstate
from nvfp4_megatron.quant.registry import get_recipe

CUDA = torch.device("cuda", 0)  # a device object only; nothing runs on it here


@pytest.mark.parametrize("cc,dtypes,want", [
    ((9, 0), ("e4m3", "e4m3"), "fp8_scaled_mm"),
    ((9, 0), ("e5m2", "e4m3"), "fp8_scaled_mm"),
    ((8, 9), ("e4m3", "e5m2"), "fp8_scaled_mm"),
    ((9, 0), ("e5m2", "e5m2"), "bf16_dequant"),
    ((8, 0), ("e4m3", "e4m3"), "bf16_dequant"),
])
def test_fp8_backend_by_capability(cc, dtypes, want):
    assert gemm.select_gemm_kernel("fp8", "fp8", CUDA, fp8_dtypes=dtypes, capability=cc) == want


def test_backend_choice_other_formats():
    for fmt in ("nvfp4", "mxfp8", "mxfp4"):
        assert gemm.select_gemm_kernel(fmt, fmt, CUDA, capability=(9, 0)) == "bf16_dequant"
        assert gemm.select_gemm_kernel(fmt, fmt, torch.device("cpu")) == "fp32_reference"
    assert (gemm.select_gemm_kernel("fp8_block", "fp8_block", CUDA, capability=(9, 0))
            == "fp32_reference")
    assert gemm.select_gemm_kernel("fp8", "fp8", torch.device("cpu")) == "fp32_reference"
    with pytest.raises(ValueError, match="cannot meet"):
        gemm.select_gemm_kernel("nvfp4", "fp8", CUDA, capability=(9, 0))
    desc = gemm.describe_backends("cpu")
    assert all(v.startswith("fp32_reference") for v in desc.values())


_SCRIPT = r"""
import sys
sys.path.insert(0, {here!r})
import gemm_cases as gc
n = gc.run_all("cpu", [((48, 64), False), ((33, 96), True), ((32, 256), True), ((20, 200), True)])
print("checked", n)
print("INTERPRETER-OK")
"""


def test_dequant_kernel_bit_exact_in_interpreter():
    pytest.importorskip("triton")
    here = str(pathlib.Path(__file__).parent)
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT.format(here=here)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "INTERPRETER-OK" in proc.stdout, \
        proc.stdout[-3000:] + proc.stderr[-3000:]


def test_dequant_kernel_compiles_for_sm90():
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget

    from nvfp4_megatron.kernels import dequant as k

    fn = k._dequant_kernel
    types = {"codes_ptr": "*u8", "scale_ptr": "*u8", "finite_ptr": "*i32", "out_ptr": "*bf16"}
    for elem in (k.ELEM_E2M1, k.ELEM_E4M3, k.ELEM_E5M2):
        for scode, block in ((k.SCALE_E4M3, 16), (k.SCALE_E8M0, 32)):
            cx = dict(ELEM=elem, SCALE=scode, BLOCK=block, BLOCK_R=16, BLOCK_K=256)
            sig = {n: ("constexpr" if n in cx else types.get(n, "i32")) for n in fn.arg_names}
            src = triton.compiler.ASTSource(fn, sig, cx)
            triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


def _run_linear(recipe_name: str, mode: str):
    recipe = get_recipe(recipe_name).linear
    g = torch.Generator().manual_seed(7)
    x = torch.randn(64, 2, 64, generator=g).to(torch.bfloat16).requires_grad_(True)
    w = (torch.randn(96, 64, generator=g) * 0.1).to(torch.bfloat16).requires_grad_(True)
    saved: list[tuple[tuple[int, ...], torch.dtype]] = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    qstate.reset_state()
    prev = qlinear.set_saved_input_mode(mode)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = qlinear.quantized_linear(x, w, None,
                                         qlinear.LinearCall(recipe=recipe, layer_key="l0"))
        y.float().pow(2).sum().backward()
    finally:
        qlinear.set_saved_input_mode(prev)
    return y.detach(), x.grad, w.grad, saved


@pytest.mark.parametrize("recipe", ["nvfp4_all_layers", "fp8_cs", "mxfp8"])
def test_saved_input_modes_same_numbers_less_saved(recipe):
    yq, dxq, dwq, saved_q = _run_linear(recipe, "quantized")
    yb, dxb, dwb, saved_b = _run_linear(recipe, "bf16")
    assert torch.equal(yq, yb) and torch.equal(dxq, dxb) and torch.equal(dwq, dwb)
    # quantized mode: autograd keeps the weight only; bf16 mode also keeps X [64, 2, 64] BF16
    assert saved_q == [((96, 64), torch.bfloat16)]
    assert ((64, 2, 64), torch.bfloat16) in saved_b


def test_saved_input_mode_validation():
    with pytest.raises(ValueError, match="set_saved_input_mode"):
        qlinear.set_saved_input_mode("fp32")


def test_fp8_cs_transposed_copies_are_reused_and_exact(monkeypatch):
    """FP8-CS: X, W, dY quantized once each; the Wgrad/Dgrad copies are their transposes, which
    is what quantizing the transposed tensors gives, bit for bit (checked below, with a reference
    that quantizes every copy independently)."""
    from nvfp4_megatron import formats

    e4m3, e5m2 = torch.float8_e4m3fn, torch.float8_e5m2
    g = torch.Generator().manual_seed(3)
    x = torch.randn(48, 2, 64, generator=g).to(torch.bfloat16)
    w = (torch.randn(96, 64, generator=g) * 0.1).to(torch.bfloat16)
    gy = (torch.randn(48, 2, 96, generator=g) * 0.01).to(torch.bfloat16)
    calls = []
    casts = []
    real_cast = qlinear.dispatch.quantize_fp8_current
    monkeypatch.setattr(qlinear.dispatch, "quantize_fp8_current",
                        lambda t, *a, **k: casts.append(tuple(t.shape)) or real_cast(t, *a, **k))
    remove = qlinear.add_quantize_observer(lambda k, r, tq: calls.append(r))
    try:
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = qlinear.quantized_linear(xi, wi, None, qlinear.LinearCall(
            recipe=get_recipe("fp8_cs").linear, layer_key="l"))
        y.backward(gy)
    finally:
        remove()
    # every role's copy is reported (three are transposes of the other three, not requantized)
    assert sorted(calls) == sorted(qlinear.ROLES)
    assert sorted(casts) == [(96, 64), (96, 64), (96, 96)]  # X, W, dY: one FP8 cast each
    x2, dy2 = x.reshape(-1, 64), gy.reshape(-1, 96)
    q = formats.quantize_fp8_current
    for t, dt in ((x2, e4m3), (w, e4m3), (dy2, e5m2)):
        a, b = q(t, dt), q(t.t().contiguous(), dt)
        assert torch.equal(a.data.view(torch.uint8).t(), b.data.view(torch.uint8))
        assert torch.equal(a.scale_inv, b.scale_inv)
    xq, wq, dyq = q(x2, e4m3), q(w, e4m3), q(dy2, e5m2)

    def mm(a, b_t, sa, sb):
        return (torch.matmul(a, b_t) * (sa * sb)).to(torch.bfloat16)

    assert torch.equal(y.detach().reshape(-1, 96),
                       mm(xq.data.float(), wq.data.float().t(), xq.scale_inv, wq.scale_inv))
    assert torch.equal(xi.grad.reshape(-1, 64),
                       mm(dyq.data.float(), wq.data.float(), dyq.scale_inv, wq.scale_inv))
    assert torch.equal(wi.grad, mm(dyq.data.float().t(), xq.data.float(), dyq.scale_inv,
                                   xq.scale_inv))


_REAL_AMAX = (qlinear.dispatch.amax, qlinear.dispatch.amax_and_transposed_rht)


def _count_amax_reads(monkeypatch, recipe_name: str, tokens: int, sharing: bool):
    """One quantized linear forward + backward: its outputs and the amax calls it made (``amax``:
    one read of a tensor each; ``pair``: one read for a row-wise and an RHT'd column-wise copy)."""
    reads = []
    inside = []  # the pair's CPU path makes its two reads through dispatch.amax: not counted
    real_amax, real_pair = _REAL_AMAX

    def amax(t, **k):
        if not inside:
            reads.append(("amax", tuple(t.shape), k.get("rht", False)))
        return real_amax(t, **k)

    def pair(t, **k):
        reads.append(("pair", tuple(t.shape)))
        inside.append(1)
        try:
            return real_pair(t, **k)
        finally:
            inside.pop()

    monkeypatch.setattr(qlinear.dispatch, "amax", amax)
    monkeypatch.setattr(qlinear.dispatch, "amax_and_transposed_rht", pair)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(tokens, 64, generator=g).to(torch.bfloat16).requires_grad_(True)
    w = (torch.randn(96, 64, generator=g) * 0.1).to(torch.bfloat16).requires_grad_(True)
    gy = (torch.randn(tokens, 96, generator=g) * 0.01).to(torch.bfloat16)
    qstate.reset_state()
    prev = qlinear.set_copy_amax_sharing(sharing)
    try:
        y = qlinear.quantized_linear(x, w, None, qlinear.LinearCall(
            recipe=get_recipe(recipe_name).linear, layer_key="l0"))
        y.backward(gy)
    finally:
        qlinear.set_copy_amax_sharing(prev)
    return (y.detach(), x.grad, w.grad), reads


@pytest.mark.parametrize("recipe,tokens,want_shared", [
    # NVFP4: row-wise Fprop/Dgrad copies + RHT'd Wgrad copies -> one pair read each for X and dY
    ("nvfp4_all_layers", 64, [("pair", (64, 64)), ("amax", (96, 64), False), ("pair", (64, 96))]),
    # 40 tokens: the RHT'd copies see 8 appended zero tokens, so they keep their own reads
    ("nvfp4_all_layers", 40, None),
    # MXFP8 (no RHT): both copies of X / dY take max |x| -> one read each
    # (the weight's Dgrad copy is quantized from W^T [64, 96] with 1x32 blocks)
    ("mxfp8", 64, [("amax", (64, 64), False), ("amax", (96, 64), False), ("amax", (64, 96), False),
                   ("amax", (64, 96), False)]),
])
def test_copies_share_one_amax_read_same_numbers(monkeypatch, recipe, tokens, want_shared):
    """The row-wise and column-wise copies of X and of dY get their amaxes from one read of the
    tensor (``quant.linear._copy_amaxes``); the outputs equal those with one amax pass per copy,
    bit for bit."""
    out_sep, reads_sep = _count_amax_reads(monkeypatch, recipe, tokens, sharing=False)
    out_sh, reads_sh = _count_amax_reads(monkeypatch, recipe, tokens, sharing=True)
    for a, b in zip(out_sh, out_sep):
        assert torch.equal(a, b)
    rht = recipe.startswith("nvfp4")
    pad = -(-tokens // 16) * 16 if rht else -(-tokens // 32) * 32
    # one read per copy: X (Fprop), W (Fprop; its Dgrad copy is the 2D transpose or its own),
    # X^T (Wgrad, tokens padded to the block), dY (Dgrad), dY^T (Wgrad)
    assert [r for r in reads_sep if r[0] == "pair"] == []
    assert ("amax", (tokens, 64), False) in reads_sep and ("amax", (64, pad), rht) in reads_sep
    assert ("amax", (tokens, 96), False) in reads_sep and ("amax", (96, pad), rht) in reads_sep
    if want_shared is None:
        assert reads_sh == reads_sep
    else:
        assert reads_sh == want_shared
        assert len(reads_sh) < len(reads_sep)
