"""CPU tests of the GPU-facing pieces: FLOPs/MFU, the foreach grad-norm/scale, fused-Adam
plumbing, and DDP's overlapped gradient reduce with quantized linears (2 gloo processes)."""

import math

import pytest
import torch

from nvfp4_megatron.runtime.gpu_fastpaths import foreach_l2_norm, foreach_scale
from nvfp4_megatron.training.throughput import StepMeter, gpu_bf16_peak_flops, model_flops_per_step


def test_peak_by_device_name():
    assert gpu_bf16_peak_flops("NVIDIA H200") == 989.5e12
    assert gpu_bf16_peak_flops("NVIDIA H100 80GB HBM3") == 989.5e12
    assert gpu_bf16_peak_flops("NVIDIA GB200") == 2500e12  # not read as B200
    assert gpu_bf16_peak_flops("NVIDIA B200") == 2250e12
    assert gpu_bf16_peak_flops("NVIDIA A100-SXM4-80GB") is None  # not in the table: no guess


def test_flops_formula_by_hand():
    """The 1.2B paper shape at seq 4096, 2 sequences: the hand formula of the old bench."""
    L, d, V, s, q, kv, f = 20, 2048, 131072, 4096, 16 * 128, 8 * 128, 6144
    cfg = {"model": dict(num_layers=L, hidden_size=d, ffn_hidden_size=f, num_attention_heads=16,
                         num_query_groups=8, kv_channels=128, vocab_size=V, seq_length=s,
                         activation="squared_relu"),
           "train": {"global_batch_size": 2}}
    per_token = 2 * L * d * (q + 2 * kv + d + 2 * f) + 2 * 2 * L * s * q * 0.5 + 2 * d * V
    assert model_flops_per_step(cfg) == pytest.approx(3 * 2 * s * per_token, rel=1e-12)
    meter = StepMeter(flops_per_step=1e15, num_gpus=2, peak_flops_per_gpu=1e15)
    assert meter.mfu(1.0) == 0.5 and meter.tflops_per_gpu(1.0) == 500.0
    assert StepMeter(flops_per_step=1e15, num_gpus=1, peak_flops_per_gpu=None).mfu(1.0) is None


def test_foreach_norm_and_scale_match_plain_torch():
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(n, generator=g) * 10 ** (i - 2) for i, n in enumerate((7, 300, 1, 4096))]
    ref = torch.linalg.vector_norm(torch.cat(ts).double()).item()
    norm, per = foreach_l2_norm(2048 * 32, None, [ts], False)
    assert per is None and norm.shape == (1,)
    assert math.isclose(norm.item(), ref, rel_tol=1e-6)
    with pytest.raises(NotImplementedError):
        foreach_l2_norm(0, None, [ts], True)
    # in place (clipping) and copy with a dtype change (FP32 master -> BF16 model params)
    a = [t.clone() for t in ts]
    foreach_scale(0, None, [a, a], 0.5)
    assert all(torch.equal(x, y * 0.5) for x, y in zip(a, ts))
    b = [torch.empty_like(t, dtype=torch.bfloat16) for t in ts]
    foreach_scale(0, None, [ts, b], 1.0)
    assert all(torch.equal(x, y.bfloat16()) for x, y in zip(b, ts))
    foreach_scale(0, None, [ts, b], 3.0)
    assert all(torch.equal(x, (y * 3.0).bfloat16()) for x, y in zip(b, ts))


def test_fused_adam_refuses_cpu_parameters():
    from nvfp4_megatron.training.optim import use_fused_adam

    class Wrapped:  # the shape of a Megatron optimizer: .optimizer is the torch one
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])

    with pytest.raises(ValueError, match="CUDA"):
        use_fused_adam(Wrapped())


def test_megatron_builds_torch_adamw_where_te_would_be_picked(monkeypatch):
    """With TE installed Megatron-Core's module flag says "not torch" and its Adam is TE's
    FusedAdam; inside torch_adam_in_megatron the flag says torch (AdamW), and it is restored."""
    import megatron.core.optimizer as mopt

    from nvfp4_megatron.training.optim import torch_adam_in_megatron

    class FusedAdam:  # stands for transformer_engine.pytorch.optimizers.FusedAdam
        pass

    monkeypatch.setattr(mopt, "Adam", FusedAdam)
    monkeypatch.setattr(mopt, "USING_PYTORCH_OPTIMIZER", False)
    with torch_adam_in_megatron():
        assert mopt.USING_PYTORCH_OPTIMIZER is True
    assert mopt.USING_PYTORCH_OPTIMIZER is False
    monkeypatch.delattr(mopt, "USING_PYTORCH_OPTIMIZER")
    with pytest.raises(RuntimeError, match="USING_PYTORCH_OPTIMIZER"):
        with torch_adam_in_megatron():
            pass


def test_adam_step_counter_placement():
    from nvfp4_megatron.training.checkpoint import _step_tensor

    p = torch.nn.Parameter(torch.zeros(2))
    assert _step_tensor({"fused": False}, p, 7.0).device.type == "cpu"
    t = _step_tensor({"fused": True}, p, 7.0)  # on the parameter's device (CPU here)
    assert t.device == p.device and t.dtype == torch.float32 and t.item() == 7.0


@pytest.mark.slow  # two 2-process runs, about 40 s
def test_overlap_grad_reduce_gives_the_same_losses(tmp_path, corpus_cache):
    """DDP's overlapped bucket reduce-scatter (DP2, 2 micro-batches per rank) with NVFP4
    quantized linears: the same losses, bit for bit, as the reduce after the backward."""
    from _train_launch import launch, train_losses

    losses = {}
    for flag in ("false", "true"):
        run = tmp_path / f"overlap_{flag}"
        rc, out = launch(run, corpus_cache, "+recipe=nvfp4_tiny", "train.train_iters=25",
                         "train.micro_batch_size=4", "train.save=false", "train.eval_iters=1",
                         f"train.overlap_grad_reduce={flag}")
        assert rc == 0, out[-3000:]
        assert f"overlap_grad_reduce={flag.capitalize()}" in out
        losses[flag] = train_losses(run)
    assert len(losses["true"]) == 25
    assert losses["true"] == losses["false"]


def test_nondeterministic_op_names_the_knob(monkeypatch, capsys):
    """Strict deterministic mode (train.deterministic, GPU) raises for an op without a
    deterministic kernel: pretrain.py exits 2 and says which knob allows it."""
    from nvfp4_megatron.cli import pretrain
    from nvfp4_megatron.training import loop

    def boom(cfg):
        raise RuntimeError("kthvalue CUDA does not have a deterministic implementation, but you "
                           "set 'torch.use_deterministic_algorithms(True)'")

    monkeypatch.setattr(loop, "run", boom)
    assert pretrain.main(["+recipe=nvfp4_tiny"]) == 2
    err = capsys.readouterr().err
    assert "kthvalue" in err and "train.deterministic=false" in err

    def other(cfg):
        raise RuntimeError("something else")

    monkeypatch.setattr(loop, "run", other)
    with pytest.raises(RuntimeError, match="something else"):
        pretrain.main(["+recipe=nvfp4_tiny"])
