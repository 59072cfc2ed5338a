"""Triton kernels vs the formats reference on the GPU: exact equality on random inputs.

Shapes include non-power-of-two token counts (1000, 4104: rowwise only, since a columnwise block
runs along 16 tokens; 1040 for columnwise) and the 12B model's 8192 x 20480 FFN activation.
The reference runs on CPU (see ``kernel_cases``). SR with the kernel's own Philox draws is
tested statistically: every code is one of the two grid neighbours of ``x * enc_b`` and the mean
over 4096 draws of each element is within 6 standard deviations of ``x * enc_b``.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

pytest.importorskip("triton")

import kernel_cases as kc  # noqa: E402  (tests/kernels is on sys.path through conftest)

from nvfp4_megatron import formats  # noqa: E402
from nvfp4_megatron.kernels import dispatch  # noqa: E402

SHAPES = [
    ((1000, 4096), torch.bfloat16, False),
    ((4104, 5120), torch.bfloat16, False),
    ((1040, 4096), torch.bfloat16, True),
    ((256, 2048), torch.float32, True),
    ((4, 100, 256), torch.float16, False),
]


@pytest.mark.parametrize("shape,dtype,heavy", SHAPES, ids=lambda v: str(v))
def test_all_kernels_exact(shape, dtype, heavy):
    done = kc.run_all(shape, device="cuda", dtype=dtype, heavy=heavy, seed=sum(shape))
    assert "nvfp4 rowwise" in done and "fp8cs torch.float8_e4m3fn" in done


def test_big_ffn_activation_exact():
    done = kc.run_all((8192, 20480), device="cuda", full=False, seed=3)
    assert done == ["nvfp4 rowwise", "nvfp4 columnwise rht"]
    x = kc.make_input((8192, 20480), device="cuda", seed=4)
    kc.check_mx("mx big", x, torch.float8_e4m3fn)
    kc.check_fp8("fp8 big", x, torch.float8_e4m3fn)
    kc.check_nvfp4("nvfp4 16x16 big", x, tile=(16, 16))


def test_special_values_exact():
    x = kc.special_values_input("cuda")
    kc.check_nvfp4("special nvfp4", x)
    kc.check_nvfp4("special nvfp4 columnwise rht", x.t(), rht=True)
    kc.check_nvfp4("special nvfp4 rowwise rht", x, rht=True)
    kc.check_nvfp4("special nvfp4 16x16", x, tile=(16, 16))
    for ed in (torch.float8_e4m3fn, torch.float8_e5m2, "e2m1"):
        kc.check_mx(f"special mx {ed}", x, ed)
    kc.check_fp8("special fp8", x, torch.float8_e4m3fn)
    kc.check_fp8("special fp8 finite", x[8:], torch.float8_e5m2)


def test_rht_output_rounded_to_input_dtype_exact():
    """DESIGN.md §RHT: the kernels round the RHT output to the input dtype exactly as the reference."""
    kc.check_round_to_dtype("rht output rounding", "cuda")
    xb = kc.special_values_input_bf16("cuda")
    kc.check_nvfp4("special bf16 nvfp4 columnwise rht", xb.t(), rht=True)
    kc.check_nvfp4("special bf16 nvfp4 rowwise rht", torch.cat([xb[:6], xb[7:]]), rht=True)
    u = torch.rand(xb.t().shape, generator=torch.Generator().manual_seed(5)).cuda()
    kc.check_nvfp4("special bf16 columnwise rht sr", xb.t(), rht=True, stochastic_rounding=True, rand=u)


def test_alpha_pass_matches_torch():
    """The cuBLAS path's alpha pass (``gemm_alpha.scale_by_alpha``): the values of torch's multiply
    by a 0-d tensor and cast, on the CPU and on the device, for ties, subnormals, overflow, Inf and
    NaN, BF16 / FP16 / FP32 outputs."""
    kc.check_scale_by_alpha("alpha pass", "cuda")


def test_block_scale_hardware_convert_exact():
    """The NVFP4 block scale from ``cvt.rn.satfinite.e4m3x2.f32``: the reference's bytes and values
    on every E4M3 value, tie and neighbour, random FP32 patterns, overflow, Inf and NaN."""
    kc.check_block_scale("nvfp4 block scale rounding", "cuda")


def test_dispatch_picks_kernel_and_matches():
    x = kc.make_input((512, 1024), device="cuda", seed=5)
    assert dispatch.uses_kernel(x)
    got, want = dispatch.quantize_nvfp4(x), formats.quantize_nvfp4(x)
    assert torch.equal(got.data, want.data)


def _sr_draws(x_row, n, seed, rht=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = x_row.expand(n, -1).contiguous()
    return dispatch.quantize_nvfp4(x, stochastic_rounding=True, generator=g, rht=rht)


def test_sr_philox_unbiased_and_neighbours():
    n = 4096
    x_row = kc.make_input((1, 2048), torch.float32, device="cuda", seed=6, heavy=True)
    q = _sr_draws(x_row, n, seed=11)
    ref = formats.quantize_nvfp4(x_row)  # same amax and block scales as every row of the batch
    assert torch.equal(q.scale[0].view(torch.uint8), ref.scale[0].view(torch.uint8))
    s_b = ref.scale.float().reshape(-1, 1)
    enc = torch.clamp(1.0 / (s_b * ref.scale_dec), max=torch.finfo(torch.float32).max)
    y = torch.clamp(x_row.reshape(-1, 16) * enc, -6, 6).reshape(-1)  # target values, E[q] = y
    grid = torch.tensor(formats.constants.E2M1_GRID, device="cuda")
    a = y.abs()
    lo = grid[(a.unsqueeze(-1) >= grid).sum(-1) - 1]
    hi = grid[torch.clamp((a.unsqueeze(-1) >= grid).sum(-1), max=7)]
    qv = formats.decode_e2m1(q.codes()).abs()  # [n, 2048] magnitudes
    assert bool(((qv == lo) | (qv == hi)).all()), "an SR draw is not a neighbour of x * enc_b"
    p = torch.where(hi > lo, (a - lo) / (hi - lo), torch.zeros_like(a))
    mean = qv.mean(0)
    sigma = (hi - lo) * torch.sqrt(p * (1 - p) / n)
    err = (mean - a).abs()
    assert bool((err <= 6 * sigma + 1e-6).all()), f"SR bias: max error/sigma {float((err / (sigma + 1e-12)).max())}"
    # RNE would be biased here: the SR mean must beat it on the heavy-tailed row
    rne = formats.decode_e2m1(ref.codes()).abs().reshape(-1)
    assert float((mean - a).abs().mean()) < float((rne - a).abs().mean())


def test_sr_philox_deterministic_per_seed():
    x_row = kc.make_input((1, 1024), device="cuda", seed=8)
    a1, a2, b = _sr_draws(x_row, 64, 1), _sr_draws(x_row, 64, 1), _sr_draws(x_row, 64, 2)
    assert torch.equal(a1.data, a2.data)
    assert not torch.equal(a1.data, b.data)
    c1, c2 = _sr_draws(x_row, 64, 1, rht=True), _sr_draws(x_row, 64, 1, rht=True)
    assert torch.equal(c1.data, c2.data)


def test_fused_cross_entropy_matches_megatron_on_gpu(tmp_path):
    """kernels/cross_entropy.py vs Megatron's vocab_parallel_cross_entropy on the GPU (one rank),
    to ``ce_cases``' bounds, at a vocabulary of the 1.2B benchmark's size and two odd ones."""
    import torch.distributed as dist

    import ce_cases as cc

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        n = cc.check_one_process(((64, 2, 131072), (33, 3, 5000), (8, 2, 50304)),
                                 (torch.bfloat16, torch.float32), dist.group.WORLD, device="cuda")
    finally:
        dist.destroy_process_group()
    assert n == 6
