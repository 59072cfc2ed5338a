"""Tokenizers that work offline: byte-level, and byte-level BPE trained locally.

Both expose what Megatron's ``GPTDataset`` needs (``vocab_size``, ``eod``) plus ``tokenize`` and
``detokenize``. Nothing is downloaded: the BPE model is trained with Hugging Face ``tokenizers`` on
the corpus being preprocessed and saved as ``tokenizer.json`` next to the data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

EOD_TOKEN = "<|endoftext|>"


class ByteTokenizer:
    """UTF-8 bytes 0..255 are tokens 0..255; 256 is end-of-document."""

    kind = "byte"

    def __init__(self) -> None:
        self.vocab_size = 257
        self.eod = 256
        # Megatron's dataset cache keys include the tokenizer's identity.
        self.unique_identifiers = {"class": "ByteTokenizer", "vocab_size": 257}

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class BPETokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer`` loaded from a local ``tokenizer.json``."""

    kind = "bpe"

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"BPE tokenizer file {path} does not exist; create it with "
                "`python scripts/preprocess_data.py --tokenizer-type bpe ...` (it writes "
                "tokenizer.json next to the output prefix) and set data.tokenizer_model to it"
            )
        if not path.is_file():
            raise ValueError(f"BPE tokenizer {path} is not a file; set data.tokenizer_model to the "
                             "tokenizer.json written by scripts/preprocess_data.py")
        self.path = path
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise ValueError(f"BPE tokenizer file {path} cannot be read: {err}") from None
        try:
            self._tok = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception on bad JSON
            detail = " ".join(str(err).split())[:200] or type(err).__name__
            raise ValueError(
                f"BPE tokenizer file {path} could not be loaded ({detail}); it must be a Hugging "
                "Face `tokenizers` JSON file such as the PREFIX.tokenizer.json written by "
                "`python scripts/preprocess_data.py --tokenizer-type bpe ...`; regenerate it or "
                "point data.tokenizer_model at the right file"
            ) from None
        eod = self._tok.token_to_id(EOD_TOKEN)
        if eod is None:
            raise ValueError(f"BPE tokenizer file {path} has no {EOD_TOKEN!r} token; train it with "
                             "scripts/preprocess_data.py (train_bpe adds it)")
        self.eod = eod
        self.vocab_size = self._tok.get_vocab_size()
        if not 0 <= eod < self.vocab_size:
            raise ValueError(f"BPE tokenizer file {path}: {EOD_TOKEN!r} has id {eod}, outside its "
                             f"vocabulary of {self.vocab_size}")
        import hashlib

        self.unique_identifiers = {"class": "BPETokenizer", "vocab_size": self.vocab_size,
                                   "sha256": hashlib.sha256(raw).hexdigest()}

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts)]

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids))


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: str | Path) -> BPETokenizer:
    """Train a byte-level BPE with ``vocab_size`` entries (EOD included) and save it to ``out_path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise ValueError(f"BPE vocab_size={vocab_size} must be >= 258 (256 bytes + EOD + a merge)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_path))
    return BPETokenizer(out_path)


def load_tokenizer(kind: str, path: str | Path | None = None):
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        if path is None:
            raise ValueError("data.tokenizer_type=bpe needs data.tokenizer_model=<tokenizer.json>")
        return BPETokenizer(path)
    raise ValueError(f"data.tokenizer_type={kind!r}; use 'byte' or 'bpe'")
