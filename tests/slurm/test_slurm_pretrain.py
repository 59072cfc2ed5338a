"""End-to-end on a real Slurm: submit a tiny run with slurm/submit.sh + slurm/pretrain.sbatch,
check it trained and checkpointed, submit again and check it resumed; preempt a run with
SIGUSR1 and check the chained job finishes it.

Assumes a running cluster (``eval "$(scripts/slurm_local.sh)"``: localhost, CPU, 2 gloo ranks
per node). Without one the tests skip, unless NVFP4_REQUIRE_SLURM=1 (CI), where they fail.
"""

import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
PYTHON = REPO / ".venv" / "bin" / "python"
# Small enough for 2 CPU ranks in a few seconds a step; no +recipe -> the default tiny model.
TINY = ["train.micro_batch_size=2", "train.global_batch_size=4", "train.eval_interval=1000",
        "train.log_interval=1", "logging.plot=false", "logging.tensorboard=false"]
RECIPE = os.environ.get("NVFP4_SLURM_TEST_RECIPE")  # e.g. a *_tiny_* recipe; default: none
JOB_TIMEOUT_S = 600


def _default_conf() -> None:
    """Find the cluster scripts/slurm_local.sh started even if SLURM_CONF was not exported."""
    conf = Path(os.environ.get("SLURM_LOCAL_DIR", Path(os.environ.get("TMPDIR", "/tmp"))
                               / "nvfp4-slurm-local")) / "slurm.conf"
    if "SLURM_CONF" not in os.environ and not Path("/etc/slurm/slurm.conf").exists() and conf.exists():
        os.environ["SLURM_CONF"] = str(conf)


def _slurm_up() -> str | None:
    _default_conf()
    if shutil.which("sbatch") is None:
        return "sbatch not on PATH (run: eval \"$(scripts/slurm_local.sh)\")"
    r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    if r.returncode != 0 or not r.stdout.strip():
        return f"sinfo failed: {r.stderr.strip() or 'no nodes'}"
    return None


@pytest.fixture(scope="module", autouse=True)
def _need_slurm():
    why = _slurm_up()
    if why:
        if os.environ.get("NVFP4_REQUIRE_SLURM") == "1":
            pytest.fail(f"Slurm required (NVFP4_REQUIRE_SLURM=1) but not usable: {why}")
        pytest.skip(why)
    if not (REPO / "pretrain.py").exists():
        pytest.fail("pretrain.py is missing at the repository root")


@pytest.fixture()
def site(tmp_path):
    f = tmp_path / "site.env"
    f.write_text(
        "GPUS_PER_NODE=2\n"
        f"SITE_SETUP='source {REPO}/.venv/bin/activate'\n"
        f"RUNS_ROOT={tmp_path}/runs\n"
        "TIME_LIMIT=00:20:00\n"
        f"MASTER_PORT={29500 + uuid.uuid4().int % 2000}\n"
    )
    return f


def _submit(site: Path, name: str, overrides: list[str], jobs: int = 1) -> list[str]:
    extra = [f"+recipe={RECIPE}"] if RECIPE else []
    r = subprocess.run(
        [str(REPO / "slurm" / "submit.sh"), "--site", str(site), "--name", name,
         "--jobs", str(jobs), "--", *extra, *TINY, *overrides],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    ids = re.findall(r"submitted job \d+/\d+: (\d+)", r.stdout)
    assert len(ids) == jobs, r.stdout
    return ids


def _job_state(job: str) -> tuple[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    state = re.search(r"JobState=(\S+)", out)
    code = re.search(r"ExitCode=(\S+)", out)
    return (state.group(1) if state else "UNKNOWN", code.group(1) if code else "?")


def _wait(job: str, timeout: float = JOB_TIMEOUT_S) -> tuple[str, str]:
    end = time.time() + timeout
    while time.time() < end:
        state, code = _job_state(job)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state, code
        time.sleep(2)
    subprocess.run(["scancel", job])
    pytest.fail(f"job {job} did not finish in {timeout} s (state {_job_state(job)})")


def _wait_running(job: str, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if _job_state(job)[0] == "RUNNING":
            return
        time.sleep(1)
    pytest.fail(f"job {job} did not start in {timeout} s")


def _log(run_dir: Path, job: str) -> str:
    return (run_dir / "slurm" / f"{job}.out").read_text(errors="replace")


def _ckpt_steps(run_dir: Path) -> list[int]:
    """Steps of the finished checkpoints run_dir/checkpoints/step_NNNNNNN (training/checkpoint.py)."""
    d = run_dir / "checkpoints"
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for p in d.iterdir() if (m := re.fullmatch(r"step_(\d+)", p.name)))


def _logged_steps(text: str) -> list[int]:
    """Training steps in the trainer's progress lines ('step      3/8 | tokens ...')."""
    return [int(s) for s in re.findall(r"^step\s+(\d+)/\d+ \|", text, flags=re.M)]


def test_trains_checkpoints_and_resumes(site, tmp_path):
    name = f"slurm-resume-{uuid.uuid4().hex[:6]}"
    run_dir = tmp_path / "runs" / name
    (job1,) = _submit(site, name, ["train.train_iters=4", "train.save_interval=2"])
    state, code = _wait(job1)
    log1 = _log(run_dir, job1)
    assert (state, code) == ("COMPLETED", "0:0"), log1[-4000:]
    assert "training finished" in log1
    assert _ckpt_steps(run_dir)[-1] == 4, (_ckpt_steps(run_dir), log1[-3000:])
    steps1 = _logged_steps(log1)
    assert steps1 and min(steps1) == 1 and max(steps1) == 4, log1[-3000:]

    (job2,) = _submit(site, name, ["train.train_iters=8", "train.save_interval=2"])
    state, code = _wait(job2)
    log2 = _log(run_dir, job2)
    assert (state, code) == ("COMPLETED", "0:0"), log2[-4000:]
    assert _ckpt_steps(run_dir)[-1] == 8
    steps2 = _logged_steps(log2)
    assert steps2 and min(steps2) == 5 and max(steps2) == 8, log2[-3000:]


def test_sigusr1_checkpoints_and_chain_resumes(site, tmp_path):
    name = f"slurm-preempt-{uuid.uuid4().hex[:6]}"
    run_dir = tmp_path / "runs" / name
    # 8 micro-batches per rank per step: slow enough (~0.3 s/step on 2 CPUs) that the signal
    # lands mid-run
    job1, job2 = _submit(site, name, ["train.train_iters=60", "train.global_batch_size=32"], jobs=2)
    _wait_running(job1)
    end = time.time() + 300
    out1 = run_dir / "slurm" / f"{job1}.out"
    while time.time() < end and not (out1.exists() and _logged_steps(out1.read_text(errors="replace"))):
        time.sleep(0.2)  # signal once the trainer is stepping (its handler is installed by then)
    # what Slurm does 120 s before the time limit (--signal=B:USR1@120)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job1], check=True)
    state, code = _wait(job1)
    log1 = _log(run_dir, job1)
    assert (state, code) == ("COMPLETED", "0:0"), log1[-4000:]
    assert "checkpointed and exited on request" in log1
    assert "[signal] SIGUSR1 received" in log1
    stop = _ckpt_steps(run_dir)[-1]
    assert 1 <= stop < 60
    state, code = _wait(job2)
    log2 = _log(run_dir, job2)
    assert (state, code) == ("COMPLETED", "0:0"), log2[-4000:]
    assert min(_logged_steps(log2)) == stop + 1 and _ckpt_steps(run_dir)[-1] == 60
    assert (run_dir / "DONE").exists()


def test_failed_job_stops_the_chain(site, tmp_path):
    """A job whose trainer fails (here: bad config, exit 2) writes FAILED; the next job of the
    chain does not start the trainer and names the failed job's log."""
    name = f"slurm-fail-{uuid.uuid4().hex[:6]}"
    run_dir = tmp_path / "runs" / name
    job1, job2 = _submit(site, name, ["train.train_iters=0"], jobs=2)
    state, code = _wait(job1)
    log1 = _log(run_dir, job1)
    assert state == "FAILED", (state, code, log1[-3000:])
    assert "trainer failed" in log1 and f"{job1}.out" in log1, log1[-3000:]
    assert not (run_dir / "DONE").exists()
    failed = (run_dir / "FAILED").read_text()
    assert f"job {job1} failed" in failed and str(run_dir / "slurm" / f"{job1}.out") in failed
    state, code = _wait(job2, timeout=120)
    log2 = _log(run_dir, job2)
    assert state == "FAILED" and code == "1:0", (state, code, log2)
    assert "stopped: job " + job1 in log2 and f"{job1}.out" in log2, log2
    assert "run_dir=" not in log2  # the trainer was not started


def test_exit_0_without_result_is_not_done(site, tmp_path):
    """The chain decides from result.json, not the exit code: a trainer that exits 0 without
    finishing a run (dry_run=true plans and exits 0) is not 'done'."""
    name = f"slurm-noresult-{uuid.uuid4().hex[:6]}"
    run_dir = tmp_path / "runs" / name
    (job1,) = _submit(site, name, ["dry_run=true", "world_size=2"])
    state, code = _wait(job1)
    log1 = _log(run_dir, job1)
    assert state == "FAILED", (state, code, log1[-3000:])
    assert "wrote no" in log1 and "result.json" in log1, log1[-3000:]
    assert not (run_dir / "DONE").exists() and (run_dir / "FAILED").exists()
