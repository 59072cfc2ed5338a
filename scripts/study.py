"""Run arms of the convergence study (issue 15, docs/RESULTS.md "Convergence study") in time-boxed calls.

    python scripts/study.py --corpus debian_docs --arms bf16,nvfp4 --seeds 1,2 --time-limit 540 --pack $OUT/runs.tgz
    python scripts/study.py --list                      # the arms and their overrides
    python scripts/study.py --arms nvfp4 --dry          # print the commands only
    python scripts/study.py --recipe study_mini --parallel 8 --arms bf16,nvfp4    # side by side, one GPU

Each (corpus, arm, seed) is one ``pretrain.py +recipe=<--recipe>`` run (default study_30m;
``torchrun --standalone --nproc_per_node=N`` with ``--nproc N``) in ``ROOT/<corpus>/<arm>/seed_<s>``,
for the same token budget (``--tokens``, default the recipe's ``train.train_tokens``: study_30m
3.2e8 = 10.5 tokens per non-embedding parameter, study_mini 5.2e7 = 10.2). Runs are taken in order;
``--parallel N`` runs up to N at once, each its own process on the same GPU with its output in its
``sweep.log`` only, after the data caches are built once in this process (on one H200, 8 study_mini
runs fit in memory side by side, 17 did not). A finished run is skipped, an unfinished one resumes
from its newest checkpoint (``pretrain.py``'s own resume: bit-exact). At ``--time-limit`` seconds after the start the running
trainer gets SIGTERM: it finishes its step, saves a checkpoint and exits; the next call resumes
it. ``--pack FILE`` then writes every run's config, metrics, result and logs (no checkpoints, no
TensorBoard) into one .tgz for ``scripts/compare_runs.py``.

Same data order and initialisation for every arm of a seed (``train.seed`` sets both), validation
on held-out documents (``data.split=98,2,0`` over documents shuffled by ``scripts/build_corpus.py``;
for the default corpus, the last 2 % of the stdlib files in path order), no per-arm tuning.
"""

from __future__ import annotations

import argparse
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nvfp4_megatron.cli.compose import compose_config  # noqa: E402
from nvfp4_megatron.cli.sweep import (Job, job_status, launch_command, planned_iters,  # noqa: E402
                                      run_dir_override, run_job)

SWITCH_FRACTION = 0.8  # the BF16 switch arms: the last 20 % of the tokens in BF16

# arm -> overrides on top of +recipe=study_30m (every block quantized unless said otherwise)
ARMS: dict[str, list[str]] = {
    "bf16": ["precision.recipe=bf16"],
    "nvfp4": ["precision.recipe=nvfp4"],
    # the last ~15 % of the blocks in BF16: 1 of 6 (16.7 %)
    "nvfp4_last_bf16": ["precision.recipe=nvfp4", "precision.bf16_last_blocks=1"],
    "nvfp4_no_rht": ["precision.recipe=nvfp4_no_rht"],
    "nvfp4_no_sr": ["precision.recipe=nvfp4_no_sr"],
    "nvfp4_no_2d": ["precision.recipe=nvfp4_no_2d"],
    "mxfp4": ["precision.recipe=mxfp4"],
    "mxfp8": ["precision.recipe=mxfp8"],
    "fp8_cs": ["precision.recipe=fp8_cs"],
    "nvfp4_fwd_only": ["precision.recipe=nvfp4_fwd_only"],
    "nvfp4_bwd_only": ["precision.recipe=nvfp4_bwd_only"],
    "nvfp4_switch_all": ["precision.recipe=nvfp4", "precision.switch_to_bf16.scope=all"],
    "nvfp4_switch_fprop": ["precision.recipe=nvfp4", "precision.switch_to_bf16.scope=fprop"],
    # issue 18: Microsoft FP4 and its ablations
    "msfp4": ["precision.recipe=msfp4"],
    "msfp4_no_dge": ["precision.recipe=msfp4_no_dge"],
    "msfp4_no_occ": ["precision.recipe=msfp4_no_occ"],
    "fp4_direct": ["precision.recipe=fp4_direct"],
}
MAIN_ARMS = ("bf16", "nvfp4", "mxfp4")  # >= 2 seeds each

CORPORA = {
    "default": [],  # the stdlib sources, built on first use into data.cache_dir
    "debian_docs": ["data.data_path=[data/debian_docs/debian_docs]",
                    "data.tokenizer_model=data/debian_docs/debian_docs.tokenizer.json"],
}


def arm_overrides(arm: str, tokens: float) -> list[str]:
    ov = list(ARMS[arm])
    if arm.startswith("nvfp4_switch_"):
        ov.append(f"precision.switch_to_bf16.at_tokens={SWITCH_FRACTION * tokens:.6g}")
    return ov


def run_overrides(corpus: str, arm: str, seed: int, tokens: float, extra: list[str],
                  recipe: str = "study_30m") -> list[str]:
    return [f"+recipe={recipe}", *CORPORA[corpus], *arm_overrides(arm, tokens),
            f"train.seed={seed}", f"train.train_tokens={tokens:.6g}", *extra]


def pack(root: Path, out: Path) -> None:
    """Every run's small files (no checkpoints, no TensorBoard) into one .tgz."""
    out.parent.mkdir(parents=True, exist_ok=True)
    keep = {"config.yaml", "metrics.jsonl", "result.json", "precision_table.txt", "sweep.log",
            "loss.png"}
    with tarfile.open(out, "w:gz") as tar:
        for f in sorted(root.rglob("*")):
            if f.is_file() and (f.name in keep or f.parent.name == "configs"):
                tar.add(f, arcname=str(f.relative_to(root.parent)))
    print(f"[study] packed {root} -> {out} ({out.stat().st_size / 1e6:.2f} MB)", flush=True)


def prime_data(cfgs, log=print) -> None:
    """Build the default corpus and Megatron's index caches once, in this process, before runs
    start side by side: otherwise every run trains the same BPE tokenizer and writes the same
    cache files at the same time. The trainers then only read (``[data] reusing verified ...``)."""
    import tempfile

    import torch.distributed as dist

    from nvfp4_megatron.cli.compose import to_plain
    from nvfp4_megatron.training.loop import build_datasets

    seen = set()
    for cfg in cfgs:
        c = to_plain(cfg)
        key = repr((c["data"], c["model"]["vocab_size"], c["model"]["seq_length"],
                    c["train"]["seed"], c["train"]["global_batch_size"], c["train"]["eval_iters"],
                    planned_iters(cfg)))
        if key in seen:
            continue
        seen.add(key)
        if not dist.is_initialized():
            store = tempfile.mkdtemp(prefix="study_store_")
            dist.init_process_group("gloo", init_method=f"file://{store}/s", rank=0, world_size=1)
        t0 = time.time()
        build_datasets(c, rank0=True, iters=planned_iters(cfg), log=log)
        log(f"[study] data ready for seed {c['train']['seed']} ({time.time() - t0:.1f} s)")


def run_parallel(plans, *, nproc: int, parallel: int, deadline: float | None, log=print) -> int:
    """Up to ``parallel`` runs at once (each one ``pretrain.py`` process on the same GPU(s)); a
    run's output goes to its ``sweep.log``. At ``deadline`` every running trainer gets SIGTERM
    (it saves and exits; the next call resumes it) and no new run starts."""
    import os
    import signal
    import subprocess
    from datetime import datetime, timezone

    threads = max(1, (os.cpu_count() or 1) // parallel)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads))
    queue = list(plans)
    running: dict = {}
    rc, stopping = 0, False
    while queue or running:
        now = time.time()
        if deadline is not None and now >= deadline and not stopping:
            stopping = True
            for child, (job, *_rest) in running.items():
                child.send_signal(signal.SIGTERM)
                log(f"[study] {job.name}: time limit, SIGTERM sent (it saves and stops)")
        while queue and len(running) < parallel and not stopping and (
                deadline is None or now < deadline - 60):
            job, run_dir, iters = queue.pop(0)
            status = job_status(run_dir, iters)
            if status == "done":
                log(f"[study] {job.name}: finished earlier ({iters} steps), skipped")
                continue
            run_dir.mkdir(parents=True, exist_ok=True)
            cmd = [*launch_command(nproc), *job.overrides, run_dir_override(run_dir)]
            logf = open(run_dir / "sweep.log", "a", encoding="utf-8")
            logf.write(f"\n# {datetime.now(timezone.utc).isoformat()} {' '.join(cmd)}\n")
            logf.flush()
            child = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
            running[child] = (job, run_dir, iters, logf, time.time())
            log(f"[study] {job.name}: {'resuming' if status == 'partial' else 'starting'} "
                f"({iters} steps) in {run_dir}")
        if queue and (stopping or (deadline is not None and now >= deadline - 60)):
            for job, _d, _i in queue:
                log(f"[study] {job.name}: not started (time limit)")
            rc, queue = 1, []
        for child in [c for c in running if c.poll() is not None]:
            job, run_dir, iters, logf, t0 = running.pop(child)
            logf.close()
            after = job_status(run_dir, iters)
            log(f"[study] {job.name}: {after} (exit code {child.returncode}, "
                f"{time.time() - t0:.0f} s)")
            if after != "done":
                rc = 1
        time.sleep(0.5)
    return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", choices=sorted(CORPORA), default="default")
    ap.add_argument("--arms", default="bf16", help=f"comma-separated, from: {', '.join(ARMS)}")
    ap.add_argument("--seeds", default="1")
    ap.add_argument("--main-seeds", default=None,
                    help=f"seeds of the main arms ({', '.join(MAIN_ARMS)}) instead of --seeds")
    ap.add_argument("--tokens", type=float, default=None,
                    help="tokens per run (default: the recipe's train.train_tokens)")
    ap.add_argument("--root", type=Path, default=ROOT / "runs" / "study")
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--recipe", default="study_30m", help="the model recipe (recipes/<name>.yaml)")
    ap.add_argument("--parallel", type=int, default=1,
                    help="runs side by side (separate processes on the same GPU)")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds from now; the running trainer then saves and stops")
    ap.add_argument("--pack", type=Path, default=None, help="write the runs' small files here (.tgz)")
    ap.add_argument("--dry", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("extra", nargs="*", help="more overrides for every run (key=value)")
    args = ap.parse_args(argv)
    if args.tokens is None:
        args.tokens = float(compose_config([f"+recipe={args.recipe}"]).train.train_tokens)
    if args.list:
        for arm, ov in ARMS.items():
            print(f"{arm:<20} {' '.join(arm_overrides(arm, args.tokens))}")
        return 0
    deadline = None if args.time_limit is None else time.time() + args.time_limit
    arms = [a for a in args.arms.split(",") if a]
    bad = [a for a in arms if a not in ARMS]
    if bad:
        raise SystemExit(f"error: unknown arm(s) {bad}; known: {list(ARMS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    main_seeds = seeds if args.main_seeds is None else [int(s) for s in args.main_seeds.split(",") if s]
    plans = []
    for arm in arms:
        for seed in (main_seeds if arm in MAIN_ARMS else seeds):
            run_dir = args.root / args.corpus / arm / f"seed_{seed}"
            ov = run_overrides(args.corpus, arm, seed, args.tokens, args.extra, args.recipe)
            cfg = compose_config([*ov, run_dir_override(run_dir)])  # every run checked first
            plans.append((Job(name=f"{arm}/seed_{seed}", overrides=tuple(ov)), run_dir,
                          planned_iters(cfg), cfg))
    if args.parallel > 1 and not args.dry:
        prime_data([p[3] for p in plans])
        rc = run_parallel([p[:3] for p in plans], nproc=args.nproc, parallel=args.parallel,
                          deadline=deadline, log=lambda s: print(s, flush=True))
        if args.pack is not None:
            pack(args.root / args.corpus, args.pack)
        return rc
    rc = 0
    for job, run_dir, iters, _cfg in plans:
        cmd = " ".join([*launch_command(args.nproc), *job.overrides, run_dir_override(run_dir)])
        status = job_status(run_dir, iters)
        if args.dry:
            print(f"[{status}] {cmd}")
            continue
        if status == "done":
            print(f"[study] {job.name}: finished earlier ({iters} steps), skipped", flush=True)
            continue
        if deadline is not None and time.time() >= deadline - 60:
            print(f"[study] {job.name}: not started (time limit)", flush=True)
            rc = 1
            continue
        print(f"[study] {job.name}: {'resuming' if status == 'partial' else 'starting'} "
              f"({iters} steps) in {run_dir}", flush=True)
        code = run_job(job, run_dir, args.nproc, deadline=deadline)
        after = job_status(run_dir, iters)
        print(f"[study] {job.name}: {after} (exit code {code})", flush=True)
        if after != "done":
            rc = 1
    if args.pack is not None and not args.dry:
        pack(args.root / args.corpus, args.pack)
    return rc


if __name__ == "__main__":
    sys.exit(main())
