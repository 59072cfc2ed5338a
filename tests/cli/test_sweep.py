"""Hydra-style multirun (``pretrain.py -m``): job expansion, directories, skip and resume."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nvfp4_megatron.cli.compose import ConfigError
from nvfp4_megatron.cli.sweep import expand, job_status, run_dir_override

ROOT = Path(__file__).parents[2]


def test_expand_is_the_cartesian_product_in_command_line_order():
    jobs, sweep_dir = expand(["+recipe=nvfp4_tiny", "precision.recipe=bf16,nvfp4",
                              "train.seed=range(1,3)", "run_dir=runs/sw"])
    assert sweep_dir == "runs/sw"
    assert [j.name for j in jobs] == [
        "precision.recipe=bf16,train.seed=1", "precision.recipe=bf16,train.seed=2",
        "precision.recipe=nvfp4,train.seed=1", "precision.recipe=nvfp4,train.seed=2"]
    assert jobs[1].overrides == ("+recipe=nvfp4_tiny", "precision.recipe=bf16", "train.seed=2")
    # no swept key: one job; '/' in a value does not make a subdirectory
    jobs, sweep_dir = expand(["train.lr=1e-3"])
    assert [j.name for j in jobs] == ["job"] and sweep_dir is None
    assert expand(["data.cache_dir=a/b,c"])[0][0].name == "data.cache_dir=a_b"


def test_expand_refusals():
    with pytest.raises(ConfigError, match="listed twice"):
        expand(["train.seed=1,1"])
    with pytest.raises(ConfigError, match="cannot be swept"):
        expand(["run_dir=a,b"])
    with pytest.raises(ConfigError, match="invalid override"):
        expand(["train.seed=(("])


def test_run_dir_override_survives_hydra_grammar():
    from nvfp4_megatron.cli.compose import compose_config

    d = "runs/sw/precision.recipe=bf16,train.seed=1"
    assert compose_config([run_dir_override(d)]).run_dir == d
    with pytest.raises(ConfigError, match="quotes"):
        run_dir_override("it's")


def test_job_status(tmp_path):
    run = tmp_path / "job"
    assert job_status(run, 4) == "new"
    run.mkdir()
    assert job_status(run, 4) == "partial"
    (run / "result.json").write_text(json.dumps({"iteration": 4, "stopped_by_signal": "SIGTERM"}))
    assert job_status(run, 4) == "partial"
    (run / "result.json").write_text(json.dumps({"iteration": 4, "stopped_by_signal": None}))
    assert job_status(run, 4) == "done"
    assert job_status(run, 6) == "partial"  # the run was asked for more steps since


def _sweep(tmp_path, *extra):
    cmd = [sys.executable, str(ROOT / "pretrain.py"), "-m", "+recipe=nvfp4_tiny",
           "precision.recipe=bf16,nvfp4", *extra, "train.train_iters=4", "train.warmup_iters=1", "train.save_interval=2",
           "train.eval_interval=0", "train.eval_iters=1", "train.log_interval=1",
           f"data.cache_dir={tmp_path / 'cache'}", "data.default_corpus_max_mb=1.0",
           "logging.print_precision_table=false", "logging.tensorboard=false",
           "logging.plot=false", f"run_dir={tmp_path / 'sweep'}"]
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    return proc.returncode, proc.stdout + proc.stderr


def test_multirun_runs_skips_and_resumes(tmp_path):
    """4 jobs (2 recipes x 2 seeds): seed 1 runs to the end; seed 2 'crashes' after step 2
    (train.exit_after_step, exit 17) and the sweep exits 1; the same sweep started again skips the
    two finished jobs and resumes the other two from their step-2 checkpoints."""
    rc, out = _sweep(tmp_path, "train.seed=choice(1)")  # a sweep of one value: same job names
    assert rc == 0, out
    rc, out = _sweep(tmp_path, "train.seed=1,2", "train.exit_after_step=2")
    assert rc == 1, out
    assert out.count("finished earlier, skipped") == 2
    assert "2/4 done, 2 failed" in out
    rc, out = _sweep(tmp_path, "train.seed=1,2")
    assert rc == 0, out
    assert out.count("finished earlier, skipped") == 2 and "4/4 done, 0 failed" in out
    sweep = tmp_path / "sweep"
    record = json.loads((sweep / "sweep.json").read_text())
    assert [j["status"] for j in record["jobs"]] == ["done"] * 4
    for recipe in ("bf16", "nvfp4"):
        for seed in (1, 2):
            run = sweep / f"precision.recipe={recipe},train.seed={seed}"
            result = json.loads((run / "result.json").read_text())
            assert result["iteration"] == 4 and result["stopped_by_signal"] is None
            steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
                     if json.loads(x)["kind"] == "train"]
            assert steps == [1, 2, 3, 4], (run, steps)  # resumed at 2, nothing run twice
            cfg = (run / "config.yaml").read_text()
            assert f"seed: {seed}" in cfg and f"recipe: {recipe}" in cfg
            log = (run / "sweep.log").read_text()
            assert ("resumed from" in log) == (seed == 2), log[-2000:]
    # the comparison report on these CPU runs: 2 arms x 2 seeds, each finished, same tokens
    sys.path.insert(0, str(ROOT / "scripts"))
    import compare_runs

    assert compare_runs.main([str(sweep), "--baseline", "bf16", "--out", str(tmp_path / "rep")]) == 0
    rep = json.loads((tmp_path / "rep" / "compare.json").read_text())
    arms = {a["arm"]: a for a in rep["arms"]}
    assert set(arms) == {"bf16", "nvfp4"} and rep["baseline"] == "bf16"
    assert all(a["finished"] and a["n"] == 2 and a["tokens"] == [4 * 16 * 64] for a in arms.values())
    assert arms["bf16"]["gap_nats"] == 0.0 and arms["nvfp4"]["gap_nats"] is not None
    assert (tmp_path / "rep" / "compare.png").is_file()
