"""Checkpoints with ``megatron.core.dist_checkpointing``: atomic, rotated, exactly resumable.

Layout: ``RUN_DIR/checkpoints/step_0000100/`` holds the dist_checkpointing files (model and
distributed-optimizer shards; the common part carries the training state: step, scheduler,
precision switch), ``rank_XXXXX.pt`` per process (CPU RNG state and Megatron's RNG-tracker states,
which differ per rank), ``meta.json`` (model shape, layout, optimizer format, precision recipe,
step) that is checked before anything is loaded, and ``manifest.json`` (every other file's size
and sha256).

Optimizer formats (``train.ckpt_optim_format``), Megatron-Core's distributed-optimizer sharding
types: ``dp_reshardable`` (the default, Megatron-LM's too) writes each rank's flat slice of the
optimizer buffers as it is: fast, but it loads only into the same TP / PP / EP / expert-TP layout
(a different layout is refused before loading, naming the fix). ``fully_reshardable`` writes every
Adam moment sharded like its parameter, so a checkpoint saved at TP2 loads at TP1 (or any other
layout); it gathers the state over the DP group through Megatron's gloo path (its NCCL path needs
CUDA and holds the whole DP-gathered state on every rank). Loading always uses the format the
checkpoint was written in (``meta.json``), whatever the run's setting.

Atomicity: every rank writes into ``checkpoints/.tmp-step_0000100``; after a barrier the ranks hash
their share of the files, rank 0 writes ``manifest.json``, fsyncs all files and renames the
directory to ``step_0000100`` (a single ``rename``), then deletes all but the newest
``train.keep_last``. A crash or a full disk during a save leaves only a ``.tmp-`` directory, which
is never loaded and is removed at the next start (and by the next save); the previous checkpoint
is untouched. A failed save raises :class:`CheckpointSaveError` naming the directory, the cause
(a full disk is recognised even where Megatron's writer drops the errno) and the newest checkpoint.

Integrity (``choose_checkpoint``): the manifest is verified before loading (sizes, then sha256;
each rank hashes a share). A damaged newest checkpoint (truncated / missing shard or RNG file) is
reported, renamed to ``step_N.damaged-<reason>`` (kept, never deleted) and the previous intact one
is resumed; an explicit ``train.load=`` of a damaged one is refused. Checkpoints written before
manifests existed get a structural check instead (every shard file the ``.metadata`` index points
into is present and long enough, one RNG file per saved rank) and load with a warning.

Safety: nothing read from a checkpoint can run code (``safe_pickle``): ``.metadata`` is read
through an allow-list unpickler, the byte items of the ``.distcp`` shards (which torch would
unpickle with ``weights_only=False``) and the RNG files with ``torch.load(weights_only=True)``,
all before Megatron touches the checkpoint. A refused pickle names the file (exit 2).

Precision: ``meta.json`` records the recipe, the BF16 block set and ``precision.backend``; a
resume with other ones is refused, naming both, unless ``train.allow_precision_change`` is set.
The BF16 switch (``precision.switch_to_bf16``) is training state, not part of that check: it is
the way to change precision mid-run, and its state resumes with the checkpoint.

Exact resume: model + FP32 master weights + Adam moments, scheduler step, RNG states, precision
switch state, and the data position (a pure function of the step, see ``training/data.py``).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from nvfp4_megatron.training import safe_pickle

_STEP_RE = re.compile(r"^step_(\d{7,})$")
_TMP_RE = re.compile(r"^\.tmp-step_\d{7,}$")  # our own half-written saves
MANIFEST = "manifest.json"
_FULL_BELOW = 64 << 20  # bytes free under which a failed save is reported as a full disk
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


# ---- start of a run (rank 0)

def clean_stale_tmp(run_dir: str | Path) -> list[str]:
    """Remove the ``.tmp-step_N`` directories a crashed or failed save left in RUN_DIR/checkpoints
    (only names of that exact form: nothing else is ever deleted). Call on rank 0 at start, before
    anything is written: they hold no loadable state and may fill the disk."""
    root = checkpoint_root(run_dir)
    stale = sorted(p for p in root.iterdir() if _TMP_RE.match(p.name)) if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p)
    return [p.name for p in stale]


def record_start_config(run_dir: str | Path, config_yaml: str) -> Path:
    """Keep every start's resolved config: ``config.yaml`` is the run's first one (never
    overwritten, so a resume with other settings cannot erase what the run was started with);
    each start, the first included, also writes ``configs/start_<UTC time>.yaml``. Returns it."""
    run_dir = Path(run_dir)
    first = run_dir / "config.yaml"
    if not first.exists():
        first.write_text(config_yaml)
    (run_dir / "configs").mkdir(exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path, n = run_dir / "configs" / f"start_{stamp}.yaml", 1
    while path.exists():  # two starts within one second
        n += 1
        path = run_dir / "configs" / f"start_{stamp}_{n}.yaml"
    path.write_text(config_yaml)
    return path


def precision_meta(precision: dict, bf16_blocks) -> dict:
    """What ``meta.json`` records of the precision config and resumes must match: the recipe name,
    the resolved BF16 block set (global block indices) and ``precision.backend``; and the
    ``precision.dge`` / ``precision.occ`` overrides, only where one is set (so checkpoints saved
    before those knobs existed, or without them, still match)."""
    meta = {"recipe": precision["recipe"], "bf16_blocks": sorted(int(b) for b in bf16_blocks),
            "backend": str(precision["backend"])}
    for group in ("dge", "occ"):
        set_keys = {k: v for k, v in (precision.get(group) or {}).items() if v is not None}
        if set_keys:
            meta[group] = set_keys
    return meta


# ---- collectives that also work without a process group (unit tests, tools)

def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _gather(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _from_rank0(fn):
    """``fn()`` run on rank 0, its result on every rank (exceptions on rank 0 propagate there;
    the others then stop at their next collective)."""
    value = [fn() if _rank_world()[0] == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(value, src=0)
    return value[0]


# ---- manifest: sizes and sha256 of every file, written before the rename, verified before loading

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(ckpt: Path) -> None:
    """Collective: each rank hashes its share of the files, rank 0 writes ``manifest.json``."""
    rank, world = _rank_world()
    names = _from_rank0(lambda: sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*")
                                       if p.is_file() and p.name != MANIFEST))
    mine = {n: {"size": (ckpt / n).stat().st_size, "sha256": _sha256(ckpt / n)}
            for n in names[rank::world]}
    files = {k: v for part in _gather(mine) for k, v in part.items()}
    if rank == 0:
        manifest = {"version": 1, "files": dict(sorted(files.items()))}
        (ckpt / MANIFEST).write_text(json.dumps(manifest, indent=1))


def verify_checkpoint(ckpt: str | Path) -> tuple[str, str] | None:
    """``None`` if ``ckpt`` is intact, else ``(reason, detail)``; reason is one word for the
    ``.damaged-<reason>`` name (missing, truncated, size, checksum, manifest, metadata).

    With ``manifest.json``: every listed file present with its size, then its sha256 (each rank
    hashes a share). Without (checkpoints saved before manifests): :func:`_structural_problem`.
    Collective when a process group exists: every rank returns the same answer, and only after
    all have looked (rank 0 may rename the checkpoint right after).
    """
    ckpt = Path(ckpt)
    found = [p for p in _gather(_local_problem(ckpt)) if p]
    return tuple(found[0]) if found else None


def _local_problem(ckpt: Path) -> tuple[str, str] | None:
    rank, world = _rank_world()
    if not (ckpt / MANIFEST).is_file():
        return _structural_problem(ckpt)
    try:
        files = json.loads((ckpt / MANIFEST).read_text())["files"]
        names = sorted(files)
    except (ValueError, KeyError, TypeError, OSError) as err:
        return "manifest", f"{ckpt / MANIFEST} cannot be read ({err})"
    for n in names:
        p = ckpt / n
        if not p.is_file():
            return "missing", f"{p} is missing"
        size, want = p.stat().st_size, files[n]["size"]
        if size != want:
            why = "truncated" if size < want else "size"
            return why, f"{p} has {size} bytes, {want} expected"
    for n in names[rank::world]:
        if _sha256(ckpt / n) != files[n]["sha256"]:
            return "checksum", f"{ckpt / n} does not match its sha256 in {MANIFEST}"
    return None


def _structural_problem(ckpt: Path) -> tuple[str, str] | None:
    """A checkpoint without a manifest: the DCP index (read safely), every shard file it points
    into present and long enough, and one RNG file per rank of the saving run."""
    if not (ckpt / ".metadata").is_file():
        return "missing", f"{ckpt / '.metadata'} is missing"
    try:
        md = safe_pickle.load_dcp_metadata(ckpt / ".metadata")
    except safe_pickle.UnsafePickleError:
        raise  # not damage: refused outright
    except ValueError as err:
        return "metadata", str(err)
    need: dict[str, int] = {}
    for info in md.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(need.items()):
        p = ckpt / name
        if not p.is_file():
            return "missing", f"{p} is missing"
        if p.stat().st_size < end:
            return "truncated", f"{p} has {p.stat().st_size} bytes, the index needs {end}"
    saved_world = json.loads((ckpt / "meta.json").read_text()).get("world_size")
    for r in range(saved_world or 0):
        if not (ckpt / f"rank_{r:05d}.pt").is_file():
            return "missing", f"{ckpt / f'rank_{r:05d}.pt'} is missing"
    return None


def _set_aside(ckpt: Path, reason: str) -> Path:
    """Rename a damaged checkpoint to ``step_N.damaged-<reason>`` (never deleted; no longer a
    resume candidate); returns the new path."""
    dest, n = ckpt.with_name(f"{ckpt.name}.damaged-{reason}"), 1
    while dest.exists():
        n += 1
        dest = ckpt.with_name(f"{ckpt.name}.damaged-{reason}-{n}")
    os.rename(ckpt, dest)
    return dest


def choose_checkpoint(run_dir: str | Path, *, load: str | None, resume: bool,
                      log=print) -> Path | None:
    """The checkpoint this start loads, verified (collective: call on every rank).

    ``load`` (``train.load``): that checkpoint; damaged -> ``ValueError`` naming it (it is not
    renamed: it may belong to another run). Else with ``resume``: the newest intact checkpoint of
    RUN_DIR; each damaged newer one is reported, renamed by :func:`_set_aside` and skipped. If
    there are checkpoints but none is intact the start is refused (``ValueError``) rather than
    silently starting from step 0.
    """
    def no_manifest_warning(ckpt: Path) -> None:
        if not (ckpt / MANIFEST).is_file():
            log(f"[checkpoint] warning: {ckpt} has no {MANIFEST} (saved before checkpoints carried "
                "one): its files are checked for presence and length only, not checksums")

    if load:
        ckpt = Path(load)
        if not (ckpt / "meta.json").is_file():
            raise FileNotFoundError(
                f"train.load={ckpt} is not a complete checkpoint (no meta.json)")
        problem = verify_checkpoint(ckpt)
        if problem:
            raise ValueError(f"train.load={ckpt} is damaged: {problem[1]}; refusing to load it. "
                             "Name an intact checkpoint (or train.load=null to resume the run's "
                             "own)")
        no_manifest_warning(ckpt)
        return ckpt
    if not resume:
        return None
    root = checkpoint_root(run_dir)
    damaged = []
    for ckpt in reversed(_from_rank0(lambda: list_checkpoints(root))):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            no_manifest_warning(ckpt)
            if damaged:
                log(f"[checkpoint] warning: resuming from {ckpt}, the newest intact checkpoint")
            return ckpt
        kept = _from_rank0(lambda: _set_aside(ckpt, problem[0]))
        log(f"[checkpoint] warning: {ckpt} is damaged: {problem[1]}. Kept as {kept.name}; "
            "trying the previous checkpoint")
        damaged.append(kept)
    if damaged:
        raise ValueError(
            f"no intact checkpoint in {root}: damaged {', '.join(p.name for p in damaged)} (kept). "
            "Name one with train.load=, or start again to begin from step 0")
    return None


# ---- pickles: nothing read from a checkpoint may run code

def check_pickles(ckpt: str | Path) -> None:
    """Read every pickle that loading ``ckpt`` unpickles through ``safe_pickle`` first: the DCP
    ``.metadata`` (allow-list unpickler), each byte item of the ``.distcp`` shards (torch's
    ``DefaultLoadPlanner.load_bytes`` unpickles them with ``weights_only=False``; here they are
    loaded weights-only) and a legacy ``common.pt``. Tensor items torch reads with
    ``weights_only=True`` itself. Raises ``safe_pickle.UnsafePickleError`` naming the file.

    Megatron then reads the same bytes (checked against the manifest just before); a process
    rewriting the checkpoint between this check and the load is not what this guards against."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    ckpt = Path(ckpt)
    md = safe_pickle.load_dcp_metadata(ckpt / ".metadata")
    for index, info in md.storage_data.items():
        if isinstance(md.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            with open(ckpt / info.relative_path, "rb") as f:
                f.seek(info.offset)
                data = f.read(info.length)
            safe_pickle.load_torch(data, source=f"{ckpt / info.relative_path} (item {index.fqn})")
    if (ckpt / "common.pt").is_file():
        safe_pickle.load_torch(ckpt / "common.pt", source=str(ckpt / "common.pt"))


def _read_rng_file(path: Path) -> dict:
    """A ``rank_XXXXX.pt`` (what :func:`_rng_state` saves: tensors and a dict of tensors), read
    with ``weights_only=True``; files of older checkpoints have the same structure."""
    state = safe_pickle.load_torch(path, source=str(path))
    if not (isinstance(state, dict) and isinstance(state.get("torch_cpu"), torch.Tensor)
            and isinstance(state.get("tracker"), dict)):
        raise ValueError(f"{path} is not an RNG state file (expected torch_cpu and tracker)")
    return state


def _space_problem(err: BaseException, root: Path) -> str | None:
    """'no space left on device' if ``err`` (its causes, or the per-rank failures of torch's
    ``CheckpointException``) is ENOSPC/EDQUOT, or if the file system is (nearly) full: Megatron's
    writer turns the OSError into a RuntimeError without errno, and torch's zip writer reports a
    short write as "unexpected pos", so the free space is the reliable sign."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return "no space left on device"
        todo += [e.__cause__, e.__context__]
        for f in getattr(e, "failures", {}).values():  # rank -> (exception, traceback)
            todo.append(f[0] if isinstance(f, tuple) else f)
    try:
        free = _free_bytes(root)
    except OSError:
        return None
    return f"no space left on device ({free} bytes free)" if free < _FULL_BELOW else None


def _free_bytes(path: Path) -> int:
    """Bytes free on the file system of ``path`` (a function of its own so tests can fake it)."""
    return shutil.disk_usage(path).free


class CheckpointSaveError(RuntimeError):
    """A save failed; the message names the directory, the cause and the newest checkpoint."""


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
    """Save on all ranks; returns the final directory. ``fail_after_shards`` is for tests.

    Any failure before the rename (a full disk, a dead peer, ...) raises
    :class:`CheckpointSaveError`; the checkpoints already there are untouched.
    """
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    optimizer_metadata(optim_format)  # a bad format fails before anything is written

    root = checkpoint_root(run_dir)
    name = f"step_{step:07d}"
    tmp = root / f".tmp-{name}"
    final = root / name
    rank = dist.get_rank()
    state = _sharded_state(ddp_model, optimizer, is_loading=False, optim_format=optim_format)
    state["train_state"] = train_state
    _in_process_results_queue()
    try:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        dist.barrier()
        dist_checkpointing.save(state, str(tmp))
        torch.save(_rng_state(), tmp / f"rank_{rank:05d}.pt")
        if fail_after_shards:
            raise RuntimeError(f"injected failure while saving {name}")
        if rank == 0:
            (tmp / "meta.json").write_text(json.dumps(
                {**meta, "step": step, "optim_format": optim_format}, indent=2))
        dist.barrier()
        _write_manifest(tmp)
        if rank == 0:
            _fsync_tree(tmp)
    except (Exception, CheckpointException) as err:  # torch's is a BaseException
        space = _space_problem(err, root)
        newest = latest_checkpoint(root)
        raise CheckpointSaveError(
            f"could not save checkpoint {name} into {tmp}: "
            + (space or f"{type(err).__name__}: {err}") + ". "
            + (f"The newest checkpoint, {newest}, is intact" if newest else "There is no earlier "
               "checkpoint") + f" (this save renamed and deleted nothing); the partial {tmp.name} "
            "is removed at the next start") from err
    if rank == 0:
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


def _fmt_precision(p: dict) -> str:
    extra = "".join(f" {g}={p[g]}" for g in ("dge", "occ") if p.get(g))
    return (f"recipe={p.get('recipe')} bf16_blocks={p.get('bf16_blocks')} "
            f"backend={p.get('backend')}{extra}")


def check_compatible(ckpt: Path, meta: dict, *, allow_precision_change: bool = False,
                     log=print) -> dict:
    """``meta.json`` of ``ckpt`` against this run's ``meta``: model shape, the layout a
    dp_reshardable optimizer state needs, and the precision (``precision_meta``; another one is
    refused unless ``allow_precision_change``, then only warned about). Returns the saved meta."""
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
    have, want = saved.get("precision"), meta.get("precision")
    if want is not None and have != want:
        if have is None:
            log(f"[checkpoint] warning: {ckpt} records no precision settings (saved before they "
                f"were recorded); cannot check that it was trained with {_fmt_precision(want)}")
        elif allow_precision_change:
            log(f"[checkpoint] warning: train.allow_precision_change=true: {ckpt} was trained "
                f"with {_fmt_precision(have)}, continuing with {_fmt_precision(want)}")
        else:
            raise ValueError(
                f"checkpoint {ckpt} was trained with precision {_fmt_precision(have)}, this run "
                f"asks for {_fmt_precision(want)}. Resume with the checkpoint's precision settings "
                "(precision.switch_to_bf16 is the way to switch to BF16 mid-run), start a fresh "
                "run (train.resume=false or a new run_dir), or set "
                "train.allow_precision_change=true to load it anyway")
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


def load_checkpoint(ckpt: str | Path, *, ddp_model, optimizer, meta: dict,
                    allow_precision_change: bool = False, log=print) -> dict:
    """Load model, optimizer, RNG and training state; returns the training state.

    ``ckpt`` should come from :func:`choose_checkpoint` (integrity verified). Before Megatron reads
    anything: ``meta.json`` is checked (:func:`check_compatible`), every pickle the load will
    unpickle is read safely (:func:`check_pickles`), and this rank's RNG file is read with
    ``weights_only=True``.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.utils import unwrap_model

    ckpt = Path(ckpt)
    if not (ckpt / "meta.json").is_file():
        raise FileNotFoundError(f"{ckpt} is not a complete checkpoint (no meta.json)")
    saved = check_compatible(ckpt, meta, allow_precision_change=allow_precision_change, log=log)
    rng, refused = None, None
    try:  # each rank reads its own RNG file: agree on the outcome before anyone raises, so that
        # every rank stops with the same message instead of one waiting in Megatron's load
        check_pickles(ckpt)
        if saved.get("world_size") == dist.get_world_size():  # else the streams differ anyway
            rng = _read_rng_file(ckpt / f"rank_{dist.get_rank():05d}.pt")
    except ValueError as err:  # UnsafePickleError is one
        refused = (type(err).__name__, str(err))
    problems = [r for r in _gather(refused) if r]
    if problems:
        kind, msg = problems[0]
        raise (safe_pickle.UnsafePickleError if kind == "UnsafePickleError" else ValueError)(msg)
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
    if rng is not None:
        _set_rng_state(rng)
    return loaded["train_state"]
