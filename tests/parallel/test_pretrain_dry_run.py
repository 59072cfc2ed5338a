"""``pretrain.py +recipe=NAME dry_run=true world_size=N`` end to end, in a subprocess (no GPU,
nothing launched): the CLI composes the Hydra config and hands it to the planner."""

import json
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]


def _run(*args, cwd):
    return subprocess.run([sys.executable, str(REPO / "pretrain.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_nvfp4_12b_at_1024(tmp_path):
    r = _run("+recipe=nvfp4_12b", "dry_run=true", "world_size=1024", f"run_dir={tmp_path}",
             cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "12,310,001,152 (12.31B)" in r.stdout
    assert "attention TP8 x CP2 x DP32 x PP2" in r.stdout
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert abs(plan["params"]["total"] - 12.31e9) / 12.31e9 < 0.005
    assert plan["layout"]["world_size"] == 1024 and plan["gpu"]["name"] == "B200"


def test_mixtral_folding_at_128_on_h100(tmp_path):
    r = _run("+recipe=mixtral_8x22b_folding", "dry_run=true", "world_size=128",
             "planner.gpu_type=H100", f"run_dir={tmp_path}", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    lay = json.loads((tmp_path / "plan.json").read_text())["layout"]
    assert (lay["tensor_model_parallel_size"], lay["expert_model_parallel_size"],
            lay["expert_tensor_parallel_size"], lay["pipeline_model_parallel_size"],
            lay["context_parallel_size"]) == (2, 8, 1, 8, 1)
    assert lay["data_parallel_size"] == 8 and lay["expert_data_parallel_size"] == 2


def test_world_that_does_not_fit_is_refused(tmp_path):
    r = _run("+recipe=mixtral_8x22b_folding", "dry_run=true", "world_size=96",
             f"run_dir={tmp_path}", cwd=tmp_path)
    assert r.returncode != 0
    assert "TP=2 x CP=1 x PP=8 = 16 does not divide world_size=96" not in r.stderr  # 96 % 16 == 0
    assert "ETP=1 x EP=8 x PP=8 = 64 does not divide world_size=96" in r.stderr
    assert not (tmp_path / "plan.json").exists()
