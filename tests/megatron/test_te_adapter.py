"""TE adapter: recipe -> TE fields + Megatron config fields, and the backend policy.

Pure mapping; nothing here imports Transformer Engine, and nothing depends on whether it is
installed (``no_te`` hides it where a test needs it absent). The fake-TE tests of the wiring, per
TE release, are in test_te_wiring.py.
"""

import dataclasses
import sys

import pytest

from nvfp4_megatron.mcore.backend import DeviceCaps, resolve_backend
from nvfp4_megatron.mcore.te_adapter import (TEField, TEFormat, TEMMParams, TEUnsupported,
                                                build_te_recipe, describe_te_recipe)
from nvfp4_megatron.quant.recipe import MsFp4Options, TensorQuant, Wgrad
from nvfp4_megatron.quant.registry import build_recipe, get_recipe

OK = (True, "")
ALL_SUPPORTED = {c: OK for c in ("NVFP4BlockScaling", "MXFP8BlockScaling", "Float8BlockScaling",
                                  "Float8CurrentScaling")}
BLACKWELL = DeviceCaps(te_available=True, te_version="2.9.0", compute_capability=(10, 0),
                       te_support=ALL_SUPPORTED)
HOPPER = DeviceCaps(te_available=True, te_version="2.9.0", compute_capability=(9, 0),
                    te_support={**ALL_SUPPORTED, "NVFP4BlockScaling": (
                        False, "Device compute capability 10.0 or higher required for NVFP4 "
                               "execution."),
                        "MXFP8BlockScaling": (False, "Device compute capability 10.0 or higher "
                                                     "required for MXFP8 execution.")})
CPU = DeviceCaps(te_available=False, te_error="no CUDA GPU")


@pytest.fixture
def no_te(monkeypatch):
    """Transformer Engine made unimportable, whatever this machine has installed."""
    for name in [n for n in sys.modules if n == "transformer_engine"
                 or n.startswith("transformer_engine.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformer_engine", None)


def _values(desc):
    return {k: f.value for k, f in desc["te_fields"].items()}


def test_nvfp4_family_sets_every_field():
    d = describe_te_recipe(get_recipe("nvfp4"), num_layers=62)
    assert d["te_class"] == "NVFP4BlockScaling"
    assert _values(d) == {
        "disable_rht": False, "disable_stochastic_rounding": False,
        "disable_2d_quantization": False, "row_scaled_activation": False,
        "nvfp4_4over6": "none", "nvfp4_4over6_e4m3_use_256": "none",
        "nvfp4_4over6_err_mode": "MAE", "fp4_format": TEFormat("E2M1"),
        "fp8_format": TEFormat("E4M3"), "fp8_dpa": False, "fp8_mha": False,
        "backward_override": None}
    # fields present since TE 2.8 are required; later ones carry the release that added them
    since = {k: f.since for k, f in d["te_fields"].items()}
    assert since["disable_rht"] == (2, 8) and since["backward_override"] == (2, 15)
    assert since["row_scaled_activation"] == (2, 16) and since["nvfp4_4over6"] == (2, 17)
    assert d["te_expect"]["fp4_quant_bwd_grad.stochastic_rounding"] is True
    assert d["te_expect"]["fp4_quant_fwd_weight.fp4_2d_quantization"] is True
    assert d["megatron_config"] == {
        "fp8": None, "fp4": "e2m1", "fp4_recipe": "nvfp4", "fp8_param": False,
        "fp4_param": False, "fp8_dot_product_attention": False,
        "fp8_multi_head_attention": False, "first_last_layers_bf16": True,
        "num_layers_at_start_in_bf16": 2, "num_layers_at_end_in_bf16": 8,
        "moe_router_padding_for_quantization": False}
    for name, key in (("nvfp4_no_rht", "disable_rht"),
                      ("nvfp4_no_sr", "disable_stochastic_rounding"),
                      ("nvfp4_no_2d", "disable_2d_quantization")):
        v = _values(describe_te_recipe(get_recipe(name), num_layers=62))
        flags = {k: v[k] for k in ("disable_rht", "disable_stochastic_rounding",
                                   "disable_2d_quantization")}
        assert flags[key] is True and sum(flags.values()) == 1, name
    d = describe_te_recipe(get_recipe("nvfp4_all_layers"), num_layers=4)
    assert d["megatron_config"]["first_last_layers_bf16"] is False
    assert d["megatron_config"]["num_layers_at_start_in_bf16"] == 0


def test_fp8_and_mx_mappings():
    cs = describe_te_recipe(get_recipe("fp8_cs"), num_layers=32)
    assert cs["te_class"] == "Float8CurrentScaling"
    assert _values(cs) == {
        "use_power_2_scales": False, "fp8_format": TEFormat("HYBRID"),
        "fp8_gemm_fprop": TEMMParams(True), "fp8_gemm_dgrad": TEMMParams(True),
        "fp8_gemm_wgrad": TEMMParams(True), "fp8_dpa": False, "fp8_mha": False,
        "backward_override": None}
    assert cs["env_hint"] == "NVTE_FP8_CURRENT_SCALING_POWER_2_SCALES"
    assert {k: cs["megatron_config"][k] for k in ("fp8", "fp8_recipe", "fp4",
                                                  "num_layers_at_start_in_bf16",
                                                  "num_layers_at_end_in_bf16")} == {
        "fp8": "hybrid", "fp8_recipe": "tensorwise", "fp4": None,
        "num_layers_at_start_in_bf16": 1, "num_layers_at_end_in_bf16": 1}
    mx = describe_te_recipe(get_recipe("mxfp8"), num_layers=32)
    assert mx["te_class"] == "MXFP8BlockScaling"
    assert _values(mx) == {"margin": 0, "fp8_format": TEFormat("E4M3"), "fp8_dpa": False,
                           "fp8_mha": False, "backward_override": None}
    assert (mx["megatron_config"]["fp8"], mx["megatron_config"]["fp8_recipe"]) == ("e4m3",
                                                                                    "mxfp8")
    blk = describe_te_recipe(get_recipe("fp8_block"), num_layers=32)
    assert blk["te_class"] == "Float8BlockScaling"
    v = _values(blk)
    assert (v["use_f32_scales"], v["x_block_scaling_dim"], v["w_block_scaling_dim"],
            v["grad_block_scaling_dim"]) == (False, 1, 2, 1)
    assert blk["megatron_config"]["fp8_recipe"] == "blockwise"
    bf = describe_te_recipe(get_recipe("bf16"), num_layers=4)
    assert bf["te_class"] is None and bf["te_fields"] == {}
    assert (bf["megatron_config"]["fp8"], bf["megatron_config"]["fp4"]) == (None, None)


def test_moe_router_padding_follows_the_dispatcher():
    def pad(recipe, dispatcher, experts=8):
        return describe_te_recipe(get_recipe(recipe), num_layers=4, num_moe_experts=experts,
                                  moe_token_dispatcher_type=dispatcher
                                  )["megatron_config"]["moe_router_padding_for_quantization"]

    assert pad("nvfp4_all_layers", "alltoall") is True
    assert pad("mxfp8", "flex") is True
    # Megatron refuses router padding with allgather; there its experts pad (fp8/fp4 is set)
    assert pad("nvfp4_all_layers", "allgather") is False
    assert pad("nvfp4_all_layers", "alltoall", experts=None) is False
    assert pad("bf16", "alltoall") is False


def test_refusals():
    with pytest.raises(TEUnsupported, match="no mxfp4 recipe"):
        describe_te_recipe(get_recipe("mxfp4"), num_layers=62)
    with pytest.raises(TEUnsupported, match="first-N/last-M"):
        describe_te_recipe(build_recipe("nvfp4", bf16_first_blocks=0, bf16_last_blocks=0,
                                        bf16_blocks=[3]), num_layers=8)
    ok = describe_te_recipe(build_recipe("nvfp4", bf16_first_blocks=0, bf16_last_blocks=0,
                                         bf16_blocks=[0, 7]), num_layers=8)
    assert (ok["megatron_config"]["num_layers_at_start_in_bf16"],
            ok["megatron_config"]["num_layers_at_end_in_bf16"]) == (1, 1)
    with pytest.raises(TEUnsupported, match="scope='fprop'"):
        describe_te_recipe(build_recipe("nvfp4_all_layers",
                                        switch_to_bf16={"at_step": 5, "scope": "fprop"}),
                           num_layers=4)
    nv = get_recipe("nvfp4_all_layers")
    lin = nv.linear
    with pytest.raises(TEUnsupported, match="Microsoft FP4"):
        describe_te_recipe(dataclasses.replace(nv, linear=dataclasses.replace(
            lin, msfp4=MsFp4Options(dge=True))), num_layers=4)

    def with_wgrad(grad_output, inp):
        return dataclasses.replace(nv, linear=dataclasses.replace(
            lin, wgrad=Wgrad(grad_output=grad_output, input=inp)))

    one_sr = with_wgrad(TensorQuant(format="nvfp4", rht=True), lin.wgrad.input)
    with pytest.raises(TEUnsupported, match="both gradient copies"):
        describe_te_recipe(one_sr, num_layers=4)
    mixed = dataclasses.replace(nv, linear=dataclasses.replace(lin, wgrad=Wgrad()))
    with pytest.raises(TEUnsupported, match="mixes"):
        describe_te_recipe(mixed, num_layers=4)


def test_build_te_recipe_without_te_is_a_clear_error(no_te):
    d = describe_te_recipe(get_recipe("nvfp4"), num_layers=62)
    with pytest.raises(RuntimeError, match="transformer_engine does not import"):
        build_te_recipe(d)
    assert build_te_recipe(describe_te_recipe(get_recipe("bf16"), num_layers=2)) is None


def test_auto_never_picks_an_unvalidated_te_path():
    for caps in (BLACKWELL, HOPPER, CPU):
        for name in ("nvfp4", "fp8_cs", "fp8_block", "mxfp8", "bf16", "mxfp4"):
            c = resolve_backend(get_recipe(name), num_layers=62, caps=caps)
            assert c.backend == "emulated" and c.requested == "auto", (name, caps)
    c = resolve_backend(get_recipe("nvfp4"), num_layers=62, caps=BLACKWELL)
    assert "has not been validated on compute capability 10.0" in c.reason
    assert "validated TE paths: none" in c.reason and "backend=te opts in" in c.reason
    assert c.describe().startswith("emulated (precision.backend=auto): ")
    # Hopper FP8-CS / block FP8 and BF16: TE would run them, but they were never validated
    for name in ("fp8_cs", "fp8_block", "bf16"):
        assert "not been validated" in resolve_backend(get_recipe(name), num_layers=62,
                                                       caps=HOPPER).reason
    hop = resolve_backend(get_recipe("nvfp4"), num_layers=62, caps=HOPPER)
    assert "NVFP4 execution" in hop.reason  # TE's own reason, not a hand-written table
    assert "no CUDA GPU" in resolve_backend(get_recipe("nvfp4"), num_layers=62, caps=CPU).reason
    em = resolve_backend(build_recipe("nvfp4", backend="emulated"), num_layers=62, caps=BLACKWELL)
    assert (em.backend, em.requested) == ("emulated", "emulated")


def test_explicit_te_is_refused_with_the_missing_piece():
    with pytest.raises(ValueError, match="10.0 or higher required for NVFP4"):
        resolve_backend(build_recipe("nvfp4", backend="te"), num_layers=62, caps=HOPPER)
    with pytest.raises(ValueError, match="Transformer Engine is unavailable"):
        resolve_backend(build_recipe("fp8_cs", backend="te"), num_layers=62, caps=CPU)
    with pytest.raises(ValueError, match="cannot express"):
        resolve_backend(build_recipe("mxfp4", backend="te"), num_layers=62, caps=BLACKWELL)
    sm120 = dataclasses.replace(BLACKWELL, compute_capability=(12, 0), te_support={
        **ALL_SUPPORTED, "MXFP8BlockScaling": (False, "MXFP8 (for all gemm layouts) is not "
                                                      "supported on 12.0+ architectures yet.")})
    with pytest.raises(ValueError, match="not supported on 12.0"):
        resolve_backend(build_recipe("mxfp8", backend="te"), num_layers=62, caps=sm120)


def test_auto_picks_te_only_where_validated(no_te):
    validated = {("nvfp4", (10, 0)): "test run"}
    # validated, but TE does not import here: the recipe object cannot be built -> emulated
    c = resolve_backend(get_recipe("nvfp4"), num_layers=62, caps=BLACKWELL, validated=validated)
    assert c.backend == "emulated" and "does not import" in c.reason
    other = resolve_backend(get_recipe("nvfp4"), num_layers=62, caps=dataclasses.replace(
        BLACKWELL, compute_capability=(10, 3)), validated=validated)
    assert other.backend == "emulated" and "nvfp4 on 10.0" in other.reason


def test_te_fields_are_complete_descriptions():
    # every field value the builder can translate: plain values, TE formats, MMParams
    for name in ("nvfp4", "fp8_cs", "fp8_block", "mxfp8"):
        for f in describe_te_recipe(get_recipe(name), num_layers=62)["te_fields"].values():
            assert isinstance(f, TEField)
            assert isinstance(f.value, (bool, int, str, type(None), TEFormat, TEMMParams))
