"""End-to-end CPU runs (2 gloo processes): train, resume exactly, SIGTERM, NaN, precision switch."""

import json
import os
import signal
import subprocess
import time

import pytest

from _train_launch import (checkpoint_steps, command, env, kill9_workers_mid_run, launch,
                           records, train_losses, worker_pids, tree_hash)

BF16 = ["+recipe=bf16_tiny", "train.log_interval=20"]


@pytest.mark.slow  # 50-85 s on 2 shared cores
def test_train_then_kill_and_resume_gives_the_same_loss_curve(tmp_path, corpus_cache):
    common = BF16 + ["train.train_iters=120", "train.save_interval=40", "train.eval_interval=60"]
    a = tmp_path / "a"
    rc, out = launch(a, corpus_cache, *common)
    assert rc == 0, out[-4000:]
    # The run directory holds everything the README promises.
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "precision_table.txt", "result.json"):
        assert (a / name).is_file(), name
    assert list((a / "tensorboard").glob("events.out.tfevents.*"))
    assert checkpoint_steps(a) == [80, 120]  # keep_last=2
    result = json.loads((a / "result.json").read_text())
    assert "final validation loss" in out and "unigram entropy" in out
    assert result["final_valid_loss"] < result["unigram_entropy_nats"] - 0.5, result

    b = tmp_path / "b"
    rc, out = launch(b, corpus_cache, *common, "train.exit_after_step=70")
    assert rc != 0 and "exit_after_step=70" in out, out[-3000:]
    assert checkpoint_steps(b) == [40]
    rc, out = launch(b, corpus_cache, *common)
    assert rc == 0, out[-4000:]
    assert "resumed from" in out and "at step 40" in out
    la, lb = train_losses(a), train_losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, 121))
    assert [la[s] for s in la] == [lb[s] for s in la]  # bit-equal, step for step
    assert json.loads((b / "result.json").read_text())["final_valid_loss"] == result["final_valid_loss"]


@pytest.mark.slow  # three 2-process runs of 60 steps
def test_kill9_of_the_workers_then_resume_is_bit_identical(tmp_path, corpus_cache):
    """A real ``kill -9`` of the training processes mid-run (not the test knob): the restart
    continues from the newest checkpoint and reproduces the uninterrupted loss curve bit for bit."""
    common = ["+recipe=nvfp4_tiny", "train.train_iters=60", "train.save_interval=20",
              "train.eval_interval=0", "train.log_interval=1"]
    ref = tmp_path / "ref"
    rc, out = launch(ref, corpus_cache, *common)
    assert rc == 0, out[-3000:]
    run = tmp_path / "killed"
    before = kill9_workers_mid_run(command(run, corpus_cache, common), run, at_step=25,
                                   cwd=tmp_path, log_path=tmp_path / "killed.log")
    resume_at = max(checkpoint_steps(run))
    assert resume_at < max(before) < 60, (checkpoint_steps(run), max(before))
    rc, out = launch(run, corpus_cache, *common)
    assert rc == 0, out[-3000:]
    assert f"at step {resume_at}" in out, out[-3000:]
    a, b = train_losses(ref), train_losses(run)
    assert all(before[s] == a[s] for s in before)
    assert [b[s] for s in range(resume_at + 1, 61)] == [a[s] for s in range(resume_at + 1, 61)]


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_signal_saves_and_exits_cleanly(tmp_path, corpus_cache, sig):
    run = tmp_path / "sig"
    run.mkdir()
    proc = subprocess.Popen(command(run, corpus_cache, BF16 + ["train.train_iters=100000",
                                                                 "train.log_interval=1"]),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env(), cwd=str(tmp_path), start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            m = run / "metrics.jsonl"
            if m.is_file() and len(records(run, "train")) >= 3:
                break
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.5)
        if sig == "SIGTERM":  # what Slurm does to a job step at preemption: the whole group
            os.killpg(proc.pid, signal.SIGTERM)
        else:  # Slurm --signal=USR1@T signals the tasks; torchrun's agent has no USR1 handler
            for child in worker_pids(proc.pid):
                os.kill(child, signal.SIGUSR1)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert f"[signal] {sig} received: saved step" in out, out[-4000:]
    last = max(r["step"] for r in records(run, "train"))
    assert checkpoint_steps(run) == [last]
    assert json.loads((run / "result.json").read_text())["stopped_by_signal"] == sig
    if sig == "SIGUSR1":  # workers exited 0, so torchrun does (on SIGTERM torchrun itself exits 1)
        assert proc.returncode == 0




def test_injected_nan_halts_and_keeps_the_last_checkpoint(tmp_path, corpus_cache):
    run = tmp_path / "nan"
    rc, out = launch(run, corpus_cache, *BF16, "train.train_iters=10", "train.save_interval=10",
                     "train.warmup_iters=2",
                     "train.eval_interval=0")
    assert rc == 0, out[-3000:]
    ckpt = run / "checkpoints" / "step_0000010"
    before = tree_hash(ckpt)
    rc, out = launch(run, corpus_cache, *BF16, "train.train_iters=30", "train.save_interval=10",
                     "train.warmup_iters=2",
                     "train.eval_interval=0", "train.inject_nan_at_step=12")
    assert rc != 0
    assert "loss is nan at step 12" in out and "step_0000010" in out, out[-3000:]
    assert tree_hash(ckpt) == before
    assert checkpoint_steps(run) == [10]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert records(run, "train")[-1] == {**records(run, "train")[-1], "step": 12, "diverged": True}


@pytest.mark.slow
def test_precision_switch_at_configured_step_survives_resume(tmp_path, corpus_cache):
    base = ["+recipe=nvfp4_tiny", "train.train_iters=16", "train.log_interval=4",
            "train.warmup_iters=2",
            "train.eval_interval=0", "train.save_interval=10"]
    switch = ["precision.switch_to_bf16.at_step=8", "precision.switch_to_bf16.scope=all"]
    u, i, n = tmp_path / "u", tmp_path / "i", tmp_path / "n"
    rc, out = launch(u, corpus_cache, *base, *switch)
    assert rc == 0, out[-3000:]
    assert "[precision] step 8: switching all GEMMs to BF16" in out
    assert [r["step"] for r in records(u, "precision")] == [8]
    rc, out = launch(n, corpus_cache, *base)
    assert rc == 0, out[-3000:]
    lu, ln = train_losses(u), train_losses(n)
    # metrics step k = after k optimizer steps; the switch applies from the 9th step on.
    assert [lu[s] for s in range(1, 9)] == [ln[s] for s in range(1, 9)]
    assert lu[9] != ln[9]

    rc, out = launch(i, corpus_cache, *base, *switch, "train.exit_after_step=12")
    assert rc != 0
    rc, out = launch(i, corpus_cache, *base, *switch)
    assert rc == 0, out[-3000:]
    assert "at step 10 (BF16 switch active: all)" in out
    li = train_losses(i)
    assert [li[s] for s in range(1, 17)] == [lu[s] for s in range(1, 17)]


def _grad_norms(run_dir):
    return {r["step"]: r["grad_norm"] for r in records(run_dir, "train")}


def test_every_layout_trains_like_one_process(tmp_path, corpus_cache):
    """Same seed, same 16 samples per step: DP2, TP2 (+SP) and PP2 must match one process.

    Losses and gradient norms of the first two steps agree up to BF16 reassociation (loose relative
    bound). The checks that this catches: gradients not reduced over data-parallel ranks (each
    rank stepping on its own half-batch gradient: norm off by ~30% here), sequence-parallel norm
    gradients not all-reduced, a loss divided by the number of micro-batches (factor 2).
    """
    two_steps = ["+recipe=bf16_tiny", "train.train_iters=2", "train.lr_schedule=constant",
                 "train.warmup_iters=0", "train.eval_interval=0", "train.eval_iters=1",
                 "train.save_interval=null", "logging.plot=false"]
    runs = {}
    for name, nproc, layout in (
            ("one", 1, []), ("dp2", 2, []),
            ("tp2sp", 2, ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]),
            ("pp2", 2, ["parallel.pipeline_model_parallel_size=2"])):
        rc, out = launch(tmp_path / name, corpus_cache, *two_steps, *layout, nproc=nproc)
        assert rc == 0, out[-3000:]
        runs[name] = (train_losses(tmp_path / name), _grad_norms(tmp_path / name))
    ref_loss, ref_gn = runs["one"]
    for name, (loss, gn) in runs.items():
        for step in (1, 2):
            assert abs(loss[step] - ref_loss[step]) <= 1e-2 * ref_loss[step], (name, runs)
        assert abs(gn[1] - ref_gn[1]) <= 2e-2 * ref_gn[1], (name, runs)
