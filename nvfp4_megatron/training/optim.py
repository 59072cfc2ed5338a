"""Optimizer and learning-rate schedule: Megatron's distributed Adam and OptimizerParamScheduler.

Schedules (``train.lr_schedule``):
* ``wsd`` — warmup-stable-decay as in the NVFP4 paper (arXiv 2509.25149 §4 / App. A): linear warmup
  over ``warmup_iters``, constant ``lr`` until the last ``lr_decay_fraction`` of training, then a
  linear decay to ``min_lr`` (the 12B run: 4.5e-4 for 80%, decayed to 4.5e-6 over the last 20%).
* ``cosine`` — linear warmup, cosine decay from ``lr`` to ``min_lr`` at the last step.
* ``constant`` — linear warmup, then ``lr``.
The scheduler's state is its step count, saved in every checkpoint.
"""

from __future__ import annotations

import contextlib


def total_iters(train: dict, *, seq_length: int) -> int:
    if train["train_iters"] is not None:
        if train["train_iters"] < 1:
            raise ValueError(f"train.train_iters={train['train_iters']} must be >= 1")
        return int(train["train_iters"])
    if train["train_tokens"] is not None:
        per_step = train["global_batch_size"] * seq_length
        return max(1, int(-(-int(train["train_tokens"]) // per_step)))
    raise ValueError("set train.train_iters or train.train_tokens")


def build_optimizer(ddp_model, train: dict, *, bf16: bool):
    import torch
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam",
        lr=train["lr"],
        min_lr=train["min_lr"],
        weight_decay=train["weight_decay"],
        adam_beta1=train["adam_beta1"],
        adam_beta2=train["adam_beta2"],
        clip_grad=train["clip_grad"],
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=train["use_distributed_optimizer"],
    )
    with torch_adam_in_megatron():
        optimizer = get_megatron_optimizer(config, [ddp_model])
    if torch.cuda.is_available():
        use_fused_adam(optimizer)
    return optimizer


@contextlib.contextmanager
def torch_adam_in_megatron():
    """Make Megatron-Core build torch's AdamW, also where Transformer Engine is installed.

    Megatron-Core picks its Adam class when ``megatron.core.optimizer`` is imported: TE's
    ``FusedAdam`` if TE imports, else Apex's, else torch's, and records the choice in the module
    flag ``USING_PYTORCH_OPTIMIZER`` that ``get_megatron_optimizer`` reads. The project pins torch's
    AdamW (its fused kernel on GPU, :func:`use_fused_adam`) on every machine, so that the numerics
    and the checkpoints (``training/checkpoint.py`` restores torch Adam's per-parameter ``step``)
    are the same with and without TE. Seen on the H200 with TE 2.18 installed (2026-12-03):
    without this, Megatron built TE's FusedAdam and every run stopped in ``use_fused_adam``.
    Megatron's DistributedOptimizer supports torch's AdamW either way.
    """
    import megatron.core.optimizer as mopt

    if not hasattr(mopt, "USING_PYTORCH_OPTIMIZER"):
        raise RuntimeError(
            "megatron.core.optimizer has no USING_PYTORCH_OPTIMIZER flag in this Megatron-Core "
            "version: training/optim.py cannot pin torch's AdamW; update torch_adam_in_megatron")
    saved = mopt.USING_PYTORCH_OPTIMIZER
    mopt.USING_PYTORCH_OPTIMIZER = True
    try:
        yield
    finally:
        mopt.USING_PYTORCH_OPTIMIZER = saved


def inner_optimizers(optimizer) -> list:
    """The torch optimizers inside Megatron's (possibly chained) distributed optimizer."""
    return [opt.optimizer for opt in getattr(optimizer, "chained_optimizers", [optimizer])]


def use_fused_adam(optimizer) -> None:
    """Run torch's Adam as its fused CUDA kernel (one launch per dtype/device group).

    Without Apex or Transformer Engine, Megatron-Core builds ``torch.optim.AdamW`` with neither
    ``fused`` nor ``foreach`` (torch then picks the multi-launch foreach path); the fused kernel
    computes the same update in one pass over the FP32 master weights. The flag is read from the
    param group at each ``step()``; ``fused`` Adam keeps its ``step`` counters on the parameter's
    device (``training/checkpoint.py`` creates them there when it restores them).
    """
    import torch

    for inner in inner_optimizers(optimizer):
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            raise TypeError(f"use_fused_adam: expected torch Adam/AdamW inside Megatron's "
                            f"optimizer, found {type(inner).__name__}")
        for group in inner.param_groups:
            if any(not (p.is_cuda and p.dtype.is_floating_point) for p in group["params"]):
                raise ValueError("fused Adam needs floating-point CUDA parameters")
            group["fused"], group["foreach"] = True, False
        inner.defaults["fused"], inner.defaults["foreach"] = True, False


def build_scheduler(optimizer, train: dict, iters: int):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    sched = train["lr_schedule"]
    warmup = train["warmup_iters"]
    if warmup >= iters and sched != "constant":
        raise ValueError(f"train.warmup_iters={warmup} must be < the number of steps {iters}")
    if not 0.0 < train["lr_decay_fraction"] <= 1.0 and sched == "wsd":
        raise ValueError(f"train.lr_decay_fraction={train['lr_decay_fraction']} must be in (0, 1]")
    style = {"wsd": "WSD", "cosine": "cosine", "constant": "constant"}[sched]
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup > 0 else train["lr"],
        max_lr=train["lr"],
        min_lr=train["min_lr"],
        lr_warmup_steps=warmup,
        lr_decay_steps=iters,
        lr_decay_style=style,
        start_wd=train["weight_decay"],
        end_wd=train["weight_decay"],
        wd_incr_steps=iters,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
        wsd_decay_steps=max(1, round(train["lr_decay_fraction"] * iters)) if sched == "wsd" else None,
        lr_wsd_decay_style="linear" if sched == "wsd" else None,
    )
