"""Data verified before training (issue 14, row 2): ``.bin`` size against the ``.idx``, a well
formed ``.idx``, token ids below the tokenizer's vocabulary, a tokenizer that loads; each failure
names the file (exit 2 through pretrain.py). The index cache is keyed on the data, so a prefix
rebuilt with other content never reuses stale indices."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _train_launch import env, launch, train_losses
from nvfp4_megatron.training import data as D
from nvfp4_megatron.training.tokenizers import ByteTokenizer, load_tokenizer

ROOT = Path(__file__).parents[2]


def _docs(n, seed, vocab=256, lo=100, hi=400):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def _byte_dataset(prefix, n=60, seed=1):
    D.write_indexed_dataset(prefix, _docs(n, seed), eod=256, vocab_size=257)
    return str(prefix)


def _cut(path, nbytes):
    with open(path, "r+b") as f:
        f.truncate(nbytes)


# ---------------------------------------------------------------- .bin / .idx
def test_an_intact_dataset_passes_with_every_token_checked(tmp_path):
    p = _byte_dataset(tmp_path / "d")
    s = D.verify_indexed_dataset(p, 257)
    assert s["documents"] == 60 and s["dtype"] == "uint16" and s["checked"] == "all"
    assert s["bin_bytes"] == os.path.getsize(p + ".bin") == 2 * s["tokens"]


def test_a_bin_cut_in_half_is_refused_naming_the_bin(tmp_path):
    p = _byte_dataset(tmp_path / "d")
    _cut(p + ".bin", os.path.getsize(p + ".bin") // 2)
    with pytest.raises(ValueError, match=r"data file .*d\.bin is truncated") as e:
        D.verify_indexed_dataset(p, 257)
    assert "preprocess_data.py" in str(e.value) and p in str(e.value)
    with pytest.raises(ValueError, match=r"d\.bin is truncated"):  # build_datasets verifies
        D.build_datasets(blend=([p], None), split="90,10,0", tokenizer=ByteTokenizer(),
                         seq_length=64, seed=1, num_train_samples=8, num_valid_samples=8,
                         cache_path=str(tmp_path / "cache"))


def test_a_bin_longer_than_its_index_is_refused(tmp_path):
    p = _byte_dataset(tmp_path / "d")
    with open(p + ".bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match=r"d\.bin is longer than its index"):
        D.verify_indexed_dataset(p, 257)


def test_bin_and_idx_of_different_builds_are_refused(tmp_path):
    a, b = _byte_dataset(tmp_path / "a", seed=1), _byte_dataset(tmp_path / "b", seed=2)
    os.replace(b + ".idx", a + ".idx")
    with pytest.raises(ValueError, match=r"a\.bin is (truncated|longer)"):
        D.verify_indexed_dataset(a, 257)


@pytest.mark.parametrize("cut, what", [(0, "is empty"), (20, "is truncated: 20 bytes"),
                                       (200, "is truncated: 200 bytes"), (-1, "is truncated")])
def test_an_empty_or_truncated_idx_is_refused_naming_the_idx(tmp_path, cut, what):
    p = _byte_dataset(tmp_path / "d")
    _cut(p + ".idx", cut if cut >= 0 else os.path.getsize(p + ".idx") - 1)
    with pytest.raises(ValueError, match=rf"index file .*d\.idx {what}") as e:
        D.verify_indexed_dataset(p, 257)
    assert "preprocess_data.py" in str(e.value)


def test_an_idx_that_is_not_an_index_is_refused(tmp_path):
    p = _byte_dataset(tmp_path / "d")
    Path(p + ".idx").write_bytes(os.urandom(500))
    with pytest.raises(ValueError, match=r"d\.idx is not a Megatron index file"):
        D.verify_indexed_dataset(p, 257)


def test_an_idx_with_inconsistent_pointers_is_refused(tmp_path):
    p = _byte_dataset(tmp_path / "d")
    raw = bytearray(Path(p + ".idx").read_bytes())
    ptr0 = 34 + 4 * 60 + 8 * 5  # the 6th sequence's byte pointer
    raw[ptr0:ptr0 + 8] = (12345).to_bytes(8, "little")
    Path(p + ".idx").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"d\.idx has inconsistent byte pointers .*sequence 5"):
        D.verify_indexed_dataset(p, 257)


# ---------------------------------------------------------------- token ids
def test_a_token_id_outside_the_vocab_is_refused_naming_bin_and_document(tmp_path):
    docs = _docs(10, 3)
    docs[3][7] = 700
    p = str(tmp_path / "d")
    D.write_indexed_dataset(p, docs, eod=256, vocab_size=1000)  # valid for a 1000-token vocab
    with pytest.raises(ValueError, match=r"d\.bin has token id 700 at token \d+ \(document 3\)"):
        D.verify_indexed_dataset(p, 257)
    with pytest.raises(ValueError, match="token id 700"):  # a full scan, and through build
        D.build_datasets(blend=([p], None), split="90,10,0", tokenizer=ByteTokenizer(),
                         seq_length=64, seed=1, num_train_samples=8, num_valid_samples=8,
                         cache_path=None)
    assert D.verify_indexed_dataset(p, 1000)["checked"] == "all"


def test_the_sample_check_of_a_big_file_finds_a_bad_id_in_the_last_window(tmp_path):
    docs = _docs(10, 3)
    docs[-1][-1] = 300
    p = str(tmp_path / "d")
    D.write_indexed_dataset(p, docs, eod=256, vocab_size=1000)
    with pytest.raises(ValueError, match=r"token id 300 .*\(document 9\)"):
        D.verify_indexed_dataset(p, 257, full_scan_max_bytes=0)
    ok = _byte_dataset(tmp_path / "ok")
    assert D.verify_indexed_dataset(ok, 257, full_scan_max_bytes=0)["checked"] == "sample"


def test_negative_ids_of_int32_data_are_refused(tmp_path):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    p = str(tmp_path / "d")
    b = IndexedDatasetBuilder(p + ".bin", dtype=np.int32)
    for doc in ([1, 2, 3], [4, -5, 6]):
        b.add_item(torch.tensor(doc))
        b.end_document()
    b.finalize(p + ".idx")
    with pytest.raises(ValueError, match=r"token id -5 at token 4 \(document 1\)"):
        D.verify_indexed_dataset(p, 100_000)


def test_writing_refuses_ids_outside_the_vocab_and_keeps_the_old_files(tmp_path):
    p = _byte_dataset(tmp_path / "d")
    before = Path(p + ".bin").read_bytes(), Path(p + ".idx").read_bytes()
    docs = _docs(5, 4)
    docs[2][0] = 257
    with pytest.raises(ValueError, match=r"document 2 has token id 257, outside the vocabulary"):
        D.write_indexed_dataset(p, docs, eod=256, vocab_size=257)
    assert (Path(p + ".bin").read_bytes(), Path(p + ".idx").read_bytes()) == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["d.bin", "d.idx"]  # no temp files left


# ---------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("content", [os.urandom(300), b"", b"{not json", b'{"a": 1}',
                                     json.dumps({"version": "1.0", "model": {"type": "BPE"}}).encode()])
def test_a_garbage_tokenizer_file_is_refused_naming_it(tmp_path, content):
    path = tmp_path / "tok.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"BPE tokenizer file {path} could not be loaded"):
        load_tokenizer("bpe", str(path))


def test_a_directory_as_tokenizer_is_refused(tmp_path):
    with pytest.raises(ValueError, match=rf"BPE tokenizer {tmp_path} is not a file"):
        load_tokenizer("bpe", str(tmp_path))


def test_preprocess_with_a_garbage_tokenizer_exits_2_naming_it(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "hello"}) + "\n")
    bad = tmp_path / "bad.tokenizer.json"
    bad.write_bytes(b"\x00garbage")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/preprocess_data.py"), "--input",
                           str(src), "--output-prefix", str(tmp_path / "o"), "--tokenizer-model",
                           str(bad)], capture_output=True, text=True, timeout=120, env=env())
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: BPE tokenizer file {bad} could not be loaded" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- index cache
def _train_tokens(train_ds):
    return np.stack([np.asarray(train_ds[i]["tokens"]) for i in range(len(train_ds))])


def test_a_rebuilt_prefix_does_not_reuse_stale_indices(tmp_path):
    p, cache = str(tmp_path / "d"), tmp_path / "cache"
    kw = dict(split="90,10,0", tokenizer=ByteTokenizer(), seq_length=64, seed=1,
              num_train_samples=40, num_valid_samples=8)
    _byte_dataset(p, n=60, seed=1)
    old, _ = D.build_datasets(blend=([p], None), cache_path=str(cache), **kw)
    old_tokens = _train_tokens(old)
    _byte_dataset(p, n=20, seed=2)  # same prefix, other content, fewer documents
    new, _ = D.build_datasets(blend=([p], None), cache_path=str(cache), **kw)
    fresh, _ = D.build_datasets(blend=([p], None), cache_path=str(tmp_path / "fresh"), **kw)
    assert np.array_equal(_train_tokens(new), _train_tokens(fresh))
    assert not np.array_equal(_train_tokens(new)[:4], old_tokens[:4])
    dirs = sorted(x.name for x in cache.iterdir())
    assert len(dirs) == 2 and all(d.startswith("data-") for d in dirs), dirs
    # the same data again reuses its directory (the key is the content, not the time)
    D.build_datasets(blend=([p], None), cache_path=str(cache), **kw)
    assert len(list(cache.iterdir())) == 2
    ident = json.loads((cache / dirs[0] / "data.json").read_text())
    assert ident[0]["prefix"] == os.path.abspath(p) and len(ident[0]["idx_sha256"]) == 64


def test_a_split_left_without_documents_is_refused_not_a_hang(tmp_path):
    """One document and split 98,2,0: the valid split gets no document, and Megatron's GPTDataset
    counted epochs of zero tokens forever (found by scripts/fault_table.py)."""
    p = str(tmp_path / "one")
    D.write_indexed_dataset(p, [list(range(200))], eod=256, vocab_size=257)
    kw = dict(tokenizer=ByteTokenizer(), seq_length=16, seed=1, num_train_samples=8,
              cache_path=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"data.split='98,2,0' leaves the valid split of .*one "
                                         r"without documents \(it has 1;.*8 valid samples"):
        D.build_datasets(blend=([p], None), split="98,2,0", num_valid_samples=8, **kw)
    D.write_indexed_dataset(p, [list(range(200)), list(range(100))], eod=256, vocab_size=257)
    train, valid = D.build_datasets(blend=([p], None), split="50,50,0", num_valid_samples=8, **kw)
    assert len(train) >= 8 and len(valid) >= 8


# ---------------------------------------------------------------- end to end (pretrain.py)
TINY = ["+recipe=bf16_tiny", "model.vocab_size=512", "data.tokenizer_type=byte",
        "data.split='90,10,0'", "train.train_iters=3", "train.warmup_iters=1",
        "train.eval_interval=0", "train.eval_iters=1", "train.save_interval=null",
        "train.log_interval=1", "logging.plot=false", "logging.print_precision_table=false"]


def test_pretrain_on_a_truncated_bin_exits_2_naming_the_file(tmp_path):
    p = _byte_dataset(tmp_path / "d")
    _cut(p + ".bin", os.path.getsize(p + ".bin") // 2)
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), f"run_dir={run}",
                           f"data.cache_dir={tmp_path / 'cache'}", f"data.data_path=[{p}]", *TINY],
                          capture_output=True, text=True, timeout=300, env=env(), cwd=str(tmp_path))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert f"error: ValueError: data file {p}.bin is truncated" in out, out[-3000:]
    assert "Traceback" not in out and "step      1/" not in out


@pytest.mark.slow  # three 2-process runs of 3 steps (~30 s each on 2 shared cores)
def test_a_rebuilt_prefix_trains_on_its_new_content(tmp_path):
    p = str(tmp_path / "data" / "d")
    os.makedirs(tmp_path / "data")
    cache, fresh = tmp_path / "cache", tmp_path / "fresh_cache"
    _byte_dataset(p, n=60, seed=1)
    rc, out = launch(tmp_path / "old", cache, f"data.data_path=[{p}]", *TINY)
    assert rc == 0, out[-3000:]
    _byte_dataset(p, n=20, seed=2)  # the case: same prefix, new content -> IndexError
    rc, out = launch(tmp_path / "new", cache, f"data.data_path=[{p}]", *TINY)
    assert rc == 0, out[-3000:]
    rc, out = launch(tmp_path / "ref", fresh, f"data.data_path=[{p}]", *TINY)
    assert rc == 0, out[-3000:]
    old, new, ref = (train_losses(tmp_path / x) for x in ("old", "new", "ref"))
    assert new == ref and new != old  # bit-equal to a run that never saw the old data
    res = [json.loads((tmp_path / x / "result.json").read_text())["unigram_entropy_nats"]
           for x in ("new", "ref")]
    assert res[0] == res[1]
