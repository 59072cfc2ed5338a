"""Multi-GPU correctness check (issue 7): 2 processes, each parallel dimension against its reference.

Usage::

    python scripts/multigpu_check.py                 # 2 GPUs (NCCL), 20 steps, the GPU model size
    python scripts/multigpu_check.py --device cpu    # 2 gloo processes, small model, few steps
    python scripts/multigpu_check.py --only tp,cp --steps 5 --out /tmp/mgc
    python scripts/multigpu_check.py --lr 3e-3 --floor   # the chaotic regime, with noise floors

The launcher starts ``torch.distributed.run --nproc_per_node=2`` on this file with NVLink multicast
off (``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``, ``NVSHMEM_DISABLE_NVLS=1``; the
lent H200 hosts require it), waits, prints the table and exits non-zero if any check failed. Rank 0
writes ``OUT/results.json``.

Every reference ("TP1", "CP1", "PP1", "EP1") runs inside the same 2-process world as data-parallel
2 with the *same* micro-batches on both ranks (except the MoE pair, below): the DP average of two
equal gradients is the single-device gradient, so the reference is exactly a 1-GPU run and one
launch covers every comparison. Checks (``--only`` picks groups):

``tp``   TP2 + sequence parallel vs TP1 for ``nvfp4_no_sr``, ``mxfp8``, ``fp8_cs`` (no BF16
         blocks), and ``bf16`` as the unquantized baseline: per-step loss within 1e-3 relative.
         At step 0 every quantized operand's global
         amax (NVFP4 / FP8 per-tensor scale source) is recorded on both ranks and asserted
         bit-identical, and at least one operand must have had *different* local amaxes on the two
         ranks (otherwise nothing sharded was checked).
``cp``   CP2 vs CP1 for ``bf16`` and ``nvfp4_no_sr`` (RoPE; load-balanced chunks, our CP attention),
         within 1e-3 (the per-tensor amax of non-expert layers is reduced over TP x CP, so CP2
         uses CP1's scales).
``pp``   PP2 vs PP1 for ``nvfp4_no_sr`` with BF16 blocks {1, 2} (the two blocks either side of the
         stage boundary): both stages report BF16 blocks [1, 2], stage 0 quantizes only block 0
         and stage 1 only block 3, and the losses match within 1e-3.
``moe``  4 experts top-2 with EP2/ETP1 vs EP1 (attention DP2 in both, different data per DP rank,
         alltoall dispatcher), ``bf16`` within 1e-5 and ``nvfp4_no_sr`` within 1e-2: with EP2 an
         expert's GEMMs see both ranks' tokens at once, so its per-tensor amax (hence its NVFP4
         scales and 16-token Wgrad blocks) differ from EP1's per-rank GEMMs; the loss agrees at the
         quantization-noise level, not bit for bit.
``ckpt`` ``nvfp4_no_sr`` at TP2 + SP for ``steps`` steps, saved half way through; a TP1 model
         loads that checkpoint and trains the second half: losses match the TP2 run within 1e-3
         (the first resumed step, within 1e-4, checks the weights; the next ones the Adam moments
         and step count). Twice: ``ckpt`` saves model + Adam state of the non-distributed
         optimizer with plain ``megatron.core.dist_checkpointing``; ``ckptdo`` uses the training
         stack's ``nvfp4_megatron.training.checkpoint`` with the distributed optimizer and the
         ``fully_reshardable`` optimizer format (``dp_reshardable``, the default, refuses a
         different TP: tests/training/test_checkpoint_reshard.py).

Verdict. A check passes when the largest per-step relative loss difference is below its bound and
the step-0 difference (same weights, forward only) below a tenth of it. With ``--floor`` (default
on GPUs) each reference also runs from weights multiplied by ``1 ± 2^-21`` (4 to 8 FP32 ulps):
the "floor" column is how far that moves the reference, a stand-in for how far a last-bit
difference such as another summation order moves it. Quantized training amplifies such
differences (a code on a rounding boundary flips): at ``--lr 3e-3`` the floor of every quantized
recipe is 4e-2 to 2e-1 on this tiny model (RESULTS.md), so the default ``--lr`` is 1e-4, where
the floors sit below the bounds. A miss whose floor is at or
above the bound is reported ``NOISY`` (inconclusive, not a pass).

Every run builds its model, DDP wrapper and optimizer with ``training.model.build_training_stack``
(what ``pretrain.py`` trains) on a config composed from the run's shape, layout and recipe; only
the data, the loss bookkeeping and the checks are this script's.

Every run reports the median step time (steps after the first) and tokens/s (distinct tokens per
second of the job; the DP-duplicated references process each token twice, so their tokens/s is the
one-GPU figure). Parameters, gradients and optimizer states are FP32 (as in the CPU tests), so
the comparisons isolate sharding and scale reduction from BF16 rounding; the quantized GEMMs run
the project's emulation (Hopper has no FP4 GEMM; DESIGN.md "Hardware facts").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                    "NVSHMEM_DISABLE_NVLS": "1"}
GROUPS = ("tp", "cp", "pp", "moe", "ckpt")
TP_RECIPES = ("nvfp4_no_sr", "mxfp8", "fp8_cs", "bf16")  # bf16: the unquantized baseline
NO_BF16 = {"bf16_first_blocks": 0, "bf16_last_blocks": 0}
SIZES = {  # model and batch per device kind
    "cuda": dict(hidden=256, ffn=1024, heads=8, groups=4, layers=4, seq=256, mbs=4, vocab=512),
    "cpu": dict(hidden=64, ffn=128, heads=4, groups=2, layers=4, seq=64, mbs=2, vocab=256),
}
NUM_MICROBATCHES = 2
# The bounds of every check, in one place (tests/training/_pretrain_layouts.py measures the same
# layouts through pretrain.py against these): the largest per-step relative loss difference; the
# first compared step (same weights, forward only) must also be below STEP0_FRACTION of it, except
# for a resumed checkpoint, whose first step has its own bound ("ckpt_first").
BOUNDS = {"tp": 1e-3, "cp": 1e-3, "pp": 1e-3, "ep_bf16": 1e-5, "ep_quantized": 1e-2,
          "ckpt": 1e-3, "ckpt_first": 1e-4}
STEP0_FRACTION = 0.1


def bound_for(group: str, recipe: str) -> float:
    """The loss bound of check group ``group`` (tp, cp, pp, ep, ckpt) for ``recipe``. EP: an
    expert's GEMMs see the tokens of every EP rank at once, so with a quantized recipe its
    per-tensor amax (hence its scales) differ from EP1's: quantization noise, not summation
    order."""
    if group == "ep":
        return BOUNDS["ep_bf16" if recipe == "bf16" else "ep_quantized"]
    return BOUNDS[group]


def within(ref: list[float], got: list[float], bound: float,
           first_bound: float | None = None) -> tuple[float, float, bool]:
    """(max relative difference, first-step relative difference, pass): every step below
    ``bound`` and the first one below ``first_bound`` (default ``STEP0_FRACTION * bound``)."""
    rel, rel0 = _rel(ref, got), _rel(ref[:1], got[:1])
    first = STEP0_FRACTION * bound if first_bound is None else first_bound
    return rel, rel0, rel < bound and rel0 < first


# ----------------------------------------------------------------------------------- worker side

def _batch(step: int, mb: int, stream: int, sz: dict) -> dict:
    """A learnable stream: each row is an arithmetic progression mod vocab (seeded by step/mb)."""
    g = torch.Generator().manual_seed(100_003 * step + 101 * mb + stream)
    start = torch.randint(0, sz["vocab"], (sz["mbs"], 1), generator=g)
    stride = torch.randint(1, 8, (sz["mbs"], 1), generator=g)
    x = (start + stride * torch.arange(sz["seq"] + 1)) % sz["vocab"]
    return {"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": torch.ones(sz["mbs"], sz["seq"]),
            "position_ids": torch.arange(sz["seq"]).expand(sz["mbs"], sz["seq"])}


class AmaxRecorder:
    """Wraps ``quant.linear.quantize_operand`` to record (layer, role) -> global / local amax."""

    def __init__(self):
        from nvfp4_megatron.quant import linear as qlinear

        self.qlinear = qlinear
        self.orig = qlinear.quantize_operand
        self.records: dict[str, dict] = {}
        self.active = False

        def wrapped(x2d, tq, *, layer_key="", role="", amax_group=None, **kw):
            out = self.orig(x2d, tq, layer_key=layer_key, role=role, amax_group=amax_group, **kw)
            if self.active and tq.format in ("nvfp4", "fp8"):
                key = f"{layer_key}|{role}"
                rec = {"global": float(out.q.amax)}
                if not tq.rht:  # the local amax of an RHT copy is post-transform: not comparable
                    rec["local"] = float(x2d.detach().abs().amax())
                self.records[key] = rec
            return out

        qlinear.quantize_operand = wrapped

    def remove(self):
        self.qlinear.quantize_operand = self.orig


def _save_plain(path: str, model, opt, step: int) -> None:
    """Model (+ Adam state) as dist_checkpointing ShardedTensors, reshardable over TP/PP/EP:
    with the non-distributed optimizer each Adam moment is sharded exactly like its parameter."""
    from megatron.core import dist_checkpointing

    model_sd = model.sharded_state_dict()
    state = {"model": model_sd, "step": step}
    if opt is not None:
        state["optimizer"] = opt.sharded_state_dict(model_sd)
    if torch.distributed.get_rank() == 0:
        Path(path).mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(state, path)
    torch.distributed.barrier()


def _load_plain(path: str, model, opt) -> dict:
    from megatron.core import dist_checkpointing

    with torch.no_grad():
        model_sd = model.sharded_state_dict()
        state = {"model": model_sd, "step": None}
        if opt is not None:
            state["optimizer"] = opt.sharded_state_dict(model_sd, is_loading=True)
        loaded = dist_checkpointing.load(state, path)
        model.load_state_dict(loaded["model"])
        if opt is not None:
            opt.load_state_dict(loaded["optimizer"])
    return {"step": loaded["step"]}


def _jitter(model, eps: float) -> None:
    """Multiply every weight by ``1 ± eps`` (a few FP32 ulps; the same draw on every rank): the
    noise-floor control. How far a run moves from its unperturbed twin under this perturbation
    stands in for how far a last-bit difference (another summation order) can move it, so a
    layout's difference is read against it."""
    with torch.no_grad():
        for i, (_, p) in enumerate(sorted(model.named_parameters())):
            g = torch.Generator().manual_seed(4242 + i)
            sign = torch.randint(0, 2, p.shape, generator=g).to(p.device, p.dtype) * 2 - 1
            p.mul_(1 + eps * sign)


def _ov(key: str, value) -> str:
    """One Hydra override, ``key=value`` with YAML spellings (true/false/null, [a,b])."""
    if isinstance(value, bool):
        value = str(value).lower()
    elif value is None:
        value = "null"
    elif isinstance(value, (list, tuple)):
        value = "[" + ",".join(str(v) for v in value) + "]"
    return f"{key}={value}"


def _compose(run: dict, sz: dict) -> dict:
    """The run's model, layout, recipe and optimizer as ``pretrain.py``'s composed config.

    FP32 parameters (``train.bf16=false``), the project's emulated GEMMs (``precision.backend=
    emulated``, also where Transformer Engine could run a recipe: the amax checks observe the
    emulation's quantizers), constant-lr Adam without weight decay or clipping, no MoE auxiliary
    loss, and CPU initialisation on every device: each weight is drawn whole on the CPU and then
    sharded, so TP2 starts from TP1's weights and the data-parallel replicas from the same ones.
    The optimizer is the training stack's distributed one except for the ``ckpt`` pair
    (``dist_opt: False``: Megatron's non-distributed optimizer, saved with plain
    dist_checkpointing)."""
    from nvfp4_megatron.cli.compose import compose_config, to_plain

    lay, moe = run["layout"], run.get("moe", False)
    ov = [_ov("model.num_layers", 2 if moe else sz["layers"]),
          _ov("model.hidden_size", sz["hidden"]), _ov("model.num_attention_heads", sz["heads"]),
          _ov("model.num_query_groups", sz["groups"]),
          _ov("model.ffn_hidden_size", sz["ffn"]), "model.normalization=RMSNorm",
          "model.activation=gelu", _ov("model.vocab_size", sz["vocab"]),
          _ov("model.seq_length", sz["seq"]), "model.position_embedding_type=rope",
          "model.add_bias_linear=false", "model.use_cpu_initialization=true",
          _ov("parallel.tensor_model_parallel_size", lay.get("tp", 1)),
          _ov("parallel.pipeline_model_parallel_size", lay.get("pp", 1)),
          _ov("parallel.context_parallel_size", lay.get("cp", 1)),
          _ov("parallel.expert_model_parallel_size", lay.get("ep", 1)),
          _ov("parallel.expert_tensor_parallel_size", lay.get("etp")),
          _ov("parallel.sequence_parallel", lay.get("sp", False)),
          "parallel.moe_token_dispatcher_type=alltoall",
          _ov("precision.recipe", run["recipe"]), "precision.backend=emulated",
          *[_ov(f"precision.{k}", v) for k, v in run.get("overrides", {}).items()],
          _ov("train.lr", run["lr"]), "train.weight_decay=0.0", "train.clip_grad=0.0",
          "train.adam_beta1=0.9", "train.adam_beta2=0.999", "train.bf16=false",
          _ov("train.use_distributed_optimizer", run.get("dist_opt", True)),
          "train.save=false"]  # the training loop's own checkpointing is not used here
    if moe:
        ov += ["model.num_moe_experts=4", "model.moe_router_topk=2",
               _ov("model.moe_ffn_hidden_size", sz["ffn"] // 2), "model.moe_aux_loss_coeff=0.0"]
    return to_plain(compose_config(ov))


def _train(run: dict, sz: dict, device: torch.device, out_dir: Path) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nvfp4_megatron.mcore.context_parallel import cp_reduce_loss, get_batch_on_this_cp_rank
    from nvfp4_megatron.quant import linear as qlinear
    from nvfp4_megatron.quant import state as qstate
    from nvfp4_megatron.training.model import build_training_stack

    lay = run["layout"]
    # use_cpu_initialization draws from the CPU default generator, which Megatron's seed call
    # leaves alone on a GPU: without this, DP replicas (and runs) start from different weights.
    torch.manual_seed(1234)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    qstate.reset_state()
    # model (moved to this rank's GPU after its CPU initialisation), precision policy, DDP and
    # optimizer: what pretrain.py builds
    stack = build_training_stack(_compose(run, sz), log=lambda msg: None)
    model, ddp, opt, table = stack.model, stack.ddp, stack.optimizer, stack.table
    dist_opt = run.get("dist_opt", True)
    meta = {"model": {"check": "multigpu_check", **sz}, "world_size":
            torch.distributed.get_world_size(),
            "parallel": {"tensor_model_parallel_size": lay.get("tp", 1),
                         "pipeline_model_parallel_size": lay.get("pp", 1),
                         "expert_model_parallel_size": lay.get("ep", 1),
                         "expert_tensor_parallel_size": lay.get("etp") or lay.get("tp", 1)}}
    # PP and EP change which rank initialises which layer/expert (Megatron seeds per rank), so
    # those comparisons start the parallel run from the reference run's initial weights,
    # resharded by dist_checkpointing.
    if run.get("save_init"):
        _save_plain(run["save_init"], model, None, 0)
    if run.get("load_init"):
        _load_plain(run["load_init"], model, None)
    if run.get("jitter"):
        _jitter(model, run["jitter"])
    first_step = 0
    if run.get("load"):
        if dist_opt:  # the training stack's checkpoint module (distributed optimizer)
            from nvfp4_megatron.training.checkpoint import latest_checkpoint, load_checkpoint

            ckpt = latest_checkpoint(Path(run["load"]) / "checkpoints")
            if ckpt is None:
                raise RuntimeError(f"{run['name']}: no checkpoint under {run['load']}")
            state = load_checkpoint(ckpt, ddp_model=ddp, optimizer=opt, meta=meta)
        else:
            state = _load_plain(run["load"], model, opt)
        first_step = int(state["step"])
    cp_group = ps.get_context_parallel_group()
    cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    stream = ps.get_data_parallel_rank() if run.get("data") == "per_rank" else 0

    def forward_step(data_iterator, model):
        b = {k: v.to(device) for k, v in next(data_iterator).items()}
        out = model(b["tokens"], b["position_ids"], None, labels=b["labels"])

        def loss_func(output):
            mask = b["loss_mask"].float()
            loss_sum = (output.float() * mask).sum()
            num = mask.sum().to(torch.int)
            return loss_sum, num, {"lm loss": cp_reduce_loss(loss_sum, num, cp_group)}

        return out, loss_func

    calls: dict[str, int] = {}
    remove_obs = qlinear.add_quantize_observer(
        lambda key, role, tq: calls.__setitem__(f"{key}|{role}", calls.get(f"{key}|{role}", 0) + 1))
    recorder = AmaxRecorder() if run.get("record_amax") else None
    fb = get_forward_backward_func()
    losses, times = [], []
    last = first_step + run["steps"]
    for step in range(first_step, last):
        qstate.set_step(step)
        mbs = [get_batch_on_this_cp_rank(_batch(step, i, stream, sz), cp_size=cp, cp_rank=cp_rank)
               for i in range(NUM_MICROBATCHES)]
        if recorder is not None:
            recorder.active = step == first_step
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        ddp.zero_grad_buffer()
        opt.zero_grad()
        res = fb(forward_step_func=forward_step, data_iterator=iter(mbs), model=[ddp],
                 num_microbatches=NUM_MICROBATCHES, seq_length=sz["seq"],
                 micro_batch_size=sz["mbs"], forward_only=False)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if step == first_step:
            remove_obs()
        if ps.is_pipeline_last_stage():
            losses.append(sum(float(r["lm loss"]) for r in res) / len(res))
        if run.get("save_at") == step + 1:
            if dist_opt:
                from nvfp4_megatron.training.checkpoint import save_checkpoint

                save_checkpoint(run_dir=run["save_dir"], step=step + 1, ddp_model=ddp,
                                optimizer=opt, train_state={"step": step + 1}, meta=meta,
                                keep_last=1, optim_format="fully_reshardable")
            else:
                _save_plain(run["save_dir"], model, opt, step + 1)
    if recorder is not None:
        recorder.remove()
    return {"losses": losses, "times": times, "calls": calls,
            "bf16_blocks": list(table.bf16_blocks), "quantized_blocks":
            list(table.quantized_blocks()), "amax": recorder.records if recorder else None,
            "last_stage": ps.is_pipeline_last_stage(), "first_step": first_step,
            "tokens_per_step": NUM_MICROBATCHES * sz["mbs"] * sz["seq"] * (
                ps.get_data_parallel_world_size() if run.get("data") == "per_rank" else 1)}


JITTER = 2.0 ** -21  # relative weight perturbation of the noise-floor runs (4 to 8 FP32 ulps)
REFERENCES = ("tp1_", "cp1_", "pp1_", "ep1_")


def _runs(groups: list[str], steps: int, tmp: Path, *,
          lr: float = 1e-4, floor: bool = False) -> list[dict]:
    same = {"data": "same"}
    runs = []
    if "tp" in groups:
        for r in TP_RECIPES:
            ov = {} if r == "mxfp8" else NO_BF16
            runs += [{"name": f"tp1_{r}", "layout": {}, "recipe": r, "overrides": ov, **same},
                     {"name": f"tp2sp_{r}", "layout": {"tp": 2, "sp": True}, "recipe": r,
                      "overrides": ov, "record_amax": True, **same}]
    if "cp" in groups:
        for r in ("bf16", "nvfp4_no_sr"):
            runs += [{"name": f"cp1_{r}", "layout": {}, "recipe": r, "overrides": NO_BF16, **same},
                     {"name": f"cp2_{r}", "layout": {"cp": 2}, "recipe": r, "overrides": NO_BF16,
                      **same}]
    if "pp" in groups:
        ov = {**NO_BF16, "bf16_blocks": [1, 2]}
        init = str(tmp / "init_pp")
        runs += [{"name": "pp1_nvfp4_no_sr", "layout": {}, "recipe": "nvfp4_no_sr",
                  "overrides": ov, "save_init": init, **same},
                 {"name": "pp2_nvfp4_no_sr", "layout": {"pp": 2}, "recipe": "nvfp4_no_sr",
                  "overrides": ov, "load_init": init, **same}]
    if "moe" in groups:
        for r in ("bf16", "nvfp4_no_sr"):
            init = str(tmp / f"init_moe_{r}")
            runs += [{"name": f"ep1_{r}", "layout": {"etp": 1}, "recipe": r, "moe": True,
                      "overrides": NO_BF16, "data": "per_rank", "save_init": init},
                     {"name": f"ep2etp1_{r}", "layout": {"ep": 2, "etp": 1}, "recipe": r,
                      "moe": True, "overrides": NO_BF16, "data": "per_rank", "load_init": init}]
    if "ckpt" in groups:
        half = max(1, steps // 2)
        for tag, dist_opt in (("ckpt", False), ("ckptdo", True)):
            ck = str(tmp / f"{tag}_tp2")
            runs += [{"name": f"{tag}_tp2sp_save", "layout": {"tp": 2, "sp": True},
                      "recipe": "nvfp4_no_sr", "overrides": NO_BF16, "dist_opt": dist_opt,
                      "save_at": half, "save_dir": ck, **same},
                     {"name": f"{tag}_tp1_load", "layout": {}, "recipe": "nvfp4_no_sr",
                      "overrides": NO_BF16, "dist_opt": dist_opt, "load": ck,
                      "steps": steps - half, **same}]
    if floor:  # each reference again from jittered weights: the noise floor of its comparison
        runs += [{**{k: v for k, v in r.items() if k != "save_init"}, "name": f"{r['name']}_jit",
                  "jitter": JITTER} for r in list(runs) if r["name"].startswith(REFERENCES)]
    for r in runs:
        r.setdefault("steps", steps)
        r["lr"] = lr
    return runs


def worker(args) -> None:
    import torch.distributed as dist

    from nvfp4_megatron.runtime.distributed import init_distributed, initialize_model_parallel

    info = init_distributed()
    device = info.device
    if device.type == "cuda":
        bad = {k: os.environ.get(k) for k, v in NO_MULTICAST_ENV.items() if os.environ.get(k) != v}
        if bad:
            raise RuntimeError(f"NVLink multicast must be off on these hosts; got {bad}")
    else:
        from nvfp4_megatron.mcore.context_parallel import route_megatron_rope_slice_to_cpu_safe

        route_megatron_rope_slice_to_cpu_safe()
    sz = SIZES[device.type]
    out = Path(args.out)
    results = {}
    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "backend": info.comm_library, "world_size": info.world_size, "sizes": sz,
           "num_microbatches": NUM_MICROBATCHES, "torch": torch.__version__,
           "no_multicast_env": {k: os.environ.get(k) for k in NO_MULTICAST_ENV}}
    env["lr"], env["floor_jitter"] = args.lr, JITTER if args.floor else None
    for run in _runs(args.only, args.steps, Path(args.work), lr=args.lr,
                     floor=args.floor):
        lay = run["layout"]
        initialize_model_parallel(
            tensor_model_parallel_size=lay.get("tp", 1),
            pipeline_model_parallel_size=lay.get("pp", 1),
            context_parallel_size=lay.get("cp", 1),
            expert_model_parallel_size=lay.get("ep", 1),
            expert_tensor_parallel_size=lay.get("etp"))
        t0 = time.perf_counter()
        try:
            res = _train(run, sz, device, out)
        except Exception:  # noqa: BLE001 - recorded as a failed run; the same code fails on
            # both ranks alike, so the next run's collectives still pair up
            import traceback

            res = {"error": traceback.format_exc()[-3000:]}
            print(f"[multigpu_check] {run['name']} FAILED on rank {dist.get_rank()}:\n"
                  f"{res['error']}", flush=True)
        res["wall_s"] = time.perf_counter() - t0
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, res)
        results[run["name"]] = {"run": run, "ranks": gathered}
        if dist.get_rank() == 0:
            print(f"[multigpu_check] {run['name']}: {res['wall_s']:.1f}s", flush=True)
            # after every run, so a run killed at its time limit still leaves what it measured
            (out / "results.json").write_text(json.dumps({"env": env, "results": results}))
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------- the evaluation

def _rel(a: list[float], b: list[float]) -> float:
    if len(a) != len(b) or not a:
        return float("inf")
    return max(abs(x - y) / abs(x) for x, y in zip(a, b))


def _losses(results: dict, name: str) -> list[float]:
    for r in results[name]["ranks"]:
        if r["last_stage"]:
            return r["losses"]
    raise KeyError(name)


def _perf(results: dict, name: str) -> tuple[float, float]:
    if _error(results, name):
        return float("nan"), float("nan")
    r0 = results[name]["ranks"][0]
    t = r0["times"][1:] or r0["times"]
    med = statistics.median(t)
    return med, r0["tokens_per_step"] / med


def _error(results: dict, name: str) -> str | None:
    if name not in results:
        return "did not run"
    errs = [r["error"].strip().splitlines()[-1] for r in results[name]["ranks"] if "error" in r]
    return f"error: {errs[0]}" if errs else None


def evaluate(results: dict) -> list[dict]:
    """One row per check: name, reference, rel, bound, ok, detail."""
    rows = []

    def _floor(results, ref):
        jit = f"{ref}_jit"
        if jit not in results or _error(results, jit) or _error(results, ref):
            return float("nan")
        return _rel(_losses(results, ref), _losses(results, jit))

    def compare(name, ref, bound, detail=""):
        err = _error(results, name) or _error(results, ref)
        if err:
            rows.append({"check": name, "ref": ref, "rel": float("inf"), "bound": bound,
                         "step0": float("inf"), "floor": float("nan"), "ok": False,
                         "detail": err})
            return
        rel, rel0, ok = within(_losses(results, ref), _losses(results, name), bound)
        floor = _floor(results, ref)
        # A miss where the reference's own jittered twin also moves past the bound cannot tell a
        # bug from chaotic training: reported as NOISY (still not a pass).
        rows.append({"check": name, "ref": ref, "rel": rel, "bound": bound, "step0": rel0,
                     "ok": ok, "noisy": not ok and floor >= bound, "detail": detail,
                     "floor": floor})

    for r in TP_RECIPES:
        name = f"tp2sp_{r}"
        if name not in results:
            continue
        detail, ok = "", True
        if r in ("nvfp4_no_sr", "fp8_cs") and not _error(results, name):
            amax = [x["amax"] for x in results[name]["ranks"]]
            keys = set(amax[0]) & set(amax[1])
            same = all(amax[0][k]["global"] == amax[1][k]["global"] for k in keys)
            sharded = [k for k in keys if "local" in amax[0][k] and "local" in amax[1][k]
                       and amax[0][k]["local"] != amax[1][k]["local"]]
            is_max = all(amax[0][k]["global"] == max(amax[0][k]["local"], amax[1][k]["local"])
                         for k in sharded)
            ok = bool(keys) and set(amax[0]) == set(amax[1]) and same and bool(sharded) and is_max
            detail = (f"global amax identical on both ranks for {len(keys)} operands: {same} "
                      f"({len(sharded)} with different local amax; global = max of locals: "
                      f"{is_max})")
        compare(name, f"tp1_{r}", bound_for("tp", r), detail)
        rows[-1]["ok"] = rows[-1]["ok"] and ok
        rows[-1]["noisy"] = rows[-1].get("noisy", False) and ok  # structural: never noise
    for r in ("bf16", "nvfp4_no_sr"):
        if f"cp2_{r}" in results:
            compare(f"cp2_{r}", f"cp1_{r}", bound_for("cp", r))
    if "pp2_nvfp4_no_sr" in results and not _error(results, "pp2_nvfp4_no_sr"):
        st = results["pp2_nvfp4_no_sr"]["ranks"]
        blocks = [sorted({int(k.split(".")[0]) for k in s["calls"]}) for s in st]
        ok = (all(s["bf16_blocks"] == [1, 2] for s in st) and blocks == [[0], [3]])
        compare("pp2_nvfp4_no_sr", "pp1_nvfp4_no_sr", bound_for("pp", "nvfp4_no_sr"),
                f"bf16 blocks per stage {[s['bf16_blocks'] for s in st]}, quantized blocks seen "
                f"per stage {blocks}")
        rows[-1]["ok"] = rows[-1]["ok"] and ok
        rows[-1]["noisy"] = rows[-1].get("noisy", False) and ok  # structural: never noise
    for r in ("bf16", "nvfp4_no_sr"):
        if f"ep2etp1_{r}" in results:
            compare(f"ep2etp1_{r}", f"ep1_{r}", bound_for("ep", r))
    for tag in ("ckpt", "ckptdo"):
        load, save = f"{tag}_tp1_load", f"{tag}_tp2sp_save"
        if load not in results:
            continue
        ref = f"{save} (second half)"
        err = _error(results, load) or _error(results, save)
        if err:
            rows.append({"check": load, "ref": ref, "rel": float("inf"), "bound": BOUNDS["ckpt"],
                         "step0": float("inf"), "floor": float("nan"), "ok": False,
                         "detail": err})
            continue
        saved, loaded = _losses(results, save), _losses(results, load)
        tail = saved[len(saved) - len(loaded):]
        rel, rel0, ok = within(tail, loaded, BOUNDS["ckpt"], BOUNDS["ckpt_first"])
        first = results[load]["ranks"][0]["first_step"]
        how = ("distributed optimizer, training/checkpoint.py, fully_reshardable" if tag ==
               "ckptdo" else "non-distributed optimizer, plain dist_checkpointing")
        rows.append({"check": load, "ref": ref, "rel": rel, "bound": BOUNDS["ckpt"],
                     "step0": rel0, "floor": float("nan"),
                     "ok": ok and first == len(saved) - len(loaded),
                     "detail": f"{how}; resumed at step {first}"})
    for row in rows:
        med, tps = _perf(results, row["check"])
        rmed, rtps = _perf(results, row["ref"].split(" ")[0])
        row.update(step_s=med, tokens_per_s=tps, ref_step_s=rmed, ref_tokens_per_s=rtps)
    return rows


def _verdict(row: dict) -> str:
    if row.get("info"):
        return "info"
    if row.get("noisy"):
        return "NOISY"
    return "PASS" if row["ok"] else "FAIL"


def report(data: dict) -> tuple[str, bool]:
    rows = evaluate(data["results"])
    env = data["env"]
    lines = [f"device: {env['device']} x{env['world_size']} ({env['backend']}), torch "
             f"{env['torch']}, sizes {env['sizes']}, {env['num_microbatches']} micro-batches/step",
             f"lr {env.get('lr')}, floor jitter {env.get('floor_jitter')}",
             f"{'check':22} {'reference':30} {'max rel':>9} {'bound':>7} {'step0':>9} "
             f"{'floor':>9} {'ok':>5} {'step s':>8} {'tok/s':>9} {'ref step s':>10} "
             f"{'ref tok/s':>9}"]
    for r in rows:
        lines.append(f"{r['check']:22} {r['ref']:30} {r['rel']:9.2e} {r['bound']:7.0e} "
                     f"{r['step0']:9.2e} {r['floor']:9.2e} "
                     f"{_verdict(r):>5} {r['step_s']:8.4f} "
                     f"{r['tokens_per_s']:9.0f} {r['ref_step_s']:10.4f} "
                     f"{r['ref_tokens_per_s']:9.0f}")
        if r["detail"]:
            lines.append(f"    {r['detail']}")
    for name, res in data["results"].items():
        if _error(data["results"], name):
            continue
        lines.append(f"  losses {name}: " + " ".join(f"{x:.5f}" for x in _losses(
            data["results"], name)))
    checks = [r for r in rows if not r.get("info")]
    ok = bool(checks) and all(r["ok"] for r in checks)
    lines.append(f"RESULT: {'PASS' if ok else 'FAIL'} ({sum(r['ok'] for r in checks)}/"
                 f"{len(checks)})")
    if any(r.get("noisy") for r in checks):
        lines.append("NOISY: a miss, but the reference moved as far from its own jittered twin: "
                     "inconclusive; lower --lr until the floor is below the bound")
    return "\n".join(lines), ok


# ------------------------------------------------------------------------------------ launcher

def launch(args) -> int:
    out = Path(args.out or tempfile.mkdtemp(prefix="multigpu_check_"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="multigpu_check_work_"))  # checkpoints: not under OUT
    env = {**os.environ, **NO_MULTICAST_ENV, "PYTHONUNBUFFERED": "1"}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        env.setdefault("OMP_NUM_THREADS", "1")
    else:  # Megatron's advice for sequence parallelism: keep kernel launches in order
        env.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(Path(__file__).resolve()), "--worker", "--out", str(out), "--work", str(work),
           "--steps", str(args.steps), "--only", ",".join(args.only), "--lr", str(args.lr),
           "--floor" if args.floor else "--no-floor"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"[multigpu_check] workers exited {proc.returncode} after "
          f"{time.perf_counter() - t0:.0f}s; results in {out}")
    if not (out / "results.json").is_file():
        return proc.returncode or 1
    text, ok = report(json.loads((out / "results.json").read_text()))
    if proc.returncode != 0:
        text += f"\n(workers exited {proc.returncode}: the table holds the runs that finished)"
    print(text)
    (out / "report.txt").write_text(text + "\n")
    return 0 if ok and proc.returncode == 0 else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("auto", "cpu"), default="auto",
                    help="auto: NCCL on 2 GPUs when CUDA is available, else gloo on CPU")
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps per run (default 20 on GPU, 3 on CPU)")
    ap.add_argument("--only", default=",".join(GROUPS),
                    help=f"comma-separated check groups from {GROUPS}")
    ap.add_argument("--out", default=None, help="output directory (default: a new temp dir)")
    ap.add_argument("--lr", type=float, default=1e-4,
                    help="Adam learning rate of every run (docs/RESULTS.md: at 3e-3 a few-ulp "
                         "weight jitter alone moves quantized runs by 4e-2 to 2e-1)")
    ap.add_argument("--floor", action=argparse.BooleanOptionalAction, default=None,
                    help="also run each reference from jittered weights (noise floor); "
                         "default: on for GPUs, off on CPU")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.only = [g for g in args.only.split(",") if g]
    unknown = sorted(set(args.only) - set(GROUPS))
    if unknown:
        ap.error(f"--only: unknown group(s) {unknown}; known: {', '.join(GROUPS)}")
    if args.steps is None:
        on_gpu = args.device == "auto" and torch.cuda.is_available()
        args.steps = 20 if on_gpu else 3
    if args.floor is None:
        args.floor = args.device == "auto" and torch.cuda.is_available()
    if args.steps < 2:
        ap.error(f"--steps={args.steps}: need at least 2 (the checkpoint check splits the run)")
    if args.worker:
        worker(args)
        return 0
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
