"""What the Megatron test workers (``gpt_worker.py``, ``hybrid_worker.py``) share.

The run loop over layouts (:func:`run_all`), one run's fresh state (:func:`prepare_run`), a few
training steps through Megatron's own forward-backward schedule with the quantizer calls of step 0
counted (:func:`train`), the per-rank result file (:func:`write_rank_result`) and the Hydra
override spelling (:func:`override`). The workers run as scripts, so this directory is
``sys.path[0]`` and they import this module by its bare name.
"""

import json
import os
import sys
from collections import Counter

import torch


def override(key, value) -> str:
    """One Hydra override, ``key=value`` with YAML spellings (true/false/null, [a,b])."""
    if isinstance(value, bool):
        value = str(value).lower()
    elif value is None:
        value = "null"
    elif isinstance(value, (list, tuple)):
        value = "[" + ",".join(str(v) for v in value) + "]"
    return f"{key}={value}"


def prepare_run(run) -> None:
    """Before a run builds its model: Megatron's RNG seed, no quantizer state from the previous
    run, and the run's test switches (``bf16_switch``, ``break_amax_reduction``)."""
    from megatron.core import tensor_parallel

    from nvfp4_megatron.quant import linear as qlinear
    from nvfp4_megatron.quant import state as qstate

    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    qstate.reset_state()
    if run.get("bf16_switch"):
        qstate.set_bf16_switch(run["bf16_switch"])
    if run.get("break_amax_reduction"):  # sensitivity check: the TP test must notice this
        qlinear.LinearCall.amax_group = property(lambda self: None)


def _forward_step(data_iterator, model):
    tokens, labels = next(data_iterator)
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    output = model(tokens, pos, None, labels=labels)

    def loss_func(o):
        loss = o.float().mean()
        return loss, {"lm loss": loss.detach()}

    return output, loss_func


def train(ddp, optimizer, *, steps: int, repeat_batch: bool, grads0=None):
    """``steps`` optimizer steps, one micro-batch of 2 x 32 random tokens (vocabulary 256) each:
    the batch drawn with seed 0 every step with ``repeat_batch``, else with seed ``step``.

    Returns the losses (last pipeline stage; empty elsewhere), the quantizer calls of step 0 as
    ``{"<layer key>|<role>": count}``, and ``grads0(ddp)`` taken after step 0's backward, before
    the optimizer steps (None without ``grads0``).
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nvfp4_megatron.quant import linear as qlinear
    from nvfp4_megatron.quant import state as qstate

    calls = Counter()
    remove = qlinear.add_quantize_observer(lambda key, role, tq: calls.update([f"{key}|{role}"]))
    fb = get_forward_backward_func()
    losses, g0 = [], None
    for step in range(steps):
        qstate.set_step(step)
        seed = 0 if repeat_batch else step
        data = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(seed))
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        res = fb(forward_step_func=_forward_step,
                 data_iterator=iter([(data[:, :-1], data[:, 1:])]), model=[ddp],
                 num_microbatches=1, seq_length=32, micro_batch_size=2, forward_only=False)
        if step == 0 and grads0 is not None:
            g0 = grads0(ddp)
        optimizer.step()
        if step == 0:
            remove()
        if parallel_state.is_pipeline_last_stage():
            losses.append(float(res[0]["lm loss"]))
    return losses, dict(calls), g0


def write_rank_result(out, run, result: dict) -> None:
    """``OUT/<run name>.rank<R>.json``, which the tests read back."""
    rank = torch.distributed.get_rank()
    with open(os.path.join(out, f"{run['name']}.rank{rank}.json"), "w") as f:
        json.dump(result, f)


def run_all(run_one) -> None:
    """The worker's entry point (``WORKER.py CONFIG.json OUT``): ``run_one(layout, run, out)`` for
    every run of the config in order. A run's layout is the config's ``layout`` updated by its
    own; Megatron's parallel groups are rebuilt only where it differs from the previous run's."""
    cfg = json.load(open(sys.argv[1]))
    out = sys.argv[2]
    from nvfp4_megatron.runtime.distributed import init_distributed, initialize_model_parallel

    init_distributed()
    layout = None
    for run in cfg["runs"]:
        lay = {**cfg.get("layout", {}), **run.get("layout", {})}
        if lay != layout:
            initialize_model_parallel(tensor_model_parallel_size=lay.get("tp", 1),
                                      pipeline_model_parallel_size=lay.get("pp", 1),
                                      expert_model_parallel_size=lay.get("ep", 1),
                                      expert_tensor_parallel_size=lay.get("etp"))
            layout = lay
        run_one(lay, run, out)
    torch.distributed.destroy_process_group()
