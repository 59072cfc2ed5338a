"""scripts/folding_run.py (issue 20): every 8-GPU case is accepted by the layout validator with the
expected folding / baseline expert layout, and the rank wrapper + summary work on a short CPU run
(the 8-GPU runs themselves need a machine with 8 GPUs)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "folding_run.py"


def _load():
    spec = importlib.util.spec_from_file_location("folding_run", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_case_is_accepted_with_its_expert_layout():
    mod = _load()
    rows = mod.dry_run(list(mod.CASES), list(mod.RECIPES), meta_build=False, log=lambda m: None)
    assert len(rows) == len(mod.CASES) * len(mod.RECIPES)
    by = {(r["case"], r["recipe"]): r for r in rows}
    for recipe in mod.RECIPES:
        for size in ("tiny", "wide"):
            f, b = by[(f"{size}_folding", recipe)], by[(f"{size}_baseline", recipe)]
            assert f["attention"] == b["attention"] and f["params"] == b["params"]
            assert f["experts"][0] == 1 and b["experts"][0] == b["attention"][0] == 2  # ETP
    assert by[("tiny_folding", "bf16")]["attention"] == (2, 2, 1, 2)  # TP2 x CP2 x PP2
    assert by[("tiny_folding", "bf16")]["experts"] == (1, 4, 1)  # ETP1 x EP4
    assert by[("wide_folding", "bf16")]["params"] == 4_614_064_128
    assert by[("wide_folding", "bf16")]["max_memory_gib_est"] < 141  # one H200


def test_a_layout_other_than_the_expected_one_is_refused(monkeypatch):
    mod = _load()
    case = mod.CASES["tiny_folding"]
    monkeypatch.setitem(mod.CASES, "tiny_folding", (case[0], case[1], (2, 2, 1)))
    with pytest.raises(ValueError, match="expected"):
        mod.dry_run(["tiny_folding"], ["bf16"], meta_build=False, log=lambda m: None)


@pytest.mark.slow  # one 2-process pretrain.py run of 2 steps through the rank wrapper
def test_rank_wrapper_runs_pretrain_and_summary_reads_it(tmp_path):
    mod = _load()
    run_dir, mem = tmp_path / "run", tmp_path / "mem"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore",
               CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(SCRIPT), "--rank-wrapper", str(mem), "--", "+recipe=bf16_tiny",
           "train.train_iters=3", "train.warmup_iters=0", *mod.RUN_OVERRIDES,
           f"run_dir={run_dir}", f"data.cache_dir={tmp_path / 'cache'}",
           "data.default_corpus_max_mb=1.0"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s = mod.summarize(run_dir, mem, skip=1)
    assert s["steps"] == 3 and s["steps_measured"] == 2
    assert s["tokens_per_s"] == pytest.approx(16 * 64 / s["step_time_s"])
    assert s["mfu"] is None and s["peak_alloc_gib_per_rank"] == []  # CPU: no GPU figures
    assert not (run_dir / "checkpoints").exists()  # train.save=false
    assert json.loads(json.dumps(s)) == s
