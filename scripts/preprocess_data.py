"""Text or JSONL -> Megatron indexed dataset (PREFIX.bin / PREFIX.idx), tokenized offline.

Examples:
  python scripts/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \
      --tokenizer-type bpe --vocab-size 8192          # trains data/corpus.tokenizer.json
  python scripts/preprocess_data.py --input notes/ --output-prefix data/notes --tokenizer-type byte
  python scripts/preprocess_data.py --input more.jsonl --output-prefix data/more \
      --tokenizer-type bpe --tokenizer-model data/corpus.tokenizer.json   # reuse a tokenizer

Input: a .jsonl file (one JSON object per line; the --json-key field, default "text", is one
document), a text file (one document), or a directory (every *.txt / *.py / *.md file under it is
one document, in path order). Train with `data.data_path=[PREFIX] data.tokenizer_type=bpe
data.tokenizer_model=PREFIX.tokenizer.json`. Nothing is downloaded (HF_HUB_OFFLINE=1 is set).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def read_documents(path: Path, json_key: str) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".py", ".md") and p.is_file())
        if not files:
            raise SystemExit(f"error: no .txt/.py/.md files under {path}")
        return [p.read_text(encoding="utf-8", errors="replace") for p in files]
    if not path.is_file():
        raise SystemExit(f"error: input {path} does not exist")
    if path.suffix == ".jsonl":
        docs = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                obj = json.loads(line)
                if json_key not in obj:
                    raise SystemExit(f"error: {path}:{n} has no key {json_key!r} "
                                     f"(keys: {sorted(obj)}); pass --json-key")
                docs.append(str(obj[json_key]))
        return docs
    return [path.read_text(encoding="utf-8", errors="replace")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, type=Path)
    ap.add_argument("--output-prefix", required=True, type=Path)
    ap.add_argument("--tokenizer-type", choices=["byte", "bpe"], default="bpe")
    ap.add_argument("--tokenizer-model", type=Path, default=None,
                    help="an existing tokenizer.json (bpe); default: train one on the input")
    ap.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size when training")
    ap.add_argument("--json-key", default="text")
    args = ap.parse_args(argv)

    try:
        return _preprocess(args)
    except (ValueError, FileNotFoundError) as err:  # bad tokenizer file, ids outside the vocab
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2


def _preprocess(args) -> int:
    from nvfp4_megatron.training.data import verify_indexed_dataset, write_indexed_dataset
    from nvfp4_megatron.training.tokenizers import BPETokenizer, ByteTokenizer, train_bpe

    docs = read_documents(args.input, args.json_key)
    args.output_prefix.parent.mkdir(parents=True, exist_ok=True)
    if args.tokenizer_type == "byte":
        tok = ByteTokenizer()
    elif args.tokenizer_model is not None:
        tok = BPETokenizer(args.tokenizer_model)
    else:
        tok_path = Path(str(args.output_prefix) + ".tokenizer.json")
        tok = train_bpe(docs, args.vocab_size, tok_path)
        print(f"trained BPE tokenizer ({tok.vocab_size} tokens) -> {tok_path}")
    ids = tok.tokenize_batch(docs) if hasattr(tok, "tokenize_batch") else [tok.tokenize(d) for d in docs]
    n = write_indexed_dataset(args.output_prefix, ids, eod=tok.eod, vocab_size=tok.vocab_size)
    # read back what was written, as training will (sizes, index consistency, every token id)
    summary = verify_indexed_dataset(args.output_prefix, tok.vocab_size)
    print(f"wrote {len(docs)} documents, {n} tokens -> {args.output_prefix}.bin/.idx "
          f"(vocab {tok.vocab_size}, eod {tok.eod}; verified: {summary['documents']} documents, "
          f"token ids checked: {summary['checked']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
