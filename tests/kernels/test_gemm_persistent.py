"""``kernels/gemm_persistent.mm_alpha_persistent`` (persistent TMA GEMM, alpha in the epilogue) on CPU.

* Under Triton's interpreter (``TRITON_INTERPRET=1``, a fresh subprocess as in
  ``test_kernels_interpreter.py``; the interpreter emulates the tensor descriptors): on operands
  whose partial sums are exact in FP32 (multiples of 1/4 in [-2, 2], K = 200) any accumulation
  order gives the reference's bits, so the result must equal ``(A.float() @ B.float() * alpha)``
  rounded to the output dtype bit for bit: BF16 / FP16 / FP32 outputs, alpha or None, B as the
  transpose of an [N, K] tensor (Fprop/Wgrad) and as a [K, N] one (Dgrad), A transposed, M, N, K
  not multiples of the tile (TMA's zero fill and clipped stores), N odd (the pointer-store
  epilogue), and more tiles than programs (a fake 3-SM device: each program runs several tiles).
  On random operands the bits do not depend on the number of programs, flattening or subtiling.
* Operands TMA cannot read are refused with ``ValueError`` (no launch, plain CPU).
* The kernel compiles for sm_90 and its SASS has TMA loads (UTMALDG), wgmma (HGMMA) with one
  group kept in flight, TMA stores and no spills (skipped without the cuobjdump Triton ships).
About 10 s on 2 CPU cores. On a GPU (``-m gpu``): the exact cases at the default tile and the
bench's alternatives on the device, and on random operands of a target shape the FP32 error bound
and the same bits for any number of programs and under CUDA graph replay.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_SCRIPT = r"""
import sys
import torch
sys.path.insert(0, {root!r})
import triton.runtime.interpreter as _ti
_patch = _ti._patch_lang_tensor
def _patch_index(tensor, scope):  # Triton 3.6's interpreter: int() of a 1-element array, which
    _patch(tensor, scope)         # NumPy 2.5 refuses; the runtime loop bounds need it
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
_ti._patch_lang_tensor = _patch_index
from nvfp4_megatron.kernels.gemm_persistent import mm_alpha_persistent

BITS = {{torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}}
g = torch.Generator().manual_seed(4)
def q(*shape):  # multiples of 1/4 in [-2, 2]: K=200 partial sums are exact in FP32
    return (torch.randint(-8, 9, shape, generator=g) / 4).to(torch.bfloat16)
alpha = torch.tensor(0.3712345, dtype=torch.float32)
# 16x32 tiles: M=72 -> 5 row tiles, N=40 -> 2 column tiles (10 tiles on 3 programs), K=200 -> 7
# K tiles of 32 with a partial last one; all three not multiples of the tile
small = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=2, NUM_SMS=3)
M, N, K = 72, 40, 200
A, Bn, Bk = q(M, K), q(N, K), q(K, N)
At = q(K, M)  # A given as the transpose view of a [K, M] tensor
n_checked = 0
def check(a, b, al, od, cfg=small, label=""):
    global n_checked
    got = mm_alpha_persistent(a, b, al, od, config=cfg)
    ref = a.float() @ b.float()
    want = (ref * al if al is not None else ref).to(od)
    assert got.shape == want.shape and got.dtype == od, (label, got.shape, got.dtype)
    assert torch.equal(got.view(BITS[od]), want.view(BITS[od])), (label, od, al is not None,
        (got.float() - want.float()).abs().max())
    n_checked += 1
for od in (torch.bfloat16, torch.float32):
    for al in (alpha, None):
        check(A, Bn.t(), al, od, label="fprop/wgrad layout")
        check(A, Bk, al, od, label="dgrad layout")
check(A, Bn.t(), alpha, torch.float16, label="fp16 out")
check(At.t(), Bn.t(), alpha, torch.bfloat16, label="A transposed")
check(At.t(), Bk, None, torch.float32, label="A and B transposed")
# N odd: C's rows are not 16-byte multiples, the epilogue stores through masked pointers
B37 = q(37, K)
check(A, B37.t(), alpha, torch.bfloat16, label="N=37 pointer epilogue")
check(A, B37.t(), None, torch.float32, label="N=37 pointer epilogue fp32")
# other settings of the same kernel: unflattened, whole-tile store, 2 programs per SM, one program
for extra in (dict(FLATTEN=False), dict(SUBTILE=False), dict(PROGRAMS_PER_SM=2), dict(NUM_SMS=1),
              dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, NUM_SMS=2)):
    check(A, Bn.t(), alpha, torch.bfloat16, dict(small, **extra), label=str(extra))
# a single output tile larger than the whole problem (TMA clips every edge)
check(q(5, 24), q(24, 8), alpha, torch.bfloat16, label="tiny")
# random (not exact) operands: the bits do not depend on which program computes a tile, nor on
# flattening or subtiling (each tile's accumulation order is the K loop's)
Ar = torch.randn(72, 200, generator=g).to(torch.bfloat16)
Br = torch.randn(40, 200, generator=g).to(torch.bfloat16).t()
ref_bits = mm_alpha_persistent(Ar, Br, alpha, torch.bfloat16, config=small).view(torch.int16)
for extra in (dict(NUM_SMS=1), dict(NUM_SMS=7), dict(FLATTEN=False), dict(SUBTILE=False), dict(PROGRAMS_PER_SM=2)):
    got = mm_alpha_persistent(Ar, Br, alpha, torch.bfloat16, config=dict(small, **extra)).view(torch.int16)
    assert torch.equal(got, ref_bits), extra
# and they are within FP32 rounding of the FP64 product
exact = (Ar.double() @ Br.double() * alpha.double()).to(torch.bfloat16)
diff = (ref_bits.view(torch.bfloat16).float() - exact.float()).abs()
assert (diff <= exact.float().abs() * 2 ** -7 + 1e-6).all(), diff.max()
print("PERSISTENT-OK", n_checked)
"""


def test_persistent_gemm_matches_reference_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT.format(root=_ROOT)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "PERSISTENT-OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def _bf16(*shape):
    return torch.zeros(shape, dtype=torch.bfloat16)


@pytest.mark.parametrize("a,b,out_dtype,match", [
    (_bf16(8, 16), _bf16(32, 8), torch.bfloat16, r"need A \[M, K\] and B \[K, N\]"),
    (_bf16(8, 16).float(), _bf16(16, 8), torch.bfloat16, "BF16 operands only"),
    (_bf16(8, 16), _bf16(16, 8), torch.int32, "output BF16, FP16 or FP32"),
    # B [K, N] with N = 37: its row stride is 74 bytes; neither orientation is TMA-readable
    (_bf16(8, 16), _bf16(16, 37), torch.bfloat16, r"operand B \(16, 37\) with strides \(37, 1\)"),
    # no unit-stride dimension
    (_bf16(8, 32)[:, ::2], _bf16(16, 8), torch.bfloat16, r"operand A \(8, 16\) with strides \(32, 2\)"),
    # a base address 2 bytes past a 16-byte boundary
    (_bf16(8, 17)[:, 1:], _bf16(16, 8), torch.bfloat16, "operand A .* cannot be read through TMA"),
], ids=["shapes", "dtype", "out-dtype", "row-stride", "no-unit-stride", "misaligned-base"])
def test_refuses_what_it_cannot_take(a, b, out_dtype, match):
    from nvfp4_megatron.kernels.gemm_persistent import mm_alpha_persistent

    with pytest.raises(ValueError, match=match):
        mm_alpha_persistent(a, b, None, out_dtype)


def test_unknown_config_key_refused():
    from nvfp4_megatron.kernels.gemm_persistent import mm_alpha_persistent

    with pytest.raises(ValueError, match="unknown config keys"):
        mm_alpha_persistent(_bf16(8, 16), _bf16(16, 8), None, torch.bfloat16, config={"BLOCK": 64})


def test_empty_operands_without_launch():
    from nvfp4_megatron.kernels.gemm_persistent import mm_alpha_persistent

    assert mm_alpha_persistent(_bf16(0, 16), _bf16(16, 8), None, torch.bfloat16).shape == (0, 8)
    out = mm_alpha_persistent(_bf16(4, 0), _bf16(0, 8), torch.tensor(0.5), torch.float32)
    assert out.shape == (4, 8) and torch.equal(out, torch.zeros(4, 8))


def _cuobjdump_available() -> bool:
    try:
        from nvfp4_megatron.kernels.sm90 import cuobjdump

        cuobjdump()
        return True
    except (FileNotFoundError, ImportError):
        return False


@pytest.mark.skipif(not _cuobjdump_available(), reason="this Triton wheel ships no cuobjdump")
@pytest.mark.parametrize("b_t", [True, False], ids=["fprop-wgrad", "dgrad"])
def test_compiles_to_tma_and_wgmma_for_sm90(b_t):
    """The default configuration as launched on the H200: operands through TMA (UTMALDG), the
    product on wgmma (HGMMA 64x256) waited with one group in flight, TMA stores, no spills."""
    from nvfp4_megatron.kernels.gemm_persistent import CONFIG, compile_sm90_launch
    from nvfp4_megatron.kernels.sm90 import sass_lines, sass_summary

    kernel = compile_sm90_launch(b_t=b_t)
    lines = sass_lines(kernel)
    summary = sass_summary(kernel)
    assert any(l.startswith("UTMALDG") or " UTMALDG" in l for l in lines), "no TMA loads"
    assert any(f"HGMMA.64x{CONFIG['BLOCK_N']}x16.F32.BF16" in l for l in lines), "no wgmma"
    assert any("WARPGROUP.DEPBAR.LE gsb0, 0x1" in l for l in lines), "wgmma not kept in flight"
    assert any("UTMASTG" in l for l in lines), "no TMA stores"
    assert not any("LDGSTS" in l for l in lines), "cp.async loads: not the TMA path"
    assert summary["local_bytes"] == 0, f"spills: {summary}"
    assert summary["shared_bytes"] <= 227 * 1024, summary



_NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# the bench's alternatives (scripts/bench_gemm_alpha.py PERSISTENT_CONFIGS) besides the default
_GPU_CONFIGS = {"default": {}, "s4": dict(num_stages=4),
                "128x128 w4 x2/SM": dict(BLOCK_N=128, num_warps=4, num_stages=3, PROGRAMS_PER_SM=2)}
_GPU_CASES = (
    [("default", lay, od, al, 520) for lay in ("nk_t", "kn", "a_t")
     for od in (torch.bfloat16, torch.float32) for al in (True, False)]
    + [("default", lay, od, al, 517) for lay in ("nk_t", "a_t")
       for od, al in ((torch.bfloat16, True), (torch.float32, False))]
    + [(cfg, lay, torch.bfloat16, True, 520) for cfg in ("s4", "128x128 w4 x2/SM") for lay in ("nk_t", "kn")])


@pytest.mark.gpu
@_NEEDS_CUDA
@pytest.mark.parametrize("cfg,layout,out_dtype,with_alpha,n", _GPU_CASES,
                         ids=[f"{c[0]}-{c[1]}-{str(c[2])[6:]}-{'alpha' if c[3] else 'none'}-n{c[4]}"
                              for c in _GPU_CASES])
def test_exact_on_gpu(cfg, layout, out_dtype, with_alpha, n):
    """On the device (BF16 wgmma, real TMA): partial sums exact in FP32, so the reference's bits;
    M, N, K not multiples of the tile (1000 x 520 x 456), several tiles per program (7 SMs: 24
    tiles of 128x256 on 7 programs, 40 of 128x128 on 14), A or B transposed, N = 517 (the
    pointer-store epilogue), layout "nk_t": B the transpose of [N, K] (Fprop/Wgrad), "kn": B
    [K, N] (Dgrad), "a_t": A the transpose of [K, M]."""
    from nvfp4_megatron.kernels.gemm_persistent import mm_alpha_persistent

    g = torch.Generator(device="cuda").manual_seed(n)
    m, k = 1000, 456

    def q(*shape):
        return (torch.randint(-8, 9, shape, generator=g, device="cuda") / 4).to(torch.bfloat16)

    a = q(k, m).t() if layout == "a_t" else q(m, k)
    b = q(k, n) if layout == "kn" else q(n, k).t()
    alpha = torch.tensor(0.3712345, device="cuda") if with_alpha else None
    got = mm_alpha_persistent(a, b, alpha, out_dtype, config=dict(_GPU_CONFIGS[cfg], NUM_SMS=7))
    ref = (a.double() @ b.double()).float()  # exact
    want = (ref * alpha if with_alpha else ref).to(out_dtype)
    bits = torch.int16 if out_dtype == torch.bfloat16 else torch.int32
    assert torch.equal(got.view(bits), want.view(bits))


@pytest.mark.gpu
@_NEEDS_CUDA
@pytest.mark.parametrize("layout", ["nk_t", "kn"])
def test_random_operands_on_gpu_deterministic(layout):
    """A target shape on random operands: within the FP32 accumulation bound of the FP64 product;
    the same bits on every run, for any number of programs, and under CUDA graph replay."""
    from nvfp4_megatron.kernels.gemm_persistent import mm_alpha_persistent

    g = torch.Generator(device="cuda").manual_seed(1)
    m, n, k = 2048, 2048, 8192
    a = torch.randn(m, k, generator=g, device="cuda").to(torch.bfloat16)
    b = (torch.randn(k, n, generator=g, device="cuda") if layout == "kn"
         else torch.randn(n, k, generator=g, device="cuda").t()).to(torch.bfloat16)
    alpha = torch.tensor(0.00137, device="cuda")
    got = mm_alpha_persistent(a, b, alpha, torch.float32)
    ref = (a.double() @ b.double()) * 0.00137
    bound = (a.double().abs() @ b.double().abs()) * 0.00137 * k * 2.0 ** -23 + 1e-30
    assert ((got.double() - ref).abs() <= bound).all()
    bf = mm_alpha_persistent(a, b, alpha, torch.bfloat16)
    for cfg in ({}, {"NUM_SMS": 37}, {"FLATTEN": False}):
        assert torch.equal(mm_alpha_persistent(a, b, alpha, torch.bfloat16, config=cfg).view(torch.int16),
                           bf.view(torch.int16)), cfg
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out = mm_alpha_persistent(a, b, alpha, torch.bfloat16)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.view(torch.int16), bf.view(torch.int16))

