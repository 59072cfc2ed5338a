"""Hybrid-spec pieces that need no process group: pattern rules, TP slicing, backend branch."""

import dataclasses

import pytest
import torch

from nvfp4_megatron.mcore.backend import DeviceCaps, hybrid_stack_spec_for, resolve_backend
from nvfp4_megatron.mcore.hybrid_spec import (LocalHybridStack, check_local_hybrid_pattern,
                                                 quantized_hybrid_stack_spec)
from nvfp4_megatron.mcore.layers import QuantizedColumnParallelLinear, QuantizedRowParallelLinear
from nvfp4_megatron.mcore.mamba_mixer import LocalMambaMixer, tp_block_slices
from nvfp4_megatron.quant.registry import build_recipe
from nvfp4_megatron.training.model import hybrid_layer_pattern, model_shape


def test_local_spec_builds_m_star_dash_and_refuses_other_symbols():
    check_local_hybrid_pattern("M-*M-|M*-")
    for bad in ("M-E*", "MG-", "M+*"):
        with pytest.raises(ValueError, match="does not build"):
            check_local_hybrid_pattern(bad)


def test_spec_wires_quantized_linears_into_the_mamba_mixer():
    spec = quantized_hybrid_stack_spec(d_conv=3, expand=2, chunk_size=64)
    assert spec.module is LocalHybridStack
    mixer = spec.submodules.mamba_layer.submodules.mixer
    assert mixer.module is LocalMambaMixer
    assert mixer.params == {"d_conv": 3, "expand": 2, "chunk_size": 64, "scan_impl": "eager"}
    compiled = quantized_hybrid_stack_spec(scan_impl="compiled").submodules.mamba_layer
    assert compiled.submodules.mixer.params["scan_impl"] == "compiled"
    assert mixer.submodules.in_proj is QuantizedColumnParallelLinear
    assert mixer.submodules.out_proj is QuantizedRowParallelLinear
    attn = spec.submodules.attention_layer.submodules.self_attention.submodules
    assert attn.linear_qkv is QuantizedColumnParallelLinear
    assert attn.linear_proj is QuantizedRowParallelLinear
    mlp = spec.submodules.mlp_layer.submodules.mlp.keywords["submodules"]
    assert mlp.linear_fc1 is QuantizedColumnParallelLinear
    assert mlp.linear_fc2 is QuantizedRowParallelLinear


def test_tp_block_slices_keeps_each_block_whole_per_rank():
    # [z(4) | x(4) | B(2) | C(2) | dt(2)] rows over TP2: rank r gets its half of every block
    t = torch.arange(14)
    sizes = [4, 4, 2, 2, 2]
    assert tp_block_slices(t, sizes, 2, 0).tolist() == [0, 1, 4, 5, 8, 10, 12]
    assert tp_block_slices(t, sizes, 2, 1).tolist() == [2, 3, 6, 7, 9, 11, 13]
    assert torch.equal(tp_block_slices(t, sizes, 1, 0), t)


def test_pipeline_boundaries_written_into_the_pattern():
    m = {"hybrid_override_pattern": "M-*M-*M-", "num_layers": 8}
    assert hybrid_layer_pattern(m, 1) == "M-*M-*M-"
    assert hybrid_layer_pattern(m, 2) == "M-*M|-*M-"
    assert hybrid_layer_pattern({**m, "hybrid_override_pattern": "M-*|M-*M-"}, 2) == "M-*|M-*M-"
    with pytest.raises(ValueError, match="num_layers=7"):
        hybrid_layer_pattern({**m, "num_layers": 7}, 1)


def test_checkpoint_model_shape_records_mamba_fields_only_for_hybrids():
    from nvfp4_megatron.cli.compose import compose_config, to_plain

    hyb = model_shape(to_plain(compose_config(["+recipe=nvfp4_hybrid_tiny"])))
    gpt = model_shape(to_plain(compose_config(["+recipe=nvfp4_tiny"])))
    assert hyb["mamba_num_heads"] == 32 and hyb["hybrid_override_pattern"] == "M-*M-M*-"
    assert not any(k.startswith("mamba_") for k in gpt)


def test_te_branch_is_megatrons_hybrid_spec_and_needs_mamba_ssm():
    from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec

    no_te = DeviceCaps(te_available=False, te_error="no CUDA GPU")
    auto = resolve_backend(build_recipe("nvfp4"), num_layers=62, caps=no_te, hybrid=True)
    assert auto.backend == "emulated" and "mamba_ssm" in auto.reason
    with pytest.raises(ValueError, match="mamba_ssm"):
        resolve_backend(build_recipe("nvfp4", backend="te"), num_layers=62, caps=no_te,
                        hybrid=True)
    te = dataclasses.replace(auto, backend="te")
    assert hybrid_stack_spec_for(te) is hybrid_stack_spec
    assert hybrid_stack_spec_for(auto).module is LocalHybridStack


def test_training_loop_applies_the_local_mixer_rules_before_megatron_starts():
    """The loop's layout check (``run_layout`` before Megatron initialises) knows whether the
    local Mamba mixer will run (here: no TE / mamba_ssm, so it will) and refuses CP > 1."""
    from nvfp4_megatron.cli.compose import compose_config, to_plain
    from nvfp4_megatron.parallel.layout import LayoutError
    from nvfp4_megatron.parallel.planner import run_layout
    from nvfp4_megatron.training.loop import local_mamba_runs

    c = to_plain(compose_config(["+recipe=nvfp4_hybrid_tiny", "parallel.context_parallel_size=2"]))
    assert local_mamba_runs(c)
    with pytest.raises(LayoutError, match="CP=2 > 1 with Mamba layers"):
        run_layout(c, 2, local_mamba=local_mamba_runs(c))
    assert not local_mamba_runs(to_plain(compose_config(["+recipe=nvfp4_tiny"])))
    attn_only = to_plain(compose_config(["+recipe=nvfp4_hybrid_tiny", "model.num_layers=4",
                                         "model.hybrid_override_pattern=*-*-"]))
    assert not local_mamba_runs(attn_only)
