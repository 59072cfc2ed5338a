"""Every kernel variant compiles for sm_90 (Hopper) on a machine without a GPU (slow: ~1 min)."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

import compile_check  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("name,fn,types,constexprs", compile_check.variants(), ids=lambda v: v if isinstance(v, str) else "")
def test_compiles_for_sm90(name, fn, types, constexprs):
    kernel = compile_check._compile(fn, types, constexprs)
    ptx = kernel.asm["ptx"]
    assert "div.full.f32" not in ptx, f"{name}: approximate division in the PTX"
    assert ".ftz" not in ptx, f"{name}: flush-to-zero would change results on subnormals"
