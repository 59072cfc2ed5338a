"""Launch a Megatron test worker (``gpt_worker.py``, ``hybrid_worker.py``) under torchrun on gloo
and read back what its ranks wrote (``OUT/<run name>.rank<R>.json``)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def launch(worker: Path, tmp: Path, nproc: int, cfg: dict, *, timeout: int) -> Path:
    """Run ``worker`` on ``nproc`` processes with ``cfg`` (its ``runs``); returns the output
    folder. A failed worker fails the test with the end of its stderr."""
    out = tmp / f"out{nproc}"
    out.mkdir()
    cfg_path = tmp / f"cfg{nproc}.json"
    cfg_path.write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--standalone", str(worker), str(cfg_path), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"worker failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return out


def read_rank(out: Path, name: str, rank: int = 0) -> dict:
    return json.loads((out / f"{name}.rank{rank}.json").read_text())
