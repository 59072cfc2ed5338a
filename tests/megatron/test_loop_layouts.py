"""The training loop (pretrain.py) trains the same model on 1 process, DP2 and CP2 (CPU, gloo).

Regression test for two things the loop needs for any layout but one process: Megatron's
``finalize_model_grads`` hook (the only place its schedule reduces gradients over DP x CP) and,
for context parallelism, this rank's load-balanced sequence chunks plus the CP-aware loss.
FP32 and no gradient clipping, so equal gradients give equal losses to summation order.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = Path(__file__).with_name("pretrain_cp_launch.py")
OVERRIDES = ["+recipe=bf16_tiny", "train.bf16=false", "train.clip_grad=0.0", "train.train_iters=4",
             "train.warmup_iters=1", "train.log_interval=1", "train.eval_interval=0",
             "train.save_interval=null", "train.eval_iters=1", "logging.plot=false",
             "logging.print_precision_table=false", "data.default_corpus_max_mb=1.0"]


def _train(tmp: Path, name: str, nproc: int, cp: int) -> dict:
    run_dir = tmp / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(LAUNCH), f"run_dir={run_dir}",
           f"data.cache_dir={tmp / 'cache'}", f"parallel.context_parallel_size={cp}", *OVERRIDES]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows if r["kind"] == "train"}


@pytest.mark.slow
def test_dp2_and_cp2_train_like_one_process(tmp_path):
    one = _train(tmp_path, "one", 1, 1)
    dp2 = _train(tmp_path, "dp2", 2, 1)
    cp2 = _train(tmp_path, "cp2", 2, 2)
    assert sorted(one) == sorted(dp2) == sorted(cp2) == [1, 2, 3, 4]
    for step in one:
        for other in (dp2, cp2):
            for a, b in zip(one[step], other[step]):
                assert abs(a - b) <= 1e-5 * abs(a), (step, one[step], dp2[step], cp2[step])
