"""``torchrun pretrain.py`` at PP2 / TP2+SP (and a TP2 checkpoint resumed at TP1) against one
process, with a quantized recipe, on 2 gloo processes: the CPU run of the harness that
tests/gpu/test_multigpu_pretrain.py runs on GPUs (``_pretrain_layouts.py``; bounds from
scripts/multigpu_check.py).

What the other CPU tests already cover through pretrain.py is left out: CP2 vs one process
(tests/megatron/test_loop_layouts.py, FP32 bf16, 1e-5), TP2+SP / PP2 / DP2 with bf16
(tests/training/test_e2e.py), a bf16 TP2 checkpoint at TP1 (test_checkpoint_reshard.py) and the
8-rank folded MoE layout (tests/megatron/test_folding_8rank.py). New here: ``nvfp4_no_sr`` through
the product at TP2+SP, at PP2 started from the one-process run's checkpoint (so both start from the
same weights, which test_e2e's PP2 does not) and a quantized TP2 -> TP1 resume. EP2 vs EP1 is not
run here: an EP1 checkpoint does not load at EP2 (``_pretrain_layouts.EP_CHECKPOINT_GAP``; the GPU
module keeps it as a strict xfail). Budget: 4 launches of 3 steps, ~15 s each on an idle 2-core
machine (seen: 60 s for the file, corpus cache included).
"""

import pytest

import _pretrain_layouts as L

RECIPE = "nvfp4_no_sr"


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    return L.Runner(tmp_path_factory.mktemp("layouts"), tmp_path_factory.mktemp("cache"), "cpu",
                    timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("check", ["pp2", "tp2sp", "tp1_from_tp2"])
def test_layout_matches_one_process(runner, check):
    row = runner.evaluate(RECIPE, check)
    print(L.describe(row))
    assert row["ok"], L.describe(row)
    assert row["trajectory_checked"] and len(row["steps"]) >= 2, row


def test_every_check_has_a_bound_from_multigpu_check():
    for check in L.CHECKS.values():
        for recipe in L.RECIPES:
            assert L.MGC.bound_for(check.group, recipe) in L.MGC.BOUNDS.values()
    assert L.MGC.bound_for("ep", "bf16") == L.MGC.BOUNDS["ep_bf16"]
    assert L.MGC.bound_for("ep", "fp8_cs") == L.MGC.BOUNDS["ep_quantized"]


def _fake(runner, recipe, name, losses, **kw):
    runner.results[(recipe, name)] = {"recipe": recipe, "name": name, "rc": 0, "losses": losses,
                                      "layout_ok": True, "resumed_ok": True, "step_time_s": 1.0,
                                      "tokens_per_s": 1.0, "mfu": None,
                                      "peak_mem_gib_rank0": None, "tail": "", **kw}


def test_verdict_logic_without_launching(tmp_path):
    r = L.Runner(tmp_path, tmp_path, "cpu", steps=3)
    _fake(r, "fp8_cs", "ref", {1: 5.0, 2: 4.0, 3: 3.0})
    _fake(r, "fp8_cs", "pp2", {2: 4.0, 3: 3.004})  # resumed at SAVE_AT=1: steps 2..3
    row = r.evaluate("fp8_cs", "pp2")
    assert row["steps"] == [2, 3] and row["ok"] is False  # 1.3e-3 > the PP bound 1e-3
    _fake(r, "fp8_cs", "pp2", {2: 4.0, 3: 3.0015})
    assert r.evaluate("fp8_cs", "pp2")["ok"]  # 5e-4 < 1e-3, first step equal
    _fake(r, "fp8_cs", "pp2", {2: 4.0008, 3: 3.0})  # first step 2e-4: over the step-0 tenth
    assert not r.evaluate("fp8_cs", "pp2")["ok"]
    _fake(r, "fp8_cs", "pp2", {1: 5.0, 2: 4.0, 3: 3.0})  # did not resume: wrong steps
    assert not r.evaluate("fp8_cs", "pp2")["ok"]
    _fake(r, "fp8_cs", "pp2", {2: 4.0, 3: 3.0}, layout_ok=False)  # the [run] line lacks PP2
    assert not r.evaluate("fp8_cs", "pp2")["ok"]
    _fake(r, "nvfp4", "ref", {1: 5.0, 2: 4.0, 3: 3.0})  # SR: only the first step is held
    _fake(r, "nvfp4", "tp2sp", {1: 5.0, 2: 4.1, 3: 3.2})
    assert r.evaluate("nvfp4", "tp2sp")["ok"]
    _fake(r, "nvfp4", "tp2sp", {1: 5.001, 2: 4.0, 3: 3.0})
    assert not r.evaluate("nvfp4", "tp2sp")["ok"]
    _fake(r, "nvfp4", "tp2sp", {1: 5.0, 2: float("nan"), 3: 3.0})
    assert not r.evaluate("nvfp4", "tp2sp")["ok"]
    _fake(r, "bf16", "ref", {}, rc=1, tail="boom")
    _fake(r, "bf16", "cp2", {1: 5.0})
    row = r.evaluate("bf16", "cp2")
    assert not row["ok"] and "ref exited 1" in row["detail"]
