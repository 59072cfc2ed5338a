"""The training loop, assembled from Megatron-Core pieces.

One step: ``quant.state.set_step`` (and the BF16 switch when the precision schedule says so, paper
arXiv 2509.25149 App. D) -> this DP rank's micro-batches of the global batch -> Megatron's
``get_forward_backward_func()`` schedule (pipeline parallelism included; inside
``quant.linear.reuse_weight_copies``, so each weight is quantized once per step, not once per
micro-batch) -> the loss reduction over
the data-parallel replicas starts (asynchronously) -> the distributed optimizer steps (gradient
clipping inside) -> the loss is read and checked (NaN/Inf stops the run before anything is saved,
names the step and leaves the last checkpoint as it was) -> the LR scheduler steps. On GPUs a step
synchronises the host twice: Megatron's gradient norm and the reduced loss. Validation runs every
``eval_interval`` steps on a fixed set of validation batches; checkpoints every ``save_interval`` and at the end; SIGTERM/SIGUSR1 (Slurm preemption)
finish the current step, save, and exit cleanly.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from nvfp4_megatron.parallel.planner import run_layout
from nvfp4_megatron.runtime.distributed import (configure_determinism, init_distributed,
                                                  initialize_model_parallel)
from nvfp4_megatron.quant import linear as qlinear
from nvfp4_megatron.quant import state as qstate
from nvfp4_megatron.quant.recipe import switch_scope
from nvfp4_megatron.quant.registry import recipe_from_config
from nvfp4_megatron.training import checkpoint as ckpt_lib
from nvfp4_megatron.training import data as data_lib
from nvfp4_megatron.training.config import to_plain
from nvfp4_megatron.training.logger import RunLogger
from nvfp4_megatron.training.model import build_training_stack, model_shape
from nvfp4_megatron.training.optim import build_scheduler, total_iters
from nvfp4_megatron.training.throughput import StepMeter


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the run stopped without saving."""


class SimulatedCrash(RuntimeError):
    """Raised by the test knob ``train.exit_after_step``: stop now, as if killed (no final save)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunResult:
    run_dir: str
    iteration: int
    final_valid_loss: float | None
    unigram_entropy_nats: float
    stopped_by_signal: str | None


def _resolve_run_dir(run_dir: str | None) -> Path:
    obj = [None]
    if dist.get_rank() == 0:
        if run_dir is None:
            stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
            run_dir = os.path.join("runs", stamp)
        path = Path(run_dir).resolve()
        path.mkdir(parents=True, exist_ok=True)
        obj = [str(path)]
    dist.broadcast_object_list(obj, src=0)
    return Path(obj[0])


class _Signals:
    """SIGTERM / SIGUSR1 set a flag; the loop saves and exits at the end of the current step."""

    CODES = {None: 0, "SIGTERM": 1, "SIGUSR1": 2}

    def __init__(self) -> None:
        self.received: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def code(self) -> int:
        return self.CODES[self.received]


class _StepReduce:
    """(mean loss over micro-batches and data-parallel replicas, the signal any rank received),
    known on every rank: one asynchronous all-reduce started before the optimizer step and read
    after it, so the step has one host synchronisation for it (Megatron's gradient clipping takes
    the other, for the norm).

    The tensor lives on the process group's device (CUDA for NCCL, CPU for gloo). Only the
    pipeline's last stage holds losses, and only TP rank 0 / CP rank 0 of it counts them (their
    TP and CP peers hold the same reduced value). The signal rides in the same all-reduce as a
    per-code count: [loss sum, count, #SIGTERM, #SIGUSR1]; SIGTERM wins over SIGUSR1.
    """

    def __init__(self, losses: list[dict], device: torch.device, signal_code: int = 0) -> None:
        from megatron.core import parallel_state as ps

        self.t = torch.zeros(4, dtype=torch.float64, device=device)
        if ps.is_pipeline_last_stage() and losses and ps.get_tensor_model_parallel_rank() == 0 \
                and ps.get_context_parallel_rank() == 0:
            self.t[0] = torch.stack([d["lm loss"].float() for d in losses]).mean().double()
            self.t[1] = 1.0
        if signal_code:
            self.t[1 + signal_code] = 1.0
        self.work = dist.all_reduce(self.t, async_op=True)

    def result(self) -> tuple[float, str | None]:
        self.work.wait()
        loss_sum, count, n_term, n_usr1 = self.t.tolist()
        return loss_sum / count, ("SIGTERM" if n_term else ("SIGUSR1" if n_usr1 else None))


def build_datasets(c: dict, *, rank0: bool, iters: int, log=print, num_evals: int = 1):
    """(train, valid) datasets of the composed config ``c`` (plain dict): the embedded default
    corpus (built on rank 0 first, then read by the others) or ``data.data_path``; the training
    loop and ``training/occ_report.py`` build them the same way."""
    m, t, d = c["model"], c["train"], c["data"]
    if d["data_path"] is None:
        prefix, tokenizer = None, None
        if rank0:
            prefix, tokenizer = data_lib.ensure_default_corpus(
                tokenizer_type=d["tokenizer_type"], vocab_size=m["vocab_size"],
                max_mb=d["default_corpus_max_mb"], cache_dir=d["cache_dir"], log=log)
        dist.barrier()
        if not rank0:
            prefix, tokenizer = data_lib.ensure_default_corpus(
                tokenizer_type=d["tokenizer_type"], vocab_size=m["vocab_size"],
                max_mb=d["default_corpus_max_mb"], cache_dir=d["cache_dir"], log=lambda s: None)
        blend = ([prefix], None)
    else:
        blend = data_lib.parse_blend(d["data_path"])
        from nvfp4_megatron.training.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(d["tokenizer_type"], d["tokenizer_model"])
    if tokenizer.vocab_size > m["vocab_size"]:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size="
                         f"{m['vocab_size']}; set model.vocab_size >= {tokenizer.vocab_size}")
    train_ds, valid_ds = data_lib.build_datasets(
        blend=blend, split=d["split"], tokenizer=tokenizer, seq_length=m["seq_length"],
        seed=t["seed"],
        num_train_samples=iters * t["global_batch_size"],
        num_valid_samples=t["eval_iters"] * t["global_batch_size"] * num_evals,
        cache_path=str(data_lib.default_cache_dir(d["cache_dir"]) / "index_cache"),
    )
    return train_ds, valid_ds


def start_run_state(c: dict) -> str:
    """The process-wide state a run starts from, set alike by ``pretrain.py``, the step benchmark
    and the OCC report: the model-parallel CUDA RNG (it draws the initial weights), a fresh
    precision state with the run's stochastic-rounding seed, and the emulated formats' GEMM
    (``precision.emulated_gemm``). Returns the GEMM setting it replaced."""
    from megatron.core import tensor_parallel

    from nvfp4_megatron.quant import gemm as qgemm

    tensor_parallel.model_parallel_cuda_manual_seed(c["train"]["seed"])
    qstate.reset_state()
    qstate.set_run_seed(c["train"]["seed"])
    return qgemm.set_emulated_mm(c["precision"]["emulated_gemm"])


def make_forward_step(inject_nan: dict | None = None):
    """The forward step Megatron's schedules call: one micro-batch (a dict of ``tokens``,
    ``labels``, ``loss_mask``, ``position_ids`` from the data iterator) through the model, and the
    masked mean token loss (CP-aware). ``inject_nan={"now": bool}`` is the NaN test knob.
    Benchmarks use it too (``scripts/bench_step.py``)."""
    from megatron.core import parallel_state as ps

    from nvfp4_megatron.mcore.context_parallel import cp_reduce_loss, get_batch_on_this_cp_rank

    inject_nan = {"now": False} if inject_nan is None else inject_nan

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        cp = ps.get_context_parallel_world_size()
        cp_group = ps.get_context_parallel_group() if cp > 1 else None
        if cp > 1:  # this rank's load-balanced chunks r and 2*CP-1-r (mcore/context_parallel.py)
            batch = get_batch_on_this_cp_rank(batch, cp_size=cp,
                                              cp_rank=ps.get_context_parallel_rank())
        tokens, labels = batch["tokens"], batch["labels"]
        loss_mask, position_ids = batch["loss_mask"].float(), batch["position_ids"]
        if torch.cuda.is_available():
            tokens, labels = tokens.cuda(non_blocking=True), labels.cuda(non_blocking=True)
            loss_mask, position_ids = loss_mask.cuda(), position_ids.cuda()
        output = model(tokens, position_ids, None, labels=labels)

        def loss_func(output_tensor):
            per_token = output_tensor.float()
            loss_sum, count = (per_token * loss_mask).sum(), loss_mask.sum()
            if cp > 1:
                # This rank's token sum over the CP group's token count: Megatron's schedule
                # multiplies a two-output loss by the CP size and DDP averages over DP x CP, so
                # the gradient is the one of the CP=1 mean loss.
                total = count.detach().clone()
                torch.distributed.all_reduce(total, group=cp_group)
                loss = loss_sum / total.clamp(min=1)
            else:
                loss = loss_sum / count.clamp(min=1)
            if inject_nan["now"]:
                loss = loss * float("nan")
            # clone: the schedule divides the returned loss by num_microbatches *in place*, and a
            # detached view would share that storage.
            report = (cp_reduce_loss(loss_sum, count, cp_group) if cp > 1
                      else loss.detach().clone())
            if inject_nan["now"]:
                report = report * float("nan")
            return loss, {"lm loss": report}

        return output, loss_func

    return forward_step


class QuantStats:
    """``logging.quant_stats_interval``: the quantization telemetry of one step in N
    (``quant/telemetry.py``), recorded as ``"kind": "quant"`` rows (one per layer and operand
    copy) and, with ``logging.quant_stats_occ_table``, ``"kind": "occ_table"`` rows (the Microsoft
    FP4 paper's Table 1 settings on every quantizable layer's input, measured through forward
    pre-hooks, ``training/occ_report.py``). Step numbers are those of the ``train`` rows."""

    def __init__(self, interval: int | None, table1: bool, log: RunLogger) -> None:
        self.interval, self.table1, self.log = interval, table1, log

    @classmethod
    def for_run(cls, c: dict, model, *, log: RunLogger) -> "QuantStats":
        lg = c["logging"]
        interval, table1 = lg["quant_stats_interval"], lg["quant_stats_occ_table"]
        if interval is None:
            return cls(None, False, log)
        from nvfp4_megatron.training.occ_report import install_input_hooks, linear_modules

        mods = linear_modules(model)
        if not mods:
            raise ValueError(
                "logging.quant_stats_interval is set but the model has none of the project's "
                "quantized linear layers (the Transformer Engine backend quantizes inside TE, "
                "where this telemetry cannot see): set precision.backend=emulated or drop "
                "logging.quant_stats_interval")
        if table1:
            from nvfp4_megatron.quant import telemetry as qtel

            install_input_hooks(model, qtel.record_table1)
        log.info(f"[quant] telemetry every {interval} steps on {len(mods)} linear layers"
                 + (" (+ the Table-1 OCC settings of their inputs)" if table1 else ""))
        return cls(interval, table1, log)

    def records(self, step: int) -> bool:
        """Whether step ``step`` (1-based, as ``begin``) records telemetry."""
        return self.interval is not None and step % self.interval == 0

    def begin(self, step: int) -> None:
        from nvfp4_megatron.quant import telemetry as qtel

        qtel.begin_step(self.records(step), table1=self.table1)

    def end(self, step: int) -> None:
        from nvfp4_megatron.quant import telemetry as qtel

        rows, t1 = qtel.end_step()
        tb = ("cos", "mse", "snr_db", "underflow", "saturation", "occ_clamped")
        for r in rows:
            self.log.record("quant", step, tb_tag=f"{r['layer']}/{r['role']}", tb_keys=tb, **r)
        for r in t1:
            self.log.record("occ_table", step,
                            tb_tag=f"{r['layer']}/{r['granularity']}/{r['setting']}",
                            tb_keys=("cos", "mse", "snr_db"), **r)
        if rows:
            worst = min(rows, key=lambda r: r["snr_db"])
            self.log.info(f"[quant] step {step}: {len(rows)} operand copies; lowest SNR "
                          f"{worst['snr_db']:.2f} dB ({worst['layer']} {worst['role']}, "
                          f"{worst['format']})")


def local_mamba_runs(c: dict) -> bool:
    """Whether this run's hybrid model uses the project's local Mamba mixer: it has Mamba layers
    and the backend ``build_hybrid`` resolves is not TE (``megatron.backend.resolve_backend``)."""
    from nvfp4_megatron.mcore.backend import resolve_backend
    from nvfp4_megatron.training.model import is_hybrid

    m = c["model"]
    if not is_hybrid(m) or "M" not in m["hybrid_override_pattern"]:
        return False
    choice = resolve_backend(recipe_from_config(c["precision"]), num_layers=m["num_layers"],
                             hybrid=True)
    return choice.backend != "te"


def run(cfg) -> RunResult:
    """Train according to the composed config ``cfg`` (see ``configs/`` and ``recipes/``)."""
    from nvfp4_megatron.training.graphs import graph_stream

    # a graphed run builds its model and trains on the capture stream (training/graphs.py)
    graphed = bool(OmegaConf.select(cfg, "train.cuda_graph", default=False))
    with graph_stream(graphed and torch.cuda.is_available()):
        return _run(cfg)


def _run(cfg) -> RunResult:
    c = to_plain(cfg)
    m, p, t, d = c["model"], c["parallel"], c["train"], c["data"]
    info = init_distributed()
    from nvfp4_megatron.training.graphs import WARMUP_STEPS, StepGraph, check_graph_config

    check_graph_config(c, info.world_size)
    # Every layout rule (sizes vs world size, heads / groups / FFN / layers / experts vs
    # TP / PP / EP / ETP, sequence and batch divisibility) checked at once, before Megatron's own
    # asserts, by the same code as the dry run: a LayoutError (ValueError) lists each violated
    # rule and pretrain.py exits 2.
    # With Mamba layers on the emulated backend (the local mixer) its own rules apply too: no CP,
    # in_proj/out_proj shards in whole quantization blocks (the backend build_hybrid will choose).
    layout = run_layout(c, info.world_size, local_mamba=local_mamba_runs(c))
    dp = initialize_model_parallel(
        tensor_model_parallel_size=p["tensor_model_parallel_size"],
        pipeline_model_parallel_size=p["pipeline_model_parallel_size"],
        context_parallel_size=p["context_parallel_size"],
        expert_model_parallel_size=p["expert_model_parallel_size"],
        expert_tensor_parallel_size=p["expert_tensor_parallel_size"],
    )
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    run_dir = _resolve_run_dir(c["run_dir"])
    rank0 = info.rank == 0
    # half-written saves of a crashed or failed run go first, before anything is written here
    stale = ckpt_lib.clean_stale_tmp(run_dir) if rank0 else []
    log = RunLogger(run_dir, enabled=rank0, tensorboard=c["logging"]["tensorboard"],
                    plot=c["logging"]["plot"])
    if stale:
        log.info(f"[checkpoint] removed unfinished save(s) {', '.join(stale)}")
    if rank0:  # config.yaml: the first start's config; configs/start_<UTC>.yaml: every start's
        ckpt_lib.record_start_config(run_dir, OmegaConf.to_yaml(cfg))
    configure_determinism(t["deterministic"], log=log.info)
    log.info(f"[run] {run_dir} | world {info.world_size} ({info.comm_library}) | "
             f"TP{p['tensor_model_parallel_size']} PP{p['pipeline_model_parallel_size']} "
             f"CP{p['context_parallel_size']} DP{dp}")

    nmb = data_lib.num_microbatches(t["global_batch_size"], t["micro_batch_size"], dp)
    seq = m["seq_length"]
    tokens_per_step = t["global_batch_size"] * seq
    iters = total_iters(t, seq_length=seq)

    recipe = recipe_from_config(c["precision"])
    start_run_state(c)

    # ---- data
    train_ds, valid_ds = build_datasets(c, rank0=rank0, iters=iters, log=log.info)
    entropy = data_lib.unigram_entropy_nats(train_ds, m["vocab_size"])
    log.info(f"[data] unigram entropy of the training tokens: {entropy:.4f} nats/token "
             f"({entropy / math.log(2):.4f} bits); the loss is in nats too")

    # ---- model, optimizer, schedule
    stack = build_training_stack(c, recipe, log=log.info)
    model, ddp, optimizer, table = stack.model, stack.ddp, stack.optimizer, stack.table
    if rank0:
        (run_dir / "precision_table.txt").write_text(table.format() + "\n")
        if c["logging"]["print_precision_table"]:
            log.info(table.format())
    scheduler = build_scheduler(optimizer, t, iters)
    n_params = sum(pp.numel() for pp in model.parameters())
    log.info(f"[model] {n_params:,} parameters on rank 0's stage; {iters} steps of "
             f"{t['global_batch_size']} x {seq} tokens ({nmb} micro-batches per rank)")

    meta = {"model": model_shape(c), "world_size": info.world_size,
            "parallel": {"tensor_model_parallel_size": layout.tp,
                         "pipeline_model_parallel_size": layout.pp,
                         "expert_model_parallel_size": layout.ep,
                         "expert_tensor_parallel_size": layout.etp,  # resolved (None -> TP)
                         "context_parallel_size": layout.cp}}
    meta["precision"] = ckpt_lib.precision_meta(c["precision"], table.bf16_blocks)
    iteration, bf16_switch = 0, None
    # train.load (refused if damaged) or the newest intact checkpoint of the run (damaged newer
    # ones are reported and kept as step_N.damaged-<reason>)
    load_from = ckpt_lib.choose_checkpoint(run_dir, load=t["load"], resume=t["resume"],
                                           log=log.info)
    if load_from is not None:
        state = ckpt_lib.load_checkpoint(
            load_from, ddp_model=ddp, optimizer=optimizer, meta=meta, log=log.info,
            allow_precision_change=t["allow_precision_change"])
        iteration = int(state["iteration"])
        scheduler.load_state_dict(state["scheduler"])
        bf16_switch = state.get("bf16_switch")
        log.info(f"[checkpoint] resumed from {load_from} at step {iteration}"
                 + (f" (BF16 switch active: {bf16_switch})" if bf16_switch else ""))

    qstate.set_bf16_switch(bf16_switch)
    signals = _Signals()
    meter = StepMeter.for_run(c, info.world_size)
    log.info(f"[throughput] {meter.describe()}; "
             f"overlap_grad_reduce={stack.ddp.ddp_config.overlap_grad_reduce}")
    quant_stats = QuantStats.for_run(c, model, log=log)
    inject = {"now": False}
    forward_step = make_forward_step(inject)
    fb = get_forward_backward_func()
    dp_rank = ps.get_data_parallel_rank()
    step_graph = None  # train.cuda_graph: the captured forward/backward (training/graphs.py)
    if t["cuda_graph"]:
        step_graph = StepGraph(fb=fb, forward_step=forward_step, model=ddp, num_microbatches=nmb,
                               seq_length=seq, micro_batch_size=t["micro_batch_size"],
                               log=log.info)
    eager_warmup_left = WARMUP_STEPS

    def train_state() -> dict:
        return {"iteration": iteration, "scheduler": scheduler.state_dict(),
                "bf16_switch": bf16_switch, "consumed_samples": iteration * t["global_batch_size"]}

    def save() -> Path:
        path = ckpt_lib.save_checkpoint(run_dir=run_dir, step=iteration, ddp_model=ddp,
                                        optimizer=optimizer, train_state=train_state(), meta=meta,
                                        keep_last=t["keep_last"],
                                        optim_format=t["ckpt_optim_format"])
        log.info(f"[checkpoint] saved {path}")
        return path

    def evaluate() -> float:
        ddp.eval()
        losses_all = []
        for e in range(t["eval_iters"]):
            mbs = data_lib.step_microbatches(valid_ds, step=e, global_batch_size=t["global_batch_size"],
                                             micro_batch_size=t["micro_batch_size"],
                                             dp_rank=dp_rank, dp_size=dp)
            with qlinear.reuse_weight_copies():  # weights fixed: each quantized once
                out = fb(forward_step_func=forward_step, data_iterator=iter(mbs), model=[ddp],
                         num_microbatches=nmb, seq_length=seq,
                         micro_batch_size=t["micro_batch_size"], forward_only=True)
            losses_all.append(_StepReduce(out, info.device).result()[0])
        ddp.train()
        return sum(losses_all) / len(losses_all)

    t0 = time.time()
    steps_done, last_saved, valid_loss, stopped = 0, None, None, None
    window_time, window_steps = 0.0, 0  # train-step time since the last progress line
    while iteration < iters:
        scope = switch_scope(recipe.schedule, step=iteration,
                             tokens=iteration * tokens_per_step)
        if scope is not None and bf16_switch is None:
            bf16_switch = scope
            qstate.set_bf16_switch(scope)
            log.info(f"[precision] step {iteration}: switching {scope} GEMMs to BF16")
            log.record("precision", iteration, bf16_switch=scope)
            if step_graph is not None:  # other GEMMs now: captured again after a warm-up step
                step_graph.reset()
                eager_warmup_left = max(eager_warmup_left, 1)
        qstate.set_step(iteration)
        inject["now"] = t["inject_nan_at_step"] is not None and iteration == t["inject_nan_at_step"]
        step_start = time.time()
        quant_stats.begin(iteration + 1)
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        mbs = data_lib.step_microbatches(train_ds, step=iteration,
                                         global_batch_size=t["global_batch_size"],
                                         micro_batch_size=t["micro_batch_size"],
                                         dp_rank=dp_rank, dp_size=dp)
        graphed = (step_graph is not None and eager_warmup_left == 0 and not inject["now"]
                   and not quant_stats.records(iteration + 1))
        if graphed:  # the same schedule, replayed (training/graphs.py)
            losses = step_graph.run(mbs)
        else:
            # the weights change only in optimizer.step(): every micro-batch of the step uses
            # the quantized weight copies the first one made (same bits; quant/linear.py)
            with qlinear.reuse_weight_copies():
                losses = fb(forward_step_func=forward_step, data_iterator=iter(mbs), model=[ddp],
                            num_microbatches=nmb, seq_length=seq,
                            micro_batch_size=t["micro_batch_size"], forward_only=False)
            eager_warmup_left = max(eager_warmup_left - 1, 0)
        reduce = _StepReduce(losses, info.device, signals.code())
        ok, grad_norm, _ = optimizer.step()
        loss, stopped = reduce.result()
        if not math.isfinite(loss):
            # the weights just stepped are discarded with the process: nothing is saved
            log.record("train", iteration, loss=loss, diverged=True)
            last = ckpt_lib.latest_checkpoint(ckpt_lib.checkpoint_root(run_dir))
            log.close()
            raise TrainingDiverged(
                f"loss is {loss} at step {iteration}; stopped without saving. The last good "
                f"checkpoint is {last if last else '(none)'}"
            )
        scheduler.step(increment=1)
        iteration += 1
        steps_done += 1
        quant_stats.end(iteration)  # a collective on recorded steps (every rank gets here)
        lr = optimizer.param_groups[0]["lr"]
        dt = time.time() - step_start
        gn = float(grad_norm) if grad_norm is not None else float("nan")
        gpu = {}
        if torch.cuda.is_available():
            gpu = {"mfu": meter.mfu(dt), "peak_mem_gib": meter.peak_memory_gib()}
        if step_graph is not None:
            gpu["graphed"] = graphed
        log.record("train", iteration, loss=loss, lr=lr, grad_norm=gn,
                   tokens=iteration * tokens_per_step, step_time_s=dt,
                   tflops_per_gpu=meter.tflops_per_gpu(dt), **gpu)
        window_time += dt
        window_steps += 1
        if iteration % t["log_interval"] == 0 or iteration == iters or iteration == 1:
            elapsed = time.time() - t0
            log.progress(step=iteration, total=iters, tokens=iteration * tokens_per_step, loss=loss,
                         lr=lr, grad_norm=gn, tokens_per_s=window_steps * tokens_per_step / window_time,
                         elapsed=elapsed, steps_done=steps_done,
                         mfu=meter.mfu(window_time / window_steps),
                         peak_mem_gib=meter.peak_memory_gib())
            window_time, window_steps = 0.0, 0
        if t["eval_interval"] and iteration % t["eval_interval"] == 0 and iteration != iters:
            valid_loss = evaluate()
            log.record("valid", iteration, loss=valid_loss)
            log.info(f"[valid] step {iteration}: loss {valid_loss:.4f} nats "
                     f"(unigram entropy {entropy:.4f})")
        if t["save"] and t["save_interval"] and iteration % t["save_interval"] == 0:
            save()
            last_saved = iteration
        if stopped:
            if t["save"] and last_saved != iteration:
                save()
            log.info(f"[signal] {stopped} received: "
                     + (f"saved step {iteration}, " if t["save"] else "train.save=false, nothing saved; ")
                     + "exiting cleanly")
            break
        if t["exit_after_step"] is not None and iteration == t["exit_after_step"]:
            log.close()
            raise SimulatedCrash(f"train.exit_after_step={iteration}: stopping without a final save")

    if not stopped:
        valid_loss = evaluate()
        log.record("valid", iteration, loss=valid_loss)
        if t["save"] and last_saved != iteration:
            save()
        log.info(f"[done] {iteration} steps in {time.time() - t0:.1f}s | final validation loss "
                 f"{valid_loss:.4f} nats/token | unigram entropy of the training tokens "
                 f"{entropy:.4f} nats/token")
        plot = log.plot_losses(entropy_nats=entropy)
        if plot:
            log.info(f"[done] loss plot: {plot}")
    log.close()
    if rank0:
        (run_dir / "result.json").write_text(json.dumps({
            "iteration": iteration, "final_valid_loss": valid_loss,
            "unigram_entropy_nats": entropy, "stopped_by_signal": stopped}, indent=2))
    return RunResult(run_dir=str(run_dir), iteration=iteration, final_valid_loss=valid_loss,
                     unigram_entropy_nats=entropy, stopped_by_signal=stopped)
