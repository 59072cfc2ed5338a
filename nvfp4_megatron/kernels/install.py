"""Installing a fused kernel in place of a Megatron-Core function, and taking it out again.

The opt-in GPU kernels (``train.fused_rope``, ``train.fused_cross_entropy``) replace a module-level
Megatron function by ``functools.partial(ours, _original=megatron_function)``: our drop-in keeps
Megatron's signature and calls ``_original`` for the cases it does not cover. Installing twice is a
no-op; ``uninstall`` puts Megatron's function back (a process that builds models with and without
the kernel, such as ``scripts/bench_step.py``).
"""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger(__name__)


def install(module, name: str, replacement, *, log=print, message: str) -> None:
    """``module.name = partial(replacement, _original=module.name)`` unless already installed."""
    current = getattr(module, name)
    if getattr(current, "_nvfp4_fused", False):
        return
    fused = functools.partial(replacement, _original=current)
    fused._nvfp4_fused = True  # type: ignore[attr-defined]
    setattr(module, name, fused)
    log(message)


def uninstall(module, name: str) -> None:
    """Put back the function that ``install`` replaced (nothing if none was)."""
    current = getattr(module, name)
    if getattr(current, "_nvfp4_fused", False):
        setattr(module, name, current.keywords["_original"])


@functools.cache
def warn_fallback_once(kernel: str, why: str) -> None:
    """One warning per distinct reason that a call went to Megatron's own function."""
    logger.warning("%s: Megatron's own function for a call the kernel does not cover: %s", kernel, why)
