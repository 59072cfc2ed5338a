"""Compare the loss curves of training runs from their ``metrics.jsonl``: one PNG and a markdown
table (train loss every ``--every`` steps, validation losses, step time).

Usage: ``python scripts/compare_runs.py --png loss.png --md loss.md nvfp4=RUN1/metrics.jsonl
bf16=RUN2/metrics.jsonl`` (``LABEL=PATH``; the first run is the one the others are compared
with: the table's last column is each run's loss minus the first's at the same step).
``train`` rows give ``loss`` (and ``step_time_s`` where the loop recorded it), ``valid`` rows
the validation loss.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def read(path: str) -> dict:
    train, valid, times = {}, {}, []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("kind") == "train" and "loss" in row:
            train[row["step"]] = row["loss"]
            if row.get("step_time_s") is not None:
                times.append(row["step_time_s"])
        elif row.get("kind") == "valid" and "loss" in row:
            valid[row["step"]] = row["loss"]
    if not train:
        raise ValueError(f"{path}: no train rows with a loss")
    return {"train": train, "valid": valid, "step_s": times}


def markdown(runs: dict[str, dict], every: int) -> str:
    labels = list(runs)
    ref = runs[labels[0]]["train"]
    steps = sorted(set.intersection(*(set(r["train"]) for r in runs.values())))
    picked = [s for s in steps if s % every == 0 or s in (steps[0], steps[-1])]
    head = "| step | " + " | ".join(labels) + "".join(f" | {lab} - {labels[0]}"
                                                     for lab in labels[1:]) + " |"
    lines = ["Train loss (nats/token):", "", head,
             "|" + "---|" * (1 + len(labels) + len(labels) - 1)]
    for s in picked:
        vals = [runs[lab]["train"][s] for lab in labels]
        diffs = [f"{v - ref[s]:+.4f}" for v in vals[1:]]
        lines.append(f"| {s} | " + " | ".join(f"{v:.4f}" for v in vals)
                     + "".join(f" | {d}" for d in diffs) + " |")
    vsteps = sorted(set.union(*(set(r["valid"]) for r in runs.values())))
    if vsteps:
        lines += ["", "Validation loss:", "", "| step | " + " | ".join(labels) + " |",
                  "|" + "---|" * (1 + len(labels))]
        for s in vsteps:
            cells = [f"{runs[lab]['valid'][s]:.4f}" if s in runs[lab]["valid"] else "-"
                     for lab in labels]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", "| run | steps | first loss | last loss | median step s (from step 5) |",
              "|---|---|---|---|---|"]
    for lab, r in runs.items():
        st = sorted(r["train"])
        med = statistics.median(r["step_s"][4:]) if len(r["step_s"]) > 4 else None
        lines.append(f"| {lab} | {st[-1]} | {r['train'][st[0]]:.4f} | {r['train'][st[-1]]:.4f} | "
                     + ("-" if med is None else f"{med:.3f}") + " |")
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for lab, r in runs.items():
        st = sorted(r["train"])
        line, = ax.plot(st, [r["train"][s] for s in st], lw=1, label=f"{lab} train")
        if r["valid"]:
            vs = sorted(r["valid"])
            ax.plot(vs, [r["valid"][s] for s in vs], "o--", color=line.get_color(),
                    label=f"{lab} valid")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="LABEL=path/to/metrics.jsonl (first: the reference)")
    ap.add_argument("--png", default=None)
    ap.add_argument("--md", default=None)
    ap.add_argument("--every", type=int, default=20, help="table row every N steps")
    args = ap.parse_args(argv)
    runs = {}
    for spec in args.runs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            ap.error(f"{spec!r}: write LABEL=path/to/metrics.jsonl")
        runs[label] = read(path)
    text = markdown(runs, args.every)
    print(text)
    if args.md:
        Path(args.md).write_text(text)
    if args.png:
        plot(runs, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
