"""Process-wide runtime precision state driven by the training loop.

The training loop calls :func:`set_step` before each step, :func:`set_bf16_switch` when the
precision schedule says so (paper arXiv 2509.25149 App. D: switch all GEMMs, or only Fprop, to
BF16 late in training) and :func:`set_run_seed` once at start. Quantized linear layers read
:func:`get_state` on every forward; a backend whose layers cannot (Transformer Engine, switched
through Megatron's config fields) registers :func:`add_bf16_switch_listener`.

Stochastic-rounding seeds are a hash of (run seed, step, layer key, role, rank, call index within
the step). The call index counts how many times one (layer, role) was quantized in the current
step (micro-batches, activation recomputation), and restarts at every :func:`set_step`; so a run
resumed at step N draws exactly the same random bits as the uninterrupted run did from step N on.

On a GPU the Triton quantizer reads its 31-bit Philox seed from device memory
(:func:`sr_seed_tensor`): one host-to-device copy per draw in eager mode, or, while a CUDA graph of
the step is captured (:func:`capture_seed_slots`), a slot of a static buffer that
:meth:`SeedSlots.fill` rewrites with the current step's seeds before every replay. Both give the
kernel the same number, so a graphed step draws the eager step's bits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import weakref
from dataclasses import dataclass

import torch

from nvfp4_megatron.quant.recipe import SWITCH_SCOPES


@dataclass(frozen=True, kw_only=True)
class PrecisionState:
    step: int = 0
    bf16_switch: str | None = None
    run_seed: int = 1234


_state = PrecisionState()
_call_counts: dict[tuple[str, str], int] = {}
# objects with ``on_bf16_switch(scope)``: backends whose layers do not read get_state() (the TE
# backend switches through Megatron's config fields); held weakly, their model owns them
_switch_listeners: weakref.WeakSet = weakref.WeakSet()


def get_state() -> PrecisionState:
    return _state


def set_step(step: int) -> None:
    global _state
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"set_step({step!r}): step must be an integer >= 0")
    _state = dataclasses.replace(_state, step=step)
    _call_counts.clear()


def set_bf16_switch(scope: str | None) -> None:
    """``None`` (recipe as configured), ``"all"`` (every GEMM BF16) or ``"fprop"`` (Fprop BF16)."""
    global _state
    if scope is not None and scope not in SWITCH_SCOPES:
        raise ValueError(f"set_bf16_switch({scope!r}): use None or one of {SWITCH_SCOPES}")
    _notify(scope)
    _state = dataclasses.replace(_state, bf16_switch=scope)


def add_bf16_switch_listener(listener) -> None:
    """``listener.on_bf16_switch(scope)`` runs on every :func:`set_bf16_switch` (and with None on
    :func:`reset_state`), before the state changes; it may refuse a scope by raising. Held
    weakly: it lives as long as whoever owns it (the TE backend keeps it on the model)."""
    _switch_listeners.add(listener)


def _notify(scope: str | None) -> None:
    for listener in list(_switch_listeners):
        listener.on_bf16_switch(scope)


def set_run_seed(seed: int) -> None:
    global _state
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"set_run_seed({seed!r}): seed must be an integer")
    _state = dataclasses.replace(_state, run_seed=seed)


def reset_state() -> None:
    """Back to defaults (tests, or a fresh run in the same process)."""
    global _state
    _notify(None)
    _state = PrecisionState()
    _call_counts.clear()


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _next_call(layer_key: str, role: str) -> int:
    idx = _call_counts.get((layer_key, role), 0)
    _call_counts[(layer_key, role)] = idx + 1
    return idx


def _seed_of(run_seed: int, step: int, layer_key: str, role: str, rank: int, idx: int) -> int:
    msg = f"{run_seed}|{step}|{layer_key}|{role}|{rank}|{idx}".encode()
    return int.from_bytes(hashlib.blake2b(msg, digest_size=8).digest(), "little") >> 1


def sr_seed(layer_key: str, role: str, *, rank: int | None = None) -> int:
    """A 63-bit seed for one stochastic-rounding draw; advances the (layer, role) call index."""
    idx = _next_call(layer_key, role)
    r = _rank() if rank is None else rank
    return _seed_of(_state.run_seed, _state.step, layer_key, role, r, idx)


def sr_generator(layer_key: str, role: str, device: torch.device) -> torch.Generator:
    """A generator for the formats reference (CPU): seeded by :func:`sr_seed`."""
    gen = torch.Generator(device=device)
    gen.manual_seed(sr_seed(layer_key, role))
    return gen


def kernel_seed(seed63: int) -> int:
    """The Triton kernel's Philox seed (int32, >= 0) of a :func:`sr_seed` value: its low 31 bits."""
    return seed63 & 0x7FFFFFFF


class SeedSlots:
    """The stochastic-rounding seeds of a captured CUDA graph: one int32 slot of a static device
    buffer per draw, in capture order, each remembering (layer, role, rank, call index); ``fill``
    writes the seeds of the current step (run seed and step from :func:`get_state`) into them."""

    def __init__(self, device: torch.device, capacity: int = 1 << 14) -> None:
        self.buffer = torch.zeros(capacity, dtype=torch.int32, device=device)
        self.keys: list[tuple[str, str, int, int]] = []

    def slot(self, layer_key: str, role: str, rank: int, idx: int) -> torch.Tensor:
        i = len(self.keys)
        if i >= self.buffer.numel():
            raise RuntimeError(f"SeedSlots: more than {self.buffer.numel()} stochastic-rounding "
                               "draws in one captured step")
        self.keys.append((layer_key, role, rank, idx))
        return self.buffer[i:i + 1]

    def seeds(self) -> list[int]:
        """The kernel seeds of the current step, slot by slot (what eager mode would draw)."""
        s = _state
        return [kernel_seed(_seed_of(s.run_seed, s.step, *k)) for k in self.keys]

    def fill(self) -> None:
        """Write the current step's seeds into the slots (stream-ordered before a replay)."""
        if self.keys:
            host = torch.tensor(self.seeds(), dtype=torch.int32)
            self.buffer[:len(self.keys)].copy_(host, non_blocking=True)


_capturing: SeedSlots | None = None


@contextlib.contextmanager
def capture_seed_slots(slots: SeedSlots):
    """While a CUDA graph is captured: :func:`sr_seed_tensor` hands out ``slots`` (no host copy,
    which a capture cannot contain)."""
    global _capturing
    prev, _capturing = _capturing, slots
    try:
        yield slots
    finally:
        _capturing = prev


def sr_seed_tensor(layer_key: str, role: str, device: torch.device) -> torch.Tensor:
    """int32 ``[1]`` on ``device``: the kernel seed of the next draw of (layer, role)."""
    idx = _next_call(layer_key, role)
    r = _rank()
    if _capturing is not None:
        return _capturing.slot(layer_key, role, r, idx)
    seed = kernel_seed(_seed_of(_state.run_seed, _state.step, layer_key, role, r, idx))
    return torch.tensor([seed], dtype=torch.int32).to(device, non_blocking=True)
