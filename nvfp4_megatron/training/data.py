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
* Verification (:func:`verify_indexed_dataset`, run by :func:`build_datasets` on every prefix
  before Megatron opens it): the ``.idx`` is well formed (header, version, integer dtype, its size
  matches its counts, pointers and document boundaries are consistent), the ``.bin`` has exactly
  the bytes the ``.idx`` describes, and every token id is in ``[0, tokenizer.vocab_size)`` (a full
  scan over a memory map up to :data:`FULL_SCAN_MAX_BYTES`, a deterministic sample of
  :data:`SAMPLE_WINDOWS` windows above it). Each failure is a ``ValueError`` naming the file.
* Datasets (:func:`build_datasets`): ``GPTDataset`` through ``BlendedMegatronDatasetBuilder`` with a
  train/valid split (``data.split``) and Megatron-style blends (``data.data_path``). Megatron's
  index cache (``cache_path``) names its files by a hash of the config, the prefix path and the
  tokenizer only, never of the data, so a prefix rebuilt with other content would reuse stale
  document/sample indices; the cache therefore goes to ``cache_path/data-<key>/`` where ``key``
  hashes each prefix's ``.idx`` content (the indices are a pure function of it) and ``.bin`` size.
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


# Token-id check: every token when the .bin is at most this big (a chunked min/max over file reads
# took ~0.5 s per GiB from the page cache on the 2-core CPU box; every rank checks), above it a
# deterministic sample (scripts/preprocess_data.py checks every token when it writes the data).
FULL_SCAN_MAX_BYTES = 1 << 30
SAMPLE_WINDOWS = 64  # evenly spaced windows (first and last included) of SAMPLE_WINDOW_BYTES
SAMPLE_WINDOW_BYTES = 4 << 20
_SCAN_CHUNK_TOKENS = 1 << 24

# Megatron's .idx layout (megatron.core.datasets.indexed_dataset): 9-byte header, u64 version 1,
# u8 dtype code, u64 sequence count, u64 document count, then int32 lengths, int64 byte pointers,
# int64 document boundaries (and int8 modes for multimodal data).
_IDX_HEADER = b"MMIDIDX\x00\x00"
_IDX_FIXED_BYTES = 34
_TOKEN_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
_FLOAT_DTYPE_CODES = {6: "float64", 7: "float32"}


# ---------------------------------------------------------------- preprocessing
def write_indexed_dataset(prefix: str | Path, docs: Iterable[Sequence[int]], *, eod: int,
                          vocab_size: int) -> int:
    """Write token documents (EOD appended) as Megatron ``.bin``/``.idx``; returns the token count.

    Every id must be in ``[0, vocab_size)`` (checked on build: ``ValueError`` naming the document).
    Both files are written under temporary names and renamed into place (``.bin`` first), so an
    interrupted build never leaves a half-written pair under ``prefix``.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(prefix)
    if not 0 <= eod < vocab_size:
        raise ValueError(f"eod={eod} is outside the vocabulary [0, {vocab_size})")
    dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    tmp = f"{prefix}.tmp-{os.getpid()}"
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    n = 0
    try:
        for k, ids in enumerate(docs):
            if len(ids) == 0:
                continue
            arr = torch.tensor(list(ids) + [eod], dtype=torch.int64)
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"document {k} has token id {bad}, outside the vocabulary "
                                 f"[0, {vocab_size}); nothing was written to {prefix}.bin/.idx")
            builder.add_item(arr)
            builder.end_document()
            n += arr.numel()
        if n == 0:
            raise ValueError(f"no non-empty documents; nothing was written to {prefix}.bin/.idx")
        builder.finalize(tmp + ".idx")
        os.replace(tmp + ".bin", prefix + ".bin")
        os.replace(tmp + ".idx", prefix + ".idx")
    finally:
        if not builder.data_file.closed:  # failed before finalize
            builder.data_file.close()
        for ext in (".bin", ".idx"):
            if os.path.exists(tmp + ext):
                os.remove(tmp + ext)
    return n


# ---------------------------------------------------------------- verification
def _rebuild_hint(prefix: str) -> str:
    return (f"rebuild it with `python scripts/preprocess_data.py --input ... --output-prefix "
            f"{prefix} ...` (or copy the .bin/.idx pair again)")


def _idx_error(idx: str, what: str) -> ValueError:
    return ValueError(f"index file {idx} {what}; the dataset cannot be read: "
                      f"{_rebuild_hint(idx[:-4])}")


def verify_indexed_dataset(prefix: str | Path, vocab_size: int | None, *,
                           full_scan_max_bytes: int = FULL_SCAN_MAX_BYTES) -> dict:
    """Check ``PREFIX.idx``/``PREFIX.bin`` before training; ``ValueError`` naming the bad file.

    * ``.idx``: not empty, the Megatron header and version, an integer token dtype, a size equal to
      what its sequence/document counts imply, byte pointers equal to the running sum of the
      lengths, document boundaries increasing from 0 to the sequence count (at least one document).
    * ``.bin``: exactly ``sum(lengths) * itemsize`` bytes (a truncated or over-long file is refused).
    * token ids in ``[0, vocab_size)`` (skipped when ``vocab_size`` is None): all of them when the
      ``.bin`` is at most ``full_scan_max_bytes``, else :data:`SAMPLE_WINDOWS` evenly spaced windows.

    Returns a summary (documents, tokens, dtype, ``checked``: "all"/"sample"/"none", the ``.idx``
    sha256 and ``.bin`` size that key the index cache).
    """
    prefix = str(prefix)
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    for path in (idx, bin_):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data path {path} does not exist; {PREPROCESS_HINT}")
    idx_bytes = os.path.getsize(idx)
    if idx_bytes == 0:
        raise _idx_error(idx, "is empty (0 bytes)")
    if idx_bytes < _IDX_FIXED_BYTES:
        raise _idx_error(idx, f"is truncated: {idx_bytes} bytes, shorter than the "
                              f"{_IDX_FIXED_BYTES}-byte header")
    with open(idx, "rb") as f:
        head = f.read(_IDX_FIXED_BYTES)
    if head[:9] != _IDX_HEADER:
        raise _idx_error(idx, f"is not a Megatron index file (header {head[:9]!r}, "
                              f"expected {_IDX_HEADER!r})")
    version = int.from_bytes(head[9:17], "little")
    if version != 1:
        raise _idx_error(idx, f"has index version {version}; only version 1 is supported")
    code = head[17]
    if code in _FLOAT_DTYPE_CODES:
        raise _idx_error(idx, f"declares {_FLOAT_DTYPE_CODES[code]} tokens; token ids must be "
                              "integers")
    if code not in _TOKEN_DTYPES:
        raise _idx_error(idx, f"declares an unknown dtype code {code}")
    dtype = np.dtype(_TOKEN_DTYPES[code])
    n_seq = int.from_bytes(head[18:26], "little")
    n_doc = int.from_bytes(head[26:34], "little")
    expected = _IDX_FIXED_BYTES + n_seq * (4 + 8) + n_doc * 8
    if idx_bytes < expected:
        raise _idx_error(idx, f"is truncated: {idx_bytes} bytes, but its header ({n_seq} "
                              f"sequences, {n_doc - 1 if n_doc else 0} documents) needs {expected}")
    if idx_bytes not in (expected, expected + n_seq):  # + n_seq: int8 modes of multimodal data
        raise _idx_error(idx, f"has {idx_bytes} bytes, but its header ({n_seq} sequences, "
                              f"{n_doc - 1 if n_doc else 0} documents) implies {expected}")
    if n_seq == 0 or n_doc < 2:
        raise _idx_error(idx, "holds no documents")
    with open(idx, "rb") as f:
        f.seek(_IDX_FIXED_BYTES)
        lengths = np.fromfile(f, dtype=np.int32, count=n_seq).astype(np.int64)
        pointers = np.fromfile(f, dtype=np.int64, count=n_seq)
        doc_idx = np.fromfile(f, dtype=np.int64, count=n_doc)
        f.seek(0)
        h = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    if (lengths < 0).any():
        raise _idx_error(idx, f"has a negative sequence length at sequence "
                              f"{int(np.argmax(lengths < 0))}")
    starts = np.zeros(n_seq + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    bad = np.flatnonzero(pointers != starts[:-1] * dtype.itemsize)
    if bad.size:
        raise _idx_error(idx, f"has inconsistent byte pointers (first at sequence {int(bad[0])})")
    if doc_idx[0] != 0 or doc_idx[-1] != n_seq or (np.diff(doc_idx) < 0).any():
        raise _idx_error(idx, "has inconsistent document boundaries (not increasing from 0 to "
                              f"the sequence count {n_seq})")
    n_tok = int(starts[-1])
    want = n_tok * dtype.itemsize
    bin_bytes = os.path.getsize(bin_)
    if bin_bytes != want:
        state = "truncated" if bin_bytes < want else "longer than its index"
        raise ValueError(
            f"data file {bin_} is {state}: {bin_bytes} bytes, but {idx} describes {n_tok} "
            f"{dtype.name} tokens = {want} bytes (an incomplete write or copy, or a .bin and .idx "
            f"from different builds); {_rebuild_hint(prefix)}")
    checked = "none"  # nothing to check when the dtype cannot hold an id >= vocab_size
    if vocab_size is not None and (dtype.kind == "i" or np.iinfo(dtype).max >= vocab_size):
        checked = _check_token_ids(bin_, dtype, n_tok, vocab_size, starts, doc_idx,
                                   full_scan_max_bytes)
    return {"documents": int(n_doc - 1), "sequences": n_seq, "tokens": n_tok, "dtype": dtype.name, "checked": checked,
            "idx_sha256": h.hexdigest(), "bin_bytes": bin_bytes}


def _check_token_ids(bin_: str, dtype: np.dtype, n_tok: int, vocab_size: int, starts, doc_idx,
                     full_scan_max_bytes: int) -> str:
    """Token ids in ``[0, vocab_size)``: every token, or evenly spaced windows of a big file."""
    if n_tok * dtype.itemsize <= full_scan_max_bytes:
        windows, checked = [(s, min(s + _SCAN_CHUNK_TOKENS, n_tok))
                            for s in range(0, n_tok, _SCAN_CHUNK_TOKENS)], "all"
    else:
        w = min(n_tok, max(1, SAMPLE_WINDOW_BYTES // dtype.itemsize))
        firsts = sorted({int(x) for x in np.linspace(0, n_tok - w, SAMPLE_WINDOWS)})
        windows, checked = [(s, s + w) for s in firsts], "sample"
    with open(bin_, "rb") as f:
        for s, e in windows:
            f.seek(s * dtype.itemsize)
            chunk = np.fromfile(f, dtype=dtype, count=e - s)
            if chunk.size != e - s:  # the file shrank since its size was checked
                raise ValueError(f"data file {bin_} ended early at token {s + chunk.size}; "
                                 f"{_rebuild_hint(bin_[:-4])}")
            lo = int(chunk.min()) if dtype.kind == "i" else 0
            if int(chunk.max()) >= vocab_size or lo < 0:
                pos = s + int(np.flatnonzero((chunk >= vocab_size) | (chunk < 0))[0])
                seq = int(np.searchsorted(starts, pos, side="right")) - 1
                doc = int(np.searchsorted(doc_idx, seq, side="right")) - 1
                raise ValueError(
                    f"data file {bin_} has token id {int(chunk[pos - s])} at token {pos} "
                    f"(document {doc}), outside the tokenizer's vocabulary [0, {vocab_size}): it "
                    "was tokenized with another tokenizer or is damaged; set "
                    "data.tokenizer_type/data.tokenizer_model to the tokenizer that built it, "
                    f"or {_rebuild_hint(bin_[:-4])}")
    return checked


def data_identity(prefixes: Sequence[str], summaries: Sequence[dict]) -> tuple[str, list[dict]]:
    """A key over the data that Megatron's index cache depends on (per prefix: path, ``.idx``
    sha256 and ``.bin`` size); the document/sample/shuffle indices are a function of the ``.idx``."""
    ident = [{"prefix": os.path.abspath(p), "idx_sha256": s["idx_sha256"],
              "bin_bytes": s["bin_bytes"]} for p, s in zip(prefixes, summaries)]
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return key, ident


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
    """Verify every prefix (:func:`verify_indexed_dataset`), then build the train/valid datasets.

    The index cache goes to ``cache_path/data-<key>/`` (see :func:`data_identity`), so a prefix
    rebuilt with other content never reuses the indices of its previous content.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefixes = list(blend[0])
    summaries = [verify_indexed_dataset(p, getattr(tokenizer, "vocab_size", None))
                 for p in prefixes]
    _check_split_sizes(prefixes, summaries, split, {"train": num_train_samples,
                                                    "valid": num_valid_samples})
    if cache_path is not None:
        key, ident = data_identity(prefixes, summaries)
        cache_path = os.path.join(cache_path, f"data-{key}")
        _write_data_description(cache_path, ident)
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


def _check_split_sizes(prefixes: Sequence[str], summaries: Sequence[dict], split: str,
                       wanted: dict[str, int]) -> None:
    """Each split that must yield samples gets at least one sequence of every prefix.

    Megatron divides a prefix's sequences between train/valid/test by rounding the cumulative
    ``data.split`` fractions (``BlendedMegatronDatasetBuilder``); a split left with none and asked
    for samples makes ``GPTDataset`` count epochs of zero tokens forever (a hang, found with a
    one-document dataset). Refused here, naming the prefix and the fix.
    """
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)

    bounds = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for prefix, summary in zip(prefixes, summaries):
        n = summary["sequences"]
        for (name, samples), bound in zip(wanted.items(), bounds):
            count = 0 if bound is None else (int(round(bound[1] * float(n)))
                                             - int(round(bound[0] * float(n))))
            if samples > 0 and count == 0:
                raise ValueError(
                    f"data.split={split!r} leaves the {name} split of {prefix} without documents "
                    f"(it has {summary['documents']}; Megatron splits whole documents), but "
                    f"{samples} {name} samples are needed. Add documents (e.g. one per file or "
                    f"line when preprocessing), or change data.split"
                    + (" (train.eval_iters samples come from the valid split)"
                       if name == "valid" else ""))


def _write_data_description(cache_dir: str, ident: list[dict]) -> None:
    """``data.json`` in the cache directory: which data its indices belong to (for people)."""
    path = os.path.join(cache_dir, "data.json")
    if os.path.isfile(path):
        return
    os.makedirs(cache_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".data.", dir=cache_dir)
    with os.fdopen(fd, "w") as f:
        json.dump(ident, f, indent=2)
    os.replace(tmp, path)  # ranks may race here: each writes the same content


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

