"""Per-run speed of a study root (``scripts/study.py --root``): median step time after the first
5 steps, tokens/s, and the wall time the run's budget would take at that speed.

    python scripts/dev/study_speed.py ROOT [--budget-tokens 5.2e7]
"""

import argparse
import json
import statistics
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", type=Path)
    ap.add_argument("--budget-tokens", type=float, default=5.2e7)
    a = ap.parse_args()
    rows = []
    for m in sorted(a.root.rglob("metrics.jsonl")):
        train = [json.loads(x) for x in m.read_text().splitlines() if '"kind": "train"' in x]
        times = [r["step_time_s"] for r in train if r["step"] > 5]
        if not times:
            continue
        st = statistics.median(times)
        tok = train[-1]["tokens"] / train[-1]["step"]
        rows.append((str(m.parent.relative_to(a.root)), len(train), st, tok / st,
                     a.budget_tokens / (tok / st)))
    print(f"{'run':<40} {'steps':>5} {'step s':>8} {'tok/s':>10} {'budget s':>9}")
    for r in rows:
        print(f"{r[0]:<40} {r[1]:>5} {r[2]:>8.4f} {r[3]:>10.0f} {r[4]:>9.0f}")
    if rows:
        print(f"aggregate tokens/s (runs side by side): {sum(r[3] for r in rows):.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
