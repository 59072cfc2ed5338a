"""SIGTERM to a pytest process whose conftest calls ``interrupt_on_sigterm`` (as tests/gpu's
does) runs the test's ``finally``: a child started in its own session is killed, not orphaned."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent

_CONFTEST = f"""
import sys
sys.path.insert(0, {str(HERE)!r})
from _train_launch import interrupt_on_sigterm
interrupt_on_sigterm()
"""

_TEST = """
import os, signal, subprocess, sys, time
from pathlib import Path

def test_long():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                            start_new_session=True)
    try:
        Path(os.environ["CHILD_PID_FILE"]).write_text(str(proc.pid))
        time.sleep(600)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
"""


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "zombie" not in status.lower()


def _run_and_terminate(tmp_path: Path, conftest: str) -> tuple[int, str]:
    (tmp_path / "conftest.py").write_text(conftest)
    (tmp_path / "test_long.py").write_text(_TEST)
    pid_file = tmp_path / "child.pid"
    env = dict(os.environ, CHILD_PID_FILE=str(pid_file))
    pytest = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               str(tmp_path / "test_long.py")], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.time() < deadline and pytest.poll() is None, "the inner test did not start"
        time.sleep(0.1)
    child = int(pid_file.read_text())
    pytest.send_signal(signal.SIGTERM)
    out, _ = pytest.communicate(timeout=60)
    time.sleep(0.2)
    orphaned = _alive(child)
    if orphaned:
        os.killpg(child, signal.SIGKILL)
    return orphaned, out


def test_sigterm_kills_the_tests_own_session_children(tmp_path):
    orphaned, out = _run_and_terminate(tmp_path, _CONFTEST)
    assert not orphaned, out
    assert "KeyboardInterrupt" in out, out


def test_without_the_handler_the_child_is_orphaned(tmp_path):
    """The control: a plain SIGTERM leaves the child running (what the handler is for)."""
    orphaned, out = _run_and_terminate(tmp_path, "")
    assert orphaned, out
