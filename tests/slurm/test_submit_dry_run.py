"""slurm/submit.sh --dry-run: the sbatch lines it would run (no Slurm needed)."""

import math
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _submit(tmp_path, *args, site_text="GPUS_PER_NODE=8\nPARTITION=gpu\nACCOUNT=proj\n"
            "TIME_LIMIT=04:00:00\nSBATCH_EXTRA='--exclusive --gres=gpu:8'\n"):
    site = tmp_path / "site.env"
    site.write_text(site_text + f"RUNS_ROOT={tmp_path}/runs\n")
    return subprocess.run([str(REPO / "slurm" / "submit.sh"), "--site", str(site), "--dry-run", *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def test_chain_with_afterany_dependencies(tmp_path):
    r = _submit(tmp_path, "--jobs", "3", "--nodes", "128", "--name", "r12b", "--",
                "+recipe=nvfp4_12b", "train.lr=1e-4")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        assert line.startswith("sbatch --parsable --nodes=128 --time=04:00:00 ")
        assert "--partition=gpu --account=proj --exclusive --gres=gpu:8" in line
        assert f"--output={tmp_path}/runs/r12b/slurm/%j.out" in line
        assert "NVFP4_RUN_NAME=r12b" in line and f"NVFP4_SITE_ENV={tmp_path}/site.env" in line
        assert line.endswith(f"{REPO}/slurm/pretrain.sbatch +recipe=nvfp4_12b train.lr=1e-4")
        dep = re.search(r"--dependency=afterany:(\S+)", line)
        assert (dep.group(1) if dep else None) == (f"JOBID_{i}" if i else None)
    chain = {re.search(r"NVFP4_CHAIN_ID=(\S+)", ln).group(1) for ln in lines}
    assert len(chain) == 1  # one chain id shared by all jobs
    assert not (tmp_path / "runs").exists()  # dry run creates nothing


def test_auto_job_count_from_planner(tmp_path):
    r = _submit(tmp_path, "--nodes", "128", "--name", "auto", "--", "+recipe=nvfp4_12b")
    assert r.returncode == 0, r.stderr
    m = re.search(r"planner estimates (\d+) s on 1024 GPUs -> (\d+) jobs of 04:00:00", r.stderr)
    assert m, r.stderr
    wall, jobs = int(m.group(1)), int(m.group(2))
    assert jobs == math.ceil(wall / (4 * 3600 - 600)) + 1
    assert len(r.stdout.strip().splitlines()) == jobs


def test_refused_layout_stops_submission(tmp_path):
    r = _submit(tmp_path, "--nodes", "12", "--", "+recipe=mixtral_8x22b_folding")
    assert r.returncode == 2
    assert "does not divide world_size=96" in r.stderr
    assert "planner refused this run at world_size=96" in r.stderr
    assert r.stdout == ""


def test_bad_options(tmp_path):
    r = _submit(tmp_path, "--nodes", "0", "--", "+recipe=nvfp4_12b")
    assert r.returncode == 2 and "--nodes=0 must be a positive integer" in r.stderr
    r = _submit(tmp_path, "--bogus")
    assert r.returncode == 2 and "unknown option '--bogus'" in r.stderr
