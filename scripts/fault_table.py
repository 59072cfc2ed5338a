"""Run the faults and bad inputs of issue 14 through ``pretrain.py`` (CPU, one process) and print
the Markdown table of docs/RESULTS.md "Faults and bad input": the case, what the run printed (its
first ``error:`` / ``warning`` line), the exit code, and what was kept (checkpoints hashed before
and after; ``config.yaml``; whether the run directory was created at all).

    .venv/bin/python scripts/fault_table.py [--work DIR] [--only SUBSTRING]

Every row is also a CPU test (tests/cli, tests/training, tests/runtime, tests/slurm); this script
is the lab-notebook view of them, with the real messages. One process per case (plain
``python pretrain.py``: the worker's own exit code; torchrun turns any worker failure into 1).
Takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["+recipe=nvfp4_tiny", "train.warmup_iters=2", "train.eval_interval=0",
        "train.log_interval=5", "logging.plot=false", "logging.tensorboard=false",
        "logging.print_precision_table=false", "data.default_corpus_max_mb=1.0"]
RUN20 = [*TINY, "train.train_iters=20", "train.save_interval=10"]


def tree_hash(d: Path) -> str | None:
    if not d.exists():
        return None
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(d)).encode() + p.read_bytes())
    return h.hexdigest()


class Table:
    def __init__(self, work: Path, only: str | None):
        self.work, self.only, self.rows = work, only, []
        self.cache = work / "cache"

    def pretrain(self, run_dir: Path | None, *overrides: str, timeout: int = 600):
        cmd = [sys.executable, str(ROOT / "pretrain.py"), *overrides]
        if run_dir is not None:
            cmd.insert(2, f"run_dir={run_dir}")
            cmd.insert(3, f"data.cache_dir={self.cache}")
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                   PYTHONPATH=str(ROOT))
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                           cwd=str(self.work))
        return p.returncode, p.stdout + p.stderr

    def row(self, case: str, rc: int, out: str, kept: str, want_rc: int) -> None:
        lines = [ln.strip() for ln in out.splitlines()]
        said = next((ln for ln in lines if ln.startswith("error:")), None) or next(
            (ln for ln in lines if "warning" in ln.lower() and "[" in ln[:15]), None) or (
            lines[0] if lines else "")
        if said.startswith("error:") and said.endswith(":") \
                and lines.index(said) + 1 < len(lines):  # a list follows: show its first item
            said += " " + lines[lines.index(said) + 1].lstrip("- ")
        said = re.sub(re.escape(str(self.work)), "W", said)
        if len(said) > 330:
            said = said[:327] + "..."
        ok = "" if rc == want_rc else f" **(expected exit {want_rc})**"
        self.rows.append(f"| {case} | {said.replace('|', '/')} | {rc}{ok} | {kept} |")
        print(f"[{len(self.rows)}] {case}: exit {rc}", file=sys.stderr, flush=True)

    def wanted(self, case: str) -> bool:
        return self.only is None or self.only in case


def base_run(t: Table) -> Path:
    base = t.work / "base"
    if not (base / "checkpoints" / "step_0000020").is_dir():
        rc, out = t.pretrain(base, *RUN20)
        if rc != 0:
            sys.exit(f"the base run failed (exit {rc}):\n{out[-3000:]}")
    return base


def copy_run(t: Table, base: Path, name: str) -> Path:
    dst = t.work / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(base, dst)
    return dst


class _Payload:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def checkpoint_rows(t: Table) -> None:
    base = base_run(t)
    ck = lambda run: run / "checkpoints"  # noqa: E731

    def resume(case, name, damage, want_rc, *extra):
        if not t.wanted(case):
            return
        run = copy_run(t, base, name)
        damage(run)
        before, cfg = tree_hash(ck(run)), (run / "config.yaml").read_text()
        rc, out = t.pretrain(run, *RUN20, "train.train_iters=30", *extra)
        names = sorted(p.name for p in ck(run).iterdir())
        same = "unchanged" if tree_hash(ck(run)) == before else "now " + ", ".join(names)
        t.row(case, rc, out, f"checkpoints {same}; config.yaml "
              f"{'unchanged' if (run / 'config.yaml').read_text() == cfg else 'CHANGED'}", want_rc)
        return run, out

    marker = t.work / "PAYLOAD_RAN"

    # as a deliberate attacker would, the manifest is made to match (else the checksum check
    # alone would set the checkpoint aside before any pickle is read)
    def rank_payload(run):
        torch_save(_Payload(marker), ck(run) / "step_0000020" / "rank_00000.pt")
        rehash(ck(run) / "step_0000020")

    def metadata_payload(run):
        (ck(run) / "step_0000020" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
        rehash(ck(run) / "step_0000020")

    for case, dmg in (("payload (`__reduce__`) in the newest checkpoint's rank_00000.pt",
                       rank_payload),
                      ("payload in the newest checkpoint's `.metadata`", metadata_payload)):
        if marker.exists():
            marker.unlink()
        res = resume(case, "payload", dmg, 2)
        if res:
            t.rows[-1] = t.rows[-1][:-2] + f"; payload ran: {marker.exists()} |"

    def truncate_shard(run):
        shard = sorted((ck(run) / "step_0000020").glob("*.distcp"))[0]
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    def delete_shard(run):
        sorted((ck(run) / "step_0000020").glob("*.distcp"))[0].unlink()

    def delete_rng(run):
        (ck(run) / "step_0000020" / "rank_00000.pt").unlink()

    resume("newest checkpoint with a shard cut in half", "trunc", truncate_shard, 0)
    resume("newest checkpoint with a shard deleted", "noshard", delete_shard, 0)
    resume("newest checkpoint with its RNG file deleted", "norng", delete_rng, 0)
    if t.wanted("explicit"):
        run = copy_run(t, base, "explicit")
        truncate_shard(run)
        before = tree_hash(ck(run))
        rc, out = t.pretrain(t.work / "explicit_new", *RUN20,
                             f"train.load={ck(run) / 'step_0000020'}")
        t.row("explicit `train.load=` of that damaged checkpoint", rc, out,
              "its run's checkpoints unchanged" if tree_hash(ck(run)) == before else "CHANGED", 2)
    resume("a stale `.tmp-step_0000030` (crashed save) in checkpoints/", "tmp",
           lambda run: (ck(run) / ".tmp-step_0000030").mkdir(), 0)
    resume("resume with another recipe (`precision.recipe=bf16` on an nvfp4 run)", "recipe",
           lambda run: None, 2, "precision.recipe=bf16")
    resume("the same with `train.allow_precision_change=true`", "recipe_ok", lambda run: None,
           0, "precision.recipe=bf16", "train.allow_precision_change=true")


def rehash(ckpt: Path) -> None:
    import json

    m = json.loads((ckpt / "manifest.json").read_text())
    for name, entry in m["files"].items():
        data = (ckpt / name).read_bytes()
        entry.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    (ckpt / "manifest.json").write_text(json.dumps(m))


def torch_save(obj, path):
    import torch

    torch.save(obj, path)


def data_rows(t: Table) -> None:
    src = t.work / "src"
    src.mkdir(exist_ok=True)
    for i in range(20):  # one document per file
        (src / f"a{i:02d}.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    data = t.work / "data"
    data.mkdir(exist_ok=True)

    def build(prefix, text_dir=src, *tok):
        subprocess.run([sys.executable, str(ROOT / "scripts" / "preprocess_data.py"),
                        "--input", str(text_dir), "--output-prefix", str(prefix),
                        *(tok or ("--tokenizer-type", "byte"))], check=True, capture_output=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))

    common = [*TINY, "train.train_iters=4", "data.tokenizer_type=byte", "model.vocab_size=512"]

    def train_on(case, prefix, want_rc, *extra, damage=None):
        if not t.wanted(case):
            return
        if damage:
            damage()
        before = {p.name: p.read_bytes() for p in data.glob(Path(prefix).name + ".*")}
        run = t.work / ("run_" + re.sub(r"\W+", "_", case)[:40])
        shutil.rmtree(run, ignore_errors=True)
        rc, out = t.pretrain(run, *common, f"data.data_path=[{prefix}]", *extra)
        after = {p.name: p.read_bytes() for p in data.glob(Path(prefix).name + ".*")}
        t.row(case, rc, out, "data files unchanged" if before == after else "data CHANGED",
              want_rc)

    one = t.work / "src1"
    one.mkdir(exist_ok=True)
    (one / "only.txt").write_text("a single document. " * 1000)
    single = data / "single"
    build(single, one)
    train_on("one document: the valid split (`data.split=98,2,0`) gets none", single, 2)
    cut = data / "cut"
    build(cut)
    train_on("`.bin` cut in half", cut, 2, damage=lambda: truncate_half(cut.with_suffix(".bin")))
    empty = data / "empty"
    build(empty)
    train_on("empty `.idx`", empty, 2, damage=lambda: empty.with_suffix(".idx").write_bytes(b""))
    big = data / "vocab"
    build(big, src, "--tokenizer-type", "bpe", "--vocab-size", "400")
    train_on("token ids above the tokenizer's vocabulary (data of a 400-token BPE, trained with "
             "the 257-token byte tokenizer)", big, 2)
    garbage = t.work / "garbage.json"
    garbage.write_text("this is not a tokenizer")
    train_on("garbage tokenizer file", big, 2, "data.tokenizer_type=bpe",
             f"data.tokenizer_model={garbage}")
    if t.wanted("rebuilt"):
        pre = data / "rebuilt"
        build(pre)
        common = [*common, "data.split='90,10,0'"]  # 20 documents: 98,2,0 leaves valid none
        rc1, _ = t.pretrain(t.work / "rb1", *common, f"data.data_path=[{pre}]")
        other = t.work / "src2"
        other.mkdir(exist_ok=True)
        for i in range(20):
            (other / f"b{i:02d}.txt").write_text("pack my box with five dozen liquor jugs! " * 150)
        build(pre, other)
        rc, out = t.pretrain(t.work / "rb2", *common, f"data.data_path=[{pre}]")
        keys = sorted(p.name for p in (t.cache / "index_cache").glob("data-*"))
        t.row("prefix rebuilt with other content (stale index cache)", rc,
              out if rc else f"trained on the new content (first run exit {rc1}); index cache "
              f"directories: {len(keys)}", "both index caches", 0)


def truncate_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def config_rows(t: Table) -> None:
    cases = [
        ("`model.seq_length=0`", ["model.seq_length=0"], 2),
        ("`model.hidden_size=0`", ["model.hidden_size=0"], 2),
        ("`model.num_layers=-1`", ["model.num_layers=-1"], 2),
        ("`train.keep_last=-1`", ["train.keep_last=-1"], 2),
        ("`train.save_interval=0`", ["train.save_interval=0"], 2),
        ("`precision.recipe=nvfp5` (typo)", ["precision.recipe=nvfp5"], 2),
        ("misspelt key added with `+` (`+train.lrr=1`)", ["+train.lrr=1"], 2),
        ("`hydra.run.dir=...`", ["hydra.run.dir=/tmp/x"], 2),
    ]
    for case, extra, want in cases:
        if not t.wanted(case):
            continue
        run = t.work / "cfg_run"
        shutil.rmtree(run, ignore_errors=True)
        rc, out = t.pretrain(run, *TINY, *extra)
        t.row(case, rc, out, "run directory not created" if not run.exists()
              else "run directory CREATED", want)
    for case, args, want in (("`dry_run=true` without `world_size`", ["+recipe=nvfp4_12b",
                                                                      "dry_run=true"], 2),
                             ("`--help`", ["--help"], 0), ("`--cfg job`", ["--cfg", "job"], 0),
                             ("`--info`", ["--info"], 0)):
        if t.wanted(case):
            rc, out = t.pretrain(None, *args)
            first = out.strip().splitlines()[0] if out.strip() else ""
            t.row(case, rc, out if rc else f"(prints) {first}", "nothing written", want)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: temp)")
    ap.add_argument("--only", default=None, help="run the cases whose name contains this")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="nvfp4_faults_"))
    work.mkdir(parents=True, exist_ok=True)
    t = Table(work.resolve(), args.only)
    config_rows(t)
    data_rows(t)
    checkpoint_rows(t)
    print("| case | what the run printed (first error / warning line) | exit | what is kept |")
    print("|---|---|---|---|")
    print("\n".join(t.rows))
    bad = [r for r in t.rows if "expected exit" in r or "CHANGED" in r or "CREATED" in r
           or "payload ran: True" in r]
    print(f"\n{len(t.rows)} cases; {len(bad)} not as expected; scratch: {work}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
