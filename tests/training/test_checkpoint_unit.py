"""Checkpoint bookkeeping that needs no process group."""

import json

import pytest

from nvfp4_megatron.training import checkpoint as C


def test_only_complete_renamed_checkpoints_count(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in (("step_0000010", True), ("step_0000020", True),
                           (".tmp-step_0000030", True), ("step_0000040", False)):
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / "meta.json").write_text("{}")
    assert [p.name for p in C.list_checkpoints(root)] == ["step_0000010", "step_0000020"]
    assert C.latest_checkpoint(root).name == "step_0000020"
    assert C.latest_checkpoint(tmp_path / "none") is None


def test_other_model_shape_is_a_clear_error(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"model": {"hidden_size": 64, "num_layers": 2}}))
    with pytest.raises(ValueError) as e:
        C.check_compatible(tmp_path, {"model": {"hidden_size": 128, "num_layers": 2}})
    assert "model.hidden_size: checkpoint 64 vs config 128" in str(e.value)
    C.check_compatible(tmp_path, {"model": {"hidden_size": 64, "num_layers": 2}})


def _layout(tp=1, pp=1, ep=1, etp=1, cp=1):
    return {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
            "expert_model_parallel_size": ep, "expert_tensor_parallel_size": etp,
            "context_parallel_size": cp}


def test_dp_reshardable_checkpoint_refuses_another_layout(tmp_path):
    model = {"hidden_size": 64}
    (tmp_path / "meta.json").write_text(json.dumps(
        {"model": model, "parallel": _layout(tp=2, etp=2), "optim_format": "dp_reshardable"}))
    with pytest.raises(ValueError) as e:
        C.check_compatible(tmp_path, {"model": model, "parallel": _layout()})
    msg = str(e.value)
    assert "tensor_model_parallel_size: checkpoint 2 vs run 1" in msg
    assert "expert_tensor_parallel_size: checkpoint 2 vs run 1" in msg
    assert "train.ckpt_optim_format=fully_reshardable" in msg
    # DP / CP changes are what dp_reshardable reshards: accepted
    C.check_compatible(tmp_path, {"model": model, "parallel": _layout(tp=2, etp=2, cp=2)})


def test_fully_reshardable_and_old_checkpoints(tmp_path):
    model = {"hidden_size": 64}
    (tmp_path / "meta.json").write_text(json.dumps(
        {"model": model, "parallel": _layout(tp=2, pp=2), "optim_format": "fully_reshardable"}))
    C.check_compatible(tmp_path, {"model": model, "parallel": _layout()})  # any layout
    # written before the format was recorded (TP/PP only): dp_reshardable, missing sizes are 1
    (tmp_path / "meta.json").write_text(json.dumps(
        {"model": model, "parallel": {"tensor_model_parallel_size": 1,
                                      "pipeline_model_parallel_size": 2}}))
    C.check_compatible(tmp_path, {"model": model, "parallel": _layout(pp=2)})
    with pytest.raises(ValueError, match="pipeline_model_parallel_size: checkpoint 2 vs run 1"):
        C.check_compatible(tmp_path, {"model": model, "parallel": _layout()})


def test_unknown_optimizer_format_is_a_clear_error():
    with pytest.raises(ValueError, match="train.ckpt_optim_format='fully'"):
        C.optimizer_metadata("fully")
    assert C.optimizer_metadata("fully_reshardable")["distrib_optim_sharding_type"] == (
        "fully_reshardable")


def test_save_failing_half_way_keeps_the_previous_checkpoint(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "out.json"
    worker = Path(__file__).parent / "save_fail_worker.py"
    proc = subprocess.run([sys.executable, str(worker), str(tmp_path / "run"), str(out)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["failed"] and r["latest"] == "step_0000001"
    assert r["tmp_left"] == [".tmp-step_0000002"]  # the half-written save is never a checkpoint
    assert r["reloaded_equal"]  # ... and the previous one still loads, bit for bit
    assert r["tmp_after"] == [] and r["final"] == ["step_0000001", "step_0000003"]
    assert "model.hidden_size: checkpoint 64 vs config 32" in r["shape_error"]
