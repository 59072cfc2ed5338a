"""The fused cross-entropy kernels against Megatron's ``vocab_parallel_cross_entropy`` under
Triton's CPU interpreter, on one process and on two tensor-parallel ranks (gloo); the bounds are
``ce_cases.py``'s (the GPU twin is in test_kernels_gpu.py).

Runs in a fresh subprocess with ``TRITON_INTERPRET=1`` (the interpreter must be on before the
kernels are wrapped). Cases: vocabulary sizes that are and are not multiples of the kernels'
4096-wide step, heavy-tailed logits, a masked-out (zero) loss gradient for one token, a row whose
target is its max, BF16, FP16 and FP32 logits; the vocabulary split over two ranks gives the
same loss and gradients as one rank holding it all, and Megatron's two-rank function agrees;
label smoothing goes to Megatron's function.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytest.importorskip("megatron.core")

_SCRIPT = r"""
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, {here!r})
import ce_cases as cc
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy as megatron_ce
from nvfp4_megatron.kernels import cross_entropy as ce

V2, HALF = 6000, 3000  # the two-rank case: its vocabulary and each rank's half


def one_process():
    dist.init_process_group("gloo", init_method=f"file://{{tempfile.mktemp()}}", rank=0, world_size=1)
    group = dist.group.WORLD
    n = cc.check_one_process(((5, 2, 1000), (3, 2, 8192), (2, 3, 5000)),
                             (torch.bfloat16, torch.float16, torch.float32), group)
    # a call the kernels do not cover goes to Megatron's function (clones: Megatron's function
    # works in place on FP32 logits)
    logits, target, up = cc.case(3, 2, 300, torch.float32, seed=99)
    a = ce.fused_vocab_parallel_cross_entropy(logits.clone(), target, label_smoothing=0.1, tp_group=group,
                                              _original=megatron_ce, _on_cpu_ok=True)
    assert torch.equal(a, megatron_ce(logits.clone(), target, label_smoothing=0.1, tp_group=group))
    dist.destroy_process_group()
    return n


def two_ranks(rank, init, out):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    group = dist.group.WORLD
    for dtype in (torch.bfloat16, torch.float32):
        logits, target, up = cc.case(4, 2, V2, dtype, seed=7)
        mine = logits[..., rank * HALF:(rank + 1) * HALF].contiguous()
        got = cc.run(cc.ours, mine, target, up, group)
        cc.compare(f"tp2 rank {{rank}} {{dtype}} vs Megatron tp2", got, cc.run(cc.megatron, mine, target, up, group),
                   dtype, target, up, rank * HALF)
        torch.save(got, f"{{out}}.{{dtype}}.{{rank}}")
    dist.destroy_process_group()


if __name__ == "__main__":
    n = one_process()
    out = tempfile.mktemp()
    mp.spawn(two_ranks, args=(f"file://{{tempfile.mktemp()}}", out), nprocs=2, join=True)
    dist.init_process_group("gloo", init_method=f"file://{{tempfile.mktemp()}}", rank=0, world_size=1)
    for dtype in (torch.bfloat16, torch.float32):
        logits, target, up = cc.case(4, 2, V2, dtype, seed=7)
        full = cc.run(cc.ours, logits, target, up, dist.group.WORLD)
        (l0, g0), (l1, g1) = torch.load(f"{{out}}.{{dtype}}.0"), torch.load(f"{{out}}.{{dtype}}.1")
        assert torch.equal(l0, l1), "the two ranks computed different losses"
        cc.compare(f"tp2 vs one rank {{dtype}}", (l0, torch.cat([g0, g1], -1)), full, dtype, target, up)
        print(f"ok tp2 {{dtype}}")
    print(f"CASES {{n}}")
"""


def test_fused_cross_entropy_matches_megatron_in_interpreter(tmp_path):
    script = tmp_path / "ce_check.py"
    script.write_text(_SCRIPT.format(here=os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(sys.path))
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "CASES 9" in p.stdout and "ok tp2 torch.float32" in p.stdout, p.stdout[-3000:]
