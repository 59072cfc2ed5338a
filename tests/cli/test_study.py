"""scripts/study.py: arms x seeds, runs side by side (--parallel), skip of finished runs, time limit."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
TINY = ["model.num_layers=1", "model.hidden_size=128", "model.ffn_hidden_size=256",
        "model.num_attention_heads=2", "model.num_query_groups=2", "model.vocab_size=512",
        "model.seq_length=64", "train.micro_batch_size=2", "train.global_batch_size=2",
        "train.warmup_iters=1", "train.eval_interval=2", "train.save_interval=2",
        "data.default_corpus_max_mb=0.2", "data.split='80,20,0'"]


def _study(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "study.py"), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


def test_main_seeds_only_for_the_main_arms(tmp_path):
    r = _study("--recipe", "study_mini", "--arms", "bf16,nvfp4_no_sr", "--seeds", "1",
               "--main-seeds", "1,2", "--root", str(tmp_path / "r"), "--dry", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stdout.splitlines() if x.startswith("[new]")]
    assert len(lines) == 3
    assert sum("bf16/seed_1" in x for x in lines) == 1 and sum("bf16/seed_2" in x for x in lines) == 1
    assert sum("nvfp4_no_sr/seed_1" in x for x in lines) == 1
    assert not any("nvfp4_no_sr/seed_2" in x for x in lines)
    assert all("+recipe=study_mini" in x and "train.train_tokens=5.2e+07" in x for x in lines)


def test_parallel_runs_finish_then_are_skipped_and_the_time_limit_starts_nothing(tmp_path):
    common = ["--recipe", "study_mini", "--arms", "bf16,nvfp4", "--seeds", "1", "--parallel", "2",
              "--tokens", "256", "--root", str(tmp_path / "r"), *TINY,
              f"data.cache_dir={tmp_path / 'cache'}"]
    r = _study(*common, "--pack", str(tmp_path / "runs.tgz"), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[study] bf16/seed_1: done" in r.stdout and "[study] nvfp4/seed_1: done" in r.stdout
    assert "[data] built default corpus" in r.stdout  # once, in the study process
    for arm in ("bf16", "nvfp4"):
        log = (tmp_path / "r" / "default" / arm / "seed_1" / "sweep.log").read_text()
        assert "reusing verified default corpus" in log  # the trainers only read the cache
        assert "train.train_tokens=256" in log
    assert "loss" not in r.stdout.split("[study] nvfp4/seed_1: starting")[1].split("[study]")[0]
    assert (tmp_path / "runs.tgz").stat().st_size > 1000
    again = _study(*common, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("finished earlier (2 steps), skipped") == 2
    # a time limit under a minute starts nothing new and says so (exit 1: runs left to do)
    late = _study(*common[:-1], "--arms", "mxfp4", "--time-limit", "30", cwd=tmp_path)
    # (--arms given twice: argparse keeps the last, mxfp4)
    assert late.returncode == 1, late.stdout + late.stderr
    assert "mxfp4/seed_1: not started (time limit)" in late.stdout
    assert not (tmp_path / "r" / "default" / "mxfp4").exists()
