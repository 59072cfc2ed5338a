"""The CPU adapter: run Megatron-Core 0.19.2 on a machine without a GPU (gloo backend).

Megatron-Core is written for CUDA. Its parallel algorithms (tensor/pipeline/data parallelism, the
distributed optimizer, dist_checkpointing) are device-agnostic, but a handful of places hard-code
the device. ``install_cpu_adapter()`` replaces exactly those assumptions, in one place, by patching
attributes of Megatron modules (never by copying Megatron code), and only on a machine where
``torch.cuda.is_available()`` is False: it raises if a GPU is present, so a GPU run can never be
silently routed through it.

What it replaces, and why (see ``../shared/notes/megatron-core-facts.md``):

1. ``torch`` as seen by the Megatron modules in ``_CUDA_ASSUMING_MODULES``. Those modules create
   buffers with ``device="cuda"`` / ``torch.cuda.current_device()`` (pipeline p2p shape exchange,
   schedules' token counters, DDP grad buffers, distributed optimizer shards, grad-norm
   accumulators, the GlobalMemoryBuffer used by local attention, TP gather/scatter outputs,
   rotary frequencies), call ``torch.cuda.synchronize()`` / ``empty_cache()``, and create CUDA
   streams and events (DDP overlap, MoE dispatcher DtoH stream). The module-level name ``torch`` in
   each of them is replaced by ``_CpuTorch``, a proxy that forwards everything to the real
   ``torch`` except: tensor factories map a CUDA device to the CPU, and ``torch.cuda`` is a small
   namespace whose device is the CPU, whose synchronisation calls are no-ops, and whose streams and
   events are inert (CPU ops are synchronous, so an inert event is exactly right). Patching the
   module global rather than using a ``TorchFunctionMode`` matters: a mode is not active inside
   autograd's backward, while module globals are.
2. The RNG tracker (``tensor_parallel/random.py``). ``CudaRNGStatesTracker`` stores CUDA generator
   states and local attention always forks it (dropout inside TP regions), so skipping the seed call
   does not help. It is replaced by ``_CpuRNGStatesTracker``, which keeps CPU generator states with
   the same names and seeds; ``model_parallel_cuda_manual_seed`` additionally seeds the CPU default
   generator with the data-parallel seed (on a GPU, the CUDA default generator gets that seed).
3. ``Tensor.type()`` string checks. The (distributed) optimizer classifies parameters by
   ``param.type() == 'torch.cuda.FloatTensor'`` and grad clipping asserts it. During exactly those
   Megatron functions, ``Tensor.type()`` reports the CUDA name of a CPU tensor's type (only the
   no-argument form; casting calls are untouched), and the real method is restored on exit.
4. MoE all-to-all split sizes. ``moe_utils.maybe_move_tensor_to_cpu(..., as_numpy=True)`` only
   converts CUDA tensors; on CPU the split sizes would stay tensors, which gloo's
   ``all_to_all_single`` refuses. The replacement converts CPU tensors too.

5. RoPE's context-parallel slice (``rope_utils.get_pos_emb_on_this_cp_rank``) uses
   ``pin_memory=True`` and ``.cuda()``; it is routed to the identical selection in
   ``nvfp4_megatron.mcore.context_parallel.pos_emb_on_this_cp_rank``.

6. ``Tensor.cuda()`` in ``LanguageModule.setup_embeddings_and_output_layer`` (tied embeddings
   with PP > 1 move the shared weight to the GPU before the first/last-stage all-reduce). During
   exactly that method ``Tensor.cuda()`` returns a CPU tensor unchanged.

The adapter was written against the Megatron-Core versions in :data:`TESTED_MEGATRON_VERSIONS`;
``install_cpu_adapter()`` refuses any other version, and every attribute it replaces must exist
(a renamed private name fails the install instead of being added silently).
``tests/runtime/test_cpu_adapter.py`` trains on CPU with every real ``torch.cuda`` entry point and
``Tensor.cuda`` watched, and fails if a Megatron module the adapter does not list reaches one.

Nothing here changes numerics: every replaced call either allocates memory, orders work on a
device, or manages RNG state.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types
from typing import Any

import torch

__all__ = ["install_cpu_adapter", "is_cpu_adapter_installed", "PATCHED_MODULES",
           "TESTED_MEGATRON_VERSIONS", "TORCH_PROXIED_MODULES", "check_megatron_version"]

_log = logging.getLogger(__name__)

# Megatron modules whose global ``torch`` is swapped for ``_CpuTorch``; each entry says why.
_CUDA_ASSUMING_MODULES: dict[str, str] = {
    "megatron.core.tensor_parallel.random": "torch.cuda.manual_seed / get_rng_state in the seed call",
    "megatron.core.utils": "GlobalMemoryBuffer allocates on torch.cuda.current_device()",
    "megatron.core.parallel_state": "torch.cuda.synchronize() in barriers / destroy",
    "megatron.core.pipeline_parallel.p2p_communication": "shape exchange on cuda, cuda.synchronize",
    "megatron.core.pipeline_parallel.schedules": "total_num_tokens = zeros(device='cuda')",
    "megatron.core.pipeline_parallel.utils": "comm streams torch.cuda.Stream(device='cuda')",
    "megatron.core.distributed.distributed_data_parallel": "communication stream, synchronize",
    "megatron.core.distributed.param_and_grad_buffer": "grad buffers on current_device, streams",
    "megatron.core.optimizer.optimizer": "found_inf / scale tensors on device='cuda'",
    "megatron.core.optimizer.distrib_optimizer": "shard buffers on torch.cuda.current_device()",
    "megatron.core.optimizer.clip_grads": "norm accumulators on device='cuda'",
    "megatron.core.tensor_parallel.layers": "weight/gather buffers on current_device()",
    "megatron.core.tensor_parallel.mappings": "gather/scatter outputs on current_device()",
    "megatron.core.tensor_parallel.utils": "split/gather buffers on current_device()",
    "megatron.core.transformer.module": "Float16Module buffers on current_device()",
    "megatron.core.transformer.utils": "attention masks on device='cuda'",
    "megatron.core.transformer.attention": "inference/rotary buffers on current_device()",
    "megatron.core.transformer.dot_product_attention": "score buffers on current_device()",
    "megatron.core.transformer.transformer_layer": "router DtoH event, buffers on current_device",
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "inv_freq on current_device()",
    "megatron.core.rerun_state_machine": "state tensors on device='cuda', cuda RNG state",
    "megatron.core.transformer.moe.token_dispatcher": "DtoH stream / events, buffers on cuda",
    "megatron.core.transformer.moe.moe_layer": "delayed-wgrad stream / events",
    "megatron.core.transformer.moe.router": "aux-loss buffers on current_device()",
    "megatron.core.transformer.moe.shared_experts": "overlap stream",
    "megatron.core.transformer.moe.moe_utils": "record_stream(torch.cuda.current_stream())",
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "cuda.synchronize before write",
    "megatron.core.dist_checkpointing.strategies.async_utils": "liveness flags on current_device()",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "verify flags on device='cuda'",
    "megatron.core.dist_checkpointing.strategies.fully_parallel": "cuda.synchronize",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict": "cuda.synchronize",
}
# Megatron modules whose methods or functions are wrapped or replaced (2.-6. of the module doc)
_WRAPPED_MODULES = (
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.models.common.language_module.language_module",
)
TORCH_PROXIED_MODULES = tuple(_CUDA_ASSUMING_MODULES)
PATCHED_MODULES = TORCH_PROXIED_MODULES + _WRAPPED_MODULES
# Megatron-Core releases this adapter was written and tested against (megatron.core.__version__
# without a local "+<git hash>" suffix)
TESTED_MEGATRON_VERSIONS = ("0.19.2",)

_CPU = torch.device("cpu")
_INSTALLED = False


def _to_cpu_device(device: Any) -> Any:
    """Map any CUDA device spelling (``"cuda"``, ``"cuda:1"``, ``torch.device("cuda")``) to CPU."""
    if device is None:
        return None
    if isinstance(device, torch.device):
        return _CPU if device.type == "cuda" else device
    if isinstance(device, str):
        return _CPU if device.split(":")[0] == "cuda" else device
    if isinstance(device, int):  # a CUDA ordinal from torch.cuda.current_device()
        return _CPU
    return device


class _InertStream:
    """Stands in for ``torch.cuda.Stream``: CPU work is already ordered, so waiting is a no-op."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> "_InertEvent":
        return event if event is not None else _InertEvent()

    def synchronize(self) -> None:
        pass

    @staticmethod
    def priority_range() -> tuple[int, int]:
        return (0, 0)

    def __eq__(self, other: object) -> bool:  # there is a single CPU "stream"
        return isinstance(other, _InertStream)

    def __hash__(self) -> int:
        return 0


class _InertEvent:
    """Stands in for ``torch.cuda.Event``; recording and waiting are no-ops on CPU."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


class _CpuCuda(types.SimpleNamespace):
    """``torch.cuda`` as the patched Megatron modules see it: the "current device" is the CPU."""

    def __getattr__(self, name: str) -> Any:  # types such as FloatTensor, amp, OutOfMemoryError
        return getattr(torch.cuda, name)


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


_CPU_CUDA = _CpuCuda(
    current_device=lambda: _CPU,
    device_count=lambda: 0,
    is_available=lambda: False,
    synchronize=_noop,
    empty_cache=_noop,
    set_device=_noop,
    Stream=_InertStream,
    Event=_InertEvent,
    current_stream=lambda *a, **k: _InertStream(),
    default_stream=lambda *a, **k: _InertStream(),
    stream=lambda s=None: contextlib.nullcontext(),
    is_current_stream_capturing=lambda: False,
    get_rng_state=lambda *a, **k: torch.get_rng_state(),
    set_rng_state=lambda state, *a, **k: torch.set_rng_state(state),
    manual_seed=lambda seed: torch.manual_seed(seed),
    memory_allocated=lambda *a, **k: 0,
    max_memory_allocated=lambda *a, **k: 0,
)

_FACTORIES = (
    "tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
    "zeros_like", "ones_like", "empty_like", "full_like", "as_tensor", "linspace",
)


def _device_mapped(fn):
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    return wrapper


class _CpuTorchProxy(types.ModuleType):
    """The real ``torch`` with CUDA device requests redirected to the CPU (see module doc, 1.)."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CPU_CUDA
        for name in _FACTORIES:
            setattr(self, name, _device_mapped(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


_CpuTorch = _CpuTorchProxy()


@contextlib.contextmanager
def _cuda_type_names():
    """Make ``Tensor.type()`` (no arguments) report ``torch.cuda.X`` for CPU tensors (module doc, 3.)."""
    real_type = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = real_type(self)
            if not self.is_cuda and name.startswith("torch.") and ".cuda." not in name:
                return "torch.cuda." + name[len("torch."):]
            return name
        return real_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = real_type


def _with_cuda_type_names(fn):
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _cuda_type_names():
            return fn(*args, **kwargs)

    wrapper.__nvfp4_cpu_adapter__ = True
    return wrapper


def _patch_type_checks() -> None:
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    targets = [
        (distrib_optimizer.DistributedOptimizer, "_build_model_and_main_param_groups"),
        (distrib_optimizer.DistributedOptimizer, "__init__"),
        (optimizer.Float16OptimizerWithFloat16Params, "__init__"),
    ]
    for owner, name in targets:
        if name not in owner.__dict__:
            raise RuntimeError(f"CPU adapter: {owner.__qualname__}.{name} is not defined in this "
                               f"Megatron-Core (written for {', '.join(TESTED_MEGATRON_VERSIONS)})")
        raw = owner.__dict__[name]
        if isinstance(raw, (staticmethod, classmethod)):
            setattr(owner, name, type(raw)(_with_cuda_type_names(raw.__func__)))
        else:
            setattr(owner, name, _with_cuda_type_names(raw))
    wrapped = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    _replace(clip_grads, "clip_grad_by_total_norm_fp32", wrapped)
    # optimizer.py imported the function by name; patch that reference too.
    _replace(optimizer, "clip_grad_by_total_norm_fp32", wrapped)


@contextlib.contextmanager
def _cpu_tensor_cuda_is_identity():
    """``Tensor.cuda()`` returns a CPU tensor unchanged (module doc, 6.); restored on exit."""
    real_cuda = torch.Tensor.cuda

    def cuda(self, *args, **kwargs):
        return self if self.device.type == "cpu" else real_cuda(self, *args, **kwargs)

    torch.Tensor.cuda = cuda
    try:
        yield
    finally:
        torch.Tensor.cuda = real_cuda


def _patch_tied_embedding_setup() -> None:
    from megatron.core.models.common.language_module.language_module import LanguageModule

    name = "setup_embeddings_and_output_layer"
    if name not in LanguageModule.__dict__:
        raise RuntimeError(f"CPU adapter: LanguageModule.{name} is not defined in this "
                           f"Megatron-Core (written for {', '.join(TESTED_MEGATRON_VERSIONS)})")
    real = LanguageModule.__dict__[name]

    @functools.wraps(real)
    def setup_embeddings_and_output_layer(self, *args, **kwargs):
        with _cpu_tensor_cuda_is_identity():
            return real(self, *args, **kwargs)

    setattr(LanguageModule, name, setup_embeddings_and_output_layer)


def _replace(owner: Any, name: str, value: Any) -> None:
    """``setattr(owner, name, value)`` for an attribute that must already exist: a Megatron release
    that renamed or removed it fails the install, naming it, instead of getting a new attribute
    nothing reads."""
    if not hasattr(owner, name):
        where = getattr(owner, "__name__", type(owner).__name__)
        raise RuntimeError(
            f"CPU adapter: {where}.{name} does not exist in this Megatron-Core; the adapter was "
            f"written for {', '.join(TESTED_MEGATRON_VERSIONS)} (runtime/cpu_adapter.py)"
        )
    setattr(owner, name, value)


def _make_cpu_rng_tracker_class(base):
    class _CpuRNGStatesTracker(base):
        """Megatron's named RNG-state tracker, keeping CPU generator states (module doc, 2.)."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            orig_name = self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig = self.states_[orig_name]
                torch.set_rng_state(orig)
                self._current_state_name = orig_name

    return _CpuRNGStatesTracker


def _patch_rng() -> None:
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom

    _replace(mrandom, "CudaRNGStatesTracker",
             _make_cpu_rng_tracker_class(mrandom.CudaRNGStatesTracker))
    _replace(mrandom, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
    _replace(mrandom, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state))
    real_seed = mrandom.model_parallel_cuda_manual_seed

    @functools.wraps(real_seed)
    def model_parallel_cuda_manual_seed(seed, *args, **kwargs):
        torch.manual_seed(seed)  # the data-parallel default state (CUDA default generator on GPU)
        kwargs["force_reset_rng"] = True  # replace any tracker created before the adapter
        return real_seed(seed, *args, **kwargs)

    _replace(mrandom, "model_parallel_cuda_manual_seed", model_parallel_cuda_manual_seed)
    _replace(tensor_parallel, "model_parallel_cuda_manual_seed", model_parallel_cuda_manual_seed)
    # A tracker built before installation holds the CUDA class: drop it.
    mrandom.initialize_rng_tracker(force_reset=True)


def _patch_moe_splits() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.cpu().numpy()
        return tensor

    _replace(moe_utils, "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu)
    _replace(token_dispatcher, "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu)


def check_megatron_version(version: str | None = None) -> str:
    """Refuse a Megatron-Core the adapter was not tested with; returns the version checked.

    ``version`` defaults to ``megatron.core.__version__``; a local ``+<git hash>`` suffix is
    ignored."""
    if version is None:
        import megatron.core

        version = megatron.core.__version__
    release = version.split("+", 1)[0]
    if release not in TESTED_MEGATRON_VERSIONS:
        raise RuntimeError(
            f"CPU adapter: Megatron-Core {version} is not a version the adapter was tested with "
            f"({', '.join(TESTED_MEGATRON_VERSIONS)}); it patches Megatron's CUDA assumptions by "
            "name and would break silently on another release. Install megatron-core=="
            f"{TESTED_MEGATRON_VERSIONS[-1]} (pyproject.toml), or re-check every entry of "
            "runtime/cpu_adapter.py against the new release and add it to "
            "TESTED_MEGATRON_VERSIONS"
        )
    return release


def is_cpu_adapter_installed() -> bool:
    return _INSTALLED


def install_cpu_adapter() -> None:
    """Patch Megatron-Core so that it trains on CPU with gloo. Idempotent.

    Raises RuntimeError when CUDA is available: on a GPU machine Megatron runs unmodified.
    """
    global _INSTALLED
    if torch.cuda.is_available():
        raise RuntimeError(
            "install_cpu_adapter() called on a machine with a CUDA GPU; the CPU adapter is only for "
            "machines without one (Megatron-Core runs unmodified with NCCL there). Call "
            "nvfp4_megatron.runtime.distributed.init_distributed(), which picks the right backend."
        )
    if _INSTALLED:
        return
    check_megatron_version()
    for name in _CUDA_ASSUMING_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is not torch:
            raise RuntimeError(
                f"CPU adapter: {name}.torch is not the torch module; Megatron-Core changed "
                f"(expected {', '.join(TESTED_MEGATRON_VERSIONS)}). Update _CUDA_ASSUMING_MODULES "
                "in runtime/cpu_adapter.py."
            )
        module.torch = _CpuTorch
    _patch_rng()
    _patch_type_checks()
    _patch_moe_splits()
    _patch_tied_embedding_setup()
    # 5. RoPE's context-parallel slice builds its index with pin_memory=True and .cuda();
    #    mcore/context_parallel.py has the same selection without the device round trip.
    from nvfp4_megatron.mcore.context_parallel import route_megatron_rope_slice_to_cpu_safe

    route_megatron_rope_slice_to_cpu_safe()
    _INSTALLED = True
    _log.info("CPU adapter for Megatron-Core installed (%d modules patched)", len(PATCHED_MODULES))
