"""The CPU adapter: tensor-parallel Megatron on gloo, and never applied when a GPU exists."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nvfp4_megatron.runtime import cpu_adapter
from nvfp4_megatron.parallel.layout import LayoutError, check_world

HERE = Path(__file__).parent


def _run_worker(nproc: int, tp: int, tmp_path: Path) -> dict:
    out = tmp_path / f"tp{tp}_n{nproc}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--standalone", str(HERE / "tp_worker.py"), str(tp), str(out)]
    if nproc == 1:
        cmd = [sys.executable, str(HERE / "tp_worker.py"), str(tp), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU adapter is for machines without a GPU")
def test_tp2_gloo_forward_backward_matches_tp1(tmp_path):
    one = _run_worker(1, 1, tmp_path)
    two = _run_worker(2, 2, tmp_path)
    assert one["adapter"] and two["adapter"]
    assert two["world"] == 2 and two["backend"] == "gloo"
    # Same seed, same master weights split over 2 ranks: same loss and gradient up to fp32
    # reassociation (the TP split changes summation order only).
    assert abs(one["loss"] - two["loss"]) <= 1e-5 * abs(one["loss"])
    assert abs(one["grad_norm"] - two["grad_norm"]) <= 1e-4 * one["grad_norm"]
    assert one["grad_norm"] > 0


def test_refuses_when_cuda_available(monkeypatch):
    import megatron.core.utils as mutils

    before = mutils.torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        cpu_adapter.install_cpu_adapter()
    assert mutils.torch is before


def test_init_distributed_on_gpu_does_not_install(monkeypatch):
    from nvfp4_megatron.runtime import distributed

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(distributed, "install_cpu_adapter", lambda: calls.append("adapter"))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 1)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: "nccl")
    info = distributed.init_distributed()
    assert calls == [("set_device", 0)]
    assert info.device == torch.device("cuda", 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check")
def test_install_is_idempotent_and_patches_listed_modules():
    code = (
        "import importlib, torch\n"
        "from nvfp4_megatron.runtime import cpu_adapter as c\n"
        "c.install_cpu_adapter(); c.install_cpu_adapter()\n"
        "for n in c.TORCH_PROXIED_MODULES:\n"
        "    assert importlib.import_module(n).torch is c._CpuTorch, n\n"
        "from megatron.core.utils import GlobalMemoryBuffer\n"
        "t = GlobalMemoryBuffer().get_tensor((4,), torch.float32, 'x')\n"
        "assert t.device.type == 'cpu'\n"
        "assert torch.zeros(1).type() == 'torch.FloatTensor'  # unscoped Tensor.type untouched\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_cpu_rng_tracker_fork_is_reproducible():
    from megatron.core.tensor_parallel import random as mrandom

    cls = cpu_adapter._make_cpu_rng_tracker_class(mrandom.CudaRNGStatesTracker)
    tr = cls()
    tr.add("model-parallel-rng", 7)
    torch.manual_seed(0)
    with tr.fork():
        a = torch.rand(3)
    after_default = torch.rand(3)
    torch.manual_seed(0)
    expected_default = torch.rand(3)
    torch.manual_seed(7)
    expected_a = torch.rand(3)
    assert torch.equal(a, expected_a)
    assert torch.equal(after_default, expected_default)  # the default stream is not consumed
    with tr.fork():
        b = torch.rand(3)
    assert not torch.equal(a, b)  # the tracked state advanced


@pytest.mark.parametrize(
    "sizes, world, rule",
    [(dict(tp=2, pp=2), 6, "attention group TP=2 x CP=1 x PP=2 = 4 does not divide world_size=6"),
     (dict(ep=4, etp=1), 6, "expert group ETP=1 x EP=4 x PP=1 = 4 does not divide world_size=6")],
)
def test_layout_that_does_not_divide_names_every_size(sizes, world, rule):
    with pytest.raises(LayoutError) as e:
        check_world(world, **sizes)
    msg = str(e.value)
    assert rule in msg
    assert f"world={world} TP={sizes.get('tp', 1)} CP=1 PP={sizes.get('pp', 1)} " \
           f"EP={sizes.get('ep', 1)} ETP={sizes.get('etp', sizes.get('tp', 1))}" in msg


def test_layout_fits():
    assert check_world(8, tp=2, pp=2) == 2
    with pytest.raises(LayoutError, match="tensor_model_parallel_size \\(TP\\)=0 must be a positive"):
        check_world(8, tp=0)


def test_refuses_an_untested_megatron_version():
    assert cpu_adapter.check_megatron_version("0.19.2+740ef09") == "0.19.2"
    with pytest.raises(RuntimeError, match=r"Megatron-Core 0\.20\.0 is not a version the adapter "
                                           r"was tested with \(0\.19\.2\)"):
        cpu_adapter.check_megatron_version("0.20.0")


def test_a_missing_patch_target_fails_loudly():
    import types

    mod = types.ModuleType("megatron.core.fake")
    with pytest.raises(RuntimeError, match=r"megatron\.core\.fake\.renamed does not exist"):
        cpu_adapter._replace(mod, "renamed", 1)
    assert not hasattr(mod, "renamed")  # nothing was added


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU adapter is for machines without a GPU")
def test_cpu_training_reaches_no_cuda_call_outside_the_adapter(tmp_path, corpus_cache_dir):
    """Two CPU ranks, PP=2 with tied embeddings (the shared weight's ``.cuda()`` in Megatron's
    LanguageModule) train, evaluate and save through ``pretrain.py``'s main with every real CUDA
    entry point watched: no Megatron module may reach one (a module missing from the adapter's
    list would call the real torch.cuda / Tensor.cuda / a device='cuda' factory)."""
    out = tmp_path / "calls"
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "cuda_watch_worker.py"), str(out), "+recipe=nvfp4_tiny",
           f"run_dir={run_dir}", f"data.cache_dir={corpus_cache_dir}",
           "data.default_corpus_max_mb=1.0", "logging.print_precision_table=false",
           "parallel.pipeline_model_parallel_size=2",
           "model.untie_embeddings_and_output_weights=false", "train.train_iters=2",
           "train.global_batch_size=4", "train.micro_batch_size=2", "train.eval_interval=0",
           "train.warmup_iters=0",
           "train.eval_iters=1", "train.log_interval=1", "train.save_interval=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env,
                          cwd=str(tmp_path))
    results = [json.loads((tmp_path / f"calls.{r}.json").read_text()) for r in (0, 1)
               if (tmp_path / f"calls.{r}.json").exists()]
    assert len(results) == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    calls = [c for r in results for c in r["calls"]]
    listed = set(cpu_adapter.PATCHED_MODULES)
    unlisted = sorted({f"{c['module']}:{c['line']} {c['call']}" for c in calls
                       if c["module"] not in listed})
    assert not unlisted, ("Megatron modules not covered by runtime/cpu_adapter.py reached CUDA "
                          "calls on CPU:\n" + "\n".join(unlisted))
    assert not calls, f"listed modules still reached real CUDA calls: {calls}"
    assert [r["rc"] for r in results] == [0, 0], proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [p.name for p in (run_dir / "checkpoints").glob("step_*")] == ["step_0000002"]
