"""Launch pretrain.py under torchrun for the end-to-end tests; read back what a run wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


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
