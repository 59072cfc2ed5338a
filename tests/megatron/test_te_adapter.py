"""TE adapter mapping and backend policy, without importing Transformer Engine."""

import dataclasses
import importlib.util

import pytest

from nvfp4_megatron.megatron.backend import DeviceCaps, resolve_backend
from nvfp4_megatron.megatron.te_adapter import TEUnsupported, build_te_recipe, describe_te_recipe
from nvfp4_megatron.quant.recipe import MsFp4Options, TensorQuant, Wgrad
from nvfp4_megatron.quant.registry import build_recipe, get_recipe

BLACKWELL = DeviceCaps(te_available=True, compute_capability=(10, 0))
HOPPER = DeviceCaps(te_available=True, compute_capability=(9, 0))
CPU = DeviceCaps(te_available=False, te_error="no CUDA GPU")


def test_te_is_not_installed_here():
    assert importlib.util.find_spec("transformer_engine") is None


def test_nvfp4_family_maps_to_constructor_args():
    d = describe_te_recipe(get_recipe("nvfp4"), num_layers=62)
    assert d["te_class"] == "NVFP4BlockScaling"
    assert d["te_kwargs"] == {"disable_rht": False, "disable_stochastic_rounding": False,
                              "disable_2d_quantization": False}
    assert d["megatron_config"] == {"fp4": "e2m1", "fp4_recipe": "nvfp4",
                                    "first_last_layers_bf16": True,
                                    "num_layers_at_start_in_bf16": 2,
                                    "num_layers_at_end_in_bf16": 8}
    for name, key in (("nvfp4_no_rht", "disable_rht"),
                      ("nvfp4_no_sr", "disable_stochastic_rounding"),
                      ("nvfp4_no_2d", "disable_2d_quantization")):
        kw = describe_te_recipe(get_recipe(name), num_layers=62)["te_kwargs"]
        assert kw[key] is True and sum(kw.values()) == 1, name
    d = describe_te_recipe(get_recipe("nvfp4_all_layers"), num_layers=4)
    assert "first_last_layers_bf16" not in d["megatron_config"]


def test_fp8_and_mx_mappings():
    cs = describe_te_recipe(get_recipe("fp8_cs"), num_layers=32)
    assert (cs["te_class"], cs["te_kwargs"]) == ("Float8CurrentScaling", {"fp8_format": "HYBRID"})
    assert cs["megatron_config"] == {"fp8": "hybrid", "fp8_recipe": "tensorwise",
                                     "first_last_layers_bf16": True,
                                     "num_layers_at_start_in_bf16": 1,
                                     "num_layers_at_end_in_bf16": 1}
    mx = describe_te_recipe(get_recipe("mxfp8"), num_layers=32)
    assert (mx["te_class"], mx["te_kwargs"]) == ("MXFP8BlockScaling", {"fp8_format": "E4M3"})
    assert mx["megatron_config"] == {"fp8": "e4m3", "fp8_recipe": "mxfp8"}
    blk = describe_te_recipe(get_recipe("fp8_block"), num_layers=32)
    assert blk["te_class"] == "Float8BlockScaling"
    assert describe_te_recipe(get_recipe("bf16"), num_layers=4)["te_class"] is None


def test_refusals():
    with pytest.raises(TEUnsupported, match="no mxfp4 recipe"):
        describe_te_recipe(get_recipe("mxfp4"), num_layers=62)
    with pytest.raises(TEUnsupported, match="first-N/last-M"):
        describe_te_recipe(build_recipe("nvfp4", bf16_first_blocks=0, bf16_last_blocks=0,
                                        bf16_blocks=[3]), num_layers=8)
    ok = describe_te_recipe(build_recipe("nvfp4", bf16_first_blocks=0, bf16_last_blocks=0,
                                         bf16_blocks=[0, 7]), num_layers=8)
    assert ok["megatron_config"]["num_layers_at_end_in_bf16"] == 1
    with pytest.raises(TEUnsupported, match="scope='fprop'"):
        describe_te_recipe(build_recipe("nvfp4_all_layers",
                                        switch_to_bf16={"at_step": 5, "scope": "fprop"}),
                           num_layers=4)
    nv = get_recipe("nvfp4_all_layers")
    lin = nv.linear
    with pytest.raises(TEUnsupported, match="Microsoft FP4"):
        describe_te_recipe(dataclasses.replace(nv, linear=dataclasses.replace(
            lin, msfp4=MsFp4Options(dge=True))), num_layers=4)
    one_sr = dataclasses.replace(lin, wgrad=Wgrad(
        grad_output=TensorQuant(format="nvfp4", rht=True), input=lin.wgrad.input))
    with pytest.raises(TEUnsupported, match="both gradient copies"):
        describe_te_recipe(dataclasses.replace(nv, linear=one_sr), num_layers=4)
    mixed = dataclasses.replace(lin, wgrad=Wgrad())
    with pytest.raises(TEUnsupported, match="mixes"):
        describe_te_recipe(dataclasses.replace(nv, linear=mixed), num_layers=4)


def test_build_te_recipe_without_te_is_a_clear_error():
    d = describe_te_recipe(get_recipe("nvfp4"), num_layers=62)
    with pytest.raises(RuntimeError, match="transformer_engine"):
        build_te_recipe(d)
    assert build_te_recipe(describe_te_recipe(get_recipe("bf16"), num_layers=2)) is None


def test_backend_policy():
    nv = get_recipe("nvfp4")
    assert resolve_backend(nv, num_layers=62, caps=BLACKWELL).backend == "te"
    hop = resolve_backend(nv, num_layers=62, caps=HOPPER)
    assert hop.backend == "emulated" and "10.0+" in hop.reason
    assert resolve_backend(get_recipe("fp8_cs"), num_layers=62, caps=HOPPER).backend == "te"
    assert resolve_backend(get_recipe("mxfp4"), num_layers=62, caps=BLACKWELL).backend == \
        "emulated"
    assert resolve_backend(nv, num_layers=62, caps=CPU).backend == "emulated"
    with pytest.raises(ValueError, match="compute capability 10.0"):
        resolve_backend(build_recipe("nvfp4", backend="te"), num_layers=62, caps=HOPPER)
    with pytest.raises(ValueError, match="Transformer Engine is unavailable"):
        resolve_backend(build_recipe("fp8_cs", backend="te"), num_layers=62, caps=CPU)
    with pytest.raises(ValueError, match="cannot express"):
        resolve_backend(build_recipe("mxfp4", backend="te"), num_layers=62, caps=BLACKWELL)
    em = resolve_backend(build_recipe("nvfp4", backend="emulated"), num_layers=62, caps=BLACKWELL)
    assert em.backend == "emulated"
    # this machine: no GPU, no TE -> auto emulates
    assert resolve_backend(nv, num_layers=62).backend == "emulated"
