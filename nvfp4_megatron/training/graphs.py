"""CUDA graphs of the training step (``train.cuda_graph=true``).

Why: on a small model each quantized linear costs about 1 ms of host time per direction (Python,
a dozen kernel launches, cuBLASLt setup) against far less GPU work, so the GPU idles and an
emulated-NVFP4 step runs at a quarter of BF16's speed (docs/PERFORMANCE.md). A captured step
replays every kernel with one launch.

What is captured: Megatron's forward/backward schedule of one whole step (every micro-batch,
inside the weight-copy reuse scope, exactly as the eager loop runs it), with the schedule's
``finalize_model_grads_func`` taken out during the capture and called eagerly after each replay,
so no collective is inside the graph. Outside it, as before: zeroing the gradient buffers, the
optimizer step (its gradient norm reads the host), the loss reduction, logging, evaluation and
checkpoints.

Same numbers as eager: a replay runs the kernels the captured step launched, on the same
addresses, after the step's micro-batches are copied into the graph's static input buffers. The
stochastic-rounding seeds, which change every step, are read by the quantizer kernel from device
memory: during the capture each draw gets a slot of ``quant.state.SeedSlots``, and before every
replay the slots receive the seeds the eager step would use (``SeedSlots.fill``). Checked on the
GPU by training the same runs with and without graphs and comparing every loss, and by a kill -9
resume of a graphed run (tests/gpu/test_pretrain_gpu.py).

Streams: autograd keeps each parameter's gradient-accumulation node on the stream it was created
on, and Megatron's DDP creates (and keeps) those nodes when it wraps the model; a capture on
another stream then fails. So a graphed run builds its model and trains on one side stream,
which is also the capture stream (:func:`graph_stream`).

Eager steps in a graphed run: the first ``WARMUP_STEPS`` (Triton compilation, cuBLAS workspaces,
Megatron's lazy buffers happen outside the capture), steps that record quantization telemetry,
the NaN test knob's step, and a step after the BF16 precision switch (the graph is dropped and
captured again with the new GEMMs). Refused with an error naming the setting: no GPU, more than
one process or any model parallelism, dropout (Megatron's RNG tracker swaps generator states,
which a capture cannot contain), MoE, ``train.overlap_grad_reduce=true``.
"""

from __future__ import annotations

import contextlib

import torch

from nvfp4_megatron.quant import linear as qlinear
from nvfp4_megatron.quant import state as qstate

WARMUP_STEPS = 2
_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


class GraphCaptureError(NotImplementedError):
    """Capturing the step failed (an operation of this model cannot be captured): the message names
    the cause and ``train.cuda_graph=false``; ``pretrain.py`` exits 2 with it."""


def check_graph_config(c: dict, world_size: int, *, cuda: bool | None = None) -> None:
    """Refuse ``train.cuda_graph=true`` where the captured step would not be the eager step."""
    t, p, m = c["train"], c["parallel"], c["model"]
    if not t["cuda_graph"]:
        return
    cuda = torch.cuda.is_available() if cuda is None else cuda
    problems = []
    if not cuda:
        problems.append("there is no CUDA GPU (CUDA graphs are a GPU feature)")
    if world_size != 1:
        problems.append(f"the run has {world_size} processes (graphed steps are implemented for "
                        "one GPU: no collective may run inside the graph)")
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                "context_parallel_size", "expert_model_parallel_size"):
        if p[key] != 1:
            problems.append(f"parallel.{key}={p[key]} (needs 1)")
    for key in ("hidden_dropout", "attention_dropout"):
        if m.get(key, 0.0):
            problems.append(f"model.{key}={m[key]} (dropout's RNG-state swaps cannot be captured; "
                            "set it to 0)")
    if m.get("num_moe_experts") is not None:
        problems.append("model.num_moe_experts is set (token routing sizes tensors on the host)")
    if t["overlap_grad_reduce"]:
        problems.append("train.overlap_grad_reduce=true (its bucket reduce-scatters would run "
                        "inside the graph; leave it null or false)")
    if problems:
        raise ValueError("train.cuda_graph=true cannot be used here: " + "; ".join(problems)
                         + ". Set train.cuda_graph=false.")


@contextlib.contextmanager
def graph_stream(enabled: bool):
    """The side stream a graphed run builds its model on, trains on and captures on (see the
    module docstring); a no-op when not ``enabled``."""
    if not enabled:
        yield None
        return
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        yield stream
    torch.cuda.current_stream().wait_stream(stream)


class StepGraph:
    """The forward/backward schedule of one training step, captured once and replayed.

    ``run(mbs)`` takes the step's micro-batches (dicts of ``tokens``, ``labels``, ``loss_mask``,
    ``position_ids``, on any device), copies them into the graph's inputs, writes the step's
    stochastic-rounding seeds, replays, finalizes the gradients, and returns what the schedule
    returned (the per-micro-batch loss dicts, tensors the next replay overwrites). The first
    call captures. ``reset()`` drops the graph (the BF16 switch changes the GEMMs).
    """

    def __init__(self, *, fb, forward_step, model, num_microbatches: int, seq_length: int,
                 micro_batch_size: int, reuse_weight_copies: bool = True, log=None) -> None:
        from megatron.core.utils import get_model_config

        self.fb, self.forward_step, self.model = fb, forward_step, model
        self.config = get_model_config(model)
        self.nmb, self.seq, self.mbs = num_microbatches, seq_length, micro_batch_size
        self.reuse = reuse_weight_copies
        self.log = log or (lambda msg: None)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list[dict[str, torch.Tensor]] = []
        self.outputs = None
        self.slots: qstate.SeedSlots | None = None

    def reset(self) -> None:
        self.graph, self.inputs, self.outputs, self.slots = None, [], None, None

    def _schedule(self, batches):
        with qlinear.reuse_weight_copies(enabled=self.reuse):
            return self.fb(forward_step_func=self.forward_step, data_iterator=iter(batches),
                           model=[self.model], num_microbatches=self.nmb, seq_length=self.seq,
                           micro_batch_size=self.mbs, forward_only=False)

    def _capture(self, mbs: list[dict]) -> None:
        device = torch.device("cuda", torch.cuda.current_device())
        self.inputs = [{k: mb[k].to(device, copy=True) for k in _KEYS} for mb in mbs]
        self.slots = qstate.SeedSlots(device)
        graph = torch.cuda.CUDAGraph()
        finalize, self.config.finalize_model_grads_func = self.config.finalize_model_grads_func, None
        torch.cuda.synchronize()
        try:
            with qstate.capture_seed_slots(self.slots), \
                    torch.cuda.graph(graph, stream=torch.cuda.current_stream()):
                self.outputs = self._schedule(self.inputs)
        except Exception as e:
            self.reset()
            raise GraphCaptureError(
                f"train.cuda_graph=true: capturing the training step failed ({type(e).__name__}: "
                f"{e}). Train without graphs: train.cuda_graph=false") from e
        finally:
            self.config.finalize_model_grads_func = finalize
        self.graph = graph
        self.log(f"[cuda_graph] captured the step ({self.nmb} micro-batches, "
                 f"{len(self.slots.keys)} stochastic-rounding seeds per replay)")

    def run(self, mbs: list[dict]) -> list[dict]:
        if len(mbs) != self.nmb:
            raise ValueError(f"StepGraph.run: {len(mbs)} micro-batches, the graph has {self.nmb}")
        if self.graph is None:
            self._capture(mbs)
        for static, mb in zip(self.inputs, mbs):
            for k in _KEYS:
                if tuple(mb[k].shape) != tuple(static[k].shape):
                    raise ValueError(f"StepGraph.run: {k} has shape {tuple(mb[k].shape)}, the "
                                     f"captured step {tuple(static[k].shape)}")
                static[k].copy_(mb[k], non_blocking=True)
        self.slots.fill()
        self.graph.replay()
        if self.config.finalize_model_grads_func is not None:
            self.config.finalize_model_grads_func([self.model], None)
        return self.outputs
