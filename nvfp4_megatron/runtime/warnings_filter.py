"""Known upstream warnings: shown once, on rank 0 only (all of them with a knob).

Megatron-Core and PyTorch print the same warnings on every rank, many at import time of
``megatron.core`` (Transformer Engine / Apex missing, ``GPTModel`` deprecated, ``MimoModelConfig``
experimental, the MCore async-save deprecation, ``torch.distributed.checkpoint`` FutureWarnings,
"No CUDA runtime is found" on a CPU machine ...). :func:`install_warning_filters` must therefore
run before anything imports ``megatron.core``; it imports neither torch nor Megatron itself.

On rank 0 each known warning is shown once per process (by its text: a de-duplicating
``warnings.showwarning`` for ``warnings.warn`` -- Python's own ``once`` action forgets what it
has shown whenever any library changes the filter list, which torch and sympy do at import -- and
a de-duplicating filter for the ``logging`` records); on the other ranks the known ones are
dropped. Unknown warnings are untouched, on every rank.

Show everything (no filtering): ``logging.all_warnings=true`` on the command line (the knob of the
config schema; read here from the command line because the filter is installed before the config
is composed) or the environment variable ``NVFP4_SHOW_ALL_WARNINGS=1``.

The rank is read from the environment (``RANK``, set by torchrun; else ``SLURM_PROCID``; else 0),
since the process group does not exist yet when this runs.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from typing import Iterable, Sequence

__all__ = ["KNOWN_LOG_RECORDS", "KNOWN_WARNINGS", "install_warning_filters", "show_all_requested"]

ENV_SHOW_ALL = "NVFP4_SHOW_ALL_WARNINGS"
CONFIG_KEY = "logging.all_warnings"

# (message regex matched at the start of the warning text, category) for warnings.warn(...)
KNOWN_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r"Transformer Engine and Apex are not installed", UserWarning),
    (r"Apex is not installed", UserWarning),
    (r"Transformer Engine is not installed", UserWarning),
    (r"full scope is deprecated", UserWarning),
    (r"MimoModelConfig is experimental", UserWarning),
    # torch.distributed.checkpoint / Megatron deprecations (FutureWarning, DeprecationWarning)
    (r".*(deprecated|will be removed)", FutureWarning),
    (r".*(deprecated|will be removed)", DeprecationWarning),
)

# (logger name, message regex) for logging records (Megatron's log_single_rank / logger.warning)
KNOWN_LOG_RECORDS: tuple[tuple[str, str], ...] = (
    ("torch.utils.cpp_extension", r"No CUDA runtime is found"),
    ("megatron.core.models.gpt.gpt_model", r"GPTModel IS DEPRECATED"),
    ("megatron.core.distributed.distributed_data_parallel", r"DistributedDataParallel: full_param_layout"),
    ("megatron.core.dist_checkpointing.strategies.torch", r"MCore's async save is deprecated"),
    ("megatron.core.dist_checkpointing.strategies.common", r"(save|load)_common is deprecated"),
)

_TRUE = {"1", "true", "yes", "on"}
_installed: dict | None = None


def show_all_requested(argv: Iterable[str] | None = None) -> bool:
    """True when ``NVFP4_SHOW_ALL_WARNINGS`` is set true or ``[+]logging.all_warnings=true`` is
    among the command-line overrides (default: ``sys.argv[1:]``)."""
    if os.environ.get(ENV_SHOW_ALL, "").strip().lower() in _TRUE:
        return True
    args = sys.argv[1:] if argv is None else argv
    value = None
    for a in args:
        key, sep, val = str(a).lstrip("+~").partition("=")
        if sep and key == CONFIG_KEY:
            value = val.strip().strip("'\"").lower()
    return value in _TRUE


def _env_rank() -> int:
    for name in ("RANK", "SLURM_PROCID"):
        raw = os.environ.get(name, "")
        if raw.strip().isdigit():
            return int(raw)
    return 0


class _KnownRecordFilter(logging.Filter):
    """Drops the known records on ranks other than 0; on rank 0 lets each one through once."""

    def __init__(self, pattern: str, rank0: bool):
        super().__init__()
        self.pattern = re.compile(pattern)
        self.rank0 = rank0
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        if not self.pattern.match(msg):
            return True
        if not self.rank0 or msg in self.seen:
            return False
        self.seen.add(msg)
        return True


def _known_warning(text: str, category: type[Warning]) -> bool:
    return any(issubclass(category, cat) and re.match(pat, text) for pat, cat in KNOWN_WARNINGS)


def _dedup_showwarning(previous):
    seen: set[tuple[str, type]] = set()

    def showwarning(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if _known_warning(text, category):
            if (text, category) in seen:
                return
            seen.add((text, category))
        return previous(message, category, filename, lineno, file, line)

    showwarning._nvfp4_dedup = True  # type: ignore[attr-defined]
    return showwarning


def install_warning_filters(argv: Sequence[str] | None = None, *, rank: int | None = None) -> dict:
    """Install the filters (idempotent: a second call does nothing and returns the first result).

    Returns ``{"rank": r, "show_all": bool, "installed": bool}``.
    """
    global _installed
    if _installed is not None:
        return _installed
    r = _env_rank() if rank is None else rank
    show_all = show_all_requested(argv)
    if not show_all:
        action = "always" if r == 0 else "ignore"  # rank 0: showwarning below shows each once
        for pattern, category in KNOWN_WARNINGS:
            # inserted at the front of the filter list: they take precedence over earlier filters
            warnings.filterwarnings(action, message=pattern, category=category)
        if r == 0 and not getattr(warnings.showwarning, "_nvfp4_dedup", False):
            warnings.showwarning = _dedup_showwarning(warnings.showwarning)
        for name, pattern in KNOWN_LOG_RECORDS:
            logging.getLogger(name).addFilter(_KnownRecordFilter(pattern, rank0=(r == 0)))
    _installed = {"rank": r, "show_all": show_all, "installed": not show_all}
    return _installed
