"""Parameter counts, FLOPs and memory (nvfp4_megatron.parallel.model_stats).

Oracles: Megatron-Core's own modules built on the meta device (parameter counts: dense and MoE
GPT, and Mamba hybrids through Megatron's HybridModel with the project's local hybrid spec),
Megatron's ``num_floating_point_operations`` (FLOPs of dense/MoE GPT models), and hand-written
arithmetic for the Mamba-2 layer.
"""

import math

import pytest

from nvfp4_megatron.parallel.layout import make_layout
from nvfp4_megatron.parallel.model_stats import (ModelShape, flops_per_step, layer_params,
                                                 memory_per_gpu, meta_param_count, param_count)

PAT12 = "M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-"

NEMOTRON_12B = ModelShape(
    num_layers=62, hidden_size=5120, ffn_hidden_size=20480, num_attention_heads=40,
    num_query_groups=8, kv_channels=128, vocab_size=131072, seq_length=8192,
    activation="squared_relu", position_embedding_type="none", hybrid_override_pattern=PAT12,
    mamba_num_heads=128, mamba_head_dim=80, mamba_state_dim=128, mamba_num_groups=8,
    mamba_conv_kernel=4, mamba_expand=2)

DENSE_CASES = [
    dict(num_layers=3, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4,
         num_query_groups=2, kv_channels=16, vocab_size=1000, seq_length=32),
    dict(num_layers=2, hidden_size=48, ffn_hidden_size=96, num_attention_heads=6,
         num_query_groups=6, kv_channels=8, vocab_size=300, seq_length=16, activation="gelu",
         normalization="LayerNorm", add_bias_linear=True, position_embedding_type="learned_absolute",
         untie_embeddings_and_output_weights=False),
    dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
         num_query_groups=1, kv_channels=8, vocab_size=100, seq_length=16, add_qkv_bias=True,
         activation="squared_relu"),
]
MOE_CASES = [
    dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
         num_query_groups=2, kv_channels=16, vocab_size=512, seq_length=32, num_moe_experts=4,
         moe_router_topk=2, moe_ffn_hidden_size=96),
    dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
         num_query_groups=4, kv_channels=16, vocab_size=512, seq_length=32, num_moe_experts=8,
         moe_router_topk=3, moe_ffn_hidden_size=32, moe_shared_expert_intermediate_size=80,
         moe_shared_expert_gate=True, add_qkv_bias=True),
]


HYBRID_CASES = [
    dict(num_layers=6, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
         num_query_groups=2, kv_channels=16, vocab_size=300, seq_length=32,
         activation="squared_relu", position_embedding_type="none",
         hybrid_override_pattern="M-*M-M", mamba_num_heads=8, mamba_head_dim=16,
         mamba_state_dim=16, mamba_num_groups=2, mamba_conv_kernel=4, mamba_expand=2),
    # LayerNorm, biases on attention/MLP (Mamba linears never have one), tied embeddings,
    # conv kernel 3, expand 3, pipeline separators
    dict(num_layers=5, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
         num_query_groups=4, kv_channels=8, vocab_size=100, seq_length=16, activation="gelu",
         normalization="LayerNorm", add_bias_linear=True, position_embedding_type="rope",
         untie_embeddings_and_output_weights=False, hybrid_override_pattern="M*|-MM",
         mamba_num_heads=12, mamba_head_dim=8, mamba_state_dim=8, mamba_num_groups=3,
         mamba_conv_kernel=3, mamba_expand=3),
]


@pytest.mark.parametrize("kw", DENSE_CASES + MOE_CASES + HYBRID_CASES)
def test_analytic_count_equals_meta_device_build(kw):
    m = ModelShape(**kw)
    assert param_count(m)["total"] == meta_param_count(m)


def test_nemotron_12b_matches_paper_within_half_percent():
    total = param_count(NEMOTRON_12B)["total"]
    assert abs(total - 12.31e9) / 12.31e9 < 0.005
    # the paper's 12.31B: Megatron's HybridModel built on the meta device agrees exactly
    assert param_count(NEMOTRON_12B)["total"] == meta_param_count(NEMOTRON_12B) == 12_310_001_152


def test_mamba_layer_by_hand():
    h, di, nh, g, n, k = 5120, 10240, 128, 8, 128, 4
    in_proj = h * (2 * di + 2 * g * n + nh)  # z, x, B, C, dt
    conv = (di + 2 * g * n) * k + (di + 2 * g * n)  # depthwise weight + bias
    expect = h + in_proj + conv + 3 * nh + di + di * h  # norm, ..., dt_bias/A_log/D, gated norm, out
    assert layer_params(NEMOTRON_12B, "M").total == expect
    assert layer_params(NEMOTRON_12B, "-").total == h + 2 * h * 20480
    assert layer_params(NEMOTRON_12B, "*").total == h + h * (5120 + 2 * 1024) + 5120 * h


def test_active_params_for_moe():
    m = ModelShape(**MOE_CASES[0])
    c = param_count(m)
    per_expert = 2 * 64 * 96 + 96 * 64
    assert c["total"] - c["active"] == 2 * (4 - 2) * per_expert


class _Args:
    """Megatron args namespace: unknown attributes are None/False."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def __getattr__(self, name):
        return None


def _megatron_flops(m: ModelShape, batch: int) -> float:
    from megatron.training.training import num_floating_point_operations

    args = _Args(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
        group_query_attention=m.num_query_groups != m.num_attention_heads,
        kv_channels=m.kv_channels, seq_length=m.seq_length, padded_vocab_size=m.vocab_size,
        swiglu=m.gated, num_experts=m.num_moe_experts, moe_router_topk=m.moe_router_topk,
        moe_layer_freq=1, moe_ffn_hidden_size=m.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
        multi_latent_attention=False, attention_output_gate=False, hybrid_override_pattern=None,
        hybrid_layer_pattern=None, is_hybrid_model=False,
    )
    return num_floating_point_operations(args, batch)


@pytest.mark.parametrize("kw", [DENSE_CASES[0], MOE_CASES[0], MOE_CASES[1]])
def test_flops_match_megatron_formula(kw):
    m = ModelShape(**kw)
    batch = 4
    ours = flops_per_step(m, batch * m.seq_length, quantized=False)
    router = 0
    if m.num_moe_experts:  # we count the router GEMM (BF16); Megatron's formula does not
        router = 3 * 2 * m.hidden_size * m.num_moe_experts * m.num_layers * batch * m.seq_length
    assert ours.quantized == 0
    assert ours.total - router == pytest.approx(_megatron_flops(m, batch), rel=1e-12)


def test_flops_split_by_bf16_blocks():
    m = ModelShape(**DENSE_CASES[0])
    tokens = 1000
    all_q = flops_per_step(m, tokens)
    none_q = flops_per_step(m, tokens, quantized=False)
    first_bf16 = flops_per_step(m, tokens, bf16_layers={0})
    assert all_q.total == none_q.total == first_bf16.total
    assert first_bf16.quantized == pytest.approx(all_q.quantized * 2 / 3, rel=1e-12)
    h, f, q, kv = 64, 160, 64, 32
    lin_per_layer = 2 * h * (q + 2 * kv) + 2 * q * h + 2 * 2 * h * f + 2 * f * h
    assert all_q.quantized == 3 * tokens * 3 * lin_per_layer


def test_mamba_flops_include_ssd():
    m = NEMOTRON_12B
    f = flops_per_step(m, 1, quantized=False).total / 3
    h, di, nh, p, n, g, qc = 5120, 10240, 128, 80, 128, 8, 128
    mamba = 2 * h * (2 * di + 2 * g * n + nh) + 2 * di * h + nh * (2 * qc * p + 4 * n * p) \
        + g * 2 * qc * n + 2 * 4 * (di + 2 * g * n)
    attn = 2 * h * (5120 + 2048) + 2 * 5120 * h + 2 * 8192 * 5120
    mlp = 2 * 2 * h * 20480
    assert f == 28 * mamba + 6 * attn + 28 * mlp + 2 * h * 131072


def test_memory_distributed_optimizer_shards():
    m = ModelShape(**DENSE_CASES[0])
    lay1 = make_layout(world_size=1, global_batch_size=4, model=m)
    lay4 = make_layout(world_size=4, global_batch_size=4, model=m)
    (s1,) = memory_per_gpu(m, lay1, act_bytes=2.0, weight_bytes=0.0)
    (s4,) = memory_per_gpu(m, lay4, act_bytes=2.0, weight_bytes=0.0)
    total = param_count(m)["total"]
    assert s1.params == s4.params == total
    assert s1.weights_gib * 1024**3 == 2 * total and s1.grads_gib * 1024**3 == 4 * total
    assert s4.optimizer_gib == pytest.approx(s1.optimizer_gib / 4, rel=1e-12)
    assert s1.quantized_weights_gib == 0
    # NVFP4 storage: 4-bit codes + one E4M3 scale per 16 elements, two copies of each weight
    (q,) = memory_per_gpu(m, lay1, act_bytes=0.5625, weight_bytes=0.5625)
    assert q.activations_gib < s1.activations_gib
    assert math.isclose(q.quantized_weights_gib * 1024**3, 2 * 0.5625 * q.breakdown["quantized_params"])


def test_pipeline_stage_params_sum_to_model():
    m = ModelShape(**MOE_CASES[0])
    lay = make_layout(world_size=2, pp=2, global_batch_size=4, model=m)
    stages = memory_per_gpu(m, lay, act_bytes=2.0, weight_bytes=0.0)
    assert sum(s.params for s in stages) == param_count(m)["total"]
    assert stages[0].inflight_microbatches == 2 and stages[1].inflight_microbatches == 1


def test_model_shape_is_the_one_list_of_shape_fields():
    """Every ModelShape field is a cli/schema.ModelConfig field except the planner-only ones, and
    the checkpoint records exactly the fields ModelShape marks (training/model.py)."""
    import dataclasses

    from nvfp4_megatron.cli.schema import ModelConfig
    from nvfp4_megatron.training.model import HYBRID_SHAPE_KEYS, MODEL_SHAPE_KEYS

    schema = {f.name for f in dataclasses.fields(ModelConfig)}
    shape = [f.name for f in dataclasses.fields(ModelShape)]
    planner_only = set(ModelShape.PLANNER_ONLY)
    assert planner_only == {"add_qkv_bias", "moe_shared_expert_gate", "mamba_chunk_size"}
    assert [n for n in shape if n not in schema] == sorted(planner_only, key=shape.index)
    assert MODEL_SHAPE_KEYS == (
        "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
        "kv_channels", "vocab_size", "seq_length", "activation", "normalization",
        "position_embedding_type", "untie_embeddings_and_output_weights", "add_bias_linear",
        "num_moe_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
        "hybrid_override_pattern")
    assert HYBRID_SHAPE_KEYS == ("mamba_num_heads", "mamba_head_dim", "mamba_state_dim",
                                 "mamba_num_groups", "mamba_conv_kernel", "mamba_expand")
