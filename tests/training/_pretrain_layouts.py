"""``torchrun pretrain.py`` at 2-process layouts against its 1-process run (issue 20).

The harness of ``tests/gpu/test_multigpu_pretrain.py`` (NCCL, marker ``multigpu``) and
``tests/training/test_pretrain_layouts.py`` (gloo, CPU). Where ``scripts/multigpu_check.py``
builds its own loop around the training stack, here every run is the product: ``torch.distributed
.run --standalone --nproc_per_node=N pretrain.py <overrides>``, and the losses come from the run's
``metrics.jsonl``. The bounds are multigpu_check's (``BOUNDS``, ``bound_for``, ``within``), as are
the model sizes per device (``SIZES``) and the NVLink-multicast-off environment.

Runs (``recipe`` is one of ``RECIPES``; every run FP32 parameters, ``train.bf16=false``, Adam at a
constant lr of 1e-4 without weight decay or clipping, no MoE auxiliary loss, ``precision.backend=
emulated``, all blocks quantized, ``train.ckpt_optim_format=fully_reshardable``, a checkpoint at
step ``SAVE_AT``):

``ref``       1 process, the dense model (multigpu_check's size, RoPE, GQA, GELU).
``tp2sp``     TP2 + sequence parallel, from its own initialisation (Megatron's CPU initialisation,
              ``model.use_cpu_initialization=true``, draws each weight whole and then shards it,
              so TP2 starts from ``ref``'s weights); every step against ``ref``, bound "tp".
``cp2``       CP2, likewise, bound "cp".
``pp2``       PP2: each stage draws its layers' weights in its own build order, so it starts from
              ``ref``'s checkpoint at ``SAVE_AT`` (``train.load``, resharded by dist_checkpointing)
              and steps ``SAVE_AT+1..`` are compared with ``ref``'s, bound "pp".
``ep2etp1``   the tiny Mixtral (``+recipe=mixtral_tiny_folding`` with the layout set to EP2 x ETP1,
              attention DP2) from ``ref_moe``'s checkpoint (each EP rank draws only its experts),
              against ``ref_moe`` (1 process, EP1), bound "ep" of the recipe.
              Not loadable today (EP_CHECKPOINT_GAP): the check fails until it is.
``tp1_from_tp2``  1 process loading ``tp2sp``'s checkpoint at ``SAVE_AT``: its steps against
              ``tp2sp``'s, bound "ckpt" (the first resumed step: "ckpt_first").

The first compared step runs the same weights forward in both runs, so it must be within
``STEP0_FRACTION`` of the bound (multigpu_check's step-0 rule). ``nvfp4`` (stochastic rounding on
the gradients): its SR seeds hash the rank (``quant/state.py``), so another layout draws other
roundings and only the first compared step (forward only, no SR) is held to the rule; the rest
must be finite. Every run also checks the ``[run]`` line names the layout it asked for.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from _train_launch import ROOT, command, env as base_env

_spec = importlib.util.spec_from_file_location("multigpu_check",
                                               ROOT / "scripts" / "multigpu_check.py")
MGC = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(MGC)

RECIPES = ("bf16", "fp8_cs", "nvfp4_no_sr", "nvfp4")
SR_RECIPES = {"nvfp4"}  # SR draws keyed by rank: only the first compared step is held to a bound
STEPS = {"cuda": 8, "cpu": 3}
SAVE_AT = 1  # the checkpoint the PP/EP runs start from and the TP1 resume loads
MOE_LAYOUT_ONE = ["parallel.tensor_model_parallel_size=1",
                  "parallel.pipeline_model_parallel_size=1",
                  "parallel.context_parallel_size=1", "parallel.expert_model_parallel_size=1",
                  "parallel.expert_tensor_parallel_size=1", "parallel.sequence_parallel=false"]


# Seen 2026-12-03 (CPU, gloo): a fully_reshardable checkpoint saved at EP1 does not load at EP2.
# At EP1 Megatron puts the experts into the dense optimizer (one optimizer: keys
# "optimizer.state.exp_avg.<param>"); at EP2 it chains a dense and an expert optimizer and prefixes
# their keys "chained_0." / "chained_1." (ChainedOptimizer.sharded_state_dict adds the prefix
# unless the metadata sets chained_optim_avoid_prefix, which training/checkpoint.py does not), so
# dist_checkpointing stops with KeyError "chained_0.optimizer.state.param.decoder.final_layernorm
# .weight from model not in state dict". Without the checkpoint the EP2 run cannot start from EP1's
# weights (Megatron draws each rank's local experts in its own build order: a fresh EP2 run's step-1
# loss differed from EP1's by 7e-4 relative with bf16, 70x the step-0 bound).
EP_CHECKPOINT_GAP = ("a fully_reshardable checkpoint saved at EP1 does not load at EP2 (Megatron's "
                     "ChainedOptimizer key prefix 'chained_0.'): _pretrain_layouts.py")


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    nproc: int
    layout: tuple[str, ...] = ()
    moe: bool = False
    load_from: str | None = None  # the run whose SAVE_AT checkpoint this one starts from
    expect: str = "TP1 PP1 CP1 DP1"  # the loop's [run] line


RUNS = {r.name: r for r in (
    Run("ref", 1),
    Run("tp2sp", 2, ("parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"),
        expect="TP2 PP1 CP1 DP1"),
    Run("cp2", 2, ("parallel.context_parallel_size=2",), expect="TP1 PP1 CP2 DP1"),
    Run("pp2", 2, ("parallel.pipeline_model_parallel_size=2",), load_from="ref",
        expect="TP1 PP2 CP1 DP1"),
    Run("ref_moe", 1, tuple(MOE_LAYOUT_ONE), moe=True),
    Run("ep2etp1", 2, tuple(MOE_LAYOUT_ONE[:3]) + ("parallel.expert_model_parallel_size=2",
                                                   "parallel.expert_tensor_parallel_size=1",
                                                   "parallel.sequence_parallel=false"),
        moe=True, load_from="ref_moe", expect="TP1 PP1 CP1 DP2"),
    Run("tp1_from_tp2", 1, load_from="tp2sp"),
)}


@dataclasses.dataclass(frozen=True)
class Check:
    name: str  # also the run that is checked
    ref: str
    group: str  # multigpu_check's bound group


CHECKS = {c.name: c for c in (
    Check("tp2sp", "ref", "tp"), Check("cp2", "ref", "cp"), Check("pp2", "ref", "pp"),
    Check("ep2etp1", "ref_moe", "ep"), Check("tp1_from_tp2", "tp2sp", "ckpt"))}


def dense_overrides(device: str) -> list[str]:
    sz = MGC.SIZES[device]
    return ["+recipe=bf16_tiny", f"model.num_layers={sz['layers']}",
            f"model.hidden_size={sz['hidden']}", f"model.ffn_hidden_size={sz['ffn']}",
            f"model.num_attention_heads={sz['heads']}", f"model.num_query_groups={sz['groups']}",
            f"model.seq_length={sz['seq']}",  # vocab: the tokenizer's 512, not SIZES' synthetic one
            f"train.micro_batch_size={sz['mbs']}",
            f"train.global_batch_size={sz['mbs'] * MGC.NUM_MICROBATCHES}"]


def common_overrides(recipe: str, steps: int) -> list[str]:
    return ["model.use_cpu_initialization=true", "model.moe_aux_loss_coeff=0.0",
            f"precision.recipe={recipe}", "precision.backend=emulated",
            "precision.bf16_first_blocks=0", "precision.bf16_last_blocks=0",
            "train.bf16=false", "train.lr=1e-4", "train.min_lr=1e-4",
            "train.lr_schedule=constant",
            "train.warmup_iters=0", "train.weight_decay=0.0", "train.clip_grad=0.0",
            "train.adam_beta1=0.9", "train.adam_beta2=0.999", f"train.train_iters={steps}",
            "train.eval_interval=0", "train.eval_iters=1", "train.log_interval=1",
            f"train.save_interval={SAVE_AT}", f"train.keep_last={steps + 1}",
            "train.ckpt_optim_format=fully_reshardable",
            "logging.plot=false", "logging.tensorboard=false"]


def launch_env(device: str) -> dict:
    e = {**base_env(), **MGC.NO_MULTICAST_ENV, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), e.get("PYTHONPATH")]))
    if device == "cpu":
        e["CUDA_VISIBLE_DEVICES"] = ""
    else:  # Megatron's advice for sequence parallelism: keep kernel launches in order
        e.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    return e


class Runner:
    """Launches each (recipe, run) once, on demand (references first), and keeps the results."""

    def __init__(self, work: Path, cache: Path, device: str, *, steps: int | None = None,
                 timeout: int = 600):
        self.work, self.cache, self.device = Path(work), Path(cache), device
        self.steps = steps or STEPS[device]
        self.timeout = timeout
        self.results: dict[tuple[str, str], dict] = {}

    def run_dir(self, recipe: str, name: str) -> Path:
        return self.work / recipe / name

    def overrides(self, recipe: str, name: str) -> list[str]:
        r = RUNS[name]
        base = ["+recipe=mixtral_tiny_folding"] if r.moe else dense_overrides(self.device)
        ov = base + common_overrides(recipe, self.steps) + list(r.layout)
        if r.moe:  # the recipe's batch: 8 micro-batches of 1 x 64 tokens on one process
            ov.append("train.global_batch_size=8")
        if r.load_from:
            ov.append(f"train.load={self.checkpoint(recipe, r.load_from)}")
        return ov

    def checkpoint(self, recipe: str, name: str) -> Path:
        self.get(recipe, name)
        return self.run_dir(recipe, name) / "checkpoints" / f"step_{SAVE_AT:07d}"

    def get(self, recipe: str, name: str) -> dict:
        key = (recipe, name)
        if key not in self.results:
            self.results[key] = self._launch(recipe, name)
        return self.results[key]

    def _launch(self, recipe: str, name: str) -> dict:
        r = RUNS[name]
        ov = self.overrides(recipe, name)  # launches the run it loads from first
        run_dir = self.run_dir(recipe, name)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        cmd = command(run_dir, self.cache, ov, nproc=r.nproc)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout,
                              env=launch_env(self.device), cwd=str(run_dir.parent))
        wall = time.perf_counter() - t0
        out = proc.stdout + proc.stderr
        res = {"recipe": recipe, "name": name, "nproc": r.nproc, "rc": proc.returncode,
               "wall_s": wall, "cmd": " ".join(cmd[3:]),
               # the workers' own error (stderr's head), not only torchrun's report (its tail)
               "tail": proc.stdout[-2000:] + proc.stderr[:2000] + "\n...\n" + proc.stderr[-1000:]}
        if proc.returncode != 0:
            return res
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train = [x for x in rows if x["kind"] == "train"]
        res["losses"] = {x["step"]: x["loss"] for x in train}
        res["layout_ok"] = any(line.startswith("[run]") and line.endswith(f"| {r.expect}")
                               for line in out.splitlines())
        res["resumed_ok"] = (not r.load_from) or f"at step {SAVE_AT}" in out
        steady = train[1:] or train  # the first step includes warm-up
        med = sorted(x["step_time_s"] for x in steady)[len(steady) // 2]
        sz = MGC.SIZES[self.device]
        tokens = 8 * 64 if r.moe else sz["mbs"] * MGC.NUM_MICROBATCHES * sz["seq"]
        mfu = sorted(x["mfu"] for x in steady if x.get("mfu") is not None)
        res.update(step_time_s=med, tokens_per_s=tokens / med,
                   mfu=mfu[len(mfu) // 2] if mfu else None,
                   peak_mem_gib_rank0=train[-1].get("peak_mem_gib") if train else None)
        return res

    def evaluate(self, recipe: str, check: str) -> dict:
        """One comparison: the check's run against its reference, over the steps both logged."""
        c = CHECKS[check]
        got, ref = self.get(recipe, c.name), self.get(recipe, c.ref)
        row = {"recipe": recipe, "check": check, "ref": c.ref, "group": c.group}
        for r in (ref, got):
            if r["rc"] != 0:
                return {**row, "ok": False, "detail": f"{r['name']} exited {r['rc']}:\n{r['tail']}"}
        first = SAVE_AT + 1 if RUNS[c.name].load_from else 1
        steps = list(range(first, self.steps + 1))
        if sorted(got["losses"]) != steps:
            return {**row, "ok": False, "detail": f"{c.name} logged steps {sorted(got['losses'])}"
                                                  f", expected {steps}"}
        a = [ref["losses"][s] for s in steps]
        b = [got["losses"][s] for s in steps]
        bound = MGC.bound_for(c.group, recipe)
        first_bound = MGC.BOUNDS["ckpt_first"] if c.group == "ckpt" else None
        rel, rel0, ok = MGC.within(a, b, bound, first_bound)
        if recipe in SR_RECIPES:  # only the forward-only first step is layout-independent
            ok = rel0 < (first_bound or MGC.STEP0_FRACTION * bound) and all(map(math.isfinite, b))
        structural = got["layout_ok"] and got["resumed_ok"]
        return {**row, "ok": ok and structural, "rel": rel, "rel_first": rel0, "bound": bound,
                "steps": steps, "ref_losses": a, "losses": b, "trajectory_checked":
                recipe not in SR_RECIPES, "layout_ok": got["layout_ok"],
                "resumed_ok": got["resumed_ok"],
                "step_time_s": got["step_time_s"], "ref_step_time_s": ref["step_time_s"],
                "tokens_per_s": got["tokens_per_s"], "ref_tokens_per_s": ref["tokens_per_s"],
                "mfu": got["mfu"], "peak_mem_gib_rank0": got["peak_mem_gib_rank0"],
                "detail": ""}


def describe(row: dict) -> str:
    if "rel" not in row:
        return f"{row['recipe']:12} {row['check']:13} FAIL {row['detail'][-2000:]}"
    return (f"{row['recipe']:12} {row['check']:13} vs {row['ref']:8} max rel {row['rel']:.2e} "
            f"first {row['rel_first']:.2e} bound {row['bound']:.0e} "
            f"{'PASS' if row['ok'] else 'FAIL'} (trajectory "
            f"{'checked' if row['trajectory_checked'] else 'not claimed: SR'}; "
            f"layout line {row['layout_ok']}, resumed {row['resumed_ok']}); "
            f"step {row['step_time_s']:.3f} s vs {row['ref_step_time_s']:.3f} s")


def append_summary(row: dict) -> None:
    """``NVFP4_MULTIGPU_SUMMARY=path.jsonl`` keeps one line per check (for docs/RESULTS.md)."""
    path = os.environ.get("NVFP4_MULTIGPU_SUMMARY")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({k: v for k, v in row.items() if k != "detail"} |
                               {"detail": row.get("detail", "")[-1500:]}) + "\n")
