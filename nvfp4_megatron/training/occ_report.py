"""The Microsoft FP4 paper's Table 1 for a run's own activations (arXiv 2501.17116, §3.2).

Table 1 of the paper measures what absmax E2M1 quantization does to a model's activations (LLaMA
1.3B, mean over training) for five settings: no clamp; clamp at the 99.9 % quantile without
compensation; clamp + compensation at 99.9, 99 and 97 % — cosine similarity, MSE and SNR between
the activation and its quantized version (plus the compensation residual). Here every setting is
``formats.quantize_absmax_e2m1`` of ``formats.outlier_clamp(x, α)`` (clamp to the [1-α, α]
quantiles of the whole tensor) plus the residual when compensated (``quant.telemetry.
table1_sums``), on the input of every linear layer of the transformer blocks, with two absmax
granularities: one scale per tensor (the paper's quantization function, §3, γ = 6 / max|X|) and
one per token (the granularity the ``msfp4`` recipe trains with). The paper does not say which
one its Table 1 used (docs/recipes.md); both tables are printed.

Two sources:

- ``checkpoint`` (default): load a checkpoint of the run (its newest, or ``--checkpoint``), run
  ``--batches`` validation batches forward, and measure each linear layer's input. One process.
- ``telemetry``: the ``"kind": "occ_table"`` rows a run wrote while training with
  ``logging.quant_stats_interval=N logging.quant_stats_occ_table=true`` (the paper's "mean over
  training").

Each (layer, batch or step) gives one value per metric; the table is their mean, next to the
paper's numbers. Written to ``OUT/occ_table.md`` and ``OUT/occ_table.json`` (``OUT`` defaults to
the run directory) and printed::

    .venv/bin/python scripts/occ_table.py RUN_DIR [--source checkpoint|telemetry]
        [--checkpoint DIR] [--batches N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from nvfp4_megatron.quant import telemetry as qtel

# arXiv 2501.17116 Table 1 (LLaMA 1.3B activations, mean over training): cos, MSE, SNR dB
PAPER = {"none": (0.9219, 0.1055, 8.31), "clamp99.9": (0.9883, 0.0366, 14.25),
         "comp99.9": (0.9961, 0.0245, 15.31), "comp99": (1.0, 0.0099, 18.38),
         "comp97": (1.0, 0.0068, 20.88)}


def linear_modules(model) -> list[tuple[str, torch.nn.Module]]:
    """``(layer_key, module)`` for the project's linear layers inside the transformer blocks
    (configured by ``apply_precision``; BF16 blocks included: their inputs are activations too)."""
    from nvfp4_megatron.mcore.layers import QUANTIZED_LINEAR_TYPES

    chunks = model if isinstance(model, (list, tuple)) else [model]
    out = []
    for chunk in chunks:
        for mod in chunk.modules():
            prec = getattr(mod, "quant_precision", None)
            if isinstance(mod, QUANTIZED_LINEAR_TYPES) and prec is not None:
                out.append((prec.layer_key, mod))
    return out


def install_input_hooks(model, fn: Callable[[str, torch.Tensor], None]) -> Callable[[], None]:
    """Call ``fn(layer_key, input)`` before every forward of each linear layer (the
    high-precision input, before any quantization); returns a function removing the hooks."""
    handles = []
    for key, mod in linear_modules(model):
        def hook(module, args, _key=key):
            fn(_key, args[0])
        handles.append(mod.register_forward_pre_hook(hook))

    def remove() -> None:
        for h in handles:
            h.remove()

    return remove


def summarize(rows: list[dict], granularity: str) -> list[dict]:
    """Mean over the ``occ_table`` rows (one per layer and batch/step) per setting."""
    out = []
    for sid, label, alpha, comp in qtel.TABLE1_SETTINGS:
        sel = [r for r in rows if r["setting"] == sid and r["granularity"] == granularity]
        if not sel:
            raise ValueError(f"no occ_table rows for setting {sid!r}, granularity "
                             f"{granularity!r}")

        def mean(k: str) -> float:
            vals = [float(r[k]) for r in sel]
            return sum(vals) / len(vals)

        out.append({"setting": sid, "label": label, "quantile": alpha, "compensate": comp,
                    "cos": mean("cos"), "mse": mean("mse"), "snr_db": mean("snr_db"),
                    "clamped": mean("occ_clamped"), "underflow": mean("underflow"),
                    "samples": len(sel), "paper_cos": PAPER[sid][0], "paper_mse": PAPER[sid][1],
                    "paper_snr_db": PAPER[sid][2]})
    return out


def snr_rises(summary: list[dict]) -> bool:
    """SNR strictly increasing down the table, as in the paper."""
    snr = [r["snr_db"] for r in summary]
    return all(b > a for a, b in zip(snr, snr[1:]))


def format_table(summary: list[dict], *, title: str) -> str:
    lines = [f"### {title}", "",
             "| setting | cos sim | MSE | SNR (dB) | clamped | flushed to 0 | paper cos | "
             "paper MSE | paper SNR (dB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['label']} | {r['cos']:.2%} | {r['mse']:.4g} | {r['snr_db']:.2f} | "
                     f"{r['clamped']:.2%} | {r['underflow']:.2%} | {r['paper_cos']:.2%} | "
                     f"{r['paper_mse']:.4f} | {r['paper_snr_db']:.2f} |")
    n = summary[0]["samples"]
    lines += ["", f"Mean over {n} (layer, batch/step) activations. SNR rises down the table: "
              f"{'yes' if snr_rises(summary) else 'NO'}."]
    return "\n".join(lines)


def from_telemetry(run_dir: Path) -> tuple[list[dict], str]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run directory?")
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("kind") == "occ_table":
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} has no occ_table rows: train with "
                         "logging.quant_stats_interval=N logging.quant_stats_occ_table=true, or "
                         "use --source checkpoint")
    steps = sorted({r["step"] for r in rows})
    return rows, f"steps {steps[0]}..{steps[-1]} ({len(steps)} recorded)"


def from_checkpoint(run_dir: Path, ckpt: Path | None, batches: int | None,
                    log=print) -> tuple[list[dict], str]:
    """Load the run's model from ``ckpt`` (default: its newest checkpoint) in one process, run
    validation batches forward and measure every linear layer's input."""
    from omegaconf import OmegaConf

    from nvfp4_megatron.training.config import to_plain
    from nvfp4_megatron.runtime.distributed import init_distributed, initialize_model_parallel
    from nvfp4_megatron.training import checkpoint as ckpt_lib
    from nvfp4_megatron.training import data as data_lib
    from nvfp4_megatron.training.loop import build_datasets, make_forward_step, start_run_state
    from nvfp4_megatron.training.model import (build_training_stack, model_shape,
                                               recipe_from_config)
    from nvfp4_megatron.training.optim import total_iters

    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} does not exist: is {run_dir} a run directory?")
    c = to_plain(OmegaConf.load(cfg_path))
    if ckpt is None:
        ckpt = ckpt_lib.latest_checkpoint(ckpt_lib.checkpoint_root(run_dir))
        if ckpt is None:
            raise FileNotFoundError(f"{run_dir} has no checkpoint (train with train.save=true, "
                                    "or use --source telemetry)")
    p = c["parallel"]
    bad = {k: p[k] for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                             "context_parallel_size", "expert_model_parallel_size")
           if p[k] != 1}
    if bad:
        raise ValueError(f"the report loads the model in one process; the run used {bad} "
                         "(parallel.* > 1): not supported")
    info = init_distributed()
    if info.world_size != 1:
        raise ValueError("run the report as one process (python, not torchrun)")
    initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                              context_parallel_size=1, expert_model_parallel_size=1,
                              expert_tensor_parallel_size=1)
    from megatron.core.pipeline_parallel import get_forward_backward_func

    t, m = c["train"], c["model"]
    start_run_state(c)
    recipe = recipe_from_config(c["precision"])
    stack = build_training_stack(c, recipe, log=lambda s: None)
    meta = {"model": model_shape(c), "world_size": 1,
            "parallel": {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
                         "expert_model_parallel_size": 1, "expert_tensor_parallel_size": 1,
                         "context_parallel_size": 1}}
    ckpt_lib.load_checkpoint(ckpt, ddp_model=stack.ddp, optimizer=stack.optimizer, meta=meta,
                             log=log)
    seq = m["seq_length"]
    iters = total_iters(t, seq_length=seq)
    _, valid_ds = build_datasets(c, rank0=True, iters=iters, log=lambda s: None)
    batches = t["eval_iters"] if batches is None else batches
    if batches > t["eval_iters"]:
        raise ValueError(f"--batches {batches}: the run's validation split holds "
                         f"train.eval_iters={t['eval_iters']} global batches")
    per_batch: dict[tuple[str, str], torch.Tensor] = {}

    def capture(key: str, x: torch.Tensor) -> None:
        for gran, s in qtel.table1_sums(x).items():
            k = (key, gran)
            per_batch[k] = per_batch[k] + s if k in per_batch else s

    mods = linear_modules(stack.model)
    if not mods:
        raise ValueError("the model has no linear layers of the project's spec to measure")
    remove = install_input_hooks(stack.model, capture)
    fb, forward_step = get_forward_backward_func(), make_forward_step()
    nmb = data_lib.num_microbatches(t["global_batch_size"], t["micro_batch_size"], 1)
    rows: list[dict] = []
    stack.ddp.eval()
    try:
        with torch.no_grad():
            for b in range(batches):
                per_batch.clear()
                mbs = data_lib.step_microbatches(valid_ds, step=b,
                                                 global_batch_size=t["global_batch_size"],
                                                 micro_batch_size=t["micro_batch_size"],
                                                 dp_rank=0, dp_size=1)
                fb(forward_step_func=forward_step, data_iterator=iter(mbs), model=[stack.ddp],
                   num_microbatches=nmb, seq_length=seq, micro_batch_size=t["micro_batch_size"],
                   forward_only=True)
                for (key, gran), sums in per_batch.items():
                    for (sid, label, alpha, comp), v in zip(qtel.TABLE1_SETTINGS, sums.tolist()):
                        mt = qtel.metrics(v)
                        rows.append({"layer": key, "batch": b, "granularity": gran,
                                     "setting": sid, "label": label,
                                     **{k: mt[k] for k in ("cos", "mse", "snr_db", "underflow",
                                                           "occ_clamped")}})
    finally:
        remove()
    return rows, f"{ckpt.name} ({batches} validation batches, {len(mods)} linear layers)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="scripts/occ_table.py",
        description="The Microsoft FP4 paper's Table 1 (arXiv 2501.17116) for a run's own "
                    "activations: cosine / MSE / SNR of per-token E2M1 with no clamp, clamp 99.9 "
                    "without compensation, clamp + compensation at 99.9 / 99 / 97.")
    ap.add_argument("run_dir", type=Path, help="a pretrain.py run directory")
    ap.add_argument("--source", choices=("checkpoint", "telemetry"), default="checkpoint",
                    help="checkpoint: load the model and measure validation batches (default); "
                         "telemetry: the run's occ_table rows (logging.quant_stats_occ_table)")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="checkpoint directory (default: the run's newest)")
    ap.add_argument("--batches", type=int, default=None,
                    help="validation batches to measure (default: train.eval_iters)")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: RUN_DIR)")
    args = ap.parse_args(argv)
    if args.batches is not None and args.batches < 1:
        print("error: --batches must be >= 1", file=sys.stderr)
        return 2
    run_dir = args.run_dir.resolve()
    try:
        if args.source == "telemetry":
            rows, what = from_telemetry(run_dir)
        else:
            rows, what = from_checkpoint(run_dir, args.checkpoint, args.batches)
        summaries = {g: summarize(rows, g) for g in qtel.TABLE1_GRANULARITIES}
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    text = "\n\n".join(
        format_table(summaries[g], title=f"Table 1 (arXiv 2501.17116) for {run_dir.name}, "
                                         f"absmax scaling per {g}: {what}")
        for g in qtel.TABLE1_GRANULARITIES)
    out = (args.out or run_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "occ_table.md").write_text(text + "\n")
    (out / "occ_table.json").write_text(json.dumps(
        {"run_dir": str(run_dir), "source": args.source, "what": what, "summary": summaries,
         "snr_rises": {g: snr_rises(v) for g, v in summaries.items()},
         "rows": [{k: (v if not (isinstance(v, float) and math.isinf(v)) else str(v))
                   for k, v in r.items()} for r in rows]}, indent=1))
    print(text)
    print(f"\nwritten: {out / 'occ_table.md'}, {out / 'occ_table.json'}")
    return 0
