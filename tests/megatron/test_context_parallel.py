"""Context parallelism for the local spec: chunking helpers, CP attention, CP2 vs CP1 training.

The fast tests check the load-balanced chunk bookkeeping exactly. The slow ones launch
``cp_worker.py`` on two gloo processes: the CP attention against full-sequence SDPA (forward and
dQ/dK/dV, FP64), and a tiny RoPE GPT trained at CP=2 against CP=1 on the same data.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nvfp4_megatron.mcore.context_parallel import (
    _global_order,
    cp_chunk_ids,
    cp_positions,
    get_batch_on_this_cp_rank,
)

WORKER = Path(__file__).with_name("cp_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def test_chunk_ids_and_positions():
    assert [cp_chunk_ids(2, r) for r in range(2)] == [(0, 3), (1, 2)]
    assert [cp_chunk_ids(4, r) for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    assert cp_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert cp_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    # every position exactly once over the CP group
    allpos = torch.cat([cp_positions(48, 3, r) for r in range(3)])
    assert sorted(allpos.tolist()) == list(range(48))
    assert cp_positions(6, 1, 0).tolist() == list(range(6))


def test_batch_split_follows_the_positions():
    s = 16
    tokens = torch.arange(2 * s).view(2, s) + 100
    batch = {"tokens": tokens, "labels": tokens + 1, "loss_mask": torch.ones(2, s),
             "position_ids": torch.arange(s).expand(2, s), "extra": None}
    for r in range(2):
        part = get_batch_on_this_cp_rank(batch, cp_size=2, cp_rank=r)
        pos = cp_positions(s, 2, r)
        assert torch.equal(part["position_ids"][0], pos)
        assert torch.equal(part["tokens"], tokens[:, pos])
        assert torch.equal(part["labels"], tokens[:, pos] + 1)
        assert part["extra"] is None
    # seq_dim other than 1 (q/k/v are [b, heads, s, d])
    x = torch.randn(2, 3, s, 4)
    assert torch.equal(get_batch_on_this_cp_rank({"x": x}, cp_size=2, cp_rank=1, seq_dim=2)["x"],
                       x[:, :, cp_positions(s, 2, 1)])


def test_global_order_inverts_the_split():
    s, cp = 24, 3
    x = torch.arange(s)
    gathered = torch.cat([x[cp_positions(s, cp, r)] for r in range(cp)])  # all-gather, rank order
    assert torch.equal(_global_order(gathered, cp), x)


def test_split_errors_name_the_rule():
    with pytest.raises(ValueError, match="not divisible by 2 x context_parallel_size = 4"):
        get_batch_on_this_cp_rank({"tokens": torch.zeros(1, 10)}, cp_size=2, cp_rank=0)
    with pytest.raises(ValueError, match="attention_mask"):
        get_batch_on_this_cp_rank({"attention_mask": torch.zeros(1, 1, 8, 8)}, cp_size=2,
                                  cp_rank=0)
    with pytest.raises(ValueError, match="cp_rank=2"):
        cp_positions(8, 2, 2)


def test_layout_validators_accept_cp():
    from nvfp4_megatron.parallel.layout import LayoutError, check_world, make_layout
    from nvfp4_megatron.parallel.model_stats import ModelShape

    def ModelDims(**kw):
        return ModelShape(hidden_size=64, ffn_hidden_size=256, kv_channels=16, vocab_size=128, **kw)

    assert check_world(2, cp=2) == 1
    assert check_world(8, tp=2, cp=2, pp=2, ep=4, etp=1) == 1
    dims = ModelDims(num_layers=2, num_attention_heads=4, num_query_groups=2, seq_length=64)
    lay = make_layout(world_size=2, cp=2, global_batch_size=2, model=dims)
    assert (lay.cp, lay.dp) == (2, 1)
    with pytest.raises(LayoutError, match="2 x CP=4"):
        make_layout(world_size=4, cp=4, global_batch_size=2,
                    model=ModelDims(num_layers=2, num_attention_heads=4, num_query_groups=2,
                                    seq_length=36))


@pytest.fixture(scope="module")
def cp_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cp")
    runs = [{"kind": "attention_check", "cp": 2}]
    for recipe in ("bf16", "nvfp4_no_sr"):
        runs += [{"name": f"{recipe}_cp1", "cp": 1, "recipe": recipe},
                 {"name": f"{recipe}_cp2", "cp": 2, "recipe": recipe}]
    runs += [{"name": "bf16_two_output_cp2", "cp": 2, "recipe": "bf16", "loss_form": "two_output"}]
    runs += [{"name": "abs_cp1", "cp": 1, "recipe": "bf16", "pos": "learned_absolute",
              "steps": 1},
             {"name": "abs_cp2", "cp": 2, "recipe": "bf16", "pos": "learned_absolute",
              "steps": 1},
             {"name": "contiguous_cp2", "cp": 2, "recipe": "bf16", "split": "contiguous",
              "steps": 1},
             # last: it changes the amax reduction group for the rest of the process
             {"name": "nvfp4_no_sr_amaxtp_cp2", "cp": 2, "recipe": "nvfp4_no_sr",
              "amax_tp_only": True}]
    (tmp / "cfg.json").write_text(json.dumps({"runs": runs}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(WORKER), str(tmp / "cfg.json"), str(tmp)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    if proc.returncode != 0:
        raise AssertionError(f"cp worker failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return tmp


@pytest.fixture(scope="module")
def cp_tp_runs(tmp_path_factory):
    """World 4: TP2 + SP x CP2 against the single-device reference (DP4, same data)."""
    tmp = tmp_path_factory.mktemp("cptp")
    runs = [{"name": "bf16_ref", "cp": 1, "recipe": "bf16", "steps": 2},
            {"name": "bf16_tp2cp2", "cp": 2, "tp": 2, "recipe": "bf16", "steps": 2},
            {"name": "nv_ref", "cp": 1, "recipe": "nvfp4_no_sr", "steps": 2},
            {"name": "nv_tp2cp2", "cp": 2, "tp": 2, "recipe": "nvfp4_no_sr", "steps": 2}]
    (tmp / "cfg.json").write_text(json.dumps({"runs": runs}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", "--standalone",
           str(WORKER), str(tmp / "cfg.json"), str(tmp)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"cp worker failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return tmp


def _losses(out, name, rank=0):
    return json.loads((out / f"{name}.rank{rank}.json").read_text())["losses"]


def _rel(a, b):
    return max(abs(x - y) / abs(x) for x, y in zip(a, b))


@pytest.mark.slow
def test_cp_attention_matches_full_sequence_attention(cp_runs):
    for rank in range(2):
        res = json.loads((cp_runs / f"attn_check.rank{rank}.json").read_text())
        assert res.pop("module_equal") and res.pop("mask_refused") and res.pop("padding_refused")
        for mode, errs in res.items():
            # FP64: output and all three gradients equal up to summation order
            assert max(errs.values()) < 1e-12, (rank, mode, errs)


def _grad_rel(out, a, b):
    g1, g2 = torch.load(out / f"{a}.grads.pt"), torch.load(out / f"{b}.grads.pt")
    assert g1.keys() == g2.keys()
    return {n: ((g1[n] - g2[n]).norm() / g1[n].norm()).item() for n in g1}


@pytest.mark.slow
def test_cp2_matches_cp1_bf16(cp_runs):
    l1, l2 = _losses(cp_runs, "bf16_cp1"), _losses(cp_runs, "bf16_cp2")
    assert len(l1) == len(l2) == 3
    assert l2 == _losses(cp_runs, "bf16_cp2", rank=1)  # the reported loss is CP-reduced
    assert _rel(l1, l2) < 1e-6, (l1, l2)  # the bf16 recipe with FP32 params: summation order
    assert max(_grad_rel(cp_runs, "bf16_cp1", "bf16_cp2").values()) < 1e-5
    # the training loop's two-output loss form gives the same gradients
    assert max(_grad_rel(cp_runs, "bf16_cp1", "bf16_two_output_cp2").values()) < 1e-5


@pytest.mark.slow
def test_cp2_matches_cp1_nvfp4(cp_runs):
    l1 = _losses(cp_runs, "nvfp4_no_sr_cp1")
    # The amax of a non-expert layer's tensors is reduced over TP x CP (mcore/layers.py), so
    # CP=2 uses CP=1's global scales and, as the 16-token blocks of the Wgrad copies fall inside
    # one CP chunk (c*b = 32 tokens), the same blocks: the same numbers up to summation order.
    l2 = _losses(cp_runs, "nvfp4_no_sr_cp2")
    assert _rel(l1, l2) < 1e-5, (l1, l2)
    assert max(_grad_rel(cp_runs, "nvfp4_no_sr_cp1", "nvfp4_no_sr_cp2").values()) < 1e-4
    # Negative control, the TP-only rule: each CP rank scales its half by its own amax; the loss
    # stays within the 1e-3 but single-step gradients move at the quantization-noise level.
    old = _losses(cp_runs, "nvfp4_no_sr_amaxtp_cp2")
    assert _rel(l1, old) < 1e-3
    assert max(_grad_rel(cp_runs, "nvfp4_no_sr_cp1", "nvfp4_no_sr_amaxtp_cp2").values()) > 1e-3


@pytest.mark.slow
def test_cp_with_learned_positions_uses_global_position_ids(cp_runs):
    assert _rel(_losses(cp_runs, "abs_cp1"), _losses(cp_runs, "abs_cp2")) < 1e-6


@pytest.mark.slow
def test_cp_comparison_detects_a_wrong_split(cp_runs):
    # Contiguous halves fed to the load-balanced attention: wrong causal mask and RoPE positions.
    assert _rel(_losses(cp_runs, "bf16_cp1")[:1], _losses(cp_runs, "contiguous_cp2")) > 1e-5


@pytest.mark.slow
def test_cp2_composes_with_tp2_sequence_parallel(cp_tp_runs):
    # 4 ranks: TP (fastest) x CP groups must both be right for the numbers to agree.
    assert _rel(_losses(cp_tp_runs, "bf16_ref"), _losses(cp_tp_runs, "bf16_tp2cp2")) < 1e-6
    assert _rel(_losses(cp_tp_runs, "nv_ref"), _losses(cp_tp_runs, "nv_tp2cp2")) < 1e-5
    for rank in range(4):
        assert _losses(cp_tp_runs, "bf16_tp2cp2", rank) == _losses(cp_tp_runs, "bf16_tp2cp2")
