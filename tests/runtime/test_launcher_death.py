"""Workers exit when their launcher dies: ``kill -9`` of torchrun alone (not its workers, which
torchrun starts in their own process group) must not leave a worker training and writing."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "training"))
from _train_launch import command, env, worker_pids  # noqa: E402

from nvfp4_megatron.runtime import distributed  # noqa: E402


def _train_rows(run_dir: Path) -> int:
    m = run_dir / "metrics.jsonl"
    return m.read_text().count('"kind": "train"') if m.is_file() else 0


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "zombie" not in status.lower()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_kill9_torchrun_takes_its_workers(tmp_path):
    run_dir = tmp_path / "run"
    cmd = command(run_dir, tmp_path / "cache", ["+recipe=bf16_tiny", "train.train_iters=100000",
                                                "train.log_interval=1"])
    log_path = tmp_path / "torchrun.log"
    with open(log_path, "w") as log:
        # its own session, so that the kill below reaches torchrun only (and cleanup its group)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env(),
                                cwd=str(tmp_path), start_new_session=True)
    workers = []
    try:
        deadline = time.time() + 300
        while _train_rows(run_dir) < 3:
            assert proc.poll() is None, log_path.read_text()[-4000:]
            assert time.time() < deadline, "no 3 logged steps within 300 s"
            time.sleep(0.2)
        workers = worker_pids(proc.pid)
        assert len(workers) == 2, workers
        os.kill(proc.pid, signal.SIGKILL)  # torchrun only
        proc.wait(timeout=30)
        end = time.time() + 10
        while time.time() < end and any(_alive(w) for w in workers):
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), (
            f"workers {[w for w in workers if _alive(w)]} outlived torchrun")
        rows = _train_rows(run_dir)
        time.sleep(3)
        assert _train_rows(run_dir) == rows, "metrics.jsonl still growing after torchrun died"
    finally:
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_pdeathsig_armed_and_orphan_exits(tmp_path):
    """A child that arms the signal dies with its parent; one whose parent is already gone when it
    arms exits at once (the getppid re-check)."""
    code = (
        "import os, sys, time\n"
        "from nvfp4_megatron.runtime.distributed import exit_with_launcher\n"
        "if sys.argv[1] == 'wait':\n"
        "    time.sleep(2)  # the parent is killed meanwhile -> reparented\n"
        "print('armed', exit_with_launcher(), flush=True)\n"
        "time.sleep(60)\n"
    )
    # middle process: starts the worker, prints its pid, then sleeps; we kill -9 the middle one
    middle = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', {code!r}, sys.argv[1]])\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    for mode in ("now", "wait"):
        m = subprocess.Popen([sys.executable, "-c", middle, mode], stdout=subprocess.PIPE,
                             text=True, start_new_session=True)
        child = int(m.stdout.readline())
        if mode == "now":
            time.sleep(1.5)  # armed by then
        os.kill(m.pid, signal.SIGKILL)
        m.wait()
        end = time.time() + 10
        while time.time() < end and _alive(child):
            time.sleep(0.1)
        alive = _alive(child)
        if alive:
            os.kill(child, signal.SIGKILL)
        assert not alive, f"mode {mode}: child {child} outlived its parent"


def test_started_by_torchrun(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert not distributed.started_by_torchrun()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert distributed.started_by_torchrun()
