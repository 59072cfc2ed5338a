"""Run logging on rank 0: progress lines, ``metrics.jsonl``, TensorBoard scalars, the loss plot.

``metrics.jsonl`` rows by ``kind``: ``train`` / ``valid`` (losses, LR, throughput), ``precision``
(the BF16 switch), ``quant`` (quantization telemetry: one row per step, layer and operand copy;
``quant/telemetry.py``) and ``occ_table`` (the Microsoft FP4 paper's Table 1 settings per layer).

Other ranks get a logger whose methods do nothing, so call sites need no rank checks.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _drop_torn_row(path: Path) -> None:
    """A run killed mid-write (kill -9, node failure) can leave half a JSON row at the end of
    ``metrics.jsonl``; cut it off before a resumed run appends, so every line stays one row."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


class RunLogger:
    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, plot: bool) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.plot_enabled = plot
        self._tb = None
        self._metrics = None
        if not enabled:
            return
        path = self.run_dir / "metrics.jsonl"
        _drop_torn_row(path)
        self._metrics = open(path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def info(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True)

    def record(self, kind: str, step: int, *, tb_tag: str | None = None,
               tb_keys: tuple[str, ...] | None = None, **values) -> None:
        """One ``metrics.jsonl`` row ``{"kind", "step", "time", **values}``; its finite numbers
        also go to TensorBoard as ``kind/[tb_tag/]key`` (only ``tb_keys`` when given)."""
        if not self.enabled:
            return
        row = {"kind": kind, "step": step, "time": time.time(), **values}
        self._metrics.write(json.dumps(row) + "\n")
        if self._tb is not None:
            prefix = f"{kind}/{tb_tag}" if tb_tag else kind
            for k, v in values.items():
                if tb_keys is not None and k not in tb_keys:
                    continue
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def progress(self, *, step: int, total: int, tokens: int, loss: float, lr: float,
                 grad_norm: float, tokens_per_s: float, elapsed: float, steps_done: int,
                 mfu: float | None = None, peak_mem_gib: float | None = None) -> None:
        left = (total - step) * elapsed / max(steps_done, 1)
        gpu = (f" | MFU {mfu:.1%}" if mfu is not None else "") + (
            f" | peak mem {peak_mem_gib:.2f} GiB" if peak_mem_gib is not None else "")
        self.info(
            f"step {step:>6d}/{total} | tokens {tokens:,} | loss {loss:.4f} | lr {lr:.3e} | "
            f"grad norm {grad_norm:.3f} | {tokens_per_s:,.0f} tok/s{gpu} | left {_fmt_time(left)}"
        )

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        if self._metrics is not None:
            self._metrics.close()

    def plot_losses(self, *, entropy_nats: float | None = None) -> Path | None:
        """train/valid loss vs step from metrics.jsonl -> loss.png (the whole run, resumes included)."""
        if not (self.enabled and self.plot_enabled):
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train, valid = {}, {}
        for line in (self.run_dir / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            if row["kind"] == "train" and "loss" in row:
                train[row["step"]] = row["loss"]
            elif row["kind"] == "valid":
                valid[row["step"]] = row["loss"]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(sorted(train), [train[s] for s in sorted(train)], label="train", lw=1)
        if valid:
            ax.plot(sorted(valid), [valid[s] for s in sorted(valid)], "o-", label="valid")
        if entropy_nats is not None:
            ax.axhline(entropy_nats, color="gray", ls="--", label="unigram entropy")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.legend()
        ax.grid(alpha=0.3)
        out = self.run_dir / "loss.png"
        fig.tight_layout()
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out
