"""The CPU adapter: tensor-parallel Megatron on gloo, and never applied when a GPU exists."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nvfp4_megatron.platform import cpu_adapter
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
    from nvfp4_megatron.platform import distributed

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
        "from nvfp4_megatron.platform import cpu_adapter as c\n"
        "c.install_cpu_adapter(); c.install_cpu_adapter()\n"
        "for n in c.PATCHED_MODULES:\n"
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
