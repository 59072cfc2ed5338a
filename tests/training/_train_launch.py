"""Launch pretrain.py under torchrun for the end-to-end tests; read back what a run wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def interrupt_on_sigterm() -> None:
    """Make SIGTERM act as Ctrl-C in this (pytest) process: pytest stops the session, and the
    running test's ``finally`` blocks kill the runs it started in their own sessions (kill -9 and
    SIGTERM tests), which a plain SIGTERM (``timeout`` on the GPU suite) would leave running
    beside whatever comes next."""
    import signal

    def _interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _interrupt)


def command(run_dir, cache_dir, overrides, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", str(ROOT / "pretrain.py"), f"run_dir={run_dir}",
            f"data.cache_dir={cache_dir}", "data.default_corpus_max_mb=1.0",
            "logging.print_precision_table=false", *overrides]


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def launch(run_dir, cache_dir, *overrides, nproc=2, timeout=300):
    proc = subprocess.run(command(run_dir, cache_dir, overrides, nproc), capture_output=True,
                          text=True, timeout=timeout, env=env(), cwd=str(run_dir.parent))
    return proc.returncode, proc.stdout + proc.stderr


def tree_hash(d) -> str:
    """sha256 over every file below ``d`` (relative path and bytes): "nothing changed" checks."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted(Path(d).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(d)).encode() + p.read_bytes())
    return h.hexdigest()


def train_losses(run_dir) -> dict[int, float]:
    """step -> train loss; a step logged twice (before a crash, again after resume) keeps the last."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["kind"] == "train":
            out[row["step"]] = row["loss"]
    return out


def records(run_dir, kind):
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def checkpoint_steps(run_dir) -> list[int]:
    root = Path(run_dir) / "checkpoints"
    return sorted(int(p.name.split("_")[1]) for p in root.glob("step_*")) if root.is_dir() else []


def worker_pids(pid: int) -> list[int]:
    """The worker processes of a torchrun agent (its direct children)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def _logged_steps(run_dir) -> dict[int, float]:
    m = Path(run_dir) / "metrics.jsonl"
    out = {}
    if not m.is_file():
        return out
    for line in m.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a row being written right now
            continue
        if row["kind"] == "train":
            out[row["step"]] = row["loss"]
    return out


def kill9_workers_mid_run(cmd, run_dir, *, at_step: int, cwd, log_path, timeout: float = 300):
    """Start ``cmd`` (torchrun), wait until ``at_step`` is logged, then ``kill -9`` every worker
    (no chance to save); torchrun notices and exits. Returns the losses logged before the kill.
    (torchrun starts its workers in their own process group: killing torchrun alone would leave
    them running.)"""
    import signal
    import time

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=str(cwd),
                                start_new_session=True)
        try:
            deadline = time.time() + timeout
            while not any(s >= at_step for s in _logged_steps(run_dir)):
                if proc.poll() is not None:
                    raise AssertionError(f"run ended (rc {proc.returncode}) before step {at_step}: "
                                         + Path(log_path).read_text()[-3000:])
                if time.time() > deadline:
                    raise AssertionError(f"no step {at_step} within {timeout}s")
                time.sleep(0.1)
            workers = worker_pids(proc.pid)
            assert workers, "torchrun has no workers"
            for w in workers:
                os.kill(w, signal.SIGKILL)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    for w in workers:  # really gone
        assert not Path(f"/proc/{w}").exists() or "zombie" in Path(f"/proc/{w}/status").read_text().lower()
    return _logged_steps(run_dir)
