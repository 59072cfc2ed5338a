"""The 8-GPU MoE Parallel Folding run through ``pretrain.py`` (issue 20): step time, tokens/s, MFU
and peak memory per GPU, with folding against the same model without it (ETP = TP).

Usage::

    python scripts/folding_run.py --dry-run                 # no GPU: planner + layout validator
    python scripts/folding_run.py --out DIR                 # 8 GPUs: every case, both recipes
    python scripts/folding_run.py --out DIR --cases wide_folding,wide_baseline --recipes nvfp4

Cases (world 8; MoE Parallel Folding, arXiv 2504.14960):

``tiny_folding``   ``+recipe=mixtral_tiny_folding parallel.context_parallel_size=2``: attention
                   TP2 x CP2 x PP2 (DP1), experts ETP1 x EP4 x PP2 -- the layout of the CPU 8-rank
                   test (tests/megatron/test_folding_8rank.py); EP4 spans each stage's TP x CP
                   block.
``tiny_baseline``  ``+recipe=mixtral_tiny_baseline parallel.context_parallel_size=2``: the same
                   model and attention layout, experts ETP2 (= TP) x EP2 x PP2.
``wide_folding``   ``+recipe=mixtral_8gpu_folding``: a 4.6B Mixtral-shaped MoE (16 layers, d=2048,
                   8 experts top-2, seq 4096) at the paper's folding shape scaled to 8 GPUs:
                   attention TP2 x CP1 x DP2 x PP2, experts ETP1 x EP4 x EDP1 x PP2.
``wide_baseline``  ``+recipe=mixtral_8gpu_baseline``: the same with experts ETP2 x EP2 x EDP1 x PP2.

Each case runs for each of ``--recipes`` (default ``bf16,nvfp4``; nvfp4 quantizes every block,
its GEMMs emulated on Hopper: DESIGN.md "Hardware facts") as ``torch.distributed.run --standalone
--nproc_per_node=8`` on this file's rank wrapper, which runs ``pretrain.py`` unchanged and then
records its process's ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` (the loop logs
rank 0's only). Reported per run, from ``metrics.jsonl``: the median step time and MFU over the
steps after ``--skip`` (warm-up), tokens/s = global batch x sequence / median step time, and the
peak memory of every GPU. ``DIR/folding.json`` holds everything, ``DIR/folding.md`` the table.
The paper's 49.3 % MFU (Mixtral 8x22B, 128 H100, BF16) is context, not a target: another model
size, GPU count and no Transformer Engine here.

``--dry-run`` composes each case's config as ``pretrain.py`` does and hands it to the dry-run
planner (``parallel/planner.py``) at world 8 on H200: the layout validator must accept it, and the
expected folding / baseline expert layout is checked; nothing is launched.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORLD = 8
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                    "NVSHMEM_DISABLE_NVLS": "1"}  # the lent H200 hosts require it
PAPER_CONTEXT = "paper: 49.3% MFU, Mixtral 8x22B, 128 H100, BF16 (arXiv 2504.14960)"

# case -> (overrides, expected (TP, CP, DP, PP), expected (ETP, EP, EDP))
CASES = {
    "tiny_folding": (["+recipe=mixtral_tiny_folding", "parallel.context_parallel_size=2"],
                     (2, 2, 1, 2), (1, 4, 1)),
    "tiny_baseline": (["+recipe=mixtral_tiny_baseline", "parallel.context_parallel_size=2"],
                      (2, 2, 1, 2), (2, 2, 1)),
    "wide_folding": (["+recipe=mixtral_8gpu_folding"], (2, 1, 2, 2), (1, 4, 1)),
    "wide_baseline": (["+recipe=mixtral_8gpu_baseline"], (2, 1, 2, 2), (2, 2, 1)),
}
RECIPES = ("bf16", "nvfp4")
RUN_OVERRIDES = ["train.save=false", "train.eval_interval=0", "train.log_interval=1",
                 "logging.plot=false", "logging.tensorboard=false",
                 "logging.print_precision_table=false"]


def case_overrides(case: str, recipe: str, steps: int | None = None) -> list[str]:
    ov = [*CASES[case][0], f"precision.recipe={recipe}"]
    return ov + ([f"train.train_iters={steps}"] if steps else [])


# ----------------------------------------------------------------------------------- dry run

def dry_run(cases, recipes, *, meta_build: bool = True, log=print) -> list[dict]:
    """Each case's composed config through the planner at world 8 on H200; raises on a layout the
    validator refuses or one that is not the case's expected folding / baseline layout."""
    from nvfp4_megatron.cli.compose import compose_config
    from nvfp4_megatron.parallel.planner import plan

    rows = []
    for case in cases:
        for recipe in recipes:
            cfg = compose_config([*case_overrides(case, recipe), "dry_run=true",
                                  f"world_size={WORLD}", "planner.gpu_type=H200"])
            p = plan(cfg, WORLD, meta_build=meta_build)
            lay = p.layout
            got = ((lay.tp, lay.cp, lay.dp, lay.pp), (lay.etp, lay.ep, lay.edp))
            want = CASES[case][1:]
            if got != want:
                raise ValueError(f"{case}/{recipe}: layout (TP,CP,DP,PP),(ETP,EP,EDP) = {got}, "
                                 f"expected {want}")
            row = {"case": case, "recipe": recipe, "attention": got[0], "experts": got[1],
                   "params": p.params["total"], "meta_params": p.meta_params,
                   "max_memory_gib_est": p.max_memory_gib, "step_time_s_est": p.step_time_s,
                   "tokens_per_s_est": p.tokens_per_s, "mfu_est": p.mfu_vs_bf16_peak}
            rows.append(row)
            log(f"[dry-run] {case:14} {recipe:6} attention TP{got[0][0]} CP{got[0][1]} "
                f"DP{got[0][2]} PP{got[0][3]} | experts ETP{got[1][0]} EP{got[1][1]} "
                f"EDP{got[1][2]} | {p.params['total']:,} params | est. {p.max_memory_gib:.1f} "
                f"GiB/GPU, {p.step_time_s:.3g} s/step at the planner's assumed MFU: accepted")
    return rows


# ------------------------------------------------------------------------------- the runs

def rank_wrapper(mem_dir: str, argv: list[str]) -> None:
    """Under torchrun: run pretrain.py with ``argv``, then write this rank's peak GPU memory."""
    import torch

    sys.argv = [str(ROOT / "pretrain.py"), *argv]
    try:
        runpy.run_path(str(ROOT / "pretrain.py"), run_name="__main__")
    finally:
        if torch.cuda.is_available():
            rank = int(os.environ.get("RANK", "0"))
            Path(mem_dir).mkdir(parents=True, exist_ok=True)
            Path(mem_dir, f"rank{rank}.json").write_text(json.dumps({
                "rank": rank, "device": torch.cuda.current_device(),
                "max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                "max_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}))


def summarize(run_dir: Path, mem_dir: Path, skip: int) -> dict:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / "config.yaml")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    steady = [r for r in train if r["step"] > skip] or train
    step = statistics.median(r["step_time_s"] for r in steady)
    mfu = [r["mfu"] for r in steady if r.get("mfu") is not None]
    mem = sorted((json.loads(p.read_text()) for p in mem_dir.glob("rank*.json")),
                 key=lambda m: m["rank"])
    tokens = cfg.train.global_batch_size * cfg.model.seq_length
    return {"steps": len(train), "steps_measured": len(steady), "step_time_s": step,
            "tokens_per_s": tokens / step, "mfu": statistics.median(mfu) if mfu else None,
            "first_loss": train[0]["loss"], "last_loss": train[-1]["loss"],
            "peak_alloc_gib_per_rank": [round(m["max_allocated_gib"], 2) for m in mem],
            "peak_reserved_gib_per_rank": [round(m["max_reserved_gib"], 2) for m in mem]}


def run_all(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **NO_MULTICAST_ENV, "PYTHONUNBUFFERED": "1",
           "CUDA_DEVICE_MAX_CONNECTIONS": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "1")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    results, failed = [], 0
    for case in args.cases:
        for recipe in args.recipes:
            name = f"{case}_{recipe}"
            run_dir, mem_dir = out / name, out / f"{name}_mem"
            ov = [*case_overrides(case, recipe, args.steps), *RUN_OVERRIDES,
                  f"run_dir={run_dir}", f"data.cache_dir={out / 'corpus_cache'}"]
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={WORLD}", str(Path(__file__).resolve()), "--rank-wrapper",
                   str(mem_dir), "--", *ov]
            t0 = time.perf_counter()
            with open(out / f"{name}.log", "w") as logf:
                rc = subprocess.run(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                    timeout=args.timeout).returncode
            row = {"case": case, "recipe": recipe, "rc": rc, "wall_s": time.perf_counter() - t0,
                   "command": "torchrun --standalone --nproc_per_node=8 pretrain.py "
                              + " ".join(ov)}
            if rc == 0:
                row.update(summarize(run_dir, mem_dir, args.skip))
            else:
                failed += 1
            results.append(row)
            print(f"[folding_run] {name}: rc {rc}, {row['wall_s']:.0f} s", flush=True)
            (out / "folding.json").write_text(json.dumps(results, indent=1))
    md = [f"| case | recipe | step s | tokens/s | MFU | peak alloc GiB per GPU (rank 0..7) |",
          "|---|---|---|---|---|---|"]
    for r in results:
        if r["rc"] != 0:
            md.append(f"| {r['case']} | {r['recipe']} | failed (rc {r['rc']}) | | | |")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        md.append(f"| {r['case']} | {r['recipe']} | {r['step_time_s']:.3f} | "
                  f"{r['tokens_per_s']:,.0f} | {mfu} | "
                  f"{' '.join(f'{m:.1f}' for m in r['peak_alloc_gib_per_rank'])} |")
    md.append(f"\n({PAPER_CONTEXT}; context only)")
    (out / "folding.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 1 if failed else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--rank-wrapper"]:  # under torchrun: --rank-wrapper MEM_DIR -- overrides...
        rank_wrapper(argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="planner + validator only (no GPU)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated from {list(CASES)}")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--steps", type=int, default=30, help="training steps per run")
    ap.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the medians")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    ap.add_argument("--out", default=None, help="output directory (runs)")
    args = ap.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    args.recipes = [r for r in args.recipes.split(",") if r]
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        ap.error(f"--cases: unknown {unknown}; known: {', '.join(CASES)}")
    if args.dry_run:
        dry_run(args.cases, args.recipes)
        return 0
    if not args.out:
        ap.error("--out DIR is needed for the runs")
    import torch

    if torch.cuda.device_count() < WORLD:
        print(f"[folding_run] needs {WORLD} CUDA GPUs, {torch.cuda.device_count()} visible; "
              "use --dry-run to check the configs without GPUs", file=sys.stderr)
        return 2
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
