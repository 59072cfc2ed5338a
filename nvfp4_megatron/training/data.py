"""Data: preprocessing to Megatron's indexed format, the default corpus, datasets and batches.

* Preprocessing (:func:`write_indexed_dataset`): documents -> token ids + EOD, written with
  ``megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder`` as ``PREFIX.bin``/``PREFIX.idx``
  (uint16 tokens when the vocabulary fits, else int32). ``scripts/preprocess_data.py`` is the CLI.
* The embedded default corpus (:func:`ensure_default_corpus`): the ``.py`` sources of the running
  interpreter's standard library (real text, present offline on every machine, written by nobody on
  this project), in path order, up to ``data.default_corpus_max_mb``. It is tokenized on first use
  into ``data.cache_dir`` (``~/.cache/nvfp4_megatron`` by default); a manifest records the hash of
  the source files and of the written files, and a later run reuses the cache only if both match.
  The build goes to a temporary directory that is renamed into place, so a crash never leaves a
  half-written cache.
* Datasets (:func:`build_datasets`): ``GPTDataset`` through ``BlendedMegatronDatasetBuilder`` with a
  train/valid split (``data.split``) and Megatron-style blends (``data.data_path``).
* Batches (:func:`step_microbatches`): the global batch of step ``s`` is samples
  ``[s*GBS, (s+1)*GBS)`` of the (already shuffled) train dataset; data-parallel rank ``r`` takes the
  ``r``-th contiguous slice and splits it into micro-batches. The iterator position is therefore a
  pure function of the step, which is what exact resume needs.
* :func:`unigram_entropy_nats`: the entropy of the training split's token distribution, in nats
  (the unit of the loss). A model that only learned token frequencies would reach this loss.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from nvfp4_megatron.training.tokenizers import BPETokenizer, ByteTokenizer, train_bpe

CACHE_FORMAT_VERSION = 1
PREPROCESS_HINT = (
    "create it with `python scripts/preprocess_data.py --input FILE.jsonl|DIR --output-prefix PREFIX "
    "--tokenizer-type bpe` (or leave data.data_path=null to use the embedded default corpus)"
)


# ---------------------------------------------------------------- preprocessing
def write_indexed_dataset(prefix: str | Path, docs: Iterable[Sequence[int]], *, eod: int,
                          vocab_size: int) -> int:
    """Write token documents (EOD appended) as Megatron ``.bin``/``.idx``; returns the token count."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(prefix)
    dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    n = 0
    for ids in docs:
        if len(ids) == 0:
            continue
        arr = torch.tensor(list(ids) + [eod], dtype=torch.int64)
        builder.add_item(arr)
        builder.end_document()
        n += arr.numel()
    builder.finalize(prefix + ".idx")
    return n


def _sha256_files(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- default corpus
def stdlib_source_files(max_mb: float) -> list[Path]:
    """The interpreter's stdlib ``.py`` files (no tests, no site-packages), path order, capped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if rel.startswith(("site-packages", "test/", "idlelib/idle_test")) or "/tests/" in rel:
            continue
        files.append(p)
    if not files:
        raise FileNotFoundError(f"no standard-library sources under {root}; set data.data_path")
    out, total, cap = [], 0, int(max_mb * 1e6)
    for p in files:
        size = p.stat().st_size
        if total + size > cap and out:
            break
        out.append(p)
        total += size
    return out


def _read_text(p: Path) -> str:
    return p.read_text(encoding="utf-8", errors="replace")


def default_cache_dir(cache_dir: str | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "nvfp4_megatron"


def _corpus_key(files: list[Path], tokenizer_type: str, vocab_size: int) -> tuple[str, dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(root).as_posix()}|{st.st_size}\n".encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    source_hash = h.hexdigest()
    spec = {"format": CACHE_FORMAT_VERSION, "tokenizer_type": tokenizer_type,
            "vocab_size": vocab_size if tokenizer_type == "bpe" else 257,
            "source_hash": source_hash, "num_files": len(files)}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return key, spec


def _cache_is_valid(d: Path, spec: dict) -> bool:
    m = d / "manifest.json"
    if not m.is_file():
        return False
    try:
        manifest = json.loads(m.read_text())
    except json.JSONDecodeError:
        return False
    if manifest.get("spec") != spec:
        return False
    files = [d / name for name in manifest.get("files", [])]
    return all(f.is_file() for f in files) and _sha256_files(files) == manifest.get("files_hash")


def ensure_default_corpus(*, tokenizer_type: str, vocab_size: int, max_mb: float,
                          cache_dir: str | None, log=print) -> tuple[str, object]:
    """Build (or verify and reuse) the stdlib corpus; returns (prefix, tokenizer). Rank-safe."""
    files = stdlib_source_files(max_mb)
    key, spec = _corpus_key(files, tokenizer_type, vocab_size)
    root = default_cache_dir(cache_dir)
    final = root / f"stdlib-{tokenizer_type}-{key}"
    if not _cache_is_valid(final, spec):
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        try:
            texts = [_read_text(p) for p in files]
            if tokenizer_type == "bpe":
                tok = train_bpe(texts, vocab_size, tmp / "tokenizer.json")
                docs = tok.tokenize_batch(texts)
            else:
                tok = ByteTokenizer()
                docs = [tok.tokenize(t) for t in texts]
            n = write_indexed_dataset(tmp / "corpus", docs, eod=tok.eod, vocab_size=tok.vocab_size)
            names = sorted(p.name for p in tmp.iterdir())
            manifest = {"spec": spec, "files": names,
                        "files_hash": _sha256_files([tmp / x for x in names]),
                        "num_tokens": n, "bytes": sum(p.stat().st_size for p in files),
                        "stdlib": sysconfig.get_paths()["stdlib"]}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
            for p in tmp.iterdir():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
            if final.exists():  # stale or damaged: replace
                shutil.rmtree(final, ignore_errors=True)
            try:
                os.rename(tmp, final)
            except OSError:
                if not _cache_is_valid(final, spec):  # another process won the race validly?
                    raise
            log(f"[data] built default corpus: {len(files)} stdlib files, {n} tokens -> {final}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        log(f"[data] reusing verified default corpus {final}")
    tok = BPETokenizer(final / "tokenizer.json") if tokenizer_type == "bpe" else ByteTokenizer()
    return str(final / "corpus"), tok


# ---------------------------------------------------------------- datasets
def parse_blend(data_path: Sequence) -> tuple[list[str], list[float] | None]:
    """``[prefix]``, ``[p1, p2]`` or ``[w1, p1, w2, p2]`` (Megatron's --data-path) -> blend."""
    items = [str(x) for x in data_path]
    if not items:
        raise ValueError("data.data_path is an empty list; give prefixes or [weight, prefix, ...]")

    def is_num(s):
        try:
            float(s)
            return True
        except ValueError:
            return False

    if is_num(items[0]):
        if len(items) % 2:
            raise ValueError(f"data.data_path={items}: weights and prefixes must alternate")
        weights = [float(w) for w in items[0::2]]
        prefixes = items[1::2]
    else:
        weights, prefixes = None, items
    for p in prefixes:
        for ext in (".bin", ".idx"):
            if not os.path.isfile(p + ext):
                raise FileNotFoundError(f"data path {p + ext} does not exist; {PREPROCESS_HINT}")
    return prefixes, weights


def build_datasets(*, blend: tuple[list[str], list[float] | None], split: str, tokenizer,
                   seq_length: int, seed: int, num_train_samples: int, num_valid_samples: int,
                   cache_path: str | None):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    cfg = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split=split,
        path_to_cache=cache_path,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=False,
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [num_train_samples, num_valid_samples, 0], lambda: True, cfg
    ).build()
    if train is None or valid is None:
        raise ValueError(f"data.split={split!r} leaves no train or valid documents; use e.g. 98,2,0")
    return train, valid


def _leaf_gpt_datasets(ds) -> list[tuple[object, float]]:
    if hasattr(ds, "datasets") and hasattr(ds, "weights"):  # BlendedDataset
        out = []
        for sub, w in zip(ds.datasets, ds.weights):
            out += [(leaf, w * lw) for leaf, lw in _leaf_gpt_datasets(sub)]
        return out
    return [(ds, 1.0)]


def unigram_entropy_nats(train_dataset, vocab_size: int) -> float:
    """Entropy (nats) of the token distribution over the train split's documents (blend-weighted)."""
    probs = np.zeros(vocab_size, dtype=np.float64)
    for ds, weight in _leaf_gpt_datasets(train_dataset):
        counts = np.zeros(vocab_size, dtype=np.float64)
        indexed = ds.dataset
        for doc in np.unique(ds.indices):
            counts += np.bincount(np.asarray(indexed[int(doc)]), minlength=vocab_size)[:vocab_size]
        if counts.sum() > 0:
            probs += weight * counts / counts.sum()
    probs /= probs.sum()
    nz = probs[probs > 0]
    return float(-(nz * np.log(nz)).sum())


def step_microbatches(dataset, *, step: int, global_batch_size: int, micro_batch_size: int,
                      dp_rank: int, dp_size: int) -> list[dict[str, torch.Tensor]]:
    """This DP rank's micro-batches of global batch ``step`` (see the module docstring)."""
    per_rank = global_batch_size // dp_size
    start = step * global_batch_size + dp_rank * per_rank
    out = []
    for m in range(per_rank // micro_batch_size):
        idx = range(start + m * micro_batch_size, start + (m + 1) * micro_batch_size)
        samples = [dataset[i % len(dataset)] for i in idx]
        out.append({k: torch.stack([torch.as_tensor(s[k]) for s in samples])
                    for k in ("tokens", "labels", "loss_mask", "position_ids")})
    return out


def num_microbatches(global_batch_size: int, micro_batch_size: int, dp_size: int) -> int:
    if global_batch_size % (micro_batch_size * dp_size):
        raise ValueError(
            f"train.global_batch_size={global_batch_size} must be a multiple of "
            f"train.micro_batch_size={micro_batch_size} x data-parallel size {dp_size} "
            f"(= {micro_batch_size * dp_size})"
        )
    return global_batch_size // (micro_batch_size * dp_size)

