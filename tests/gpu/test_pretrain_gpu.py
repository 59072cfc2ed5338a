"""The product on a GPU: ``torchrun pretrain.py`` trains, resumes exactly, stops on signals and NaN.

Every test starts ``pretrain.py`` through ``torch.distributed.run`` (NCCL, one GPU) on
``configs/model/small.yaml`` (8 blocks, d=512, seq 512: the Triton quantizers and, for FP8-CS on
sm_89+, ``torch._scaled_mm`` run). Run on a machine with a GPU:

    python -m pytest -m gpu tests/gpu        # or: bash scripts/test_gpu.sh

``NVFP4_GPU_SUMMARY=path.jsonl`` appends one JSON line per training run (recipe, losses, tokens/s,
MFU, peak memory, GEMM backends) for the lab notebook (docs/RESULTS.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "training"))
from _train_launch import (checkpoint_steps, command, env,  # noqa: E402
                           kill9_workers_mid_run, train_losses)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SMALL = ["model=small", "train.micro_batch_size=16", "train.global_batch_size=32",
         "train.lr=1e-3", "train.min_lr=1e-4", "train.warmup_iters=5", "train.log_interval=5",
         "train.eval_iters=2", "data.default_corpus_max_mb=4.0"]
# recipes with the paper's BF16-block policy (first 2 + last 8 blocks) need it to fit 8 blocks
PAPER_POLICY = {"nvfp4", "nvfp4_no_rht", "nvfp4_no_sr", "nvfp4_no_2d", "mxfp4"}
RECIPES = ["bf16", "fp8_cs", "fp8_block", "mxfp8", "nvfp4", "nvfp4_no_rht", "nvfp4_no_sr",
           "nvfp4_no_2d", "nvfp4_all_layers", "mxfp4"]


def _overrides(recipe: str) -> list[str]:
    ov = [f"precision.recipe={recipe}"]
    if recipe in PAPER_POLICY:
        ov += ["precision.bf16_first_blocks=1", "precision.bf16_last_blocks=1"]
    return ov


@pytest.fixture(scope="session")
def gpu_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("gpu_corpus_cache")


def _cmd(run_dir, cache, overrides):
    cmd = command(run_dir, cache, [*SMALL, *overrides], nproc=1)
    return [c for c in cmd if not c.startswith("data.default_corpus_max_mb=1.0")]


def _run(run_dir: Path, cache: Path, overrides: list[str], timeout: int = 300):
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(_cmd(run_dir, cache, overrides), capture_output=True, text=True,
                       timeout=timeout, env=env(), cwd=str(run_dir.parent))
    return p.returncode, p.stdout + p.stderr


def _rows(run_dir: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == kind]


def _summarise(name: str, run_dir: Path, out: str) -> dict:
    rows = _rows(run_dir)
    table = (run_dir / "precision_table.txt").read_text().splitlines()
    backends = sorted({line.split()[-1] for line in table[2:] if line.strip()})
    steady = rows[len(rows) // 2:]
    summ = {"name": name, "steps": len(rows), "first_loss": rows[0]["loss"],
            "last_loss": rows[-1]["loss"],
            "valid": [r["loss"] for r in _rows(run_dir, "valid")],
            "step_ms_median": 1e3 * sorted(r["step_time_s"] for r in steady)[len(steady) // 2],
            "mfu_median": sorted(r["mfu"] for r in steady)[len(steady) // 2],
            "peak_mem_gib": rows[-1]["peak_mem_gib"], "backends": backends,
            "table_head": table[0], "device": torch.cuda.get_device_name()}
    path = os.environ.get("NVFP4_GPU_SUMMARY")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(summ) + "\n")
    return summ


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_trains_on_gpu(recipe, tmp_path, gpu_cache):
    run_dir = tmp_path / recipe
    rc, out = _run(run_dir, gpu_cache, [*_overrides(recipe), "train.train_iters=40",
                                        "train.eval_interval=20", "train.save=false"])
    assert rc == 0, out[-4000:]
    s = _summarise(recipe, run_dir, out)
    # loss falling: from ln(4096) = 8.3 at init to well below it in 40 steps
    assert s["last_loss"] < s["first_loss"] - 1.5, s
    assert s["mfu_median"] > 0 and s["peak_mem_gib"] > 0, s
    assert "MFU" in out and "peak mem" in out, out[-2000:]
    # the table names what multiplies each quantized GEMM on this GPU
    cc = torch.cuda.get_device_capability()
    if recipe == "bf16":
        assert s["backends"] == ["bf16"], s
    elif recipe == "fp8_cs" and cc >= (8, 9):
        # E4M3 x E4M3 and E5M2 x E4M3 run cuBLASLt FP8 GEMMs; the BF16 blocks run BF16
        assert s["backends"] == ["bf16", "native:fp8_scaled_mm"], s
    elif recipe == "fp8_block":
        # 1x128 / 128x128 FP32 block scales: no cuBLASLt GEMM on Hopper, FP32 reference matmul
        assert s["backends"] == ["emulated:fp32_reference"], s
    else:
        # NVFP4 / MX: exact dequantized BF16 operands on BF16 tensor cores (no FP4 on Hopper)
        assert "emulated:bf16_dequant" in s["backends"], s
        assert not any(b.startswith("native") for b in s["backends"]), s


def _wait_for_step(run_dir: Path, step: int, proc, timeout: float = 240.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before step {step}")
        m = run_dir / "metrics.jsonl"
        if m.is_file() and any(r["step"] >= step for r in _rows(run_dir)):
            return
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout}s")


@pytest.mark.parametrize("recipe", ["bf16", "nvfp4", "nvfp4+graph"])
def test_kill9_resume_is_bit_identical(recipe, tmp_path, gpu_cache):
    """kill -9 of the worker mid-run; the restart continues from the newest
    checkpoint and every step after it has the loss of the uninterrupted run, bit for bit
    (nvfp4: stochastic rounding on the gradients; +graph: both runs with train.cuda_graph, the
    resumed one warming up eagerly again before its capture)."""
    base, _, graph = recipe.partition("+")
    ov = [*_overrides(base), "train.train_iters=60", "train.save_interval=20",
          "train.eval_interval=0", "train.log_interval=1",
          *(["train.cuda_graph=true"] if graph else [])]
    ref = tmp_path / "ref"
    rc, out = _run(ref, gpu_cache, ov)
    assert rc == 0, out[-4000:]
    _summarise(f"{recipe}_resume_ref", ref, out)
    ref_losses = train_losses(ref)

    run = tmp_path / "killed"
    before = kill9_workers_mid_run(_cmd(run, gpu_cache, ov), run, at_step=25, cwd=tmp_path,
                                   log_path=tmp_path / "killed.log")
    ckpts = checkpoint_steps(run)
    assert ckpts and ckpts[-1] < max(before) < 60, (ckpts, max(before))
    resume_at = ckpts[-1]
    rc, out = _run(run, gpu_cache, ov)
    assert rc == 0, out[-4000:]
    assert f"at step {resume_at}" in out, out[-3000:]
    after = train_losses(run)
    # the killed run's own steps are the reference's (same GPU, same kernels: deterministic);
    # steps resume_at+1 .. max(before) ran twice; every step after the resume is bit-identical
    rerun = {s: (before[s], ref_losses[s]) for s in before if before[s] != ref_losses[s]}
    diffs = {s: (after[s], ref_losses[s]) for s in range(resume_at + 1, 61)
             if after[s] != ref_losses[s]}
    with open(os.environ.get("NVFP4_GPU_SUMMARY", os.devnull), "a") as f:
        f.write(json.dumps({"name": f"{recipe}_kill9_resume", "killed_after_step": max(before),
                            "resumed_at": resume_at, "steps_compared": 60 - resume_at,
                            "first_segment_differs_at": sorted(rerun)[:5],
                            "resumed_differs_at": sorted(diffs)[:5]}) + "\n")
    assert not rerun, f"same run twice differs (a nondeterministic kernel): {rerun}"
    assert not diffs, diffs


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_sigterm_saves_and_exits_0(tmp_path, gpu_cache):
    """SIGTERM (Slurm preemption) finishes the step, saves, and the process exits 0 (plain
    ``python pretrain.py``: torchrun's own agent exits 1 when it is signalled itself)."""
    run = tmp_path / "term"
    run.mkdir()
    cmd = [sys.executable,  # pretrain.py and its arguments, without torchrun
           *_cmd(run, gpu_cache, [*_overrides("nvfp4"), "train.train_iters=2000",
                                  "train.eval_interval=0", "train.log_interval=1"])[5:]]
    with open(tmp_path / "term.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env(),
                                cwd=str(tmp_path), start_new_session=True)
        try:
            _wait_for_step(run, 5, proc)
            os.kill(proc.pid, signal.SIGTERM)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = (tmp_path / "term.log").read_text()
    assert rc == 0, text[-3000:]
    result = json.loads((run / "result.json").read_text())
    assert result["stopped_by_signal"] == "SIGTERM", result
    step = result["iteration"]
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == [f"step_{step:07d}"]
    assert f"[signal] SIGTERM received: saved step {step}" in text, text[-2000:]


def test_nan_exits_3_and_keeps_the_last_checkpoint(tmp_path, gpu_cache):
    """An injected NaN loss: exit status 3 (plain ``python pretrain.py``; torchrun reports a failed
    worker as 1), the step named, the last checkpoint byte-identical, nothing newer written."""
    run = tmp_path / "nan"
    ov = [*_overrides("nvfp4"), "train.save_interval=5", "train.eval_interval=0",
          "train.warmup_iters=2", "train.train_iters=20"]
    rc, out = _run(run, gpu_cache, [*ov, "train.exit_after_step=5"])
    assert rc != 0 and "exit_after_step=5" in out, out[-3000:]
    ckpt = run / "checkpoints" / "step_0000005"
    digest = _tree_digest(ckpt)
    p = subprocess.run([sys.executable, *_cmd(run, gpu_cache, [*ov, "train.inject_nan_at_step=7"])[5:]],
                       capture_output=True, text=True, timeout=300, env=env(), cwd=str(tmp_path))
    rc, out = p.returncode, p.stdout + p.stderr
    assert rc == 3, out[-3000:]
    assert "loss is nan at step 7" in out, out[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000005"]
    assert _tree_digest(ckpt) == digest


# train.cuda_graph: (name, overrides). nvfp4 draws stochastic-rounding seeds every step (the
# replays must get the eager seeds); the switch run drops the graph at step 8 and captures again
GRAPH_CASES = {
    "bf16": _overrides("bf16"),
    "fp8_cs": _overrides("fp8_cs"),
    "nvfp4": _overrides("nvfp4"),
    "nvfp4_all_layers": _overrides("nvfp4_all_layers"),
    "nvfp4_tgemm": [*_overrides("nvfp4"), "precision.emulated_gemm=triton"],
    "nvfp4_switch_all": [*_overrides("nvfp4"), "precision.switch_to_bf16.scope=all",
                         "precision.switch_to_bf16.at_step=8"],
}


def _with_and_without(tmp_path, gpu_cache, base, option, installed, kernel) -> dict:
    """{False: (train rows, valid rows), True: ...}: ``base`` run with ``option`` off and on; the
    run with it logs ``installed`` and neither falls back to Megatron's function for ``kernel``."""
    runs = {}
    for on in (False, True):
        run_dir = tmp_path / f"{option}_{on}"
        rc, out = _run(run_dir, gpu_cache, [*base, f"{option}={str(on).lower()}"])
        assert rc == 0, out[-4000:]
        assert (installed in out) == on, out[-3000:]
        assert f"{kernel}: Megatron's own function" not in out, out[-3000:]
        runs[on] = (_rows(run_dir), _rows(run_dir, "valid"))
    return runs


def test_fused_rope_trains_the_same_bits(tmp_path, gpu_cache):
    """train.fused_rope=true: the fused RoPE kernel gives Megatron's unfused RoPE's bits, so every
    loss, gradient norm and validation loss of a run equals the run without it."""
    base = [*_overrides("nvfp4"), "train.train_iters=8", "train.eval_interval=4", "train.save=false"]
    runs = _with_and_without(tmp_path, gpu_cache, base, "train.fused_rope", "[rope] fused RoPE kernel",
                             "fused RoPE")
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in runs[True][0]] == [r[key] for r in runs[False][0]], key
    assert [r["loss"] for r in runs[True][1]] == [r["loss"] for r in runs[False][1]]


# 8 steps of nvfp4 (paper policy), a loss row every step, validation at 4 and 8, no checkpoints
_SHORT_NVFP4 = [*_overrides("nvfp4"), "train.train_iters=8", "train.eval_interval=4", "train.save=false",
                "train.log_interval=1"]


def test_fused_cross_entropy_trains_like_megatrons(tmp_path, gpu_cache):
    """train.fused_cross_entropy=true: the same forward (step 1's loss equal to a few FP32 ulps:
    only the order of the sum of exponentials differs), and curves that stay together (the
    gradients differ in rare last bits, so the runs drift apart only slowly)."""
    base = _SHORT_NVFP4
    runs = _with_and_without(tmp_path, gpu_cache, base, "train.fused_cross_entropy",
                             "[loss] fused cross-entropy kernels", "fused cross-entropy")
    (eager, eager_valid), (fused, fused_valid) = runs[False], runs[True]
    assert len(fused) == len(eager) == 8
    assert abs(fused[0]["loss"] - eager[0]["loss"]) <= 1e-5 * abs(eager[0]["loss"])
    _losses_close(fused + fused_valid, eager + eager_valid, 1e-3)


def _losses_close(rows, ref_rows, rel: float) -> None:
    """Every loss of ``rows`` within ``rel`` (relative) of the same row of ``ref_rows``."""
    assert len(rows) == len(ref_rows)
    for a, b in zip(rows, ref_rows):
        assert abs(a["loss"] - b["loss"]) <= rel * abs(b["loss"]), (a, b)


@pytest.mark.parametrize("name", list(GRAPH_CASES))
def test_cuda_graph_trains_the_same_bits(name, tmp_path, gpu_cache):
    # 2 micro-batches per step (weight copies reused inside the graph too); telemetry every 5
    # steps (those steps run eagerly); an evaluation at step 6 between replays
    base = [*GRAPH_CASES[name], "train.train_iters=12", "train.eval_interval=6",
            "train.save=false", "logging.quant_stats_interval=5"]
    runs = {}
    for graph in (False, True):
        run_dir = tmp_path / f"{name}_{'graph' if graph else 'eager'}"
        rc, out = _run(run_dir, gpu_cache, [*base, f"train.cuda_graph={str(graph).lower()}"])
        assert rc == 0, out[-4000:]
        _summarise(f"{name}{'+graph' if graph else ''}", run_dir, out)
        runs[graph] = (_rows(run_dir), _rows(run_dir, "valid"), out)
    (eager, eager_valid, _), (graphed, graphed_valid, out) = runs[False], runs[True]
    assert [r["loss"] for r in graphed] == [r["loss"] for r in eager]
    assert [r["grad_norm"] for r in graphed] == [r["grad_norm"] for r in eager]
    assert [r["loss"] for r in graphed_valid] == [r["loss"] for r in eager_valid]
    # steps 1-2 warm up, 5 and 10 record telemetry; the switch run warms up again at step 9
    want_eager = {1, 2, 5, 10} | ({9} if name == "nvfp4_switch_all" else set())
    assert {r["step"] for r in graphed if not r["graphed"]} == want_eager, graphed
    seeds = [int(n) for n in re.findall(r"\[cuda_graph\] captured the step \(2 micro-batches, "
                                        r"(\d+) stochastic-rounding seeds", out)]
    # one capture, two for the switch run (its second one all BF16: no seeds); NVFP4 rounds the
    # gradient copies stochastically, so its replays need seeds
    want = {"nvfp4": "+", "nvfp4_all_layers": "+", "nvfp4_tgemm": "+",
            "nvfp4_switch_all": "+0"}.get(name, "0")
    assert ["+" if n > 0 else "0" for n in seeds] == list(want), (seeds, out[-3000:])


def test_gradient_accumulation_fusion_trains_like_without(tmp_path, gpu_cache):
    """train.gradient_accumulation_fusion=true (``mcore/grad_accum.py`` in place of Apex): Megatron's
    BF16 linears (the BF16 blocks, the LM head) and the quantized linears add each micro-batch's
    weight gradient to ``main_grad`` in FP32 without rounding it to BF16 first. Step 1's loss is the
    same (the forward does not change), its gradient norm is not (the option is on), and the runs
    stay within 1e-3 of each other."""
    base = _SHORT_NVFP4
    runs = _with_and_without(tmp_path, gpu_cache, base, "train.gradient_accumulation_fusion",
                             "[fusion] gradient_accumulation_fusion", "gradient_accumulation_fusion")
    (off, off_valid), (on, on_valid) = runs[False], runs[True]
    assert len(on) == len(off) == 8
    assert on[0]["loss"] == off[0]["loss"]
    assert on[0]["grad_norm"] != off[0]["grad_norm"]
    _losses_close(on + on_valid, off + off_valid, 1e-3)
