"""kernels.dispatch on CPU: routed to the formats reference with every argument, no kernel
imported, and the NVFP4 result equal to the independent NumPy oracle."""

from __future__ import annotations

import logging

import pytest
import torch

from nvfp4_megatron import formats
from nvfp4_megatron.kernels import dispatch


def _x():
    return torch.randn(32, 64, generator=torch.Generator().manual_seed(0)).bfloat16()


def test_cpu_tensor_uses_reference():
    assert not dispatch.uses_kernel(_x())


_ALL_ARGS = {
    "quantize_nvfp4": dict(tile=(16, 16), rht=True, rht_signs=[1, -1] * 8,
                           stochastic_rounding=True, generator=torch.Generator(), rand=None,
                           amax=3.0),
    "quantize_mx": dict(block=64),
    "quantize_fp8_current": dict(pow2_scale=True, amax=2.0),
    "quantize_fp8_block": dict(tile=(128, 128), pow2_scale=True),
}


@pytest.mark.parametrize("name", sorted(_ALL_ARGS))
def test_cpu_routes_to_the_reference_with_every_argument(name, monkeypatch):
    """On CPU each entry point calls the formats reference once, with x, the positional dtype and
    every keyword it was given (a dropped or renamed argument fails), and never imports a kernel."""
    import sys

    seen = []
    monkeypatch.setattr(formats, name, lambda *a, **k: seen.append((a, k)) or "reference")
    x = _x()
    pos = () if name == "quantize_nvfp4" else (torch.float8_e4m3fn,)
    before = {m for m in sys.modules if m.startswith("nvfp4_megatron.kernels.")}
    assert getattr(dispatch, name)(x, *pos, **_ALL_ARGS[name]) == "reference"
    assert len(seen) == 1 and seen[0][0][0] is x and seen[0][0][1:] == pos
    assert seen[0][1] == _ALL_ARGS[name]
    after = {m for m in sys.modules if m.startswith("nvfp4_megatron.kernels.")}
    assert after == before


def test_nvfp4_cpu_matches_the_independent_oracle():
    """dispatch on CPU against tests/formats/formats_oracle.py (NumPy, written apart)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "formats"))
    try:
        import formats_oracle as oracle
    finally:
        sys.path.pop(0)
    x = _x().float()
    for tile_rows in (1, 16):
        got = dispatch.quantize_nvfp4(x, tile=(tile_rows, 16))
        codes, s_b, s_enc, _, _ = oracle.nvfp4_reference(x.numpy(), tile_rows)
        assert (formats.unpack_e2m1(got.data).numpy() == codes).all()
        assert (got.scale.float().numpy() == s_b).all()
        assert got.scale_enc.item() == float(s_enc)


def test_amax_cpu_matches_definition():
    x = _x()
    assert torch.equal(dispatch.amax(x), x.float().abs().amax())
    assert torch.equal(dispatch.amax(x, rht=True), formats.apply_rht(x).abs().amax())


def test_bad_shape_raises_with_rule():
    with pytest.raises(ValueError, match="block size 16"):
        dispatch.quantize_nvfp4(torch.randn(4, 24))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_case_without_kernel_logs_once(caplog):
    x = torch.randn(32, 128).bfloat16().cuda()
    with caplog.at_level(logging.WARNING, logger="nvfp4_megatron.kernels.dispatch"):
        dispatch.quantize_fp8_block(x, torch.float8_e4m3fn)
        dispatch.quantize_fp8_block(x, torch.float8_e4m3fn)
    assert sum("quantize_fp8_block" in r.message for r in caplog.records) == 1
    assert dispatch.uses_kernel(x)


def test_16x16_tiles_refuse_programs_of_several_tile_rows():
    """BLOCK_R = 32 with 16x16 tiles gave wrong codes on the H200 (half the bytes, session 13)
    while the interpreter agreed with the reference: such a setting is refused, and the default
    settings (also with SR) hold one tile row per program."""
    import pytest as _pytest

    from nvfp4_megatron.kernels import nvfp4 as k

    with _pytest.raises(ValueError, match="BLOCK_R=32 with 16x16 tiles"):
        k.kernel_config(tile=(16, 16), rht=False, sr=False, unit_stride=True, config={"BLOCK_R": 32})
    for sr in (False, True):
        assert k.kernel_config(tile=(16, 16), rht=False, sr=sr, unit_stride=True)["BLOCK_R"] == 16
