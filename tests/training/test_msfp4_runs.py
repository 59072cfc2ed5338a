"""Issue 18 end to end on CPU: ``pretrain.py +recipe=msfp4_tiny`` trains, the quantization
telemetry lands in metrics.jsonl and TensorBoard (one row per layer and operand copy, reduced over
the two data-parallel ranks), and the Table-1 report (scripts/occ_table.py) of a trained model
shows the paper's pattern: SNR rising down the table."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from _train_launch import ROOT, env, launch, records, train_losses

ROLES = ["fprop.input", "fprop.weight", "dgrad.grad_output", "dgrad.weight",
         "wgrad.grad_output", "wgrad.input"]
LAYERS = [f"{b}.{m}" for b in (0, 1) for m in ("self_attention.linear_qkv",
                                               "self_attention.linear_proj", "mlp.linear_fc1",
                                               "mlp.linear_fc2")]


def _report(run_dir, *args):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "occ_table.py"), str(run_dir),
                           *args], capture_output=True, text=True, timeout=600, env=env(),
                          cwd=str(run_dir.parent))
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.slow  # one 2-process run of 6 steps (~40 s on 2 shared cores)
def test_telemetry_rows_reduced_over_ranks_and_in_tensorboard(tmp_path, corpus_cache):
    run = tmp_path / "tel"
    rc, out = launch(run, corpus_cache, "+recipe=msfp4_tiny", "train.train_iters=6",
                     "train.warmup_iters=1",
                     "train.eval_interval=0", "train.save=false", "train.log_interval=1",
                     "logging.quant_stats_interval=3", "logging.quant_stats_occ_table=true")
    assert rc == 0, out[-4000:]
    assert sorted(train_losses(run)) == list(range(1, 7))
    rows = records(run, "quant")
    assert sorted({r["step"] for r in rows}) == [3, 6]
    for step in (3, 6):
        got = sorted((r["layer"], r["role"]) for r in rows if r["step"] == step)
        # one row per (layer, copy): the two DP ranks' sums were merged, not written twice
        assert got == sorted((la, ro) for la in LAYERS for ro in ROLES)
    for r in rows:
        assert 0.95 < r["cos"] <= 1 and r["mse"] > 0 and math.isfinite(r["snr_db"]), r
        assert 0 <= r["underflow"] < 0.5 and r["saturation"] == 0.0, r  # absmax/current scaling
        if r["role"] in ("fprop.input", "wgrad.input"):
            assert "OCC+comp" in r["format"] and 0.01 < r["occ_clamped"] < 0.03, r
        else:
            assert "occ_clamped" not in r
    fp = {(r["layer"], r["role"]): r for r in rows if r["step"] == 6}
    for la in LAYERS:  # reused copies carry the numbers of the copy they are
        assert fp[(la, "dgrad.weight")]["snr_db"] == fp[(la, "fprop.weight")]["snr_db"]
        assert fp[(la, "wgrad.input")]["snr_db"] == fp[(la, "fprop.input")]["snr_db"]
    t1 = records(run, "occ_table")
    assert len(t1) == 2 * len(LAYERS) * 2 * 5  # steps x layers x granularities x settings
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(run / "tensorboard"))
    ev.Reload()
    tags = set(ev.Tags()["scalars"])
    assert "quant/0.mlp.linear_fc1/fprop.input/snr_db" in tags
    assert "quant/1.mlp.linear_fc2/wgrad.input/occ_clamped" in tags
    assert "occ_table/0.mlp.linear_fc2/comp97/snr_db" not in tags  # keyed by granularity too
    assert any(t.startswith("occ_table/0.mlp.linear_fc2/") for t in tags)
    table = (run / "precision_table.txt").read_text()
    assert "OCC q=0.99 comp" in table and "DGE k=5 cap=3" in table and "Fprop copy" in table
    rc, out = _report(run, "--source", "telemetry")
    assert rc == 0, out[-3000:]
    assert "clamp+comp 97" in out and (run / "occ_table.md").is_file()


@pytest.mark.slow  # a 1-process 100-step msfp4 run (~45 s) and the report (~20 s)
def test_table1_of_a_trained_model_rises_down_the_table(tmp_path, corpus_cache):
    run = tmp_path / "t1"
    rc, out = launch(run, corpus_cache, "+recipe=msfp4_tiny", "train.train_iters=100",
                     "train.eval_interval=0", "train.save_interval=null", "train.log_interval=50",
                     nproc=1)
    assert rc == 0, out[-4000:]
    result = json.loads((run / "result.json").read_text())
    assert result["final_valid_loss"] < result["unigram_entropy_nats"] - 0.5  # trained
    rc, out = _report(run, "--batches", "2")
    assert rc == 0, out[-4000:]
    rep = json.loads((run / "occ_table.json").read_text())
    tensor = [r["snr_db"] for r in rep["summary"]["tensor"]]
    token = [r["snr_db"] for r in rep["summary"]["token"]]
    # per-tensor absmax (the paper's quantization function): every step down the table helps
    assert rep["snr_rises"]["tensor"] and all(b > a for a, b in zip(tensor, tensor[1:])), tensor
    # per-token absmax: compensation helps at every quantile; the lower the quantile the better
    assert token[2] > token[0] and token[2] < token[3] < token[4], token
    assert [r["label"] for r in rep["summary"]["tensor"]] == [
        "no clamp", "clamp 99.9, no comp", "clamp+comp 99.9", "clamp+comp 99", "clamp+comp 97"]
    assert "SNR rises down the table: yes" in out


def test_precision_meta_records_dge_occ_only_when_set():
    """Resume checks compare meta.json's precision: DGE/OCC settings that were set are part of it,
    and a config without them matches checkpoints written before the keys existed."""
    from nvfp4_megatron.training.checkpoint import precision_meta

    base = {"recipe": "msfp4", "backend": "auto", "dge": {"enabled": None, "k": None, "cap": None},
            "occ": {"enabled": None, "quantile": None, "compensate": None}}
    assert precision_meta(base, [1]) == {"recipe": "msfp4", "bf16_blocks": [1], "backend": "auto"}
    m = precision_meta({**base, "occ": {"enabled": True, "quantile": 0.97, "compensate": None}}, [])
    assert m["occ"] == {"enabled": True, "quantile": 0.97} and "dge" not in m
