"""Compare training runs: loss curves (PNG) and a table (Markdown + JSON) grouped by arm.

    python scripts/compare_runs.py RUN_DIR_OR_SWEEP_DIR... --baseline bf16 --out DIR

Each argument is a run directory (it holds ``metrics.jsonl`` and ``config.yaml``) or a directory
whose subdirectories are (a sweep, ``pretrain.py -m``). An *arm* is a run's config minus its seed:
runs whose configs differ only in ``train.seed`` (and in bookkeeping keys: run_dir, data.cache_dir,
logging.*, checkpoint cadence, resume/load, the test knobs) are seeds of one arm. An arm is named by
the config keys that differ between arms (``precision.`` dropped: ``recipe=nvfp4,bf16_last_blocks=1``;
just the recipe name when only ``precision.recipe`` differs), or ``--label RUN_DIR=NAME``.

Per run, from ``metrics.jsonl`` (a step logged twice, before a kill and again after the resume,
counts once: the last row wins): the final validation loss (the validation row at the last step),
tokens (the last train row), and train time = the sum of the kept steps' ``step_time_s`` (no
start-up, evaluation or checkpoint time; a resumed run's repeated steps counted once).
Per arm: the mean final validation loss over seeds, the spread (max - min and the sample standard
deviation; n = 1 has none), the gap to the baseline arm's mean in nats and relative (%), tokens,
mean train time. A run that did not finish (no ``result.json`` with ``stopped_by_signal: null``)
is listed and marked, and its arm is marked "unfinished". A last table gives each arm's train loss
(mean over seeds) at the steps all runs reached, every ``--every`` steps, minus the baseline's: the
comparison for runs cut off by a time limit (``scripts/run_hybrid_proxy.sh``).

Paired gaps: a seed sets the data order and also which held-out sequences the validation draws,
so two seeds of one arm differ by their validation sample as much as by training noise. The
paired gap of a run is its validation loss minus the baseline run's *of the same seed*, at the
same step; per arm, the mean of its runs' paired final gaps and their range ("paired gap" column),
and a table of the paired gaps at every validation step the run and its baseline both reached
(unfinished runs included: the comparison of a cut-off run at the steps it did reach).

Paired train gap: every arm of one seed trains on the same batch at each step, so a run's train
loss minus its same-seed baseline run's, averaged over the last ``--train-window`` steps both
reached (default 100), compares arms on window x tokens-per-step token positions rather than on
one validation draw: the steadier measure when validation uses few tokens. It is a training-set
loss (on repeated data it also measures memorisation). Per run and per arm (mean [min, max]); and
per run over consecutive windows of that many steps, counted back from the last common step (a
table), which shows whether a recipe's gap opens, closes or changes sign during training.

Study layout: a directory that is neither a run nor a sweep is searched for run directories at
any depth (``scripts/study.py --root``: ``CORPUS/ARM/seed_N``); ``--arm-from-dir`` names each run's
arm by its directory (the one above ``seed_N`` in that layout) instead of by its config.

Writes ``DIR/compare.png`` (train loss, EMA-smoothed; validation loss; validation loss over the
last half of the tokens; with a baseline, each run's paired train gap step by step, EMA-smoothed), ``DIR/compare.md`` and ``DIR/compare.json``; prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

SEED_KEY = "train.seed"
# keys that do not change what is trained (bookkeeping, logging, checkpoints, test knobs)
IGNORED_PREFIXES = ("run_dir", "data.cache_dir", "logging.", "train.save_interval", "train.keep_last",
                    "train.save", "train.resume", "train.load", "train.log_interval",
                    "train.exit_after_step", "train.inject_nan_at_step", "train.allow_precision_change",
                    "dry_run", "world_size", "planner.")


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v, sort_keys=True) if isinstance(v, list) else v
    return out


def find_runs(paths: list[Path]) -> list[Path]:
    runs = []
    for p in paths:
        if (p / "metrics.jsonl").is_file():
            runs.append(p)
            continue
        sub = sorted(d for d in p.iterdir() if (d / "metrics.jsonl").is_file()) if p.is_dir() else []
        if not sub and p.is_dir():  # e.g. a study root: CORPUS/ARM/seed_N
            sub = sorted(m.parent for m in p.rglob("metrics.jsonl"))
        if not sub:
            raise SystemExit(f"error: {p} is neither a run directory (metrics.jsonl) nor holds any")
        runs += sub
    return runs


def read_run(run: Path) -> dict:
    import yaml

    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise SystemExit(f"error: {run} has no config.yaml")
    cfg = _flatten(yaml.safe_load(cfg_path.read_text()))
    rows: dict[tuple[str, int], dict] = {}
    for n, line in enumerate((run / "metrics.jsonl").read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise SystemExit(f"error: {run}/metrics.jsonl:{n} is not JSON") from None
        if row.get("kind") in ("train", "valid"):
            rows[(row["kind"], row["step"])] = row  # the last row of a step wins (resumes)
    train = sorted((r for (k, _), r in rows.items() if k == "train"), key=lambda r: r["step"])
    valid = sorted((r for (k, _), r in rows.items() if k == "valid"), key=lambda r: r["step"])
    tokens_per_step = cfg["train.global_batch_size"] * cfg["model.seq_length"]
    result = {}
    if (run / "result.json").is_file():
        result = json.loads((run / "result.json").read_text())
    last_step = train[-1]["step"] if train else 0
    final_valid = valid[-1] if valid and valid[-1]["step"] == last_step else None
    finished = bool(result) and result.get("stopped_by_signal") is None and final_valid is not None
    return {
        "run_dir": str(run), "config": cfg, "seed": cfg.get(SEED_KEY), "tokens_per_step": tokens_per_step,
        "train": [(r["step"] * tokens_per_step, r["loss"]) for r in train],
        "train_by_step": {r["step"]: r["loss"] for r in train},
        "valid": [(r["step"] * tokens_per_step, r["loss"]) for r in valid],
        "valid_by_step": {r["step"]: r["loss"] for r in valid},
        "steps": last_step, "tokens": train[-1].get("tokens", last_step * tokens_per_step) if train else 0,
        "final_valid_loss": final_valid["loss"] if final_valid else None,
        "train_time_s": sum(r.get("step_time_s", 0.0) for r in train),
        "finished": finished,
    }


def dir_arm_name(run_dir: str) -> str:
    """The arm a run directory belongs to by its path: the parent's name for ``ARM/seed_N``
    (``scripts/study.py``'s layout), else the directory's own name."""
    p = Path(run_dir)
    return p.parent.name if re.fullmatch(r"seed_\d+", p.name) else p.name


def arm_names(runs: list[dict], labels: dict[str, str]) -> list[str]:
    keys = sorted({k for r in runs for k in r["config"]})
    varying = [k for k in keys if k != SEED_KEY and not k.startswith(IGNORED_PREFIXES)
               and len({json.dumps(r["config"].get(k), default=str) for r in runs}) > 1]
    names = []
    for r in runs:
        if r["run_dir"] in labels:
            names.append(labels[r["run_dir"]])
        elif varying == ["precision.recipe"]:
            names.append(str(r["config"]["precision.recipe"]))
        elif varying:
            names.append(",".join(f"{k.removeprefix('precision.')}={r['config'].get(k)}"
                                  for k in varying))
        else:
            names.append(str(r["config"].get("precision.recipe", "run")))
    return names


def paired_train_gap(run: dict, base_run: dict, window: int) -> tuple[float, int, int] | None:
    """Mean of (run - baseline) train loss over the last ``window`` steps both reached, with the
    first and last step of that window; None if they share no step."""
    common = sorted(set(run["train_by_step"]) & set(base_run["train_by_step"]))[-window:]
    if not common:
        return None
    gap = statistics.fmean(run["train_by_step"][s] - base_run["train_by_step"][s] for s in common)
    return gap, common[0], common[-1]


def paired_train_windows(run: dict, base_run: dict, window: int) -> list[tuple[int, int, float]]:
    """(first step, last step, mean run - baseline train loss) over consecutive windows of
    ``window`` common steps, counted back from the last common step (so the last window is the one
    :func:`paired_train_gap` reports; the first may be shorter)."""
    common = sorted(set(run["train_by_step"]) & set(base_run["train_by_step"]))
    out = []
    for end in range(len(common), 0, -window):
        chunk = common[max(0, end - window):end]
        gap = statistics.fmean(run["train_by_step"][s] - base_run["train_by_step"][s] for s in chunk)
        out.append((chunk[0], chunk[-1], gap))
    return out[::-1]


def summarise(runs: list[dict], names: list[str], baseline: str | None,
              train_window: int = 100) -> dict:
    arms: dict[str, dict] = {}
    for r, name in zip(runs, names):
        arms.setdefault(name, {"arm": name, "runs": []})["runs"].append(r)
    for a in arms.values():
        losses = [r["final_valid_loss"] for r in a["runs"] if r["final_valid_loss"] is not None]
        a["seeds"] = sorted(str(r["seed"]) for r in a["runs"])
        a["n"] = len(losses)
        a["final_valid_loss"] = statistics.fmean(losses) if losses else None
        a["spread"] = (max(losses) - min(losses)) if len(losses) > 1 else None
        a["std"] = statistics.stdev(losses) if len(losses) > 1 else None
        a["tokens"] = sorted({r["tokens"] for r in a["runs"]})
        a["train_time_s"] = statistics.fmean(r["train_time_s"] for r in a["runs"])
        a["finished"] = all(r["finished"] for r in a["runs"])
    base = None
    if baseline is not None:
        if baseline in arms:
            base = arms[baseline]
        else:
            hits = [a for a in arms.values()
                    if {r["config"].get("precision.recipe") for r in a["runs"]} == {baseline}]
            if len(hits) != 1:
                raise SystemExit(f"error: --baseline {baseline!r} matches {len(hits)} arms; "
                                 f"arms: {sorted(arms)}")
            base = hits[0]
    for a in arms.values():
        a["gap_nats"] = a["gap_rel_pct"] = None
        if base is not None and a["final_valid_loss"] is not None and base["final_valid_loss"]:
            a["gap_nats"] = a["final_valid_loss"] - base["final_valid_loss"]
            a["gap_rel_pct"] = 100.0 * a["gap_nats"] / base["final_valid_loss"]
    base_final = {r["seed"]: r["final_valid_loss"] for r in base["runs"]
                  if r["final_valid_loss"] is not None} if base is not None else {}
    for a in arms.values():
        paired = [r["final_valid_loss"] - base_final[r["seed"]] for r in a["runs"]
                  if r["final_valid_loss"] is not None and r["seed"] in base_final]
        a["paired_gaps"] = paired
        a["paired_gap_nats"] = statistics.fmean(paired) if paired and a is not base else None
    base_runs = {r["seed"]: r for r in base["runs"]} if base is not None else {}
    for a in arms.values():
        for r in a["runs"]:
            pt = (paired_train_gap(r, base_runs[r["seed"]], train_window)
                  if a is not base and r["seed"] in base_runs else None)
            r["paired_train_gap"] = pt[0] if pt else None
            r["paired_train_steps"] = [pt[1], pt[2]] if pt else None
            r["paired_train_windows"] = (paired_train_windows(r, base_runs[r["seed"]], train_window)
                                         if pt else [])
        gaps = [r["paired_train_gap"] for r in a["runs"] if r["paired_train_gap"] is not None]
        a["paired_train_gaps"] = gaps
        a["paired_train_gap_nats"] = statistics.fmean(gaps) if gaps else None
    return {"baseline": base["arm"] if base else None, "arms": list(arms.values())}


def step_table(summary: dict, every: int) -> list[str]:
    """Train loss per arm (mean over its seeds) at the steps every run reached, every ``every``
    steps plus the first and the last common step, and each arm minus the baseline: the comparison
    that still means something when runs were cut off by a time limit before their final evaluation."""
    arms = summary["arms"]
    steps = sorted(set.intersection(*(set(r["train_by_step"]) for a in arms for r in a["runs"])))
    if not steps:
        return ["No step was reached by every run: no train-loss table."]
    picked = [s for s in steps if s % every == 0 or s in (steps[0], steps[-1])]
    base = next((a for a in arms if a["arm"] == summary["baseline"]), None)
    others = [a for a in arms if a is not base] if base else []
    head = "| step | " + " | ".join(a["arm"] for a in arms)
    head += "".join(f" | {a['arm']} - {base['arm']}" for a in others) + " |"
    lines = [f"Train loss at the steps every run reached (last common step {steps[-1]}):", "", head,
             "|" + "---|" * (1 + len(arms) + len(others))]
    for s in picked:
        mean = {a["arm"]: statistics.fmean(r["train_by_step"][s] for r in a["runs"]) for a in arms}
        cells = [f"{mean[a['arm']]:.4f}" for a in arms]
        cells += [f"{mean[a['arm']] - mean[base['arm']]:+.4f}" for a in others]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return lines


def paired_table(summary: dict) -> list[str]:
    """Validation loss minus the same-seed baseline run's, at each validation step both reached."""
    base = next((a for a in summary["arms"] if a["arm"] == summary["baseline"]), None)
    if base is None:
        return []
    by_seed = {r["seed"]: r["valid_by_step"] for r in base["runs"]}
    steps = sorted({s for v in by_seed.values() for s in v})
    lines = [f"Paired validation gap (run minus the {base['arm']} run of the same seed, nats), "
             "at every validation step both reached:", "",
             "| arm | seed | " + " | ".join(str(s) for s in steps) + " |",
             "|---|---|" + "---|" * len(steps)]
    for a in summary["arms"]:
        if a is base:
            continue
        for r in a["runs"]:
            b = by_seed.get(r["seed"])
            if b is None:
                continue
            cells = [f"{r['valid_by_step'][s] - b[s]:+.4f}" if s in r["valid_by_step"] and s in b
                     else "" for s in steps]
            flag = "" if r["finished"] else " (unfinished)"
            lines.append(f"| {a['arm']}{flag} | {r['seed']} | " + " | ".join(cells) + " |")
    return lines + [""]


def paired_train_table(summary: dict, window: int) -> list[str]:
    """Each run's paired train gap per window of ``window`` steps (columns: the window's last step):
    how a recipe's gap opens or closes over training, not only where it ends."""
    runs = [(a, r) for a in summary["arms"] for r in a["runs"] if r["paired_train_windows"]]
    if not runs:
        return []
    ends = sorted({w[1] for _, r in runs for w in r["paired_train_windows"]})
    lines = [f"Paired train gap by window of {window} steps (run minus the {summary['baseline']} "
             "run of the same seed, mean over the window ending at the column's step):", "",
             "| arm | seed | " + " | ".join(str(e) for e in ends) + " |",
             "|---|---|" + "---|" * len(ends)]
    for a, r in runs:
        by_end = {w[1]: w[2] for w in r["paired_train_windows"]}
        cells = [f"{by_end[e]:+.4f}" if e in by_end else "" for e in ends]
        lines.append(f"| {a['arm']} | {r['seed']} | " + " | ".join(cells) + " |")
    return lines + [""]


def _f(v, fmt):
    return "–" if v is None else format(v, fmt)


def _paired(a, key: str = "paired_gap") -> str:
    g, gaps = a[f"{key}_nats"], a[f"{key}s"]
    if g is None:
        return "–"
    if len(gaps) == 1:
        return f"{g:+.4f}"
    return f"{g:+.4f} [{min(gaps):+.4f}, {max(gaps):+.4f}]"


def markdown(summary: dict, every: int = 10, train_window: int = 100) -> str:
    base = summary["baseline"]
    lines = [f"| arm | seeds | final valid loss (mean) | gap to {base or 'baseline'} (nats) | "
             "gap (%) | paired gap (nats; same-seed mean [min, max]) | paired train gap (last "
             f"{train_window} common steps; mean [min, max]) | spread over seeds (max-min) "
             "| std | tokens | train time (s, mean) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in summary["arms"]:
        flag = "" if a["finished"] else " (unfinished)"
        tokens = ", ".join(f"{t:,}" for t in a["tokens"])
        lines.append(f"| {a['arm']}{flag} | {', '.join(a['seeds'])} | {_f(a['final_valid_loss'], '.4f')} "
                     f"| {_f(a['gap_nats'], '+.4f')} | {_f(a['gap_rel_pct'], '+.2f')} "
                     f"| {_paired(a)} | {_paired(a, 'paired_train_gap')} | {_f(a['spread'], '.4f')} | {_f(a['std'], '.4f')} | {tokens} "
                     f"| {a['train_time_s']:.1f} |")
    lines += ["", "| run | arm | seed | steps | tokens | final valid loss | paired train gap "
              "(steps) | train time (s) | finished |",
              "|---|---|---|---|---|---|---|---|---|"]
    for a in summary["arms"]:
        for r in a["runs"]:
            pt = "–" if r["paired_train_gap"] is None else \
                f"{r['paired_train_gap']:+.4f} ({r['paired_train_steps'][0]}–{r['paired_train_steps'][1]})"
            lines.append(f"| {r['run_dir']} | {a['arm']} | {r['seed']} | {r['steps']} | "
                         f"{r['tokens']:,} | {_f(r['final_valid_loss'], '.4f')} | {pt} | "
                         f"{r['train_time_s']:.1f} | {'yes' if r['finished'] else 'no'} |")
    lines += [""] + paired_table(summary) + paired_train_table(summary, train_window)
    lines += step_table(summary, every)
    return "\n".join(lines) + "\n"


def _ema(points, alpha=0.05):
    out, m = [], None
    for x, y in points:
        if not math.isfinite(y):
            continue
        m = y if m is None else (1 - alpha) * m + alpha * y
        out.append((x, m))
    return out


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(24, 5.2))
    base = next((a for a in summary["arms"] if a["arm"] == summary["baseline"]), None)
    base_train = {r["seed"]: r["train_by_step"] for r in base["runs"]} if base else {}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ("-", "--", ":", "-.")  # past the colour cycle (10 arms), the line style tells arms apart
    for i, a in enumerate(summary["arms"]):
        c, ls = colors[i % len(colors)], styles[(i // len(colors)) % len(styles)]
        for j, r in enumerate(a["runs"]):
            lab = a["arm"] if j == 0 else None
            tr = _ema(r["train"])
            if tr:
                axes[0].plot([x for x, _ in tr], [y for _, y in tr], color=c, ls=ls, lw=1, label=lab)
            b = base_train.get(r["seed"]) if a is not base else None
            if b:  # the paired train gap, step by step (tokens of the run's own steps)
                gap = [(s * r["tokens_per_step"], r["train_by_step"][s] - b[s])
                       for s in sorted(set(r["train_by_step"]) & set(b))]
                gap = _ema(gap, alpha=0.02)
                axes[3].plot([x for x, _ in gap], [y for _, y in gap], color=c, ls=ls, lw=1, label=lab)
            va = r["valid"]
            for ax in axes[1:3]:
                ax.plot([x for x, _ in va], [y for _, y in va], color=c, ls=ls, lw=1.2, marker=".",
                        label=lab)
    max_tok = max((r["tokens"] for a in summary["arms"] for r in a["runs"]), default=0)
    tail = [y for a in summary["arms"] for r in a["runs"] for x, y in r["valid"] if x >= max_tok / 2]
    if tail:
        lo, hi = min(tail), max(tail)
        pad = 0.05 * (hi - lo or 1e-3)
        axes[2].set_xlim(max_tok / 2, max_tok * 1.01)
        axes[2].set_ylim(lo - pad, hi + pad)
    titles = ("train loss (EMA 0.05)", "validation loss", "validation loss, last half of the tokens",
              f"train loss minus the same-seed {summary['baseline']} run (EMA 0.02)")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("tokens")
        ax.set_ylabel("nats / token")
        ax.grid(alpha=0.3)
    axes[3].axhline(0.0, color="k", lw=0.8)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--baseline", help="arm name or precision recipe of the baseline arm")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--label", action="append", default=[], metavar="RUN_DIR=NAME",
                    help="name a run's arm explicitly (repeatable)")
    ap.add_argument("--every", type=int, default=10,
                    help="train-loss table: every N steps of those all runs reached (default 10)")
    ap.add_argument("--train-window", type=int, default=100,
                    help="paired train gap: the last N steps a run and its baseline both reached")
    ap.add_argument("--arm-from-dir", action="store_true",
                    help="name arms by directory (ARM/seed_N: ARM) instead of by config")
    args = ap.parse_args(argv)
    if args.train_window < 1:
        raise SystemExit(f"error: --train-window {args.train_window}: expected a positive number of steps")
    labels = {}
    for item in args.label:
        run, eq, name = item.partition("=")
        if not eq or not name:
            raise SystemExit(f"error: --label {item!r}: expected RUN_DIR=NAME")
        labels[str(Path(run))] = name
    runs = [read_run(r) for r in find_runs(args.runs)]
    if args.arm_from_dir:
        labels = {r["run_dir"]: dir_arm_name(r["run_dir"]) for r in runs} | labels
    summary = summarise(runs, arm_names(runs, labels), args.baseline, args.train_window)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.every < 1:
        raise SystemExit(f"error: --every {args.every}: expected a positive number of steps")
    md = markdown(summary, args.every, args.train_window)
    (args.out / "compare.md").write_text(md)
    plain = {"baseline": summary["baseline"], "arms": [
        {**{k: v for k, v in a.items() if k != "runs"},
         "runs": [{k: v for k, v in r.items() if k not in ("config", "train", "valid", "train_by_step")}
                  for r in a["runs"]]} for a in summary["arms"]]}
    (args.out / "compare.json").write_text(json.dumps(plain, indent=2) + "\n")
    plot(summary, args.out / "compare.png")
    print(md, end="")
    print(f"wrote {args.out / 'compare.png'}, compare.md, compare.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
