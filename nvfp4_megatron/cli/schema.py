"""Typed schemas for the Hydra config tree, registered in Hydra's ConfigStore.

Every group under ``configs/`` (model, precision, parallel, data, train, logging) is validated
against one dataclass here, so a mistyped key or a value of the wrong type fails when the config is
composed, and :func:`nvfp4_megatron.cli.compose.compose_config` turns the failure into a message
that lists what is valid. Choices with a fixed set of values are Enums (OmegaConf lists the allowed
names in its error). Field names are Megatron-Core's own (docs/ARCHITECTURE.md).

Every numeric field states its allowed range where it is declared (``num(default, ge=..., ...)``,
kept in the dataclass field's metadata; ``null`` is allowed exactly when the type is Optional), and
:func:`validate` checks every one of them plus the cross-field rules that are not layout rules (the
layout rules — divisibility by TP/PP/CP/EP and the world size — live in
:mod:`nvfp4_megatron.parallel.layout` and run later). ``tests/cli/test_config_ranges.py`` fails if a
numeric field has no range.

The schemas are mutable because OmegaConf merges overrides into them; the composed config is made
read-only before anything reads it (``OmegaConf.set_readonly``).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


@dataclass(frozen=True)
class Range:
    """An interval for a numeric field: any of ``ge`` (>=), ``gt`` (>), ``le`` (<=), ``lt`` (<)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    note: str | None = None  # shown after the range in the error message

    def contains(self, v: float) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def describe(self) -> str:
        lo = (f"[{_num(self.ge)}" if self.ge is not None
              else f"({_num(self.gt)}" if self.gt is not None else None)
        hi = (f"{_num(self.le)}]" if self.le is not None
              else f"{_num(self.lt)})" if self.lt is not None else None)
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return (">= " if lo[0] == "[" else "> ") + lo[1:]
        if hi:
            return ("<= " if hi[-1] == "]" else "< ") + hi[:-1]
        return "any finite number"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def num(default: Any, *, ge: float | None = None, gt: float | None = None,
        le: float | None = None, lt: float | None = None, note: str | None = None) -> Any:
    """A numeric dataclass field with its allowed range (for a list, the range of each item)."""
    return field(default=default,
                 metadata={"range": Range(ge=ge, gt=gt, le=le, lt=lt, note=note)})


def _choices(name: str, *values: str) -> type[enum.Enum]:
    """An Enum whose members are named as their values (OmegaConf lists them in its errors)."""
    return enum.Enum(name, [(v, v) for v in values], module=__name__, qualname=name)


Activation = _choices("Activation", "gelu", "swiglu", "squared_relu")
Normalization = _choices("Normalization", "RMSNorm", "LayerNorm")
PositionEmbedding = _choices("PositionEmbedding", "rope", "none", "learned_absolute")
LRSchedule = _choices("LRSchedule", "wsd", "cosine", "constant")
# distributed-optimizer checkpoint format (training/checkpoint.py): dp_reshardable is fast and
# loads only into the same TP/PP/EP/expert-TP; fully_reshardable loads into any layout (e.g.
# saved TP2, loaded TP1)
CkptOptimFormat = _choices("CkptOptimFormat", "dp_reshardable", "fully_reshardable")
SwitchScope = _choices("SwitchScope", "all", "fprop")
Backend = _choices("Backend", "auto", "te", "emulated")
EmulatedGemm = _choices("EmulatedGemm", "cublas", "triton")
TokenDispatcher = _choices("TokenDispatcher", "alltoall", "allgather", "flex")
# byte: 256 byte values + end-of-document; bpe: byte-level BPE trained locally with Hugging
# Face `tokenizers`
TokenizerType = _choices("TokenizerType", "byte", "bpe")


class MambaScan(enum.Enum):
    eager = "eager"
    compiled = "compiled"


@dataclass(kw_only=True)
class ModelConfig:
    num_layers: int = num(2, ge=1)
    hidden_size: int = num(64, ge=1)
    ffn_hidden_size: Optional[int] = num(None, ge=1)  # None -> 4 * hidden_size
    num_attention_heads: int = num(4, ge=1)
    num_query_groups: Optional[int] = num(None, ge=1)  # None -> num_attention_heads (MHA)
    kv_channels: Optional[int] = num(None, ge=1)  # None -> hidden_size // num_attention_heads
    vocab_size: int = num(512, ge=1)
    seq_length: int = num(64, ge=1)
    activation: Activation = Activation.gelu
    normalization: Normalization = Normalization.RMSNorm
    position_embedding_type: PositionEmbedding = PositionEmbedding.rope
    rotary_base: int = num(10000, ge=1)
    untie_embeddings_and_output_weights: bool = True
    add_bias_linear: bool = False
    num_moe_experts: Optional[int] = num(None, ge=1)
    moe_router_topk: int = num(2, ge=1)
    moe_ffn_hidden_size: Optional[int] = num(None, ge=1)
    moe_shared_expert_intermediate_size: Optional[int] = num(None, ge=1)
    moe_aux_loss_coeff: float = num(1.0e-2, ge=0)  # load-balancing loss weight (0: none)
    hybrid_override_pattern: Optional[str] = None
    mamba_num_heads: Optional[int] = num(None, ge=1)
    mamba_head_dim: int = num(64, ge=1)
    mamba_state_dim: int = num(128, ge=1)
    mamba_num_groups: int = num(8, ge=1)
    mamba_conv_kernel: int = num(4, ge=1)
    mamba_expand: int = num(2, ge=1)
    # SSD scan of the local Mamba mixer: eager (plain PyTorch, the oracle) or compiled
    # (torch.compile of the same chunked form; for GPUs). Megatron's TE path ignores it.
    mamba_scan: MambaScan = MambaScan.eager
    init_method_std: float = num(0.02, gt=0)
    hidden_dropout: float = num(0.0, ge=0, lt=1)
    attention_dropout: float = num(0.0, ge=0, lt=1)
    # Draw each weight whole on the CPU, then shard it: every TP/EP layout (and every data-parallel
    # replica) starts from the same weights. null -> only without a GPU (on a GPU each TP rank
    # draws its own shard on the device).
    use_cpu_initialization: Optional[bool] = None


@dataclass(kw_only=True)
class SwitchToBF16Config:
    at_step: Optional[int] = num(None, ge=0)  # 0: BF16 from the first step
    at_tokens: Optional[float] = num(None, ge=0)  # float so 8.2e12 can be written as such
    scope: SwitchScope = SwitchScope.all


@dataclass(kw_only=True)
class DGEConfig:
    """Microsoft FP4 differentiable gradient estimator on the weights (arXiv 2501.17116 §3.1).
    null keeps the recipe's value (msfp4 / msfp4_no_occ: on, k 5, cap 3); needs an FP4 Fprop."""

    enabled: Optional[bool] = None
    k: Optional[float] = num(None, gt=1, note="the paper uses 5")
    cap: Optional[float] = num(None, gt=0, note="cap on f'; the paper uses 3.0")


@dataclass(kw_only=True)
class OCCConfig:
    """Microsoft FP4 outlier clamping and compensation on the activations (§3.2). null keeps the
    recipe's value (msfp4 / msfp4_no_dge: on, quantile 0.99, compensate); needs an FP4 Fprop."""

    enabled: Optional[bool] = None
    quantile: Optional[float] = num(None, gt=0.5, lt=1, note="clamp to the [1-q, q] quantiles; "
                                                             "the paper uses 0.99")
    compensate: Optional[bool] = None  # add (X - clamp(X))·Wᵀ back in high precision


@dataclass(kw_only=True)
class PrecisionConfig:
    recipe: str = "bf16"  # a name from nvfp4_megatron.quant.registry.list_recipes()
    backend: Backend = Backend.auto
    bf16_first_blocks: Optional[int] = num(None, ge=0)  # None -> the recipe's default
    bf16_last_blocks: Optional[int] = num(None, ge=0)
    bf16_blocks: Optional[list[int]] = num(None, ge=0)  # 0-based block indices (each checked)
    switch_to_bf16: SwitchToBF16Config = field(default_factory=SwitchToBF16Config)
    dge: DGEConfig = field(default_factory=DGEConfig)
    occ: OCCConfig = field(default_factory=OCCConfig)
    # the GEMM of the emulated formats on CUDA (NVFP4, MX; quant/gemm.py): cublas = torch.mm to
    # FP32, then alpha in a second pass; triton = one Triton kernel, alpha in its epilogue. Same
    # contract, other FP32 accumulation order
    emulated_gemm: EmulatedGemm = EmulatedGemm.cublas


@dataclass(kw_only=True)
class ParallelConfig:
    tensor_model_parallel_size: int = num(1, ge=1)
    pipeline_model_parallel_size: int = num(1, ge=1)
    context_parallel_size: int = num(1, ge=1)
    expert_model_parallel_size: int = num(1, ge=1)
    # None -> tensor_model_parallel_size
    expert_tensor_parallel_size: Optional[int] = num(None, ge=1)
    sequence_parallel: bool = False
    moe_token_dispatcher_type: TokenDispatcher = TokenDispatcher.alltoall


@dataclass(kw_only=True)
class DataConfig:
    # Megatron-style blend: [prefix] or [weight1, prefix1, weight2, prefix2, ...] of .bin/.idx
    # prefixes written by scripts/preprocess_data.py. None -> the embedded default corpus.
    data_path: Optional[list[Any]] = None
    split: str = "98,2,0"  # train,valid,test weights over each dataset's documents
    tokenizer_type: TokenizerType = TokenizerType.bpe
    tokenizer_model: Optional[str] = None  # tokenizer.json for bpe with data_path
    cache_dir: Optional[str] = None  # None -> ~/.cache/nvfp4_megatron
    # how much of the stdlib source the default corpus takes
    default_corpus_max_mb: float = num(4.0, gt=0)


@dataclass(kw_only=True)
class TrainConfig:
    micro_batch_size: int = num(4, ge=1)
    global_batch_size: int = num(16, ge=1)
    train_iters: Optional[int] = num(100, ge=1)
    train_tokens: Optional[float] = num(None, gt=0)  # alternative to train_iters
    lr: float = num(1.0e-3, gt=0)
    min_lr: float = num(1.0e-4, ge=0)  # <= lr
    lr_schedule: LRSchedule = LRSchedule.wsd
    warmup_iters: int = num(0, ge=0)  # < the number of steps (unless constant)
    # WSD: the last fraction of training decays to min_lr
    lr_decay_fraction: float = num(0.2, gt=0, le=1)
    weight_decay: float = num(0.1, ge=0)
    adam_beta1: float = num(0.9, ge=0, lt=1)
    adam_beta2: float = num(0.95, ge=0, lt=1)
    clip_grad: float = num(1.0, ge=0)  # 0: no clipping
    seed: int = num(1234, ge=0, le=2**32 - 1)  # numpy's seed range
    bf16: bool = True  # BF16 params/activations (Float16Module) with FP32 master weights
    # Megatron's distributed optimizer (Adam state sharded over data-parallel ranks); false: every
    # rank keeps the whole optimizer state (gradients all-reduced instead of reduce-scattered);
    # false needs save=false (training/checkpoint.py resumes the distributed optimizer only)
    use_distributed_optimizer: bool = True
    log_interval: int = num(10, ge=1)
    eval_interval: Optional[int] = num(50, ge=0, note="0 or null: no evaluation during training")
    eval_iters: int = num(4, ge=1)
    save_interval: Optional[int] = num(None, ge=1, note="null: save only at the end")
    keep_last: int = num(2, ge=1)
    save: bool = True  # false: write no checkpoint at all (benchmarks, throw-away runs)
    # bit-identical reruns and resumes on the same GPU (runtime/distributed.configure_determinism)
    deterministic: bool = True
    # DDP reduce-scatters gradient buckets during the backward; null -> on with GPUs (NCCL), off on CPU
    overlap_grad_reduce: Optional[bool] = None
    # capture each step's forward/backward (all micro-batches) as one CUDA graph and replay it, so
    # the host's per-kernel launches leave the step (training/graphs.py): one GPU, no dropout;
    # the same numbers as without (the first steps run eagerly to warm up)
    cuda_graph: bool = False
    # Megatron's native fused cross-entropy over the vocabulary (torch.compile; GPU only): fewer
    # passes over the FP32 logits; the loss differs from the unfused one in its last bits
    cross_entropy_fusion: bool = False
    # our fused RoPE kernel (kernels/rope.py; GPU only) in place of Megatron's unfused torch RoPE:
    # one pass forward and one backward instead of ~6 each; the same bits
    fused_rope: bool = False
    # our fused cross-entropy kernels (kernels/cross_entropy.py; GPU only) in place of Megatron's
    # vocab_parallel_cross_entropy: three passes over the BF16 logits instead of ~8 over an FP32
    # copy, no FP32 softmax kept for the backward; the loss differs in its last bits (the sum's
    # order). Not with cross_entropy_fusion (Megatron's own fused one)
    fused_cross_entropy: bool = False
    # Megatron's gradient-accumulation fusion (GPU only; mcore/grad_accum.py stands in for Apex's
    # fused_weight_gradient_mlp_cuda): the Wgrad GEMMs add into the FP32 main_grad directly, with no
    # BF16 weight.grad and no separate accumulation pass; each micro-batch's weight gradient is then
    # not rounded to BF16 before it is added (as in Megatron-LM / NeMo runs with Apex or TE)
    gradient_accumulation_fusion: bool = False
    ckpt_optim_format: CkptOptimFormat = CkptOptimFormat.dp_reshardable
    resume: bool = True  # continue from the newest checkpoint in run_dir/checkpoints
    load: Optional[str] = None  # a checkpoint directory to start from (overrides resume)
    # load a checkpoint trained with another recipe / BF16 block set / backend (refused otherwise;
    # precision.switch_to_bf16 is the planned way to change precision mid-run)
    allow_precision_change: bool = False
    # Test-only knobs (tests/training): make step N's loss NaN; exit (as if killed) after step N.
    inject_nan_at_step: Optional[int] = num(None, ge=1)
    exit_after_step: Optional[int] = num(None, ge=1)


@dataclass(kw_only=True)
class LoggingConfig:
    tensorboard: bool = True
    plot: bool = True
    print_precision_table: bool = True
    # show every upstream warning on every rank (default: known ones once, on rank 0;
    # runtime/warnings_filter.py; NVFP4_SHOW_ALL_WARNINGS=1 does the same)
    all_warnings: bool = False
    # every N steps: per quantized layer and operand copy, cosine / MSE / SNR / underflow /
    # saturation / OCC-clamped fraction -> metrics.jsonl ("kind": "quant") and TensorBoard
    # (quant/telemetry.py; overhead in docs/PERFORMANCE.md)
    quant_stats_interval: Optional[int] = num(None, ge=1, note="null: off (the default)")
    # with quant_stats_interval: also the Microsoft FP4 paper's Table 1 on every quantizable
    # layer's input ("kind": "occ_table" rows; scripts/occ_table.py --source telemetry)
    quant_stats_occ_table: bool = False


@dataclass(kw_only=True)
class PlannerConfig:
    """Dry-run estimates (nvfp4_megatron/parallel/planner.py, docs/planner.md)."""

    gpu_type: str = "B200"  # B200 | GB200 | H100 | H200 (peak table in parallel/hardware.py)
    # fraction of each GEMM class's datasheet peak assumed reachable
    assumed_mfu: float = num(0.4, gt=0, le=1)
    # JSON of measured per-layer forward+backward times (scripts/bench_layer.py --json): adds a
    # step estimate built from them, saying which figures are measured and which assumed
    layer_times: Optional[str] = None


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    dry_run: bool = False
    world_size: Optional[int] = num(None, ge=1)  # required (>= 1) with dry_run=true
    run_dir: Optional[str] = None  # None -> runs/<UTC timestamp>, chosen on rank 0


GROUPS = {
    "model": ModelConfig,
    "precision": PrecisionConfig,
    "parallel": ParallelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "logging": LoggingConfig,
}


def register_configs() -> None:
    """Register the root schema and one schema per group (``configs/<group>/*.yaml`` extend them)."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, node in GROUPS.items():
        cs.store(group=group, name=f"{group}_schema", node=node)


# ---- validation (after composition, before anything is written) -------------------------------

_NUMERIC = (int, float)


def _is_numeric_type(t: Any) -> bool:
    """int/float, Optional of them, or a list of them."""
    if t in _NUMERIC:
        return True
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Union:
        return any(_is_numeric_type(a) for a in args if a is not type(None))
    if origin is list:
        return bool(args) and args[0] in _NUMERIC
    return False


def _optional(t: Any) -> bool:
    return typing.get_origin(t) is typing.Union and type(None) in typing.get_args(t)


def numeric_fields(node: type = None, prefix: str = "") -> list[tuple[str, Any, Range | None]]:
    """``(dotted key, type, Range or None)`` for every numeric field reachable from ``node``."""
    node = Config if node is None else node
    out = []
    hints = typing.get_type_hints(node)
    for f in dataclasses.fields(node):
        t = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(t):
            out += numeric_fields(t, key + ".")
        elif _is_numeric_type(t):
            out.append((key, t, f.metadata.get("range")))
    return out


def _get(plain: dict, key: str) -> Any:
    for part in key.split("."):
        plain = plain[part]
    return plain


def range_problems(plain: dict) -> list[str]:
    """One line per numeric value outside its declared range: key, value, allowed range."""
    problems = []
    for key, t, rng in numeric_fields():
        if rng is None:
            continue
        v = _get(plain, key)
        allowed = rng.describe() + (" or null" if _optional(t) else "") + (
            f" ({rng.note})" if rng.note else "")
        if v is None:
            continue  # OmegaConf already refused null for a non-Optional field
        if isinstance(v, list):
            bad = [x for x in v if not rng.contains(x)]
            if bad:
                problems.append(f"{key}={v}: items {bad} out of range; each item must be "
                                f"{rng.describe()}")
        elif not rng.contains(v):
            problems.append(f"{key}={v!r}: must be {allowed}")
    return problems


def cross_field_problems(plain: dict) -> list[str]:
    """Rules between fields that are not layout rules (those are in parallel/layout.py)."""
    m, t, p = plain["model"], plain["train"], plain["precision"]
    problems = []

    def ok(*keys) -> bool:  # only judge values that passed their own range check
        return all(isinstance(_get(plain, k), (int, float)) and not isinstance(_get(plain, k), bool)
                   and _in_range(k, _get(plain, k)) for k in keys)

    if plain["dry_run"] and plain["world_size"] is None:
        problems.append("dry_run=true needs world_size=N (N >= 1): the number of GPUs to plan for")
    heads, groups = m["num_attention_heads"], m["num_query_groups"]
    if groups is not None and ok("model.num_attention_heads", "model.num_query_groups") \
            and heads % groups:
        problems.append(f"model.num_attention_heads={heads} must be a multiple of "
                        f"model.num_query_groups={groups} (grouped-query attention)")
    if m["kv_channels"] is None and ok("model.hidden_size", "model.num_attention_heads") \
            and m["hidden_size"] < heads:
        problems.append(f"model.kv_channels=null derives hidden_size // num_attention_heads = "
                        f"{m['hidden_size']} // {heads} = 0; set model.hidden_size >= {heads} "
                        f"or model.kv_channels")
    if m["num_moe_experts"] is not None and ok("model.num_moe_experts", "model.moe_router_topk") \
            and m["moe_router_topk"] > m["num_moe_experts"]:
        problems.append(f"model.moe_router_topk={m['moe_router_topk']} must be <= "
                        f"model.num_moe_experts={m['num_moe_experts']}")
    if ok("train.lr", "train.min_lr") and t["min_lr"] > t["lr"]:
        problems.append(f"train.min_lr={t['min_lr']!r} must be <= train.lr={t['lr']!r}")
    if t["train_iters"] is None and t["train_tokens"] is None:
        problems.append("set train.train_iters or train.train_tokens (both are null)")
    if t["lr_schedule"] != "constant" and ok("train.warmup_iters"):
        iters = None
        if t["train_iters"] is not None and ok("train.train_iters"):
            iters = t["train_iters"]
        elif t["train_iters"] is None and t["train_tokens"] is not None and ok(
                "train.train_tokens", "train.global_batch_size", "model.seq_length"):
            per_step = t["global_batch_size"] * m["seq_length"]
            iters = max(1, -(-int(t["train_tokens"]) // per_step))
        if iters is not None and t["warmup_iters"] >= iters:
            problems.append(f"train.warmup_iters={t['warmup_iters']} must be < the number of "
                            f"steps ({iters}) with train.lr_schedule={t['lr_schedule']}")
    sw = p["switch_to_bf16"]
    if sw["at_step"] is not None and sw["at_tokens"] is not None:
        problems.append(f"precision.switch_to_bf16: set at_step ({sw['at_step']}) or at_tokens "
                        f"({sw['at_tokens']!r}), not both")
    split = plain["data"]["split"]
    try:
        weights = [float(x) for x in str(split).split(",")]
    except ValueError:
        weights = []
    if not (1 <= len(weights) <= 3 and all(math.isfinite(w) and w >= 0 for w in weights)
            and sum(weights) > 0):
        problems.append(f"data.split={split!r}: must be up to 3 comma-separated weights >= 0 "
                        f"(train,valid,test) with a positive sum, e.g. 98,2,0")
    from nvfp4_megatron.quant.registry import list_recipes

    if p["recipe"] not in list_recipes():
        import difflib

        near = difflib.get_close_matches(str(p["recipe"]), list_recipes(), n=1)
        problems.append(f"precision.recipe={p['recipe']!r} is not a recipe"
                        + (f" (did you mean {near[0]!r}?)" if near else "")
                        + f"; known: {', '.join(list_recipes())}")
    blocks = p["bf16_blocks"] or []
    if len(set(blocks)) != len(blocks):
        problems.append(f"precision.bf16_blocks={blocks} lists an index twice")
    if p["recipe"] in list_recipes() and all(
            _get(plain, k) is None or ok(k)
            for k in ("precision.dge.k", "precision.dge.cap", "precision.occ.quantile")):
        from nvfp4_megatron.quant.registry import apply_msfp4_overrides, get_recipe

        try:  # DGE/OCC against the recipe (FP4 Fprop; parameters of a component left off)
            apply_msfp4_overrides(get_recipe(p["recipe"]), p["dge"], p["occ"])
        except ValueError as e:
            problems.append(str(e))
        tp = plain["parallel"]["tensor_model_parallel_size"]
        if any(t.format == "e2m1_vector" for t in
               get_recipe(p["recipe"]).linear.operands().values()) and ok(
                   "parallel.tensor_model_parallel_size") and tp > 1:
            problems.append(f"precision.recipe={p['recipe']!r} (e2m1_vector: per-token / "
                            f"per-channel scales) needs parallel.tensor_model_parallel_size=1, "
                            f"got {tp}: its scales are not reduced over TP")
    if plain["logging"]["quant_stats_occ_table"] and plain["logging"]["quant_stats_interval"] is None:
        problems.append("logging.quant_stats_occ_table=true needs logging.quant_stats_interval=N "
                        "(the steps it measures on)")
    return problems


def _in_range(key: str, v: Any) -> bool:
    for k, t, rng in numeric_fields():
        if k == key:
            return rng is None or rng.contains(v)
    return True


def validate(plain: dict) -> list[str]:
    """Every problem with a composed config (plain dict, enums as names): ranges, cross-field."""
    return range_problems(plain) + cross_field_problems(plain)
