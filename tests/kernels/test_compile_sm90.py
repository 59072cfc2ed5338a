"""Every kernel variant compiles for sm_90 (Hopper) on a machine without a GPU (slow: ~1 min)."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

import compile_check  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("name,fn,types,constexprs", compile_check.variants(), ids=lambda v: v if isinstance(v, str) else "")
def test_compiles_for_sm90(name, fn, types, constexprs):
    kernel = compile_check.compile_sm90(fn, types, constexprs)
    ptx = kernel.asm["ptx"]
    assert "div.full.f32" not in ptx, f"{name}: approximate division in the PTX"
    if not name.startswith("cross-entropy"):
        # (the cross-entropy kernels call libdevice's expf, which Triton links in its flush-to-
        # zero flavour: an exp below FP32's normal range is 0 there, a subnormal in torch; the
        # kernels' docstring states it and the tests leave gradient elements below 2^-126 out)
        assert ".ftz" not in ptx, f"{name}: flush-to-zero would change results on subnormals"


@pytest.mark.slow
@pytest.mark.parametrize("sr", [False, True], ids=["rne", "sr"])
def test_rowwise_nvfp4_stores_without_shared_memory(sr):
    """The 1x16 quantizer of unit-stride BF16 (the launch's own settings, aligned operands as at run
    time) keeps its tiles in the order it stores them: 16-byte loads, 8-byte code stores, and no
    shared memory or barriers (a row-major tile layout went through shared memory before every
    store; kernels/nvfp4.py)."""
    from nvfp4_megatron.kernels.sm90 import compile_nvfp4_launch

    _, kernel = compile_nvfp4_launch(tile=(1, 16), rht=False, sr=sr, unit_stride=True)
    ptx = kernel.asm["ptx"]
    assert kernel.metadata.shared == 0, f"shared memory: {kernel.metadata.shared} bytes"
    assert "bar.sync" not in ptx and "st.shared" not in ptx
    assert "ld.global.v4.b32" in ptx and "st.global.v2.b32" in ptx, "loads/stores not vectorised"
