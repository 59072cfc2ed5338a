"""Tiny GPT / MoE models built through the quantized spec provider, trained on gloo processes.

Each launch runs ``gpt_worker.py`` under ``torch.distributed.run`` once per world size and
several runs inside it (the layout is re-initialised between runs); the tests read its JSON.
"""

import json
from pathlib import Path

import pytest

from _worker_launch import launch
from _worker_launch import read_rank as _read

WORKER = Path(__file__).with_name("gpt_worker.py")
NO_BF16_BLOCKS = {"bf16_first_blocks": 0, "bf16_last_blocks": 0}
FIRST_LAST = {"bf16_first_blocks": 1, "bf16_last_blocks": 1}
TP_RECIPES = ("nvfp4_no_sr", "mxfp8", "fp8_cs")

pytestmark = pytest.mark.slow


def _launch(tmp: Path, nproc: int, cfg: dict) -> Path:
    return launch(WORKER, tmp, nproc, cfg, timeout=400)


def _tp_runs(suffix: str) -> list[dict]:
    return [{"name": f"{r}_{suffix}", "recipe": r, "steps": 5, "repeat_batch": False,
             "overrides": NO_BF16_BLOCKS if r != "mxfp8" else {}} for r in TP_RECIPES]


@pytest.fixture(scope="module")
def world1(tmp_path_factory):
    runs = [
        {"kind": "layer_checks"},
        {"name": "nv", "recipe": "nvfp4", "overrides": FIRST_LAST, "steps": 2},
        {"name": "nv_no2d", "recipe": "nvfp4_no_2d", "overrides": FIRST_LAST, "steps": 1},
        {"name": "bf", "recipe": "bf16", "steps": 2, "sdpa": False, "dump_grads": True},
        {"name": "local", "spec": "local", "steps": 2, "dump_grads": True},
        {"name": "switch_all", "recipe": "nvfp4", "overrides": FIRST_LAST, "steps": 2,
         "sdpa": False, "bf16_switch": "all"},
        {"name": "switch_fprop", "recipe": "nvfp4", "overrides": FIRST_LAST, "steps": 1,
         "bf16_switch": "fprop"},
        *_tp_runs("tp1"),
    ]
    return _launch(tmp_path_factory.mktemp("w1"), 1, {"runs": runs})


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    runs = [
        *[{**r, "layout": {"tp": 2, "sp": True}} for r in _tp_runs("tp2")],
        {"name": "pp2", "recipe": "nvfp4", "overrides": FIRST_LAST, "steps": 1,
         "layout": {"pp": 2}},
        # last: it disables the amax reduction for the rest of the process
        {"name": "no_amax_reduce_tp2", "recipe": "nvfp4_no_sr", "steps": 5,
         "repeat_batch": False, "overrides": NO_BF16_BLOCKS, "break_amax_reduction": True,
         "layout": {"tp": 2, "sp": True}},
    ]
    return _launch(tmp_path_factory.mktemp("w2"), 2, {"runs": runs})


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    runs = [{"name": "moe", "recipe": "nvfp4", "overrides": NO_BF16_BLOCKS, "steps": 8,
             "moe": True, "num_layers": 2, "lr": 3e-3}]
    layout = {"tp": 2, "sp": True, "ep": 2, "etp": 1}
    return _launch(tmp_path_factory.mktemp("w4"), 4, {"layout": layout, "runs": runs})


LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
           "mlp.linear_fc2")
ROLES_2D = ("fprop.input", "fprop.weight", "dgrad.grad_output", "wgrad.grad_output",
            "wgrad.input")


def _expected_calls(blocks, roles, linears=LINEARS) -> dict:
    return {f"{b}.{lin}|{role}": 1 for b in blocks for lin in linears for role in roles}


def test_every_configured_layer_and_role_is_quantized(world1):
    nv = _read(world1, "nv")
    # 4 blocks, first and last BF16: blocks 1 and 2 quantized. With 2D weights the Dgrad copy of
    # W is the transposed Fprop copy, so W is quantized once; every other role once per step.
    assert nv["calls"] == _expected_calls((1, 2), ROLES_2D)
    assert nv["bf16_blocks"] == [0, 3]
    assert nv["quantized_blocks"] == [1, 2]
    no2d = _read(world1, "nv_no2d")
    assert no2d["calls"] == _expected_calls((1, 2), ROLES_2D + ("dgrad.weight",))


def test_bf16_recipe_matches_megatron_local_layers_bitwise(world1):
    checks = json.loads((world1 / "layer_checks.json").read_text())
    for key in ("column", "row"):
        for dtype in ("torch.float32", "torch.bfloat16"):
            assert checks[f"{key}_{dtype}"], f"{key} {dtype}: bf16 recipe differs from Megatron"
    bf, local = _read(world1, "bf"), _read(world1, "local")
    assert bf["calls"] == {}
    assert bf["losses"] == local["losses"]
    assert bf["grads"] == local["grads"]


def test_precision_switch(world1):
    # scope 'all': no quantizer runs and the model is exactly the BF16 model
    sw, bf = _read(world1, "switch_all"), _read(world1, "bf")
    assert sw["calls"] == {} and sw["losses"] == bf["losses"]
    # scope 'fprop': Fprop in BF16, so W is quantized once, for Dgrad, from Wᵀ
    fp = _read(world1, "switch_fprop")
    assert fp["calls"] == _expected_calls(
        (1, 2), ("dgrad.grad_output", "dgrad.weight", "wgrad.grad_output", "wgrad.input"))


def test_no_silent_bf16(world1):
    checks = json.loads((world1 / "layer_checks.json").read_text())
    assert checks["unconfigured_refused"] and checks["plain_spec_refused"]


def test_sdpa_attention_matches_local_attention(world1):
    checks = json.loads((world1 / "layer_checks.json").read_text())
    assert checks["sdpa_max_abs_diff"] < 1e-5  # FP32, causal, GQA (4 heads, 2 groups)


def test_nvfp4_hooks_are_live(world1):
    nv, bf = _read(world1, "nv"), _read(world1, "bf")
    assert nv["losses"][0] != bf["losses"][0]
    assert nv["losses"][1] != bf["losses"][1]


def test_tp2_sp_matches_tp1(world1, world2):
    for r in TP_RECIPES:
        l1 = _read(world1, f"{r}_tp1")["losses"]
        l2 = _read(world2, f"{r}_tp2")["losses"]
        assert len(l1) == len(l2) == 5
        rel = [abs(a - b) / abs(a) for a, b in zip(l1, l2)]
        # With the TP amax reduction the two layouts differ only in summation order. Over the
        # first 3 steps that stays below 1e-6 (measured 0.0 for all three recipes); later, a
        # summation-order difference can flip an FP8 code and grow (fp8_cs, 2026-12-03, another
        # CI machine: 0, 0, 0, 1.2e-5, 7.8e-6; earlier machines stayed under 1e-5). A missing
        # amax reduction shows from step 0 (test below: 1.5e-5, 5.4e-4, 2.6e-4, ...).
        assert max(rel[:3]) < 1e-6, (r, rel)
        assert max(rel) < 1e-4, (r, rel)
        calls = _read(world2, f"{r}_tp2", rank=1)["calls"]
        assert calls == _expected_calls(range(4), ROLES_2D + (
            () if r == "nvfp4_no_sr" else ("dgrad.weight",)))


def test_tp_comparison_detects_a_missing_amax_reduction(world1, world2):
    # The worker replaces LinearCall.amax_group by None for this run: each rank then scales its
    # shard by its own amax. The tight bound above (first 3 steps) must see the difference.
    l1 = _read(world1, "nvfp4_no_sr_tp1")["losses"]
    bad = _read(world2, "no_amax_reduce_tp2")["losses"]
    assert max(abs(a - b) / abs(a) for a, b in zip(l1[:3], bad[:3])) > 1e-6


def test_pipeline_parallel_uses_global_block_indices(world2):
    first, last = _read(world2, "pp2", 0), _read(world2, "pp2", 1)
    assert first["local_blocks"] == [0, 1] and last["local_blocks"] == [2, 3]
    assert first["calls"] == _expected_calls((1,), ROLES_2D)
    assert last["calls"] == _expected_calls((2,), ROLES_2D)
    assert first["bf16_blocks"] == last["bf16_blocks"] == [0, 3]
    assert first["quantized_blocks"] == last["quantized_blocks"] == [1, 2]


def test_moe_nvfp4_trains_with_tp2_ep2_etp1(world4):
    losses = _read(world4, "moe")["losses"]
    assert losses[-1] < 0.8 * losses[0], losses
    for rank in range(4):
        calls = _read(world4, "moe", rank)["calls"]
        experts = {k for k in calls if ".mlp.experts.local_experts." in k}
        # EP2 over 4 experts: 2 local experts per rank, fc1 and fc2, 5 roles, 2 blocks.
        assert len(experts) == 2 * 2 * 2 * 5
        assert not any("router" in k for k in calls)
