"""Train through ``pretrain.py``'s ``main`` with every real CUDA entry point watched (CPU only).

Usage (under torchrun): ``cuda_watch_worker.py OUT_PREFIX OVERRIDE...``. Before anything imports
Megatron, ``torch.cuda``'s device, stream, event, RNG and memory functions, ``Tensor.cuda`` and the
tensor factories (with a CUDA ``device=``) are wrapped: a call whose caller is a Megatron module is
recorded (module, function, line) and then made as before (on a machine without a GPU most of them
raise). Writes ``OUT_PREFIX.<rank>.json``: ``{"rc": main's return code, "calls": [...]}``.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import torch

CALLS: list[dict] = []
CUDA_FUNCTIONS = ("current_device", "set_device", "synchronize", "empty_cache", "Stream", "Event",
                  "current_stream", "default_stream", "stream", "get_rng_state", "set_rng_state",
                  "manual_seed", "manual_seed_all", "memory_allocated", "max_memory_allocated",
                  "reset_peak_memory_stats", "mem_get_info")
FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
             "zeros_like", "ones_like", "empty_like", "full_like", "as_tensor", "linspace")


def _record(what: str) -> None:
    frame = sys._getframe(2)
    module = frame.f_globals.get("__name__", "?")
    if module.startswith("megatron"):
        CALLS.append({"module": module, "call": what, "line": frame.f_lineno})


def _watch(owner, name: str, label: str, *, only_cuda_device: bool = False) -> None:
    real = getattr(owner, name)

    @functools.wraps(real)
    def watched(*args, **kwargs):
        if not only_cuda_device or "cuda" in str(kwargs.get("device", "")):
            _record(label)
        return real(*args, **kwargs)

    setattr(owner, name, watched)


def install() -> None:
    for name in CUDA_FUNCTIONS:
        _watch(torch.cuda, name, f"torch.cuda.{name}")
    _watch(torch.Tensor, "cuda", "Tensor.cuda")
    for name in FACTORIES:
        _watch(torch, name, f"torch.{name}(device=cuda)", only_cuda_device=True)


def main(argv: list[str]) -> int:
    out_prefix, overrides = argv[0], argv[1:]
    install()
    from nvfp4_megatron.cli.pretrain import main as pretrain_main

    try:
        rc = pretrain_main(overrides)
    except BaseException as err:  # recorded below with the calls that led to it
        rc = f"{type(err).__name__}: {err}"
    rank = os.environ.get("RANK", "0")
    with open(f"{out_prefix}.{rank}.json", "w") as f:
        json.dump({"rc": rc, "calls": CALLS}, f)
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
