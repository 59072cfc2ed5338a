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
"""

from __future__ import annotations

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


def sr_seed(layer_key: str, role: str, *, rank: int | None = None) -> int:
    """A 63-bit seed for one stochastic-rounding draw; advances the (layer, role) call index."""
    idx = _call_counts.get((layer_key, role), 0)
    _call_counts[(layer_key, role)] = idx + 1
    r = _rank() if rank is None else rank
    msg = f"{_state.run_seed}|{_state.step}|{layer_key}|{role}|{r}|{idx}".encode()
    return int.from_bytes(hashlib.blake2b(msg, digest_size=8).digest(), "little") >> 1


def sr_generator(layer_key: str, role: str, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(sr_seed(layer_key, role))
    return gen
