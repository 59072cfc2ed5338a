"""Reading a checkpoint's pickles without letting them run code.

A pickle names callables (``GLOBAL module name``) that the unpickler imports and calls; a copied or
tampered checkpoint can therefore run anything on load (a ``__reduce__`` payload). Every pickle a
resume reads goes through one of two gates before Megatron or torch unpickles it:

- ``.metadata`` (torch.distributed.checkpoint's index, which ``FileSystemReader.read_metadata``
  reads with plain ``pickle.load``): :func:`load_dcp_metadata`, a ``pickle.Unpickler`` whose
  ``find_class`` resolves only :data:`DCP_METADATA_GLOBALS` and torch dtypes;
- ``torch.save`` files and byte items (the per-rank RNG file; the ``ShardedObject`` byte items of
  the ``.distcp`` shards, which torch's ``DefaultLoadPlanner.load_bytes`` unpickles with
  ``weights_only=False``): :func:`load_torch`, ``torch.load(weights_only=True)`` (torch's own
  allow-list: tensors, dtypes, containers of primitives).

A refused pickle raises :class:`UnsafePickleError` (a ``ValueError``: ``pretrain.py`` exits 2)
naming the file; nothing in it has been called.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import torch

# Every global the ``.metadata`` of our checkpoints references (listed from real saves of
# +recipe=nvfp4_tiny, bf16_tiny and mixtral_tiny_baseline (EP2), dp_reshardable and
# fully_reshardable, TP1 and TP2+SP; torch 2.11, megatron-core 0.19.2): the DCP
# metadata dataclasses, torch.Size, and the layout / memory-format decoders. Dtypes are allowed
# separately (any ``torch.<name>`` that is a ``torch.dtype``).
DCP_METADATA_GLOBALS = frozenset({
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
})


class UnsafePickleError(ValueError):
    """A checkpoint pickle refers to something outside the allow-list; it was not unpickled."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, *, allowed: frozenset, source: str) -> None:
        super().__init__(file)
        self._allowed, self._source = allowed, source

    def find_class(self, module: str, name: str):
        if (module, name) in self._allowed or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self._source} refers to {module}.{name}, which a checkpoint never needs (a code "
            "payload?); refusing to load it. Nothing in it was run.")

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self._source} holds a persistent id; refusing to load it")


def restricted_loads(data: bytes, *, allowed: frozenset, source: str):
    """``pickle.loads`` that resolves only the ``(module, name)`` pairs in ``allowed``."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), allowed=allowed, source=source).load()
    except UnsafePickleError:
        raise
    except Exception as err:  # truncated or garbled: damaged, not unsafe
        raise ValueError(f"{source} cannot be read ({type(err).__name__}: {err})") from err


def load_dcp_metadata(path: str | Path):
    """A ``torch.distributed.checkpoint`` ``.metadata`` file, through the restricted unpickler."""
    path = Path(path)
    return restricted_loads(path.read_bytes(), allowed=DCP_METADATA_GLOBALS, source=str(path))


def load_torch(data: bytes | str | Path, *, source: str):
    """``torch.load(..., weights_only=True)``; a global outside torch's allow-list (or any
    pickle payload) raises :class:`UnsafePickleError`, a file torch cannot parse ``ValueError``."""
    f = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message is long; its "Unsupported global: GLOBAL x.y" part names the culprit
        why = re.search(r"WeightsUnpickler error: (.*?)(?: was not an allowed|$)", str(err), re.M)
        raise UnsafePickleError(
            f"{source} holds more than tensors ({why.group(1) if why else 'not weights-only'}), "
            "which a checkpoint never needs (a code payload?); refusing to load it. Nothing in "
            "it was run.") from err
    except Exception as err:
        raise ValueError(f"{source} cannot be read ({type(err).__name__}: {err})") from err
