"""Checkpoints with ``megatron.core.dist_checkpointing``: atomic, rotated, exactly resumable.

Layout: ``RUN_DIR/checkpoints/step_0000100/`` holds the dist_checkpointing files (model and
distributed-optimizer shards, ``dp_reshardable`` optimizer format; the common part carries the
training state: step, scheduler, precision switch), ``rank_XXXXX.pt`` per process (CPU RNG state and
Megatron's RNG-tracker states, which differ per rank), and ``meta.json`` (model shape, layout,
step) that is checked before anything is loaded.

Atomicity: every rank writes into ``checkpoints/.tmp-step_0000100``; after a barrier rank 0 fsyncs
all files and renames the directory to ``step_0000100`` (a single ``rename``), then deletes all but
the newest ``train.keep_last``. A crash or a full disk during a save leaves only a ``.tmp-`` directory,
which is never loaded and is removed by the next save; the previous checkpoint is untouched.

Exact resume: model + FP32 master weights + Adam moments, scheduler step, RNG states, precision
switch state, and the data position (a pure function of the step, see ``training/data.py``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

_STEP_RE = re.compile(r"^step_(\d{7,})$")
_OPT_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


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


def _sharded_state(ddp_model, optimizer, *, is_loading: bool):
    from megatron.core.utils import unwrap_model

    gpt = unwrap_model(ddp_model)
    model_sd = gpt.sharded_state_dict()
    opt_sd = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=_OPT_METADATA)
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
                    meta: dict, keep_last: int, fail_after_shards: bool = False) -> Path:
    """Save on all ranks; returns the final directory. ``fail_after_shards`` is for tests."""
    from megatron.core import dist_checkpointing

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
    state = _sharded_state(ddp_model, optimizer, is_loading=False)
    state["train_state"] = train_state
    _in_process_results_queue()
    dist_checkpointing.save(state, str(tmp))
    torch.save(_rng_state(), tmp / f"rank_{rank:05d}.pt")
    if fail_after_shards:
        raise RuntimeError(f"injected failure while saving {name}")
    dist.barrier()
    if rank == 0:
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=2))
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
    return saved


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
                    inner.state[param]["step"] = torch.tensor(0.0)
                    inner.state[param]["exp_avg"] = torch.zeros_like(param.data)
                    inner.state[param]["exp_avg_sq"] = torch.zeros_like(param.data)


def _restore_adam_steps(optimizer, loaded_opt) -> None:
    """Set every parameter's Adam ``step`` to the saved step, as its own tensor.

    Without Apex/TE, Megatron keeps the Adam step in the checkpoint's param_groups; on load
    ``DistributedOptimizer.load_state_dict`` assigns one *shared* step tensor to all parameter
    states, and the parameter-state copy that follows then overwrites it with the placeholder step
    of the freshly initialised state (0). Torch Adam increments each state's step in place, so
    either effect changes the bias correction after a resume (seen here as losses drifting from
    the second step after resume). Each state gets a private tensor holding the saved step.
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
        for st in opt.optimizer.state.values():
            if "step" in st:
                st["step"] = torch.tensor(step, dtype=torch.float32)


def load_checkpoint(ckpt: str | Path, *, ddp_model, optimizer, meta: dict) -> dict:
    """Load model, optimizer, RNG and training state; returns the training state."""
    from megatron.core import dist_checkpointing
    from megatron.core.utils import unwrap_model

    ckpt = Path(ckpt)
    if not (ckpt / "meta.json").is_file():
        raise FileNotFoundError(f"{ckpt} is not a complete checkpoint (no meta.json)")
    saved = check_compatible(ckpt, meta)
    with torch.no_grad():
        _init_adam_state(optimizer)
        state = _sharded_state(ddp_model, optimizer, is_loading=True)
        state["train_state"] = None
        loaded = dist_checkpointing.load(state, str(ckpt))
        unwrap_model(ddp_model).load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer, loaded["optimizer"])
    rank_file = ckpt / f"rank_{dist.get_rank():05d}.pt"
    if saved.get("world_size") == dist.get_world_size() and rank_file.is_file():
        _set_rng_state(torch.load(rank_file, weights_only=False))
    return loaded["train_state"]
