"""Layout validation and rank -> group tables (nvfp4_megatron.parallel.layout).

The group tables are checked against Megatron-Core's own ``RankGenerator`` (an independent
implementation of the "tp-cp-ep-dp-pp" ordering), so a wrong stride or order fails here.
"""

import pytest
from megatron.core.parallel_state import RankGenerator

from nvfp4_megatron.parallel.layout import (LayoutError, LocalMambaRules, is_partition, make_layout,
                                            mamba_proj_shards, rank_coordinates, rank_groups,
                                            split_hybrid_pattern)
from nvfp4_megatron.parallel.model_stats import ModelShape


def ModelDims(**kw):
    """A ModelShape with the fields the layout rules do not read filled in (ffn_hidden_size
    None: no FFN divisibility rule)."""
    return ModelShape(**{"hidden_size": 64, "ffn_hidden_size": None, "kv_channels": 16,
                         "vocab_size": 128, **kw})


MIXTRAL = ModelDims(num_layers=56, num_attention_heads=48, num_query_groups=8, ffn_hidden_size=16384,
                    num_moe_experts=8, moe_ffn_hidden_size=16384, seq_length=4096)
DENSE = ModelDims(num_layers=32, num_attention_heads=32, num_query_groups=8, ffn_hidden_size=14336,
                  seq_length=8192)


def _sorted(groups):
    return sorted(sorted(g) for g in groups)


def test_mixtral_folding_layout_at_128():
    lay = make_layout(world_size=128, tp=2, cp=1, pp=8, ep=8, etp=1, sequence_parallel=True,
                      global_batch_size=256, model=MIXTRAL)
    assert (lay.tp, lay.cp, lay.dp, lay.pp) == (2, 1, 8, 8)
    assert (lay.etp, lay.ep, lay.edp) == (1, 8, 2)
    assert lay.num_microbatches == 32


@pytest.mark.parametrize(
    "world,tp,cp,pp,ep,etp",
    [(128, 2, 1, 8, 8, 1), (128, 2, 1, 8, 4, 2), (64, 2, 1, 4, 4, 1), (16, 2, 2, 2, 4, 1),
     (32, 4, 2, 1, 8, 1), (24, 2, 3, 2, 2, 3)],
)
def test_groups_match_megatron_rank_generator(world, tp, cp, pp, ep, etp):
    model = ModelDims(num_layers=8, num_attention_heads=12, num_query_groups=12,
                      ffn_hidden_size=96, num_moe_experts=8, moe_ffn_hidden_size=96, seq_length=48)
    lay = make_layout(world_size=world, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp,
                      sequence_parallel=tp > 1, global_batch_size=world, model=model)
    ours = rank_groups(lay)
    dense = RankGenerator(tp=tp, ep=1, dp=lay.dp, pp=pp, cp=cp, order="tp-cp-ep-dp-pp")
    expert = RankGenerator(tp=etp, ep=ep, dp=lay.edp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    for name, token in (("tp", "tp"), ("cp", "cp"), ("dp", "dp"), ("pp", "pp"),
                        ("dp_cp", "dp-cp"), ("tp_cp", "tp-cp"), ("mp", "tp-pp")):
        assert ours[name] == _sorted(dense.get_ranks(token)), name
    for name, token in (("etp", "tp"), ("ep", "ep"), ("edp", "dp"), ("etp_ep", "tp-ep")):
        assert ours[name] == _sorted(expert.get_ranks(token)), name
    for groups in ours.values():
        assert is_partition(groups, world)


def test_rank_coordinates_folding_example():
    lay = make_layout(world_size=16, tp=2, cp=1, pp=2, ep=4, etp=1, sequence_parallel=True,
                      global_batch_size=8, model=ModelDims(num_layers=4, num_attention_heads=4,
                      num_query_groups=2, num_moe_experts=4, moe_ffn_hidden_size=8, seq_length=8))
    # rank 13 = tp 1 + 2*(dp 2 + 4*pp 1); expert view: ep 13%8=5 -> etp 0, ep 5%4=1, edp 1, pp 1
    assert rank_coordinates(lay, 13) == {"tp": 1, "cp": 0, "dp": 2, "pp": 1,
                                         "etp": 0, "ep": 1, "edp": 1}
    with pytest.raises(ValueError, match="rank=16 outside world_size=16"):
        rank_coordinates(lay, 16)


def test_world_that_does_not_fit_names_every_size():
    with pytest.raises(LayoutError) as exc:
        make_layout(world_size=100, tp=2, cp=1, pp=8, ep=8, etp=1, sequence_parallel=True,
                    global_batch_size=256, model=MIXTRAL)
    msg = str(exc.value)
    assert "TP=2 x CP=1 x PP=8 = 16 does not divide world_size=100" in msg
    assert "ETP=1 x EP=8 x PP=8 = 64 does not divide world_size=100" in msg
    assert "world=100 TP=2 CP=1 PP=8 EP=8 ETP=1" in msg


def test_collects_all_model_divisibility_problems():
    model = ModelDims(num_layers=30, num_attention_heads=12, num_query_groups=6,
                      ffn_hidden_size=1004, num_moe_experts=6, moe_ffn_hidden_size=100,
                      seq_length=102)
    with pytest.raises(LayoutError) as exc:
        make_layout(world_size=64, tp=8, cp=2, pp=4, ep=4, etp=8, sequence_parallel=False,
                    global_batch_size=10, model=model)
    p = exc.value.problems
    joined = "\n".join(p)
    for needle in ("num_attention_heads=12 not divisible by TP=8",
                   "num_query_groups=6 not divisible by TP=8",
                   "ffn_hidden_size=1004 not divisible by TP=8",
                   "num_layers=30 not divisible by PP=4",
                   "num_moe_experts=6 not divisible by EP=4",
                   "moe_ffn_hidden_size=100 not divisible by ETP=8",
                   "MoE with TP=8 > 1 requires sequence_parallel=true",
                   "seq_length=102 not divisible by 2 x CP=2 = 4",
                   "ETP=8 x EP=4 x PP=4 = 128 does not divide world_size=64"):
        assert needle in joined, needle
    assert len(p) == 9
    with pytest.raises(LayoutError, match="global_batch_size=10 not divisible by micro_batch_size=1 x DP=4 = 4"):
        make_layout(world_size=8, tp=2, global_batch_size=10, model=DENSE)


def test_dense_rules():
    with pytest.raises(LayoutError, match="EP=2 > 1 but the model has no experts"):
        make_layout(world_size=8, ep=2, global_batch_size=8, model=DENSE)
    with pytest.raises(LayoutError, match="sequence_parallel=true needs TP > 1"):
        make_layout(world_size=8, sequence_parallel=True, global_batch_size=8, model=DENSE)
    with pytest.raises(LayoutError, match=r"micro_batch_size=0 must be a positive integer"):
        make_layout(world_size=8, micro_batch_size=0, global_batch_size=8, model=DENSE)
    lay = make_layout(world_size=8, tp=2, global_batch_size=8, model=DENSE)
    assert (lay.dp, lay.etp, lay.edp) == (4, 2, 4)


def test_hybrid_pattern_across_pipeline():
    pat = "M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-"
    assert [len(s) for s in split_hybrid_pattern(pat, 2)] == [31, 31]
    with pytest.raises(ValueError, match="62 layers, not divisible by pipeline_model_parallel_size=4"):
        split_hybrid_pattern(pat, 4)
    assert split_hybrid_pattern("M-*|M-|-M*", 3) == ["M-*", "M-", "-M*"]
    with pytest.raises(ValueError, match="2 '\\|'-separated stages"):
        split_hybrid_pattern("M-*|M-", 4)
    with pytest.raises(ValueError, match=r"unknown symbols \['X'\]"):
        split_hybrid_pattern("MX", 1)
    model = ModelDims(num_layers=62, num_attention_heads=40, num_query_groups=8,
                      ffn_hidden_size=20480, seq_length=8192, hybrid_override_pattern=pat,
                      mamba_num_heads=128, mamba_num_groups=8)
    with pytest.raises(LayoutError, match="not divisible by pipeline_model_parallel_size=4"):
        make_layout(world_size=1024, tp=8, cp=2, pp=4, sequence_parallel=True,
                    global_batch_size=736, model=model)
    with pytest.raises(LayoutError, match="mamba_num_groups=8 not divisible by TP=16"):
        make_layout(world_size=1024, tp=16, pp=2, sequence_parallel=True,
                    global_batch_size=1024, model=model)


def _hybrid(**kw):
    base = dict(num_layers=4, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=256,
                seq_length=64, hybrid_override_pattern="M-*-", mamba_num_heads=32,
                mamba_num_groups=2, hidden_size=64, mamba_head_dim=4, mamba_state_dim=16)
    return ModelDims(**{**base, **kw})


def test_mamba_projection_shards_per_tp_rank():
    # in_proj packs [z, x, B, C, dt]: 2 x 128 + 2 x 2 x 16 + 32 = 352 rows, split over TP
    assert mamba_proj_shards(_hybrid(), 1) == {"in_proj": (352, 64), "out_proj": (64, 128)}
    assert mamba_proj_shards(_hybrid(), 2) == {"in_proj": (176, 64), "out_proj": (64, 64)}
    pat = "M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-"
    m12 = _hybrid(num_layers=62, hybrid_override_pattern=pat, mamba_num_heads=128,
                  mamba_num_groups=8, hidden_size=5120, mamba_head_dim=80, mamba_state_dim=128)
    assert mamba_proj_shards(m12, 8) == {"in_proj": (2832, 5120), "out_proj": (5120, 1280)}


def test_local_mamba_rules_blocks_and_context_parallel():
    nv = LocalMambaRules(recipe="nvfp4", weight_multiples=(16, 16))
    mx = LocalMambaRules(recipe="mxfp4", weight_multiples=(32, 32))
    lay = make_layout(world_size=2, tp=2, global_batch_size=2, model=_hybrid(), local_mamba=nv)
    assert lay.tp == 2
    # 24 heads x 4: in_proj rows 2 x 96 + 64 + 24 = 280 (17.5 blocks of 16); out_proj columns 96
    bad = _hybrid(mamba_num_heads=24)
    with pytest.raises(LayoutError, match=r"Mamba in_proj shard \[280, 64\] per TP rank .*rows "
                                          r"280 is not a multiple of 16"):
        make_layout(world_size=1, global_batch_size=1, model=bad, local_mamba=nv)
    # the same model is not refused where the local mixer does not run (TE + mamba_ssm) ...
    make_layout(world_size=1, global_batch_size=1, model=bad)
    # ... or when every Mamba block stays in BF16
    make_layout(world_size=1, global_batch_size=1, model=bad,
                local_mamba=LocalMambaRules(recipe="nvfp4", weight_multiples=None))
    # MX blocks are 32: TP2 halves 352 rows to 176 (5.5 blocks), out_proj 64 columns is fine
    with pytest.raises(LayoutError) as err:
        make_layout(world_size=2, tp=2, global_batch_size=2, model=_hybrid(), local_mamba=mx)
    assert "rows 176 is not a multiple of 32" in str(err.value)
    assert "out_proj" not in str(err.value)
    with pytest.raises(LayoutError, match=r"CP=2 > 1 with Mamba layers: the local Mamba mixer"):
        make_layout(world_size=2, cp=2, global_batch_size=2, model=_hybrid(), local_mamba=nv)
    make_layout(world_size=2, cp=2, global_batch_size=2, model=_hybrid())  # Megatron's mixer
    # a model without Mamba blocks has no such rules
    make_layout(world_size=2, cp=2, global_batch_size=2, local_mamba=nv,
                model=_hybrid(hybrid_override_pattern="*-*-", mamba_num_heads=24))
    with pytest.raises(LayoutError,
                       match="mamba_num_heads=24 not a multiple of mamba_num_groups=5"):
        make_layout(world_size=1, global_batch_size=1, model=_hybrid(mamba_num_heads=24,
                                                                     mamba_num_groups=5))
