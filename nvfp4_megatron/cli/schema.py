"""Typed schemas for the Hydra config tree, registered in Hydra's ConfigStore.

Every group under ``configs/`` (model, precision, parallel, data, train, logging) is validated
against one dataclass here, so a mistyped key or a value of the wrong type fails when the config is
composed, and :func:`nvfp4_megatron.cli.compose.compose_config` turns the failure into a message
that lists what is valid. Choices with a fixed set of values are Enums (OmegaConf lists the allowed
names in its error). Field names are Megatron-Core's own (docs/ARCHITECTURE.md).

The schemas are mutable because OmegaConf merges overrides into them; the composed config is made
read-only before anything reads it (``OmegaConf.set_readonly``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


class Activation(enum.Enum):
    gelu = "gelu"
    swiglu = "swiglu"
    squared_relu = "squared_relu"


class Normalization(enum.Enum):
    RMSNorm = "RMSNorm"
    LayerNorm = "LayerNorm"


class PositionEmbedding(enum.Enum):
    rope = "rope"
    none = "none"
    learned_absolute = "learned_absolute"


class LRSchedule(enum.Enum):
    wsd = "wsd"
    cosine = "cosine"
    constant = "constant"


class CkptOptimFormat(enum.Enum):
    """Distributed-optimizer checkpoint format (training/checkpoint.py)."""
    dp_reshardable = "dp_reshardable"  # fast; loads only into the same TP/PP/EP/expert-TP
    fully_reshardable = "fully_reshardable"  # loads into any layout (e.g. saved TP2, loaded TP1)


class SwitchScope(enum.Enum):
    all = "all"
    fprop = "fprop"


class Backend(enum.Enum):
    auto = "auto"
    te = "te"
    emulated = "emulated"


class TokenDispatcher(enum.Enum):
    alltoall = "alltoall"
    allgather = "allgather"
    flex = "flex"


class TokenizerType(enum.Enum):
    byte = "byte"  # 256 byte values + end-of-document
    bpe = "bpe"  # byte-level BPE trained locally with Hugging Face `tokenizers`


@dataclass(kw_only=True)
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: Optional[int] = None  # None -> 4 * hidden_size
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # None -> num_attention_heads (MHA)
    kv_channels: Optional[int] = None  # None -> hidden_size // num_attention_heads
    vocab_size: int = 512
    seq_length: int = 64
    activation: Activation = Activation.gelu
    normalization: Normalization = Normalization.RMSNorm
    position_embedding_type: PositionEmbedding = PositionEmbedding.rope
    rotary_base: int = 10000
    untie_embeddings_and_output_weights: bool = True
    add_bias_linear: bool = False
    num_moe_experts: Optional[int] = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None
    moe_shared_expert_intermediate_size: Optional[int] = None
    moe_aux_loss_coeff: float = 1.0e-2  # load-balancing loss weight (0: none)
    hybrid_override_pattern: Optional[str] = None
    mamba_num_heads: Optional[int] = None
    mamba_head_dim: int = 64
    mamba_state_dim: int = 128
    mamba_num_groups: int = 8
    mamba_conv_kernel: int = 4
    mamba_expand: int = 2
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    # Draw each weight whole on the CPU, then shard it: every TP/EP layout (and every data-parallel
    # replica) starts from the same weights. null -> only without a GPU (on a GPU each TP rank
    # draws its own shard on the device).
    use_cpu_initialization: Optional[bool] = None


@dataclass(kw_only=True)
class SwitchToBF16Config:
    at_step: Optional[int] = None
    at_tokens: Optional[float] = None  # float so 8.2e12 can be written as such
    scope: SwitchScope = SwitchScope.all


@dataclass(kw_only=True)
class PrecisionConfig:
    recipe: str = "bf16"  # a name from nvfp4_megatron.quant.registry.list_recipes()
    backend: Backend = Backend.auto
    bf16_first_blocks: Optional[int] = None  # None -> the recipe's default
    bf16_last_blocks: Optional[int] = None
    bf16_blocks: Optional[list[int]] = None
    switch_to_bf16: SwitchToBF16Config = field(default_factory=SwitchToBF16Config)


@dataclass(kw_only=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: Optional[int] = None  # None -> tensor_model_parallel_size
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
    default_corpus_max_mb: float = 4.0  # how much of the stdlib source the default corpus takes


@dataclass(kw_only=True)
class TrainConfig:
    micro_batch_size: int = 4
    global_batch_size: int = 16
    train_iters: Optional[int] = 100
    train_tokens: Optional[float] = None  # alternative to train_iters
    lr: float = 1.0e-3
    min_lr: float = 1.0e-4
    lr_schedule: LRSchedule = LRSchedule.wsd
    warmup_iters: int = 0
    lr_decay_fraction: float = 0.2  # WSD: the last fraction of training decays to min_lr
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    seed: int = 1234
    bf16: bool = True  # BF16 params/activations (Float16Module) with FP32 master weights
    # Megatron's distributed optimizer (Adam state sharded over data-parallel ranks); false: every
    # rank keeps the whole optimizer state (gradients all-reduced instead of reduce-scattered);
    # false needs save=false (training/checkpoint.py resumes the distributed optimizer only)
    use_distributed_optimizer: bool = True
    log_interval: int = 10
    eval_interval: int = 50
    eval_iters: int = 4
    save_interval: Optional[int] = None  # None -> only at the end
    keep_last: int = 2
    save: bool = True  # false: write no checkpoint at all (benchmarks, throw-away runs)
    # bit-identical reruns and resumes on the same GPU (platform/distributed.configure_determinism)
    deterministic: bool = True
    # DDP reduce-scatters gradient buckets during the backward; null -> on with GPUs (NCCL), off on CPU
    overlap_grad_reduce: Optional[bool] = None
    ckpt_optim_format: CkptOptimFormat = CkptOptimFormat.dp_reshardable
    resume: bool = True  # continue from the newest checkpoint in run_dir/checkpoints
    load: Optional[str] = None  # a checkpoint directory to start from (overrides resume)
    # Test-only knobs (tests/training): make step N's loss NaN; exit (as if killed) after step N.
    inject_nan_at_step: Optional[int] = None
    exit_after_step: Optional[int] = None


@dataclass(kw_only=True)
class LoggingConfig:
    tensorboard: bool = True
    plot: bool = True
    print_precision_table: bool = True


@dataclass(kw_only=True)
class PlannerConfig:
    """Dry-run estimates (nvfp4_megatron/parallel/planner.py, docs/planner.md)."""

    gpu_type: str = "B200"  # B200 | GB200 | H100 | H200 (peak table in parallel/hardware.py)
    assumed_mfu: float = 0.4  # fraction of each GEMM class's datasheet peak assumed reachable


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
    world_size: Optional[int] = None
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
