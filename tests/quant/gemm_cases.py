"""Dequantize-kernel checks shared by the CPU interpreter test and the GPU tests.

``check_dequant`` quantizes with the formats reference (on CPU), runs the Triton dequantize kernel
on ``device`` and compares its BF16 output bit for bit with the reference ``q * s_b`` cast to BF16
(exact: that product has at most 8 significant bits), and checks that a non-finite flag makes
every element NaN.
"""

from __future__ import annotations

import torch

from nvfp4_megatron import formats
from nvfp4_megatron.quant import gemm


def _moved(q, device):
    import dataclasses

    fields = {f.name: getattr(q, f.name) for f in dataclasses.fields(q)}
    return dataclasses.replace(q, **{k: v.to(device) for k, v in fields.items()
                                     if isinstance(v, torch.Tensor)})


def reference_values(q, fmt: str) -> torch.Tensor:
    if fmt == "nvfp4":
        v = q.dequantize_unscaled()
    elif fmt == "fp8":
        v = q.data.float()
    else:
        v = q.dequantize(torch.float32)
    return v.reshape(-1, v.shape[-1])


def quantize_ref(x: torch.Tensor, fmt: str, variant):
    if fmt == "nvfp4":
        return formats.quantize_nvfp4(x, tile=variant)
    if fmt in ("mxfp8", "mxfp4"):
        return formats.quantize_mx(x, variant)
    return formats.quantize_fp8_current(x, variant)


CASES = [("nvfp4", (1, 16)), ("nvfp4", (16, 16)), ("mxfp8", torch.float8_e4m3fn),
         ("mxfp8", torch.float8_e5m2), ("mxfp4", "e2m1"), ("fp8", torch.float8_e4m3fn),
         ("fp8", torch.float8_e5m2)]


def check_dequant(name: str, x: torch.Tensor, fmt: str, variant, device) -> None:
    q = quantize_ref(x, fmt, variant)
    ref = reference_values(q, fmt)
    assert torch.equal(ref.to(torch.bfloat16).float(), ref), f"{name}: reference not BF16-exact"
    qd = _moved(q, device)
    yes = torch.ones((), dtype=torch.bool, device=device)
    got = gemm.dequant_bf16(qd, fmt, yes).cpu()
    want = ref.to(torch.bfloat16)
    if not torch.equal(got.view(torch.int16), want.view(torch.int16)):
        bad = (got.view(torch.int16) != want.view(torch.int16)).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: {fmt} {variant} dequant differs at {bad}: "
                             f"{[(got[i, j].item(), want[i, j].item()) for i, j in bad]}")
    no = torch.zeros((), dtype=torch.bool, device=device)
    nan = gemm.dequant_bf16(qd, fmt, no).cpu()
    assert torch.isnan(nan).all(), f"{name}: non-finite flag did not give all-NaN"


def inputs(shape, seed: int, *, heavy: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if heavy:  # wide dynamic range: scales from tiny to large, E4M3 subnormal block scales
        x = x * torch.exp(4 * torch.randn(shape, generator=g))
    return x.to(torch.bfloat16)


def run_all(device, shapes) -> int:
    n = 0
    for i, (shape, heavy) in enumerate(shapes):
        x = inputs(shape, i, heavy=heavy)
        for fmt, variant in CASES:
            if variant == (16, 16) and shape[0] % 16:
                continue
            if fmt != "fp8" and shape[-1] % 32:  # block formats: K a multiple of the block
                continue
            check_dequant(f"{shape} heavy={heavy}", x, fmt, variant, device)
            n += 1
    return n
