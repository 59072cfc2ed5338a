"""scripts/compare_runs.py: the loss table and plot of two runs' metrics.jsonl."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _metrics(path: Path, losses: dict, valid: dict) -> str:
    rows = [{"kind": "train", "step": s, "loss": v, "step_time_s": 0.5 + s / 100}
            for s, v in losses.items()]
    rows += [{"kind": "valid", "step": s, "loss": v} for s, v in valid.items()]
    rows.append({"kind": "precision", "step": 3})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_table_and_png(tmp_path):
    a = _metrics(tmp_path / "a.jsonl", {s: 8.0 - s * 0.1 for s in range(1, 11)}, {10: 7.5})
    b = _metrics(tmp_path / "b.jsonl", {s: 8.0 - s * 0.09 for s in range(1, 11)}, {10: 7.6})
    r = subprocess.run([sys.executable, str(ROOT / "scripts/compare_runs.py"), "--every", "5",
                        "--png", str(tmp_path / "loss.png"), "--md", str(tmp_path / "loss.md"),
                        f"bf16={a}", f"nvfp4={b}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "loss.md").read_text()
    assert "| step | bf16 | nvfp4 | nvfp4 - bf16 |" in md
    assert "| 10 | 7.0000 | 7.1000 | +0.1000 |" in md
    assert "| 1 | 7.9000 | 7.9100 | +0.0100 |" in md and "| 5 | 7.5000 | 7.5500 | +0.0500 |" in md
    assert "| 10 | 7.5000 | 7.6000 |" in md  # validation
    assert "| nvfp4 | 10 | 7.9100 | 7.1000 | 0.575 |" in md  # median of steps 5..10
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
