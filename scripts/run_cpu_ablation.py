#!/usr/bin/env python
"""CPU recipe ablation on a tiny GPT: the table of docs/RESULTS.md "CPU: recipe ablations on a tiny GPT".

Trains the same tiny GPT (default: 4 blocks, d=64, 4 heads, seq 64, vocab 512, 250 steps of
16 x 64 tokens, WSD schedule) once per precision recipe with the same seed and data, plus a
second seed for ``bf16`` and ``nvfp4`` (seed-to-seed spread) and the precision switch of the
NVFP4 paper (arXiv 2509.25149, App. D: switch to BF16 for the last ~20 % of training, every GEMM
or only Fprop). Every quantized recipe runs with *all* blocks quantized
(``precision.bf16_first_blocks=0 precision.bf16_last_blocks=0``) except ``nvfp4_last_bf16``
(the last block BF16, the paper's "keep the last blocks in BF16" rule at this scale).

Each run is one ``pretrain.py`` process (one rank, 2 micro-batches of 8 per step; no torchrun
needed) with ``OMP_NUM_THREADS=1``; ``--jobs`` runs go at once. Per run the script reads the
run's own ``metrics.jsonl`` / ``result.json`` and reports

- train loss: mean of the per-step training losses of the last ``--last-n`` steps,
- valid loss: the final validation loss (``--eval-iters`` batches of the validation split),
- the relative gap of both to the ``bf16`` run of the same seed, and the wall time,
- the paired gap: the mean over the second half of the steps of ``loss / loss_bf16 - 1`` taken
  step by step against the ``bf16`` run of the same seed (same batch at every step).

Output: ``OUT/results.json`` and ``OUT/table.md`` (also printed). A failed run is reported
with its exit code and the tail of its log, never dropped silently.

    .venv/bin/python scripts/run_cpu_ablation.py --out runs/cpu_ablation --jobs 2
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ALL_QUANTIZED = ["precision.bf16_first_blocks=0", "precision.bf16_last_blocks=0"]


def runs(seed: int, seed2: int, switch_at: int) -> list[tuple[str, int, list[str]]]:
    """(name, seed, precision overrides) in the order they are run (most important first)."""
    r = []
    for name in ["bf16", "nvfp4", "nvfp4_no_rht", "nvfp4_no_sr", "nvfp4_no_2d", "mxfp8", "fp8_cs",
                 "mxfp4"]:
        r.append((name, seed, [f"precision.recipe={name}", *ALL_QUANTIZED]))
    r.append(("nvfp4_last_bf16", seed, ["precision.recipe=nvfp4", "precision.bf16_first_blocks=0",
                                        "precision.bf16_last_blocks=1"]))
    r.append(("bf16", seed2, ["precision.recipe=bf16", *ALL_QUANTIZED]))
    r.append(("nvfp4", seed2, ["precision.recipe=nvfp4", *ALL_QUANTIZED]))
    for scope in ["all", "fprop"]:
        r.append((f"nvfp4_switch_{scope}", seed,
                  ["precision.recipe=nvfp4", *ALL_QUANTIZED,
                   f"precision.switch_to_bf16.at_step={switch_at}",
                   f"precision.switch_to_bf16.scope={scope}"]))
    return r


def model_overrides(a: argparse.Namespace) -> list[str]:
    return [
        f"model.num_layers={a.layers}", f"model.hidden_size={a.hidden}",
        f"model.ffn_hidden_size={4 * a.hidden}", f"model.num_attention_heads={a.heads}",
        f"model.num_query_groups={a.heads}", f"model.seq_length={a.seq}",
        f"train.train_iters={a.steps}", f"train.warmup_iters={a.warmup}",
        "train.log_interval=50", "train.eval_interval=0", "train.save_interval=null",
        f"train.eval_iters={a.eval_iters}",
        "logging.tensorboard=false", "logging.plot=false", "logging.print_precision_table=false",
    ]


def run_one(a: argparse.Namespace, name: str, seed: int, prec: list[str]) -> dict:
    run_dir = Path(a.out).resolve() / f"{name}_s{seed}"
    if run_dir.exists() and (run_dir / "result.json").exists() and not a.force:
        return summarize(a, name, seed, run_dir, rc=0, wall=json.loads(
            (run_dir / "wall.json").read_text())["wall_s"] if (run_dir / "wall.json").exists()
            else float("nan"))
    if run_dir.exists():
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    run_dir.mkdir(parents=True)
    cmd = [sys.executable, "pretrain.py", "+recipe=nvfp4_tiny", *model_overrides(a),
           f"train.seed={seed}", *prec, f"run_dir={run_dir}"]
    (run_dir / "command.txt").write_text(" ".join(cmd) + "\n")
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    t0 = time.time()
    with open(run_dir / "log.txt", "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=a.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    wall = time.time() - t0
    (run_dir / "wall.json").write_text(json.dumps({"wall_s": wall, "rc": rc}))
    return summarize(a, name, seed, run_dir, rc=rc, wall=wall)


def summarize(a, name, seed, run_dir: Path, *, rc: int, wall: float) -> dict:
    row = {"name": name, "seed": seed, "rc": rc, "wall_s": wall, "run_dir": str(run_dir)}
    if rc != 0 or not (run_dir / "result.json").exists():
        row["error_tail"] = (run_dir / "log.txt").read_text()[-2000:]
        return row
    train = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in train if m["kind"] == "train"]
    last = [m["loss"] for m in train[-a.last_n:]]
    row["train_loss"] = sum(last) / len(last)
    row["losses"] = [m["loss"] for m in train]
    row["steps"] = train[-1]["step"]
    row["valid_loss"] = json.loads((run_dir / "result.json").read_text())["final_valid_loss"]
    return row


def paired_gap(r: dict, b: dict) -> float:
    """Mean over the second half of the steps of loss/loss_bf16 - 1, step by step.

    Runs of one seed read the same batch at each step, so this compares like with like and
    averages over many more steps than the last-N mean; it is still one trajectory per recipe.
    """
    n = min(len(r["losses"]), len(b["losses"]))
    pairs = list(zip(r["losses"][n // 2:n], b["losses"][n // 2:n]))
    return sum(x / y - 1 for x, y in pairs) / len(pairs)


def table(rows: list[dict], a: argparse.Namespace) -> str:
    base = {r["seed"]: r for r in rows if r["name"] == "bf16" and "train_loss" in r}
    out = [f"| run | seed | train loss (mean last {a.last_n}) | vs bf16 | valid loss | vs bf16 "
           f"| paired vs bf16, 2nd half | wall s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "train_loss" not in r:
            out.append(f"| {r['name']} | {r['seed']} | FAILED rc={r['rc']} | | | | | "
                       f"{r['wall_s']:.0f} |")
            continue
        b = base.get(r["seed"])
        gt = f"{(r['train_loss'] / b['train_loss'] - 1) * 100:+.2f} %" if b else "—"
        gv = f"{(r['valid_loss'] / b['valid_loss'] - 1) * 100:+.2f} %" if b else "—"
        gp = f"{paired_gap(r, b) * 100:+.2f} %" if b else "—"
        out.append(f"| {r['name']} | {r['seed']} | {r['train_loss']:.4f} | {gt} | "
                   f"{r['valid_loss']:.4f} | {gv} | {gp} | {r['wall_s']:.0f} |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/cpu_ablation")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (one core each)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per run")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--eval-iters", type=int, default=16)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--seed2", type=int, default=4321)
    p.add_argument("--switch-at", type=int, default=None, help="default: 80 %% of --steps")
    p.add_argument("--last-n", type=int, default=25, help="train loss = mean of the last N steps")
    p.add_argument("--only", nargs="*", default=None,
                   help="run only these names (e.g. bf16 nvfp4 nvfp4_switch_all)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per run")
    p.add_argument("--force", action="store_true", help="rerun runs that already have a result")
    a = p.parse_args()
    if a.switch_at is None:
        a.switch_at = int(0.8 * a.steps)
    plan = runs(a.seed, a.seed2, a.switch_at)
    if a.only:
        plan = [x for x in plan if x[0] in a.only]
    Path(a.out).mkdir(parents=True, exist_ok=True)
    rows: dict[int, dict] = {}
    with cf.ThreadPoolExecutor(max_workers=a.jobs) as ex:
        futs = {ex.submit(run_one, a, *x): i for i, x in enumerate(plan)}
        for f in cf.as_completed(futs):
            r = f.result()
            rows[futs[f]] = r
            status = (f"train {r['train_loss']:.4f} valid {r['valid_loss']:.4f}"
                      if "train_loss" in r else f"FAILED rc={r['rc']}")
            print(f"[{time.strftime('%H:%M:%S')}] {r['name']} seed {r['seed']}: {status} "
                  f"({r['wall_s']:.0f} s)", flush=True)
            ordered = [rows[i] for i in sorted(rows)]
            (Path(a.out) / "results.json").write_text(json.dumps(
                {"args": vars(a), "rows": ordered}, indent=2))
            (Path(a.out) / "table.md").write_text(table(ordered, a) + "\n")
    ordered = [rows[i] for i in sorted(rows)]
    print(table(ordered, a))
    failed = [r for r in ordered if "train_loss" not in r]
    for r in failed:
        print(f"--- {r['name']} seed {r['seed']} rc={r['rc']}:\n{r.get('error_tail', '')}",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
