"""Throughput figures for the progress line, ``metrics.jsonl`` and ``scripts/bench_step.py``.

One FLOP formula for the whole project: :func:`nvfp4_megatron.parallel.model_stats.flops_per_step`
(model FLOPs, forward + backward = 3 x forward; per token and layer: the linear GEMMs
``2 h (q + 2 kv) + 2 q h`` for attention and ``2 h g f + 2 f h`` for the MLP (g = 2 when gated),
causal attention ``2 s q`` (QK^T and AV over half the score matrix), and the LM head ``2 h V``;
no recomputation counted). The planner's estimates use the same function.

MFU = model FLOPs per step / step time / (GPUs x the GPU's dense BF16 peak), for every recipe:
quantized recipes do the same model FLOPs, and on Hopper the NVFP4 / MXFP8 emulation runs them on
BF16 tensor cores (FP8-CS on FP8 ones; its MFU is still stated against the BF16 peak, as Megatron
and TE report it). The peak comes from ``parallel.hardware.GPU_PEAKS`` by the device's name; a GPU
not in that table gets no MFU (``None``), never a guessed one.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["StepMeter", "gpu_bf16_peak_flops", "model_flops_per_step"]


def model_flops_per_step(cfg: dict) -> float:
    """Model FLOPs of one optimizer step of the composed config (global batch x sequence)."""
    from nvfp4_megatron.parallel.model_stats import ModelShape, flops_per_step

    tokens = cfg["train"]["global_batch_size"] * cfg["model"]["seq_length"]
    return flops_per_step(ModelShape.from_cfg(cfg["model"]), tokens).total


def gpu_bf16_peak_flops(device_name: str) -> float | None:
    """Dense BF16 FLOP/s of a GPU named like ``torch.cuda.get_device_name()`` ('NVIDIA H200')."""
    from nvfp4_megatron.parallel.hardware import GPU_PEAKS

    words = device_name.upper().replace("-", " ").split()
    # longest name first: "GB200" must not be read as "B200"
    for name in sorted(GPU_PEAKS, key=len, reverse=True):
        if name in words:
            return GPU_PEAKS[name].bf16_tflops * 1e12
    return None


@dataclasses.dataclass(kw_only=True)
class StepMeter:
    """Per-step model FLOPs, and MFU / peak memory when running on GPUs."""

    flops_per_step: float
    num_gpus: int
    peak_flops_per_gpu: float | None  # None: CPU, or a GPU missing from the peak table

    @classmethod
    def for_run(cls, cfg: dict, world_size: int) -> "StepMeter":
        peak = (gpu_bf16_peak_flops(torch.cuda.get_device_name())
                if torch.cuda.is_available() else None)
        return cls(flops_per_step=model_flops_per_step(cfg), num_gpus=world_size,
                   peak_flops_per_gpu=peak)

    def mfu(self, step_time_s: float) -> float | None:
        if self.peak_flops_per_gpu is None or step_time_s <= 0:
            return None
        return self.flops_per_step / step_time_s / (self.num_gpus * self.peak_flops_per_gpu)

    def tflops_per_gpu(self, step_time_s: float) -> float:
        return self.flops_per_step / step_time_s / self.num_gpus / 1e12

    @staticmethod
    def peak_memory_gib() -> float | None:
        """``torch.cuda.max_memory_allocated`` of this process's GPU since start, in GiB."""
        if not torch.cuda.is_available():
            return None
        return torch.cuda.max_memory_allocated() / 2**30

    def describe(self) -> str:
        peak = ("no MFU: not on a GPU" if not torch.cuda.is_available() else
                f"MFU against {self.peak_flops_per_gpu / 1e12:.1f} TFLOP/s dense BF16 per GPU"
                if self.peak_flops_per_gpu else
                f"no MFU: {torch.cuda.get_device_name()} is not in parallel/hardware.py's table")
        return f"{self.flops_per_step / 1e12:.3f} model TFLOP per step; {peak}"
