"""Checkpoints with ``megatron.core.dist_checkpointing``: atomic, rotated, exactly resumable.

Layout: ``RUN_DIR/checkpoints/step_0000100/`` holds the dist_checkpointing files (model and
distributed-optimizer shards; the common part carries the training state: step, scheduler,
precision switch), ``rank_XXXXX.pt`` per process (CPU RNG state and Megatron's RNG-tracker states,
which differ per rank), and ``meta.json`` (model shape, layout, optimizer format, step) that is
checked before anything is loaded.

Optimizer formats (``train.ckpt_optim_format``), Megatron-Core's distributed-optimizer sharding
types: ``dp_reshardable`` (the default, Megatron-LM's too) writes each rank's flat slice of the
optimizer buffers as it is: fast, but it loads only into the same TP / PP / EP / expert-TP layout
(a different layout is refused before loading, naming the fix). ``fully_reshardable`` writes every
Adam moment sharded like its parameter, so a checkpoint saved at TP2 loads at TP1 (or any other
layout); it gathers the state over the DP group through Megatron's gloo path (its NCCL path needs
CUDA and holds the whole DP-gathered state on every rank). Loading always uses the format the
checkpoint was written in (``meta.json``), whatever the run's setting.

Atomicity: every rank writes into ``checkpoints/.tmp-step_0000100``; after a barrier rank 0 fsyncs
all files and renames the directory to ``step_0000100`` (a single ``rename``), then deletes all but
the newest ``train.keep_last``. A crash or a full disk during a save leaves only a ``.tmp-`` directory,
which is never loaded and is removed by the next save; the previous checkpoint is untouched.

Exact resume: model + FP32 master weights + Adam moments, scheduler step, RNG states, precision
switch state, and the data position (a pure function of the step, see ``training/data.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

_STEP_RE = re.compile(r"^step_(\d{7,})$")
OPTIM_FORMATS = ("dp_reshardable", "fully_reshardable")
# layout keys a dp_reshardable checkpoint must match (they shape each rank's optimizer buffers)
_FIXED_LAYOUT = ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                 "expert_model_parallel_size", "expert_tensor_parallel_size")


def optimizer_metadata(fmt: str) -> dict:
    """Megatron's ``sharded_state_dict`` metadata for optimizer format ``fmt``."""
    if fmt not in OPTIM_FORMATS:
        raise ValueError(f"train.ckpt_optim_format={fmt!r}: expected one of {OPTIM_FORMATS}")
    md = {"distrib_optim_sharding_type": fmt}
    if fmt == "fully_reshardable":
        md["distrib_optim_fully_reshardable_mem_efficient"] = True  # gloo gather to DP rank 0
    return md


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_RE.match(p.name)) and (p / "meta.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def _rng_state() -> dict:
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.get_cuda_rng_tracker()
    state = {"torch_cpu": torch.get_rng_state(),
             "tracker": {k: v.clone() for k, v in tracker.get_states().items()}}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import random as mrandom

    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])
    mrandom.get_cuda_rng_tracker().set_states(dict(state["tracker"]))


def _fsync_tree(path: Path) -> None:
    for dirpath, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sharded_state(ddp_model, optimizer, *, is_loading: bool, optim_format: str):
    from megatron.core.utils import unwrap_model

    gpt = unwrap_model(ddp_model)
    model_sd = gpt.sharded_state_dict()
    opt_sd = optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                          metadata=optimizer_metadata(optim_format))
    return {"model": model_sd, "optimizer": opt_sd}


def _in_process_results_queue() -> None:
    """Make dist_checkpointing's writer report results through an in-process queue.

    By default the writer creates a ``multiprocessing`` Manager (a separate spawned process) to carry
    write results. We save synchronously, so results never cross a process boundary, and that extra
    process is a liability: a SIGTERM sent to the whole process group (Slurm preemption, Ctrl-C)
    kills it while our handler is still saving, and a killed trainer leaves it orphaned. A plain
    ``queue.Queue`` has the same ``put``/``get_nowait`` interface.
    """
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not isinstance(filesystem_async._results_queue, queue.Queue):
        filesystem_async._results_queue = queue.Queue()


def save_checkpoint(*, run_dir: str | Path, step: int, ddp_model, optimizer, train_state: dict,
                    meta: dict, keep_last: int, optim_format: str = "dp_reshardable",
                    fail_after_shards: bool = False) -> Path:
    """Save on all ranks; returns the final directory. ``fail_after_shards`` is for tests."""
    from megatron.core import dist_checkpointing

    optimizer_metadata(optim_format)  # a bad format fails before anything is written

    root = checkpoint_root(run_dir)
    name = f"step_{step:07d}"
    tmp = root / f".tmp-{name}"
    final = root / name
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    state = _sharded_state(ddp_model, optimizer, is_loading=False, optim_format=optim_format)
    state["train_state"] = train_state
    _in_process_results_queue()
    dist_checkpointing.save(state, str(tmp))
    torch.save(_rng_state(), tmp / f"rank_{rank:05d}.pt")
    if fail_after_shards:
        raise RuntimeError(f"injected failure while saving {name}")
    dist.barrier()
    if rank == 0:
        (tmp / "meta.json").write_text(json.dumps(
            {**meta, "step": step, "optim_format": optim_format}, indent=2))
        _fsync_tree(tmp)
        if final.exists():  # re-saving the same step (e.g. signal right after a periodic save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    return final


def check_compatible(ckpt: Path, meta: dict) -> dict:
    saved = json.loads((ckpt / "meta.json").read_text())
    diffs = {k: (saved["model"].get(k), v) for k, v in meta["model"].items()
             if saved["model"].get(k) != v}
    if diffs:
        lines = ", ".join(f"model.{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diffs.items())
        raise ValueError(
            f"checkpoint {ckpt} was saved from a different model shape ({lines}); use the "
            "checkpoint's model config, or start a fresh run (train.resume=false or a new run_dir)"
        )
    fmt = saved.get("optim_format", "dp_reshardable")  # older checkpoints: the only format then
    if fmt == "dp_reshardable" and "parallel" in saved and "parallel" in meta:
        moved = {k: (saved["parallel"].get(k, 1), meta["parallel"].get(k, 1))
                 for k in _FIXED_LAYOUT if k in saved["parallel"] or k in meta["parallel"]}
        moved = {k: ab for k, ab in moved.items() if ab[0] != ab[1]}
        if moved:
            lines = ", ".join(f"{k}: checkpoint {a} vs run {b}" for k, (a, b) in moved.items())
            raise ValueError(
                f"checkpoint {ckpt} holds its optimizer state in the dp_reshardable format, which "
                f"loads only into the layout it was saved from ({lines}). Resume it with the "
                "saved layout and train.ckpt_optim_format=fully_reshardable to write a "
                "checkpoint that loads into any layout, then change the layout")
    return saved


def _step_tensor(group: dict, param, value: float) -> torch.Tensor:
    """An Adam ``step`` counter where torch's Adam keeps it: on the parameter's device for the
    fused / capturable kernels, a CPU float32 scalar otherwise."""
    if group.get("fused") or group.get("capturable"):
        return torch.tensor(value, dtype=torch.float32, device=param.device)
    return torch.tensor(value, dtype=torch.float32)


def _init_adam_state(optimizer) -> None:
    """Give a fresh optimizer Adam state to load into.

    Megatron's DistributedOptimizer reads the Adam ``step`` of every parameter state before it can
    load (``state_dict()`` asserts one common step); a fresh torch Adam has no state until its first
    step, so the zero state is created here (its values are overwritten by the load).
    """
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    for opt in chained:
        inner = opt.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                if len(inner.state[param]) == 0:
                    inner.state[param]["step"] = _step_tensor(group, param, 0.0)
                    inner.state[param]["exp_avg"] = torch.zeros_like(param.data)
                    inner.state[param]["exp_avg_sq"] = torch.zeros_like(param.data)


def _restore_adam_steps(optimizer, loaded_opt) -> None:
    """Set every parameter's Adam ``step`` to the saved step, as its own tensor.

    Without Apex/TE, Megatron keeps the Adam step in the checkpoint's param_groups; on load
    ``DistributedOptimizer.load_state_dict`` assigns one *shared* step tensor to all parameter
    states, and the parameter-state copy that follows then overwrites it with the placeholder step
    of the freshly initialised state (0). Torch Adam increments each state's step in place, so
    either effect changes the bias correction after a resume (seen here as losses drifting from
    the second step after resume). Each state gets a private tensor holding the saved step, on
    the device the optimizer keeps it (``_step_tensor``).
    """
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    saved = loaded_opt if isinstance(loaded_opt, list) else [loaded_opt]
    if len(saved) != len(chained):
        raise ValueError(f"checkpoint has {len(saved)} optimizer state(s), the run {len(chained)}")
    for opt, sd in zip(chained, saved):
        steps = {g["step"] for g in sd["optimizer"]["param_groups"] if "step" in g}
        if len(steps) != 1:
            raise ValueError(f"checkpoint optimizer param_groups carry steps {sorted(steps)}; "
                             "expected exactly one common Adam step")
        step = float(steps.pop())
        inner = opt.optimizer
        on_device = any(g.get("fused") or g.get("capturable") for g in inner.param_groups)
        for st in inner.state.values():  # every state, keyed as the load left them
            if "step" in st:
                st["step"] = torch.tensor(step, dtype=torch.float32,
                                          device=st["exp_avg"].device if on_device else "cpu")


@contextlib.contextmanager
def _tolerate_missing_adam_step(optimizer):
    """Let Megatron's ``fully_reshardable`` load run with torch's Adam (no Apex/TE).

    ``DistributedOptimizer.load_state_dict`` first gives every torch-Adam state a ``step``
    tensor, then ``load_parameter_state_from_fully_reshardable`` skips ``step`` in the saved
    per-parameter state while ``_set_main_param_and_optimizer_states`` copies every tensor of the
    live state, so it looks ``step`` up in the saved tensors and raises ``KeyError: 'step'``
    (megatron-core 0.19.2, seen on CPU). Within this block each call gets ``step: None``, which
    that method skips; ``_restore_adam_steps`` then sets the steps.
    """
    patched = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        orig = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if orig is None:
            continue

        def fill(model_param, tensors, _orig=orig):
            return _orig(model_param, {"step": None, **tensors})  # only "step": a missing
            # moment must still fail loudly

        opt._set_main_param_and_optimizer_states = fill
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states  # back to the class method


def load_checkpoint(ckpt: str | Path, *, ddp_model, optimizer, meta: dict) -> dict:
    """Load model, optimizer, RNG and training state; returns the training state."""
    from megatron.core import dist_checkpointing
    from megatron.core.utils import unwrap_model

    ckpt = Path(ckpt)
    if not (ckpt / "meta.json").is_file():
        raise FileNotFoundError(f"{ckpt} is not a complete checkpoint (no meta.json)")
    saved = check_compatible(ckpt, meta)
    fmt = saved.get("optim_format", "dp_reshardable")
    with torch.no_grad():
        _init_adam_state(optimizer)
        state = _sharded_state(ddp_model, optimizer, is_loading=True, optim_format=fmt)
        state["train_state"] = None
        loaded = dist_checkpointing.load(state, str(ckpt))
        unwrap_model(ddp_model).load_state_dict(loaded["model"])
        with _tolerate_missing_adam_step(optimizer):
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer, loaded["optimizer"])
    rank_file = ckpt / f"rank_{dist.get_rank():05d}.pt"
    if saved.get("world_size") == dist.get_world_size() and rank_file.is_file():
        _set_rng_state(torch.load(rank_file, weights_only=False))
    return loaded["train_state"]
