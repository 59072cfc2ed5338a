"""The dry-run planner: ``pretrain.py +recipe=NAME dry_run=true world_size=N``.

Launches nothing and needs no GPU. From the composed config it

1. validates the 5D layout with MoE parallel folding over ``world_size`` (:mod:`.layout`),
2. counts parameters analytically and also from a ``meta``-device build of the model (dense
   and MoE GPT with Megatron's local spec; Mamba hybrids with Megatron's ``HybridModel`` and
   the project's local hybrid spec, no mamba_ssm needed), and refuses to continue if the two
   disagree (:mod:`.model_stats`),
3. estimates memory per GPU for every pipeline stage, tokens per step, steps for the token
   budget, model FLOPs per step split by precision, and the step time / tokens/s / MFU on a
   GPU type from :mod:`.hardware` at an assumed fraction of peak,
4. prints all of it (plus the rank -> group table when ``world_size <= 64``) and writes the same
   numbers to ``plan.json`` in ``cfg.run_dir`` (or the working directory).

Config keys read (besides model/parallel/train/precision): ``planner.gpu_type`` (default B200),
``planner.assumed_mfu`` (default 0.40) and ``planner.layer_times`` (a JSON of measured per-layer
forward+backward times from ``scripts/bench_layer.py``: a second step estimate built from them,
printed with what is measured and what is assumed). ``docs/planner.md`` explains the estimates.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from .hardware import DEFAULT_ASSUMED_MFU, DEFAULT_GPU, GpuPeak, get_gpu, recipe_compute, runs_native
from .layout import (LayoutError, LocalMambaRules, ParallelLayout, local_mamba_problems,
                     make_layout, rank_coordinates, rank_groups)
from .model_stats import (Flops, ModelShape, StageMemory, cfg_get, flops_per_step, memory_per_gpu,
                          meta_param_count, param_count)

__all__ = ["Plan", "plan", "run_dry_run", "format_plan", "RANK_TABLE_MAX_WORLD"]

RANK_TABLE_MAX_WORLD = 64


@dataclass(frozen=True, kw_only=True)
class Plan:
    recipe: str
    layout: ParallelLayout
    params: dict
    meta_params: int | None
    stages: list[StageMemory]
    tokens_per_step: int
    train_tokens: int | None
    steps: int | None
    flops: Flops
    gpu: GpuPeak
    assumed_mfu: float
    native: bool
    step_time_s: float
    step_time_bf16_bound_s: float  # same model with every GEMM at the BF16 peak (no speed-up)
    bubble_factor: float
    bf16_layers: list[int]
    notes: list[str] = field(default_factory=list)
    measured: dict | None = None  # step estimate from measured per-layer times (layer_times)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_time_s

    @property
    def mfu_vs_bf16_peak(self) -> float:
        return self.flops.total / (self.step_time_s * self.layout.world_size * self.gpu.bf16_tflops * 1e12)

    @property
    def wall_time_s(self) -> float | None:
        return None if self.steps is None else self.steps * self.step_time_s

    @property
    def max_memory_gib(self) -> float:
        return max(s.total_gib for s in self.stages)

    def to_dict(self) -> dict:
        d = {
            "recipe": self.recipe,
            "layout": self.layout.to_dict(),
            "params": self.params,
            "meta_device_params": self.meta_params,
            "memory_per_gpu_gib": [
                {"stage": s.stage, "params": s.params, "weights": s.weights_gib,
                 "grads": s.grads_gib, "optimizer": s.optimizer_gib,
                 "quantized_weights": s.quantized_weights_gib, "activations": s.activations_gib,
                 "inflight_microbatches": s.inflight_microbatches, "total": s.total_gib,
                 **s.breakdown}
                for s in self.stages
            ],
            "max_memory_per_gpu_gib": self.max_memory_gib,
            "tokens_per_step": self.tokens_per_step,
            "train_tokens": self.train_tokens,
            "steps": self.steps,
            "model_flops_per_step": self.flops.total,
            "model_flops_per_step_quantized": self.flops.quantized,
            "model_flops_per_step_bf16": self.flops.bf16,
            "bf16_layers": self.bf16_layers,
            "gpu": {"name": self.gpu.name, "bf16_tflops": self.gpu.bf16_tflops,
                    "fp8_tflops": self.gpu.fp8_tflops, "fp4_tflops": self.gpu.fp4_tflops,
                    "memory_gib": self.gpu.memory_gib, "source": self.gpu.source},
            "assumed_mfu": self.assumed_mfu,
            "native_precision": self.native,
            "pipeline_bubble_factor": self.bubble_factor,
            "step_time_s": self.step_time_s,
            "step_time_if_no_lowp_speedup_s": self.step_time_bf16_bound_s,
            "tokens_per_s_if_no_lowp_speedup": self.tokens_per_step / self.step_time_bf16_bound_s,
            "wall_time_days_if_no_lowp_speedup": None if self.steps is None
            else self.steps * self.step_time_bf16_bound_s / 86400,
            "tokens_per_s": self.tokens_per_s,
            "mfu_vs_bf16_peak": self.mfu_vs_bf16_peak,
            "wall_time_s": self.wall_time_s,
            "wall_time_days": None if self.wall_time_s is None else self.wall_time_s / 86400,
            "notes": self.notes,
            "step_time_from_layer_times": self.measured,
        }
        if self.layout.world_size <= RANK_TABLE_MAX_WORLD:
            d["rank_groups"] = rank_groups(self.layout)
        return d


def _int(node: Any, key: str, default: Any) -> Any:
    v = cfg_get(node, key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
        raise ValueError(f"{key}={v!r} must be an integer")
    return int(v)


def local_mamba_rules(cfg: Any, m: ModelShape) -> LocalMambaRules:
    """The local Mamba mixer's layout rules for ``cfg``: its recipe's block multiples when any
    Mamba block is quantized (the BF16 block policy applied to the hybrid pattern)."""
    from nvfp4_megatron.quant.recipe import bf16_block_set
    from nvfp4_megatron.quant.registry import recipe_from_config

    prec = recipe_from_config(cfg_get(cfg, "precision", {}))
    multiples = None
    if prec.linear.is_quantized:
        bf16 = bf16_block_set(prec.layers, m.num_layers)
        if any(k == "M" and i not in bf16 for i, k in enumerate(m.layer_kinds())):
            multiples = prec.linear.weight_multiples()
    return LocalMambaRules(recipe=prec.name, weight_multiples=multiples)


def run_layout(cfg: Any, world_size: int, *, model: ModelShape | None = None,
               local_mamba: bool | None = None) -> ParallelLayout:
    """The layout of ``cfg`` (``parallel``, ``train`` batch sizes, ``model``) over ``world_size``,
    validated by :func:`make_layout` (LayoutError listing every violated rule). Used by the dry
    run and, before Megatron starts, by the training loop.

    ``local_mamba``: the project's local Mamba mixer will run (the emulated backend), so its rules
    apply too (no CP, block-multiple in_proj/out_proj shards); None: when
    ``precision.backend=emulated`` (the training loop passes what ``resolve_backend`` chose)."""
    m = ModelShape.from_cfg(cfg_get(cfg, "model")) if model is None else model
    if local_mamba is None:
        local_mamba = str(cfg_get(cfg_get(cfg, "precision"), "backend", "auto")) == "emulated"
    par, train = cfg_get(cfg, "parallel"), cfg_get(cfg, "train")
    gbs = _int(train, "global_batch_size", None)
    if gbs is None:
        raise ValueError("train.global_batch_size is required")
    return make_layout(
        world_size=int(world_size),
        tp=_int(par, "tensor_model_parallel_size", 1),
        cp=_int(par, "context_parallel_size", 1),
        pp=_int(par, "pipeline_model_parallel_size", 1),
        ep=_int(par, "expert_model_parallel_size", 1),
        etp=_int(par, "expert_tensor_parallel_size", None),
        sequence_parallel=bool(cfg_get(par, "sequence_parallel", False)),
        micro_batch_size=_int(train, "micro_batch_size", 1),
        global_batch_size=gbs,
        model=m,
        local_mamba=local_mamba_rules(cfg, m) if local_mamba else None,
    )


def plan(cfg: Any, world_size: int, *, meta_build: bool = True) -> Plan:
    """Validate and estimate one run. Raises LayoutError (a ValueError) for a layout that does not
    fit, ValueError for bad config values."""
    from nvfp4_megatron.quant.recipe import bf16_block_set
    from nvfp4_megatron.quant.registry import recipe_from_config

    m = ModelShape.from_cfg(cfg_get(cfg, "model"))
    train = cfg_get(cfg, "train")
    planner_cfg = cfg_get(cfg, "planner")
    # the training code's reading of the precision group: BF16 blocks, overrides, defaults
    prec = recipe_from_config(cfg_get(cfg, "precision", {}))
    recipe = prec.name
    rc = recipe_compute(prec)
    layout = run_layout(cfg, world_size, model=m)
    gbs = layout.global_batch_size
    notes: list[str] = []
    params = param_count(m)
    meta = meta_param_count(m) if meta_build else None
    if meta is not None and meta != params["total"]:
        raise RuntimeError(
            f"parameter count mismatch: analytic {params['total']} vs meta-device build {meta}; "
            f"nvfp4_megatron/parallel/model_stats.py does not model this configuration"
        )
    if meta is None:
        notes.append("parameter count is analytic (no meta-device build for this model)")

    if m.hybrid_override_pattern and "M" in m.hybrid_override_pattern:
        local = local_mamba_problems(m, tp=layout.tp, cp=layout.cp,
                                     rules=local_mamba_rules(cfg, m))
        for problem in local:  # refused above with precision.backend=emulated
            notes.append(f"on the emulated backend (local Mamba mixer: no mamba_ssm / TE, e.g. "
                         f"the H200 and CPU) this layout is refused: {problem}")
    quantized = rc.gemm_class != "bf16"
    bf16_layers = (sorted(bf16_block_set(prec.layers, m.num_layers)) if quantized
                   else list(range(m.num_layers)))
    tokens_per_step = gbs * m.seq_length
    flops = flops_per_step(m, tokens_per_step, bf16_layers=set(bf16_layers), quantized=quantized)
    stages = memory_per_gpu(m, layout, act_bytes=rc.act_bytes, weight_bytes=rc.weight_bytes,
                            bf16_layers=set(bf16_layers))

    gpu = get_gpu(cfg_get(planner_cfg, "gpu_type", DEFAULT_GPU))
    mfu = float(cfg_get(planner_cfg, "assumed_mfu", DEFAULT_ASSUMED_MFU))
    if not 0 < mfu <= 1:
        raise ValueError(f"planner.assumed_mfu={mfu} must be in (0, 1]")
    native = runs_native(gpu, rc)
    q_peak = gpu.peak(rc.gemm_class) if native else gpu.bf16_tflops
    if not native:
        notes.append(
            f"{gpu.name} has no tensor cores for {recipe}: its GEMMs run emulated; the time "
            f"estimate counts them at the BF16 peak, an optimistic bound"
        )
    w = layout.world_size
    compute_s = (flops.quantized / w) / (q_peak * 1e12 * mfu) + (flops.bf16 / w) / (gpu.bf16_tflops * 1e12 * mfu)
    bubble = 1.0 + (layout.pp - 1) / layout.num_microbatches
    step_time = compute_s * bubble
    bound_s = bubble * (flops.total / w) / (gpu.bf16_tflops * 1e12 * mfu)

    train_tokens = cfg_get(train, "train_tokens")
    train_iters = cfg_get(train, "train_iters")
    if train_tokens is not None:
        train_tokens = int(float(train_tokens))
        steps = math.ceil(train_tokens / tokens_per_step)
    elif train_iters is not None:
        steps = int(train_iters)
        train_tokens = steps * tokens_per_step
    else:
        steps = None
    worst = max(stages, key=lambda s: s.total_gib)
    if worst.total_gib > gpu.memory_gib:
        notes.append(
            f"stage {worst.stage} needs ~{worst.total_gib:.1f} GiB per GPU, more than the "
            f"{gpu.name}'s {gpu.memory_gib:g} GiB: raise TP/PP/CP or use activation recomputation"
        )
    measured = None
    lt_path = cfg_get(planner_cfg, "layer_times", None)
    if lt_path:
        measured = measured_step_time(m, layout, recipe, bf16_layers, load_layer_times(lt_path),
                                      gpu=gpu, mfu=mfu, source=str(lt_path))
        if measured["gpu_mismatch"]:
            notes.append(f"layer times {measured['gpu_mismatch']}")
    return Plan(recipe=recipe, layout=layout, params=params, meta_params=meta, stages=stages,
                tokens_per_step=tokens_per_step, train_tokens=train_tokens, steps=steps,
                flops=flops, gpu=gpu, assumed_mfu=mfu, native=native, step_time_s=step_time,
                step_time_bf16_bound_s=bound_s,
                bubble_factor=bubble, bf16_layers=bf16_layers, notes=notes, measured=measured)


LAYER_TIMES_FORMAT = "nvfp4_megatron.layer_times.v1"
# model fields a layer-times file must agree on with the plan's model (when it records them)
_LAYER_SHAPE_KEYS = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                     "kv_channels", "mamba_num_heads", "mamba_head_dim", "mamba_num_groups",
                     "mamba_state_dim", "mamba_conv_kernel", "activation")


def load_layer_times(path: str) -> dict:
    """Read a layer-times JSON (``scripts/bench_layer.py --json``: its ``layer_times`` key, or
    the object itself): forward+backward ms of one layer per recipe and layer kind."""
    with open(path) as f:
        data = json.load(f)
    lt = data.get("layer_times", data)
    if lt.get("format") != LAYER_TIMES_FORMAT:
        raise ValueError(f"planner.layer_times={path}: not a layer-times file (format "
                         f"{lt.get('format')!r}, expected {LAYER_TIMES_FORMAT!r}; write it with "
                         "scripts/bench_layer.py --json)")
    for key in ("fwd_bwd_ms", "seq_length", "micro_batch_size"):
        if key not in lt:
            raise ValueError(f"planner.layer_times={path}: missing {key!r}")
    if lt.get("tensor_model_parallel_size", 1) != 1:
        raise ValueError(f"planner.layer_times={path}: measured at TP="
                         f"{lt['tensor_model_parallel_size']}; the estimate expects TP1 figures")
    return lt


def measured_step_time(m: ModelShape, layout: ParallelLayout, recipe: str, bf16_layers: list[int],
                       lt: dict, *, gpu: GpuPeak, mfu: float, source: str) -> dict:
    """The step time from measured per-layer times, and which figures are measured or assumed.

    Measured: each layer's forward+backward on one GPU at the file's sequence length and
    micro-batch (TP1), at the layer's own precision (the recipe, or ``bf16`` for BF16 blocks).
    Assumed: time proportional to the tokens each GPU processes (micro-batch x seq / (TP x CP))
    -- perfect TP/CP scaling, and attention's quadratic part is exact only at the measured seq
    length; the LM head (+ embedding) at ``assumed_mfu`` of the BF16 peak; the pipeline bubble
    of 1F1B; no time for TP/CP/PP/DP communication or the optimizer step (not measured).
    """
    times = lt["fwd_bwd_ms"]
    shape = lt.get("model", {})
    bad = [f"{k}={shape[k]!r} (plan: {getattr(m, k)!r})" for k in _LAYER_SHAPE_KEYS
           if k in shape and shape[k] is not None and shape[k] != getattr(m, k)]
    if bad:
        raise ValueError(f"planner.layer_times={source} was measured on another layer shape: "
                         + ", ".join(bad))
    bf16 = set(bf16_layers)
    need = set()
    kinds = m.layer_kinds()
    for i, k in enumerate(kinds):
        need.add(("bf16" if i in bf16 else recipe, k))
    missing = sorted(f"{r}/{k}" for r, k in need if k not in times.get(r, {}))
    if missing:
        have = sorted(f"{r}/{k}" for r, ks in times.items() for k in ks)
        raise ValueError(f"planner.layer_times={source} has no time for {missing} (recipe/layer "
                         f"kind; it has {have}); run scripts/bench_layer.py with those recipes")
    scale = (layout.micro_batch_size * m.seq_length / (layout.tp * layout.cp)) / (
        lt["micro_batch_size"] * lt["seq_length"])
    stage_s = []
    offset = 0
    for stage, stage_kinds in enumerate(m.stage_kinds(layout.pp)):
        t = sum(times["bf16" if offset + j in bf16 else recipe][k]
                for j, k in enumerate(stage_kinds)) * 1e-3 * scale
        offset += len(stage_kinds)
        head = 0.0
        if stage == layout.pp - 1:  # LM head fwd+bwd, BF16, at the assumed MFU
            tokens = layout.micro_batch_size * m.seq_length / layout.cp
            head = 3 * 2 * m.hidden_size * m.vocab_size * tokens / layout.tp / (
                gpu.bf16_tflops * 1e12 * mfu)
        stage_s.append(t + head)
    nmb = layout.num_microbatches
    bubble = 1.0 + (layout.pp - 1) / nmb
    step = max(stage_s) * nmb * bubble
    return {
        "step_time_s": step,
        "per_microbatch_stage_s": stage_s,
        "scale_from_measured": scale,
        "source": source,
        "measured": (f"forward+backward of one layer per kind ({', '.join(sorted(set(kinds)))}) "
                     f"at {recipe} and bf16 on {lt.get('gpu', '?')}, seq {lt['seq_length']}, "
                     f"micro-batch {lt['micro_batch_size']}, TP1"),
        "assumed": ("time proportional to tokens per GPU (x%.4g: micro-batch x seq / (TP x CP) "
                    "against the measured shape), LM head at %.0f%% of the BF16 peak, 1F1B "
                    "bubble x%.3f; no communication (TP/SP, CP, PP, DP) and no optimizer step"
                    % (scale, 100 * mfu, bubble)),
        "gpu_mismatch": None if gpu.name.lower() in str(lt.get("gpu", "")).lower() else
        f"measured on {lt.get('gpu', '?')}, planning for {gpu.name}",
    }


def _fmt_count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:g}"


def _fmt_ranges(idx: list[int]) -> str:
    if not idx:
        return "none"
    out, start, prev = [], idx[0], idx[0]
    for i in idx[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(out)


def format_plan(p: Plan) -> str:
    lay = p.layout
    lines = [
        f"== dry run: recipe precision={p.recipe}, world_size={lay.world_size} ==",
        f"layout      : {lay.describe()}",
        f"              micro-batch {lay.micro_batch_size}, global batch {lay.global_batch_size}, "
        f"{lay.num_microbatches} micro-batches per step per DP rank",
        f"parameters  : {p.params['total']:,} ({_fmt_count(p.params['total'])}); active per token "
        f"{_fmt_count(p.params['active'])}; embedding {_fmt_count(p.params['embedding'])}, "
        f"LM head {_fmt_count(p.params['output_layer'])}, experts {_fmt_count(p.params['experts'])}",
        f"              meta-device build: "
        + (f"{p.meta_params:,} (matches)" if p.meta_params is not None else "not built (analytic count)"),
        f"BF16 blocks : {_fmt_ranges(p.bf16_layers)}",
        "memory/GPU  : stage  params    weights  grads  optim  q-wts  activ (mb in flight)  total GiB",
    ]
    for s in p.stages:
        lines.append(
            f"              {s.stage:5d}  {_fmt_count(s.params):>8s}  {s.weights_gib:7.1f}  "
            f"{s.grads_gib:5.1f}  {s.optimizer_gib:5.1f}  {s.quantized_weights_gib:5.1f}  "
            f"{s.activations_gib:5.1f} ({s.inflight_microbatches:d})            {s.total_gib:6.1f}"
        )
    lines += [
        f"tokens/step : {p.tokens_per_step:,}",
        f"budget      : {('%s tokens -> %s steps' % (f'{p.train_tokens:,}', f'{p.steps:,}')) if p.steps is not None else 'no train_tokens/train_iters set'}",
        f"model FLOPs : {p.flops.total:.4g} per step "
        + (f"({p.flops.quantized:.4g} at {p.recipe}, {p.flops.bf16:.4g} BF16)" if p.flops.quantized
           else "(all BF16)"),
        f"GPU         : {p.gpu.name} dense TFLOP/s BF16 {p.gpu.bf16_tflops:g} / FP8 {p.gpu.fp8_tflops:g}"
        f" / FP4 {'n/a' if p.gpu.fp4_tflops is None else f'{p.gpu.fp4_tflops:g}'} ({p.gpu.source})",
        f"estimate    : assumed {p.assumed_mfu:.0%} of each GEMM class's peak, pipeline bubble "
        f"x{p.bubble_factor:.3f} -> step {p.step_time_s:.4g} s, {p.tokens_per_s:,.0f} tokens/s, "
        f"MFU vs BF16 peak {p.mfu_vs_bf16_peak:.1%}",
    ]
    if p.wall_time_s is not None:
        lines.append(f"wall time   : {p.wall_time_s / 86400:.1f} days ({p.wall_time_s / 3600:,.0f} h) "
                     f"for {p.steps:,} steps")
    if p.flops.quantized:
        lines.append(
            f"bound       : if {p.recipe} GEMMs ran no faster than BF16: step "
            f"{p.step_time_bf16_bound_s:.4g} s, {p.tokens_per_step / p.step_time_bf16_bound_s:,.0f} "
            f"tokens/s" + ("" if p.steps is None else
                           f", {p.steps * p.step_time_bf16_bound_s / 86400:.1f} days")
        )
    if p.measured is not None:
        ms = p.measured
        lines += [
            f"from layers: step {ms['step_time_s']:.4g} s, "
            f"{p.tokens_per_step / ms['step_time_s']:,.0f} tokens/s"
            + ("" if p.steps is None else f", {p.steps * ms['step_time_s'] / 86400:.1f} days")
            + f" ({ms['source']})",
            f"  measured  : {ms['measured']}",
            f"  assumed   : {ms['assumed']}",
        ]
    for n in p.notes:
        lines.append(f"note        : {n}")
    if lay.world_size <= RANK_TABLE_MAX_WORLD:
        lines.append(format_rank_table(lay))
    return "\n".join(lines)


def format_rank_table(lay: ParallelLayout) -> str:
    groups = rank_groups(lay)
    lines = ["rank table (Megatron order tp-cp-ep-dp-pp: coordinates of each rank, then the groups):",
             "  rank  pp | tp cp dp | etp ep edp"]
    for r in range(lay.world_size):
        c = rank_coordinates(lay, r)
        lines.append(f"  {r:4d}  {c['pp']:2d} | {c['tp']:2d} {c['cp']:2d} {c['dp']:2d} | "
                     f"{c['etp']:3d} {c['ep']:2d} {c['edp']:3d}")
    for name in ("tp", "cp", "dp", "pp", "dp_cp", "etp", "ep", "edp"):
        lines.append(f"  {name:5s} groups: {groups[name]}")
    return "\n".join(lines)


def run_dry_run(cfg: Any) -> Plan:
    """Entry point for ``pretrain.py dry_run=true world_size=N``: print the plan, write plan.json.

    A layout that does not fit is printed to stderr and the process exits with status 2.
    """
    world = cfg_get(cfg, "world_size")
    if world is None:
        raise ValueError("dry_run=true needs world_size=N (the number of GPUs to plan for)")
    try:
        p = plan(cfg, int(world))
    except LayoutError as err:
        print(f"dry run refused: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from err
    print(format_plan(p), flush=True)
    run_dir = cfg_get(cfg, "run_dir") or os.getcwd()
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(str(run_dir), "plan.json")
    with open(path, "w") as f:
        json.dump(p.to_dict(), f, indent=2)
    print(f"wrote {path}", flush=True)
    return p
