import dataclasses

import pytest
import torch

from nvfp4_megatron.quant import state as qstate
from nvfp4_megatron.quant.recipe import (
    Dgrad, Fprop, LayerPolicy, LinearRecipe, MsFp4Options, PrecisionRecipe, PrecisionSchedule,
    TensorQuant, Wgrad, bf16_block_set, switch_scope, with_fprop_bf16)
from nvfp4_megatron.quant.registry import apply_overrides, build_recipe, get_recipe, list_recipes

NV = TensorQuant(format="nvfp4")


def test_tensor_quant_defaults_and_validation():
    assert NV.tile == (1, 16)
    assert TensorQuant(format="mxfp8").tile == (1, 32)
    assert TensorQuant(format="fp8").tile is None
    with pytest.raises(ValueError, match="tile"):
        TensorQuant(format="nvfp4", tile=(1, 32))
    with pytest.raises(ValueError, match="rht"):
        TensorQuant(format="mxfp8", rht=True)
    with pytest.raises(ValueError, match="stochastic_rounding"):
        TensorQuant(format="fp8", stochastic_rounding=True)
    with pytest.raises(ValueError, match="format"):
        TensorQuant(format="int8")
    with pytest.raises(ValueError, match="fp8_dtype"):
        TensorQuant(format="fp8", fp8_dtype="e3m4")
    with pytest.raises(TypeError):
        TensorQuant("nvfp4")  # keyword-only
    with pytest.raises(dataclasses.FrozenInstanceError):
        NV.rht = True


def test_gemm_operands_must_agree():
    with pytest.raises(ValueError, match="both be bf16 or both quantized"):
        Fprop(input=NV)
    with pytest.raises(ValueError, match="same scaling family"):
        Fprop(input=NV, weight=TensorQuant(format="fp8"))
    with pytest.raises(ValueError, match="rht must be the same"):
        Wgrad(grad_output=TensorQuant(format="nvfp4", rht=True), input=NV)
    with pytest.raises(ValueError, match="gradient operands only"):
        Fprop(input=NV, weight=TensorQuant(format="nvfp4", stochastic_rounding=True))
    Dgrad(grad_output=TensorQuant(format="fp8", fp8_dtype="e5m2"),
          weight=TensorQuant(format="fp8"))  # hybrid FP8 is fine


def test_layer_policy_selection():
    assert bf16_block_set(LayerPolicy(bf16_first_blocks=2, bf16_last_blocks=8), 62) == \
        frozenset([0, 1, *range(54, 62)])
    assert bf16_block_set(LayerPolicy(bf16_blocks=(5, 3)), 6) == frozenset([3, 5])
    assert bf16_block_set(LayerPolicy(), 4) == frozenset()
    with pytest.raises(ValueError, match="match no block"):
        bf16_block_set(LayerPolicy(bf16_blocks=(4,)), 4)
    with pytest.raises(ValueError, match="exceeds"):
        bf16_block_set(LayerPolicy(bf16_first_blocks=2, bf16_last_blocks=8), 4)
    with pytest.raises(ValueError, match="twice"):
        LayerPolicy(bf16_blocks=(1, 1))
    with pytest.raises(ValueError, match=">= 0"):
        LayerPolicy(bf16_first_blocks=-1)


def test_schedule():
    s = PrecisionSchedule(at_tokens=1000, scope="fprop")
    assert switch_scope(s, step=10, tokens=999) is None
    assert switch_scope(s, step=10, tokens=1000) == "fprop"
    s = PrecisionSchedule(at_step=5)
    assert switch_scope(s, step=4, tokens=10**9) is None and switch_scope(s, step=5, tokens=0) == "all"
    with pytest.raises(ValueError, match="not both"):
        PrecisionSchedule(at_step=1, at_tokens=1)
    with pytest.raises(ValueError, match="scope"):
        PrecisionSchedule(at_step=1, scope="wgrad")


def test_registry_contents():
    names = set(list_recipes())
    assert {"bf16", "fp8_cs", "fp8_block", "mxfp8", "nvfp4", "nvfp4_no_rht", "nvfp4_no_sr",
            "nvfp4_no_2d", "nvfp4_all_layers", "mxfp4"} <= names
    with pytest.raises(ValueError, match="known recipes: .*nvfp4"):
        get_recipe("nvfp5")
    nv = get_recipe("nvfp4").linear
    assert nv.fprop.weight.tile == (16, 16) and nv.fprop.weight == nv.dgrad.weight
    assert nv.fprop.input.tile == (1, 16) and not nv.fprop.input.rht
    assert nv.wgrad.input.rht and nv.wgrad.grad_output.rht
    assert nv.dgrad.grad_output.stochastic_rounding and nv.wgrad.grad_output.stochastic_rounding
    assert not nv.dgrad.grad_output.rht and not nv.fprop.weight.stochastic_rounding
    assert not get_recipe("nvfp4_no_rht").linear.wgrad.input.rht
    assert not get_recipe("nvfp4_no_sr").linear.dgrad.grad_output.stochastic_rounding
    assert get_recipe("nvfp4_no_2d").linear.fprop.weight.tile == (1, 16)
    assert bf16_block_set(get_recipe("nvfp4_all_layers").layers, 62) == frozenset()
    cs = get_recipe("fp8_cs")
    assert cs.linear.fprop.input.fp8_dtype == "e4m3" and cs.linear.dgrad.grad_output.fp8_dtype == "e5m2"
    assert bf16_block_set(cs.layers, 10) == frozenset([0, 9])
    blk = get_recipe("fp8_block").linear
    assert blk.fprop.input.tile == (1, 128) and blk.fprop.weight.tile == (128, 128)
    assert blk.wgrad.grad_output.tile == (1, 128)
    mx = get_recipe("mxfp8").linear
    assert all(t.format == "mxfp8" and t.fp8_dtype == "e4m3" for t in mx.operands().values())
    assert not get_recipe("bf16").is_quantized


def test_overrides():
    r = build_recipe("nvfp4", bf16_first_blocks=0, bf16_last_blocks=4,
                     switch_to_bf16={"at_tokens": 100, "scope": "fprop"}, backend="emulated")
    assert (r.layers.bf16_first_blocks, r.layers.bf16_last_blocks) == (0, 4)
    assert r.schedule == PrecisionSchedule(at_tokens=100, scope="fprop")
    assert r.backend == "emulated"
    assert get_recipe("nvfp4").layers.bf16_first_blocks == 2  # registry untouched
    r = apply_overrides(get_recipe("mxfp8"), bf16_blocks=[3, 1])
    assert r.layers.bf16_blocks == (1, 3)
    with pytest.raises(ValueError, match="unknown precision override"):
        apply_overrides(get_recipe("bf16"), bf16_frist_blocks=1)
    with pytest.raises(ValueError, match="backend"):
        apply_overrides(get_recipe("bf16"), backend="cuda")
    with pytest.raises(ValueError, match="unknown key"):
        apply_overrides(get_recipe("bf16"), switch_to_bf16={"at": 3})
    with pytest.raises(ValueError, match="integer"):
        apply_overrides(get_recipe("bf16"), bf16_last_blocks="4")


def test_with_fprop_bf16_and_msfp4():
    nv = get_recipe("nvfp4").linear
    f = with_fprop_bf16(nv)
    assert not f.fprop.input.is_quantized and f.dgrad == nv.dgrad and f.wgrad == nv.wgrad
    with pytest.raises(ValueError, match="dge=True"):
        MsFp4Options()
    with pytest.raises(ValueError, match="FP4 Fprop"):
        LinearRecipe(msfp4=MsFp4Options(dge=True))
    with pytest.raises(ValueError, match="backend"):
        PrecisionRecipe(name="x", backend="fast")


def test_sr_seeds_reproduce_on_resume():
    qstate.reset_state()
    qstate.set_run_seed(7)
    qstate.set_step(3)
    a = [qstate.sr_seed("1.fc1", "dgrad.grad_output", rank=0) for _ in range(2)]
    b = qstate.sr_seed("1.fc1", "wgrad.grad_output", rank=0)
    c = qstate.sr_seed("1.fc1", "dgrad.grad_output", rank=1)
    # "resume": a fresh process state at the same step reproduces the same sequence
    qstate.reset_state()
    qstate.set_run_seed(7)
    qstate.set_step(3)
    assert [qstate.sr_seed("1.fc1", "dgrad.grad_output", rank=0) for _ in range(2)] == a
    assert a[0] != a[1] and len({a[0], b, c}) == 3
    qstate.set_step(4)
    assert qstate.sr_seed("1.fc1", "dgrad.grad_output", rank=0) not in a
    with pytest.raises(ValueError):
        qstate.set_bf16_switch("wgrad")
    qstate.reset_state()


def test_forward_only_and_backward_only_nvfp4():
    """Quartet-II's arms: nvfp4 on Fprop only / on Dgrad+Wgrad only, the other GEMMs BF16, and the
    precision table says so GEMM by GEMM."""
    from nvfp4_megatron.mcore.policy import _rows_for

    nv = get_recipe("nvfp4")
    fwd, bwd = get_recipe("nvfp4_fwd_only"), get_recipe("nvfp4_bwd_only")
    assert fwd.linear.fprop == nv.linear.fprop
    assert not fwd.linear.dgrad.grad_output.is_quantized and not fwd.linear.wgrad.input.is_quantized
    assert not bwd.linear.fprop.input.is_quantized and not bwd.linear.fprop.weight.is_quantized
    assert bwd.linear.dgrad == nv.linear.dgrad and bwd.linear.wgrad == nv.linear.wgrad
    assert fwd.layers == bwd.layers == nv.layers
    assert bwd.linear == with_fprop_bf16(nv.linear)  # the fprop-scope switch, from step 0
    cpu = torch.device("cpu")
    rows = {r.gemm: r for r in _rows_for(3, "mlp.linear_fc1", fwd.linear, cpu)}
    assert rows["fprop"].quantized and rows["fprop"].operand_b == "weight: nvfp4 16x16"
    assert rows["dgrad"].backend == rows["wgrad"].backend == "bf16"
    assert rows["wgrad"].operand_a == "grad_output: bf16"
    rows = {r.gemm: r for r in _rows_for(3, "mlp.linear_fc1", bwd.linear, cpu)}
    assert rows["fprop"].backend == "bf16" and not rows["fprop"].quantized
    assert rows["dgrad"].quantized and rows["dgrad"].operand_a == "grad_output: nvfp4 1x16 SR"
    assert rows["wgrad"].operand_b == "input: nvfp4 1x16 RHT"


def test_weight_multiples_follow_each_operands_tile():
    from nvfp4_megatron.quant.registry import get_recipe

    assert get_recipe("nvfp4").linear.weight_multiples() == (16, 16)
    assert get_recipe("nvfp4_no_2d").linear.weight_multiples() == (16, 16)  # Dgrad: along out
    assert get_recipe("mxfp8").linear.weight_multiples() == (32, 32)
    assert get_recipe("fp8_block").linear.weight_multiples() == (128, 128)
    for name in ("bf16", "fp8_cs", "msfp4"):  # no blocks (per-tensor / per-row scales)
        assert get_recipe(name).linear.weight_multiples() == (1, 1), name
    # Fprop only (input (1, 16), weight (1, 16)): the reduction dim `in` only
    fprop_only = LinearRecipe(fprop=Fprop(input=TensorQuant(format="nvfp4"),
                                          weight=TensorQuant(format="nvfp4")))
    assert fprop_only.weight_multiples() == (1, 16)
    # a 2D weight tile in Fprop adds the rows
    fprop_2d = LinearRecipe(fprop=Fprop(input=TensorQuant(format="nvfp4"),
                                        weight=TensorQuant(format="nvfp4", tile=(16, 16))))
    assert fprop_2d.weight_multiples() == (16, 16)


def test_policy_refuses_a_weight_shard_that_is_not_whole_blocks():
    import torch

    from nvfp4_megatron.mcore.policy import check_weight_blocks
    from nvfp4_megatron.quant.registry import get_recipe

    lin = torch.nn.Linear(64, 280, bias=False)  # weight [280, 64]
    nv = get_recipe("nvfp4").linear
    with pytest.raises(ValueError, match=r"3\.mixer\.in_proj: this tensor-parallel rank's weight "
                                         r"shard is \[280, 64\] .*multiples of \[16, 16\]: "
                                         r"out_features=280 is not a multiple of 16\. Change"):
        check_weight_blocks(lin, nv, layer_key="3.mixer.in_proj", recipe_name="nvfp4")
    lin.shard_hint = "Mamba in_proj rows per TP rank = ..."
    with pytest.raises(ValueError, match=r"multiple of 16\. Mamba in_proj rows per TP rank"):
        check_weight_blocks(lin, nv, layer_key="3.mixer.in_proj", recipe_name="nvfp4")
    check_weight_blocks(lin, get_recipe("bf16").linear, layer_key="k", recipe_name="bf16")
    check_weight_blocks(torch.nn.Linear(64, 288), nv, layer_key="k", recipe_name="nvfp4")
