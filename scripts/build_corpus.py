"""Build the convergence study's natural-language corpus from Debian documentation packages.

    python scripts/build_corpus.py                      # -> data/debian_docs/ (gitignored)
    python scripts/build_corpus.py --out DIR --vocab-size 16384 --packages linux-doc-6.12 python3.11-doc

What it does, every step from the package archive (nothing is downloaded at training time):
1. ``apt-get download PKG`` for each package (Debian's archive, the ordinary client; a .deb already
   in ``OUT/../debs/`` is reused), ``dpkg-deb -x`` into a temporary directory.
2. Every Sphinx HTML page of the package (``*.html`` outside ``_static/``, ``_sources/``,
   ``_images/``, ``translations/`` and the index/search pages) becomes one document: the text of
   its main body (``<div role="main">``) without ``<pre>`` blocks (code listings), scripts, styles
   and the pilcrow header links. Pages under 500 characters are dropped, exact duplicates once.
3. The documents are shuffled with a fixed seed, so ``data.split=98,2,0`` (Megatron's contiguous
   document ranges) holds out a random 2 % of the pages for validation.
4. A byte-level BPE tokenizer (``training/tokenizers.train_bpe``) is trained on the first 95 % of
   the shuffled documents only (inside the training range, so no held-out page shapes the
   vocabulary), then ``scripts/preprocess_data.py`` writes ``OUT/debian_docs.bin/.idx`` with it.
5. ``OUT/manifest.json``: package versions, .deb sha256, document / byte / token counts.

Default packages and licences (``/usr/share/doc/PKG/copyright``): ``linux-doc-6.12`` (the Linux
kernel's documentation, GPL-2.0) and ``python3.11-doc`` (the Python 3.11 documentation, PSF License
v2). Both are English technical prose: closer to natural language than source code, further from
web text (C4) than a general corpus. Train with::

    data.data_path='[data/debian_docs/debian_docs]' data.tokenizer_model=data/debian_docs/debian_docs.tokenizer.json model.vocab_size=16384
"""

from __future__ import annotations

import argparse
import hashlib
import html.parser
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PACKAGES = ("linux-doc-6.12", "python3.11-doc")
SKIP_DIRS = {"_static", "_sources", "_images", "_downloads", "translations"}
SKIP_PAGES = {"genindex.html", "search.html", "py-modindex.html", "genindex-all.html"}
MIN_CHARS = 500
SEED = 15


class _MainText(html.parser.HTMLParser):
    """Text inside ``<div role="main">`` minus <pre>/<script>/<style> and header links."""

    SKIP = {"script", "style", "pre"}
    BREAK = {"p", "li", "h1", "h2", "h3", "h4", "h5", "h6", "dt", "dd", "br", "tr", "div",
             "section", "table", "blockquote"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.divs: list[bool] = []
        self.main = 0
        self.skip: list[str] = []
        self.out: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div":
            is_main = a.get("role") == "main"
            self.divs.append(is_main)
            self.main += is_main
        if tag in self.SKIP or (tag == "a" and "headerlink" in (a.get("class") or "")):
            self.skip.append(tag)
        if tag in self.BREAK:
            self.out.append("\n")

    def handle_endtag(self, tag):
        if tag == "div" and self.divs:
            self.main -= self.divs.pop()
        if self.skip and self.skip[-1] == tag:
            self.skip.pop()

    def handle_data(self, data):
        if self.main > 0 and not self.skip:
            self.out.append(data)


def page_text(markup: str) -> str:
    p = _MainText()
    p.feed(markup)
    p.close()
    text = re.sub(r"[ \t\r\f\v]+", " ", "".join(p.out))
    text = re.sub(r" *\n *", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def package_documents(root: Path) -> list[str]:
    """One document per Sphinx page under ``root`` (an extracted package), path order."""
    docs = []
    for f in sorted(root.rglob("*.html")):
        if SKIP_DIRS & set(f.parts) or f.name in SKIP_PAGES:
            continue
        text = page_text(f.read_text(encoding="utf-8", errors="replace"))
        if len(text) >= MIN_CHARS:
            docs.append(text)
    return docs


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(pkg: str, debs: Path) -> Path:
    debs.mkdir(parents=True, exist_ok=True)
    have = sorted(debs.glob(f"{pkg}_*.deb"))
    if not have:
        if subprocess.run(["apt-get", "download", pkg], cwd=debs).returncode != 0:
            # A fresh Debian image has no package lists yet: refresh them once and retry.
            print(f"[corpus] apt-get download {pkg} failed; running apt-get update and retrying", flush=True)
            subprocess.run(["apt-get", "update", "-qq"], check=True)
            subprocess.run(["apt-get", "download", pkg], cwd=debs, check=True)
        have = sorted(debs.glob(f"{pkg}_*.deb"))
    if len(have) != 1:
        raise SystemExit(f"error: expected one {pkg}_*.deb in {debs}, found {[p.name for p in have]}")
    return have[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "debian_docs")
    ap.add_argument("--packages", nargs="+", default=list(DEFAULT_PACKAGES))
    ap.add_argument("--vocab-size", type=int, default=16384)
    ap.add_argument("--debs", type=Path, default=None,
                    help="where the .debs are kept (default OUT/../debs: outside OUT, so OUT alone "
                         "can be carried to the GPU machine: about 22 MB)")
    ap.add_argument("--name", default="debian_docs", help="prefix of the .bin/.idx/.tokenizer.json")
    args = ap.parse_args(argv)
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise SystemExit("error: needs apt-get and dpkg-deb (a Debian/Ubuntu machine); run "
                         "'apt-get update' once first")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    sources, docs, seen = [], [], set()
    for pkg in args.packages:
        deb = download(pkg, args.debs or out.parent / "debs")
        version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True,
                                 capture_output=True, text=True).stdout.strip()
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
            got = package_documents(Path(tmp))
        kept = 0
        for d in got:
            h = hashlib.sha256(d.encode()).digest()
            if h not in seen:
                seen.add(h)
                docs.append(d)
                kept += 1
        nbytes = sum(len(d.encode()) for d in got)
        sources.append({"package": pkg, "version": version, "deb": deb.name,
                        "sha256": _sha256(deb), "pages": len(got), "kept": kept, "bytes": nbytes})
        print(f"{pkg} {version}: {len(got)} pages, {kept} kept, {nbytes / 1e6:.1f} MB of text",
              flush=True)
    if len(docs) < 100:
        raise SystemExit(f"error: only {len(docs)} documents; expected thousands")
    random.Random(SEED).shuffle(docs)
    jsonl = out / f"{args.name}.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")

    sys.path.insert(0, str(ROOT))
    from nvfp4_megatron.training.tokenizers import train_bpe

    tok_path = out / f"{args.name}.tokenizer.json"
    n_tok_docs = int(0.95 * len(docs))
    tok = train_bpe(docs[:n_tok_docs], args.vocab_size, tok_path)
    print(f"trained BPE ({tok.vocab_size} tokens) on the first {n_tok_docs} of {len(docs)} "
          f"documents -> {tok_path}", flush=True)
    sys.path.insert(0, str(ROOT / "scripts"))
    import preprocess_data

    rc = preprocess_data.main(["--input", str(jsonl), "--output-prefix", str(out / args.name),
                               "--tokenizer-model", str(tok_path)])
    if rc:
        return rc
    from nvfp4_megatron.training.data import verify_indexed_dataset

    summary = verify_indexed_dataset(str(out / args.name), tok.vocab_size)
    total_bytes = sum(len(d.encode()) for d in docs)
    manifest = {"name": args.name, "sources": sources, "documents": len(docs),
                "text_bytes": total_bytes, "shuffle_seed": SEED, "vocab_size": tok.vocab_size,
                "tokenizer_trained_on_first_documents": n_tok_docs, "verified": summary,
                "bin_bytes": (out / f"{args.name}.bin").stat().st_size}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    jsonl.unlink()  # the text is rebuilt from the .debs; keep the directory small
    print(f"{len(docs)} documents, {total_bytes / 1e6:.1f} MB of text -> {out / args.name}"
          f".bin/.idx; manifest {out / 'manifest.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
