"""Process-group start-up: NCCL on GPUs, gloo plus the CPU adapter elsewhere.

``init_distributed()`` reads the ``torchrun`` environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT). Started without ``torchrun`` it forms a world of one process on a free
local port, so ``python pretrain.py`` works too. ``initialize_model_parallel()`` checks the layout
against the world size *before* Megatron builds any group, so a layout that cannot fit fails with
every size named instead of an assertion deep inside ``parallel_state``.

Parallel folding (MoE paper; DESIGN.md §4): attention groups are TP x CP x DP x PP and MoE groups
ETP x EP x EDP x PP over the same world; both products without the data-parallel factor must
divide the world size.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import datetime
import os
import signal
import socket
import sys

import torch
import torch.distributed as dist

from nvfp4_megatron.parallel.layout import check_world
from nvfp4_megatron.runtime.cpu_adapter import install_cpu_adapter
from nvfp4_megatron.runtime.gpu_fastpaths import install_gpu_fastpaths

__all__ = ["DistInfo", "configure_determinism", "exit_with_launcher", "init_distributed",
           "started_by_torchrun", "initialize_model_parallel"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    comm_library: str  # "nccl" | "gloo"
    device: torch.device


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} must be an integer") from None


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_launcher_watch: int | None = None  # the launcher's pid once exit_with_launcher() has armed


def started_by_torchrun() -> bool:
    """torchrun (torch.distributed.elastic) sets TORCHELASTIC_RUN_ID in every worker's environment."""
    return bool(os.environ.get("TORCHELASTIC_RUN_ID"))


def exit_with_launcher() -> bool:
    """Make this worker die with its launcher (Linux ``PR_SET_PDEATHSIG`` = SIGKILL).

    torchrun starts its workers in their own process group, so a ``kill -9`` of torchrun alone
    used to leave them training and writing checkpoints. With the parent-death signal the kernel
    kills the worker when torchrun exits for any reason. The parent may have died before the
    signal was armed: ``os.getppid()`` is read before and re-checked after, and a worker whose
    launcher is already gone exits at once. Returns True when armed; False when not on Linux or
    libc has no ``prctl`` (nothing changes then). Idempotent.
    """
    global _launcher_watch
    if _launcher_watch is not None:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return False
    parent = os.getppid()
    if prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent or parent == 1:
        print(f"[launch] the launcher (pid {parent}) is gone; this worker (pid {os.getpid()}) exits",
              file=sys.stderr, flush=True)
        os._exit(1)
    _launcher_watch = parent
    return True


def init_distributed(*, timeout_minutes: float = 10.0) -> DistInfo:
    """Start (or reuse) the default process group and return this process's place in it.

    GPU present -> NCCL, ``torch.cuda.set_device(LOCAL_RANK)``. No GPU -> gloo, and the CPU adapter
    for Megatron-Core is installed (``runtime/cpu_adapter.py``). Started by torchrun, the worker
    is first tied to it (:func:`exit_with_launcher`): it exits when torchrun dies.
    """
    if started_by_torchrun():
        exit_with_launcher()
    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s); "
                "use --nproc_per_node <= the number of GPUs"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        install_gpu_fastpaths()  # foreach grad norm / scale instead of Megatron's per-tensor loop
    else:
        install_cpu_adapter()
        device = torch.device("cpu")
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            if world_size != 1:
                raise ValueError(
                    f"WORLD_SIZE={world_size} but MASTER_ADDR/MASTER_PORT are not set; launch with "
                    "torchrun (e.g. `torchrun --nproc_per_node=2 pretrain.py ...`)"
                )
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ["MASTER_PORT"] = str(_free_port())
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        comm_library=dist.get_backend(),
        device=device,
    )


DETERMINISM_HINT = ("train.deterministic=true asks for deterministic CUDA kernels and this "
                    "operation has none; set train.deterministic=false to allow it (a resumed run "
                    "then no longer reproduces the uninterrupted loss curve bit for bit)")


def configure_determinism(enabled: bool, *, log=print) -> None:
    """``train.deterministic``: the same inputs give the same bits on the same GPU, so a resumed
    run continues the uninterrupted run's loss curve exactly.

    Found on the H200 (docs/RESULTS.md): PyTorch's SDPA backward is not deterministic by default
    (cuDNN attention and flash attention accumulate dQ with atomics), and with
    ``use_deterministic_algorithms(True, warn_only=True)`` it stays so (it only warns). Strict
    mode, ``use_deterministic_algorithms(True)``, is what changes the kernels: cuDNN attention is
    no longer selected and flash attention's backward runs its deterministic variant. The same
    warn-only run listed no other nondeterministic operation on the training path. An operation
    without a deterministic kernel raises in strict mode; ``cli/pretrain.py`` reports it with
    :data:`DETERMINISM_HINT` (e.g. the Microsoft-FP4 OCC quantile uses ``kthvalue``).

    Also: ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (cuBLAS's fixed-workspace mode, which PyTorch requires
    for deterministic GEMMs; set before the first GEMM, so call this before building the model),
    cuDNN deterministic, and no NaN-filling of uninitialised memory (a PyTorch default of this
    mode that costs a kernel per allocation; the training path reads no uninitialised memory).
    The project's own kernels are deterministic by construction (max reductions, stochastic
    rounding from a counter-based RNG keyed by seed, step and layer). CPU runs are deterministic
    already; nothing is changed there.
    """
    if not enabled or not torch.cuda.is_available():
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    log(f"[determinism] deterministic CUDA kernels (CUBLAS_WORKSPACE_CONFIG="
        f"{os.environ['CUBLAS_WORKSPACE_CONFIG']}); train.deterministic=false to turn off")


def initialize_model_parallel(
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: int | None = None,
    virtual_pipeline_model_parallel_size: int | None = None,
) -> int:
    """Check the sizes against the world (``parallel.layout.check_world``: a LayoutError naming
    every size), then build Megatron's groups; returns the data-parallel size."""
    sizes = dict(locals())  # Megatron's own keyword names, passed through as given
    from megatron.core import parallel_state

    if not dist.is_initialized():
        raise RuntimeError("initialize_model_parallel() needs init_distributed() first")
    dp = check_world(dist.get_world_size(), tp=tensor_model_parallel_size,
                     cp=context_parallel_size, pp=pipeline_model_parallel_size,
                     ep=expert_model_parallel_size, etp=expert_tensor_parallel_size)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(**sizes)
    return dp
