"""Data: preprocessing to .bin/.idx, the cached default corpus, entropy, batch slicing."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nvfp4_megatron.training import data as D

ROOT = Path(__file__).parents[2]


def _read_indexed(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix), mmap=False)
    return [np.asarray(ds[i]).tolist() for i in range(len(ds))]


def test_preprocess_jsonl_byte_tokens_are_the_utf8_bytes(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "ab"}) + "\n" + json.dumps({"text": "é"}) + "\n")
    out = tmp_path / "out" / "c"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/preprocess_data.py"), "--input",
                           str(src), "--output-prefix", str(out), "--tokenizer-type", "byte"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _read_indexed(out) == [[97, 98, 256], [0xC3, 0xA9, 256]]


def test_preprocess_bpe_trains_locally_and_round_trips(tmp_path):
    src = tmp_path / "docs"
    src.mkdir()
    text = "def add(a, b):\n    return a + b\n" * 50
    (src / "a.py").write_text(text)
    (src / "b.txt").write_text("hello world " * 40)
    out = tmp_path / "bpe"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/preprocess_data.py"), "--input",
                           str(src), "--output-prefix", str(out), "--vocab-size", "300"],
                          capture_output=True, text=True, timeout=120,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    from nvfp4_megatron.training.tokenizers import BPETokenizer

    tok = BPETokenizer(str(out) + ".tokenizer.json")
    docs = _read_indexed(out)
    assert len(docs) == 2 and all(d[-1] == tok.eod for d in docs)
    assert tok.detokenize(docs[0][:-1]) == text
    assert len(docs[0]) - 1 < len(text) / 2  # merges were learned


def test_missing_data_path_points_to_preprocess(tmp_path):
    with pytest.raises(FileNotFoundError, match="preprocess_data.py"):
        D.parse_blend([str(tmp_path / "nope")])


def test_blend_parsing(tmp_path):
    for name in ("a", "b"):
        for ext in (".bin", ".idx"):
            (tmp_path / (name + ext)).write_bytes(b"")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert D.parse_blend([a, b]) == ([a, b], None)
    assert D.parse_blend([0.3, a, 0.7, b]) == ([a, b], [0.3, 0.7])
    with pytest.raises(ValueError, match="alternate"):
        D.parse_blend([0.3, a, 0.7])


class _Leaf:
    def __init__(self, docs):
        self.dataset = [np.array(d) for d in docs]
        self.indices = np.arange(len(docs))


def test_unigram_entropy_exact():
    h = D.unigram_entropy_nats(_Leaf([[0, 0, 1, 1], [2, 2, 2, 2]]), vocab_size=8)
    assert h == pytest.approx(-(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5)), abs=1e-12)


def test_default_corpus_is_cached_verified_and_rebuilt_when_damaged(tmp_path):
    logs = []
    p1, tok = D.ensure_default_corpus(tokenizer_type="byte", vocab_size=512, max_mb=0.05,
                                      cache_dir=str(tmp_path), log=logs.append)
    assert "built default corpus" in logs[-1]
    docs = _read_indexed(p1)
    files = D.stdlib_source_files(0.05)
    assert len(docs) == len(files)
    assert docs[0][:-1] == list(files[0].read_bytes())  # real stdlib text, byte for byte
    p2, _ = D.ensure_default_corpus(tokenizer_type="byte", vocab_size=512, max_mb=0.05,
                                    cache_dir=str(tmp_path), log=logs.append)
    assert p2 == p1 and "reusing verified" in logs[-1]
    with open(p1 + ".bin", "r+b") as f:  # flip one byte: the manifest hash must catch it
        b = f.read(1)
        f.seek(0)
        f.write(bytes([b[0] ^ 1]))
    D.ensure_default_corpus(tokenizer_type="byte", vocab_size=512, max_mb=0.05,
                            cache_dir=str(tmp_path), log=logs.append)
    assert "built default corpus" in logs[-1]
    assert _read_indexed(p1) == docs


class _Seq:
    def __len__(self):
        return 1000

    def __getitem__(self, i):
        t = torch.full((4,), i)
        return {"tokens": t, "labels": t, "loss_mask": torch.ones(4), "position_ids": torch.arange(4)}


def test_step_microbatches_slice_the_global_batch_by_dp_rank():
    kw = dict(step=3, global_batch_size=8, micro_batch_size=2)
    whole = D.step_microbatches(_Seq(), dp_rank=0, dp_size=1, **kw)
    r0 = D.step_microbatches(_Seq(), dp_rank=0, dp_size=2, **kw)
    r1 = D.step_microbatches(_Seq(), dp_rank=1, dp_size=2, **kw)
    ids = lambda mbs: [int(x) for mb in mbs for x in mb["tokens"][:, 0]]
    assert ids(whole) == list(range(24, 32))
    assert ids(r0) + ids(r1) == ids(whole)


def test_global_batch_must_divide():
    with pytest.raises(ValueError, match="global_batch_size=10"):
        D.num_microbatches(10, 4, 2)
