"""``pretrain.py +recipe=nvfp4_hybrid_tiny`` end to end on 2 gloo ranks: trains, saves, resumes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _pretrain(run_dir: Path, cache: Path, *overrides: str, timeout: int = 900):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "pretrain.py"), "+recipe=nvfp4_hybrid_tiny", f"run_dir={run_dir}",
           f"data.cache_dir={cache}", "data.default_corpus_max_mb=1.0", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=str(run_dir.parent))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc.stdout + proc.stderr


def _train_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def test_nvfp4_hybrid_tiny_trains_saves_and_resumes(tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    common = ("train.warmup_iters=5", "train.log_interval=10", "train.eval_interval=0",
              "train.save_interval=null")
    _pretrain(run_dir, cache, "train.train_iters=60", *common)
    result = json.loads((run_dir / "result.json").read_text())
    assert result["iteration"] == 60
    losses = _train_losses(run_dir)
    entropy = result["unigram_entropy_nats"]
    # below the unigram entropy: the model uses context (Mamba, attention), not token counts
    assert result["final_valid_loss"] < entropy - 0.5, (result, losses[60])
    assert losses[60] < losses[1] - 1.0
    table = (run_dir / "precision_table.txt").read_text()
    assert "backend=emulated" in table and "blocks=8 bf16_blocks=[]" in table
    for block in (0, 3, 5):  # the Mamba blocks of M-*M-M*-
        for lin in ("in_proj ", "out_proj"):
            assert f"\n{block}      mixer.{lin}" in table
    assert "conv" not in table and "norm" not in table

    out = _pretrain(run_dir, cache, "train.train_iters=70", *common)
    assert "resumed from" in out and "step_0000060" in out
    assert json.loads((run_dir / "result.json").read_text())["iteration"] == 70
    assert set(_train_losses(run_dir)) >= set(range(61, 71))
