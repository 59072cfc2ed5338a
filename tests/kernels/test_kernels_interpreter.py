"""Kernels vs reference on CPU through Triton's interpreter (``TRITON_INTERPRET=1``), small shapes.

The interpreter must be switched on before ``triton.jit`` wraps the kernels, so the check runs in
a fresh subprocess. Same exact comparisons as the GPU tests (``kernel_cases``), on shapes with a
row count that is not a multiple of 16, heavy-tailed BF16 and FP32 inputs (FP32 RHT sums round, so
this also pins the RHT summation order), NaN/Inf/subnormal/signed-zero specials in FP32 and BF16,
and the rounding of the RHT output to the input's dtype (BF16 ties, FP16 overflow). About 10 s.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_SCRIPT = r"""
import sys
import torch
sys.path.insert(0, {here!r})
import kernel_cases as kc
for shape, heavy, dtype in [((48, 64), False, torch.bfloat16), ((33, 96), True, torch.bfloat16),
                            ((32, 64), True, torch.float32), ((2, 16, 32), False, torch.float16)]:
    print(shape, kc.run_all(shape, device="cpu", heavy=heavy, dtype=dtype))
x = kc.special_values_input("cpu")
kc.check_nvfp4("special nvfp4", x)
kc.check_nvfp4("special nvfp4 columnwise rht", x.t(), rht=True)
# Row 6 (3e38) overflows in the butterflies: Inf - Inf = NaN, whose sign bit (it becomes the code's
# sign) is the platform's default NaN: negative under NumPy on x86, positive in torch and on GPUs.
kc.check_nvfp4("special nvfp4 rowwise rht", torch.cat([x[:6], x[7:]]), rht=True)
kc.check_nvfp4("special nvfp4 16x16", x, tile=(16, 16))
kc.check_amax_pair("special amax pair", x)  # Inf and NaN: both maxima NaN
xi = x.clone()
xi[4, 70] = 1.0
kc.check_amax_pair("special amax pair, Inf without NaN", xi)  # both +Inf
xi[2, 3] = xi[3, 40] = 2.0
xi[6, :16] = 1e30
kc.check_amax_pair("special amax pair, finite", xi)  # the subnormal and -0.0 rows stay
kc.check_round_to_dtype("rht output rounding", "cpu")
kc.check_scale_by_alpha("alpha pass", "cpu")
kc.check_block_scale("nvfp4 block scale rounding", "cpu")
xb = kc.special_values_input_bf16("cpu", subnormals=False)  # the interpreter mis-loads BF16 subnormals
kc.check_nvfp4("special bf16 nvfp4 columnwise rht", xb.t(), rht=True)
kc.check_nvfp4("special bf16 nvfp4 rowwise rht", torch.cat([xb[:6], xb[7:]]), rht=True)
u = torch.rand(xb.t().shape, generator=torch.Generator().manual_seed(5))
kc.check_nvfp4("special bf16 columnwise rht sr", xb.t(), rht=True, stochastic_rounding=True, rand=u)
for ed in (torch.float8_e4m3fn, torch.float8_e5m2, "e2m1"):
    kc.check_mx(f"special mx {{ed}}", x, ed)
kc.check_fp8("special fp8 (Inf/NaN amax)", x, torch.float8_e4m3fn)
kc.check_fp8("special fp8 (Inf amax, no NaN)", x[:4], torch.float8_e4m3fn)
kc.check_fp8("special fp8 finite", x[8:], torch.float8_e5m2)
kc.check_fp8("zeros", torch.zeros(4, 16), torch.float8_e4m3fn)
kc.check_nvfp4("zeros", torch.zeros(4, 16))
# SR with the seed given as a device tensor (the training path; a CUDA graph replays it) draws
# what the generator path draws when it holds the same seed; another seed draws other codes
xs = kc.make_input((32, 64), torch.bfloat16, seed=3)
s9 = torch.randint(0, 2**31 - 1, (1,), generator=torch.Generator().manual_seed(9), dtype=torch.int64)
a = kc.k_nvfp4.quantize_nvfp4(xs, stochastic_rounding=True, generator=torch.Generator().manual_seed(9))
b = kc.k_nvfp4.quantize_nvfp4(xs, stochastic_rounding=True, seed=s9.to(torch.int32))
c = kc.k_nvfp4.quantize_nvfp4(xs, stochastic_rounding=True, seed=(s9 + 1).to(torch.int32))
assert torch.equal(a.data, b.data) and torch.equal(a.scale.view(torch.uint8), b.scale.view(torch.uint8))
assert not torch.equal(b.data, c.data)
# the 16-wide tile load layout draws the same Philox words for each element as the half-block one
d = kc.k_nvfp4.quantize_nvfp4(xs, stochastic_rounding=True, seed=s9.to(torch.int32), config={{"HALF_LOADS": 0}})
assert torch.equal(d.data, b.data) and torch.equal(d.scale.view(torch.uint8), b.scale.view(torch.uint8))
# and so do several row tiles per program under the 1-D column-fastest grid, in both layouts
for half in (0, 1):
    cfg = {{"BLOCK_R": 16, "G": 2, "ITERS": 2, "COL_FASTEST": 1, "HALF_LOADS": half}}
    e = kc.k_nvfp4.quantize_nvfp4(xs, stochastic_rounding=True, seed=s9.to(torch.int32), config=cfg)
    assert torch.equal(e.data, b.data) and torch.equal(e.scale.view(torch.uint8), b.scale.view(torch.uint8)), half
try:
    kc.k_nvfp4.quantize_nvfp4(xs, stochastic_rounding=True, seed=s9)  # int64: refused
    raise AssertionError("an int64 seed tensor was accepted")
except ValueError as e:
    assert "one-element int32 tensor" in str(e), e
# the emulated formats' GEMM with alpha in the epilogue: on operands whose partial sums are exact
# in FP32 (multiples of 1/4 up to 2, K=96) any accumulation order gives the reference's bits
from nvfp4_megatron.kernels.gemm_alpha import mm_alpha
import triton.runtime.interpreter as _ti
_patch = _ti._patch_lang_tensor
def _patch_index(tensor, scope):  # Triton 3.6's interpreter: int() of a 1-element array, which
    _patch(tensor, scope)         # NumPy 2.5 refuses; a runtime loop bound (range(K tiles)) needs it
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
_ti._patch_lang_tensor = _patch_index
g = torch.Generator().manual_seed(4)
A = (torch.randint(-8, 9, (40, 96), generator=g) / 4).to(torch.bfloat16)
Bn = (torch.randint(-8, 9, (24, 96), generator=g) / 4).to(torch.bfloat16)  # [N, K], used as Bn.t()
alpha = torch.tensor(0.3712345, dtype=torch.float32)
ref = A.float() @ Bn.float().t()
small = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)
for out_dtype in (torch.bfloat16, torch.float32):
    got = mm_alpha(A, Bn.t(), alpha, out_dtype, config=small)
    want = (ref * alpha).to(out_dtype)
    assert torch.equal(got.view(torch.int16 if out_dtype == torch.bfloat16 else torch.int32),
                       want.view(torch.int16 if out_dtype == torch.bfloat16 else torch.int32)), out_dtype
got = mm_alpha(A, Bn.t().contiguous(), None, torch.bfloat16, config=small)
assert torch.equal(got.view(torch.int16), ref.to(torch.bfloat16).view(torch.int16))
print("INTERPRETER-OK")
"""


def test_kernels_match_reference_in_interpreter():
    here = str(pathlib.Path(__file__).parent)
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT.format(here=here)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0 and "INTERPRETER-OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
