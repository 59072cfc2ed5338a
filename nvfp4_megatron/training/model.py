"""Model provider: config -> Megatron-Core ``GPTModel`` (or ``HybridModel``) with this project's
quantized layers.

``model.hybrid_override_pattern`` set (Megatron's name; letters ``M`` Mamba-2, ``*`` attention,
``-`` MLP, ``|`` pipeline boundary) builds Megatron's ``HybridModel`` with the local quantized
hybrid spec (``nvfp4_megatron.mcore.hybrid_spec``: Mamba ``in_proj``/``out_proj`` quantized,
conv1d / SSD scan / gated norm in high precision), or Megatron's TE hybrid spec when the backend
resolves to ``te``; unset builds ``GPTModel`` exactly as before.

Every linear layer of the transformer blocks is our quantized ``Column/RowParallelLinear`` (or, on
the ``te`` backend, Transformer Engine's) and ``nvfp4_megatron.mcore.policy.apply_precision``
configures each one from the recipe (the precision table it returns is what actually runs:
layer -> GEMM -> format, block, RHT, SR).

BF16 runs wrap the model in ``Float16Module`` (BF16 parameters and activations; the distributed
optimizer keeps FP32 master weights) and then in Megatron's ``DistributedDataParallel``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from nvfp4_megatron.parallel.model_stats import ModelShape
from nvfp4_megatron.quant.registry import recipe_from_config

# the shape fields a checkpoint records (ModelShape is the one list; hybrid fields only for
# hybrid models, so GPT checkpoints written before hybrids existed stay loadable)
MODEL_SHAPE_KEYS = ModelShape.checkpoint_fields(hybrid=False)
HYBRID_SHAPE_KEYS = ModelShape.checkpoint_fields(hybrid=True)


# TransformerConfig fields taken from the config as they are (the same Megatron names)
_CONFIG_MODEL_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                        "kv_channels", "normalization", "add_bias_linear", "hidden_dropout",
                        "attention_dropout", "init_method_std")
_CONFIG_PARALLEL_FIELDS = ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                           "context_parallel_size", "expert_model_parallel_size",
                           "expert_tensor_parallel_size", "sequence_parallel")
# fused kernels that need Apex / Transformer Engine (docs/ARCHITECTURE.md "Off, and why");
# gradient_accumulation_fusion can be switched on (train.gradient_accumulation_fusion, mcore/grad_accum.py)
_FUSIONS_OFF = ("gradient_accumulation_fusion", "bias_activation_fusion", "masked_softmax_fusion",
                "bias_dropout_fusion", "apply_rope_fusion")


def fusion_options(t: dict) -> dict:
    """The ``train.*`` fusion switches that ``transformer_config`` takes, from the train config."""
    return {k: t.get(k, False) for k in ("cross_entropy_fusion", "fused_rope", "fused_cross_entropy",
                                         "gradient_accumulation_fusion")}


def transformer_config(m: dict, p: dict, *, bf16: bool, quantization: dict | None = None,
                       cross_entropy_fusion: bool = False, fused_rope: bool = False,
                       fused_cross_entropy: bool = False, gradient_accumulation_fusion: bool = False,
                       log=print):
    """Megatron's TransformerConfig; ``quantization``: the backend's fp8/fp4, BF16-block and MoE
    padding fields (``backend.backend_config_fields``; empty on the emulated backend).
    ``cross_entropy_fusion`` (``train.cross_entropy_fusion``, GPU only): Megatron's native fused
    vocab-parallel cross-entropy (three ``torch.compile``d kernels instead of about ten passes
    over the FP32 logits; the same mathematics in another order, so the loss differs from the
    unfused one in its last bits). ``fused_rope`` (``train.fused_rope``, GPU only): our RoPE kernel
    (``kernels/rope.py``, bit-exact with Megatron's unfused RoPE) installed in Megatron's place.
    ``fused_cross_entropy`` (``train.fused_cross_entropy``, GPU only): our cross-entropy kernels
    (``kernels/cross_entropy.py``: Megatron's arithmetic, the FP32 sum in another order) in place
    of Megatron's ``vocab_parallel_cross_entropy``. ``gradient_accumulation_fusion``
    (``train.gradient_accumulation_fusion``, GPU only): Megatron's option of that name, with the
    Wgrad GEMM that accumulates into the FP32 ``main_grad`` from ``mcore/grad_accum.py`` instead
    of Apex (each micro-batch's weight gradient is then not rounded to BF16 before it is added)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    if fused_cross_entropy and cross_entropy_fusion:
        raise ValueError("train.fused_cross_entropy=true and train.cross_entropy_fusion=true both "
                         "replace the cross-entropy; set one of them to false")
    if cross_entropy_fusion and not torch.cuda.is_available():
        raise ValueError("train.cross_entropy_fusion=true needs a GPU (Megatron's fused "
                         "cross-entropy is compiled for CUDA); set train.cross_entropy_fusion=false")
    if fused_rope:
        if not torch.cuda.is_available():
            raise ValueError("train.fused_rope=true needs a GPU (a Triton kernel); set "
                             "train.fused_rope=false")
        from nvfp4_megatron.kernels.rope import enable_fused_rope

        enable_fused_rope(log)
    if fused_cross_entropy:
        if not torch.cuda.is_available():
            raise ValueError("train.fused_cross_entropy=true needs a GPU (Triton kernels); set "
                             "train.fused_cross_entropy=false")
        from nvfp4_megatron.kernels.cross_entropy import enable_fused_cross_entropy

        enable_fused_cross_entropy(log)
    extra: dict[str, Any] = {}
    if gradient_accumulation_fusion:
        if not torch.cuda.is_available():
            raise ValueError("train.gradient_accumulation_fusion=true needs a GPU (Megatron's "
                             "backward places its weight-gradient placeholder on the CUDA device); "
                             "set train.gradient_accumulation_fusion=false")
        from nvfp4_megatron.mcore import grad_accum

        grad_accum.install(log)
    if cross_entropy_fusion:
        extra.update(cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="native")
    act = m["activation"]
    if act == "swiglu":
        extra.update(gated_linear_unit=True, activation_func=F.silu)
    elif act == "squared_relu":
        from megatron.core.activations import squared_relu

        extra.update(activation_func=squared_relu)
    else:
        extra.update(activation_func=F.gelu)
    if m["num_moe_experts"]:
        extra.update(
            num_moe_experts=m["num_moe_experts"], moe_router_topk=m["moe_router_topk"],
            moe_ffn_hidden_size=m["moe_ffn_hidden_size"] or m["ffn_hidden_size"],
            moe_shared_expert_intermediate_size=m["moe_shared_expert_intermediate_size"],
            moe_token_dispatcher_type=p["moe_token_dispatcher_type"],
            moe_aux_loss_coeff=m["moe_aux_loss_coeff"],
        )
    if is_hybrid(m):
        # Megatron's hybrid settings (is_hybrid_model: output-layer init scaled by 1/sqrt(L))
        extra.update(is_hybrid_model=True, mamba_state_dim=m["mamba_state_dim"],
                     mamba_head_dim=m["mamba_head_dim"], mamba_num_groups=m["mamba_num_groups"],
                     mamba_num_heads=m["mamba_num_heads"])
    dtype = torch.bfloat16 if bf16 else torch.float32
    return TransformerConfig(
        **{k: m[k] for k in _CONFIG_MODEL_FIELDS},
        ffn_hidden_size=m["ffn_hidden_size"] or 4 * m["hidden_size"],
        **{k: p[k] for k in _CONFIG_PARALLEL_FIELDS},
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=resolve_cpu_initialization(m),
        **dict(dict.fromkeys(_FUSIONS_OFF, False), gradient_accumulation_fusion=gradient_accumulation_fusion),
        **extra,
        **(quantization or {}),
    )


def resolve_cpu_initialization(m: dict) -> bool:
    """``model.use_cpu_initialization``: null -> CPU initialization only without a GPU."""
    v = m["use_cpu_initialization"]
    return not torch.cuda.is_available() if v is None else bool(v)


def is_hybrid(m: dict) -> bool:
    """``model.hybrid_override_pattern`` asks for Megatron's HybridModel."""
    return bool(m.get("hybrid_override_pattern"))


def hybrid_layer_pattern(m: dict, pp: int) -> str:
    """The pattern for ``HybridModel``: with PP > 1 and no ``|`` the stage boundaries the planner
    uses (even split, ``parallel/layout.split_hybrid_pattern``) are written in, so Megatron and
    the planner agree on which blocks each stage holds."""
    from nvfp4_megatron.parallel.layout import PIPE_SEPARATOR, split_hybrid_pattern

    pattern = m["hybrid_override_pattern"]
    n = len(pattern.replace(PIPE_SEPARATOR, ""))
    if n != m["num_layers"]:
        raise ValueError(f"model.hybrid_override_pattern has {n} layers but model.num_layers="
                         f"{m['num_layers']}; every pattern symbol is one layer")
    if pp > 1 and PIPE_SEPARATOR not in pattern:
        pattern = PIPE_SEPARATOR.join(split_hybrid_pattern(pattern, pp))
    return pattern


def _model_kwargs(m: dict) -> dict:
    """What ``GPTModel`` and ``HybridModel`` are built with alike: vocabulary and sequence length,
    this stage's place in the pipeline, tied embeddings and positions."""
    from megatron.core import parallel_state

    return dict(
        vocab_size=m["vocab_size"],
        max_sequence_length=m["seq_length"],
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not m["untie_embeddings_and_output_weights"],
        position_embedding_type=m["position_embedding_type"],
        rotary_base=m["rotary_base"],
    )


def build_model(cfg: dict, recipe, *, log=print):
    """This pipeline stage's model: ``HybridModel`` for a hybrid pattern, else ``GPTModel``."""
    if is_hybrid(cfg["model"]):
        return build_hybrid(cfg, recipe, log=log)
    return build_gpt(cfg, recipe, log=log)


def build_hybrid(cfg: dict, recipe, *, log=print):
    """Build this pipeline stage's HybridModel; returns (model, config, precision_table)."""
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    from nvfp4_megatron.mcore.backend import (apply_backend_precision, backend_config_fields,
                                                 hybrid_stack_spec_for, resolve_backend)

    m, p, t = cfg["model"], cfg["parallel"], cfg["train"]
    pattern = hybrid_layer_pattern(m, p["pipeline_model_parallel_size"])
    choice = resolve_backend(recipe, num_layers=m["num_layers"], hybrid=True)
    log(f"[precision] backend {choice.describe()}")
    config = transformer_config(m, p, bf16=t["bf16"], quantization=backend_config_fields(
        choice, recipe, num_layers=m["num_layers"]),
        **fusion_options(t), log=log)
    if choice.backend != "te":
        from nvfp4_megatron.mcore.hybrid_spec import check_local_hybrid_pattern

        check_local_hybrid_pattern(pattern)
    spec = hybrid_stack_spec_for(choice, d_conv=m["mamba_conv_kernel"], expand=m["mamba_expand"],
                                 scan_impl=m.get("mamba_scan", "eager"))
    model = HybridModel(config=config, hybrid_stack_spec=spec, hybrid_layer_pattern=pattern,
                        **_model_kwargs(m))
    if config.use_cpu_initialization and torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    table = apply_backend_precision([model], recipe, choice, log=False)
    return model, config, table


def build_gpt(cfg: dict, recipe, *, log=print):
    """Build this pipeline stage's GPTModel; returns (model, config, precision_table)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    m, p, t = cfg["model"], cfg["parallel"], cfg["train"]
    from nvfp4_megatron.mcore.backend import (apply_backend_precision, backend_config_fields,
                                                 gpt_layer_spec_for, resolve_backend)

    # backend auto|te|emulated -> Megatron's TE layer spec + its fp8/fp4 config fields, or our
    # quantized spec
    moe = {"num_moe_experts": m["num_moe_experts"],
           "moe_token_dispatcher_type": p["moe_token_dispatcher_type"]}
    choice = resolve_backend(recipe, num_layers=m["num_layers"], **moe)
    log(f"[precision] backend {choice.describe()}")
    config = transformer_config(m, p, bf16=t["bf16"], quantization=backend_config_fields(
        choice, recipe, num_layers=m["num_layers"], **moe),
        **fusion_options(t), log=log)
    spec = gpt_layer_spec_for(choice, config,
                              pp_rank=parallel_state.get_pipeline_model_parallel_rank())
    model = GPTModel(config=config, transformer_layer_spec=spec, **_model_kwargs(m))
    if config.use_cpu_initialization and torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())  # drawn on the CPU, trained on this rank's GPU
    table = apply_backend_precision([model], recipe, choice, log=False)
    return model, config, table


def wrap_model(model, config, *, bf16: bool, overlap_grad_reduce: bool = False,
               use_distributed_optimizer: bool = True):
    """Float16Module (BF16) + DDP, and the schedule hooks that make DDP reduce gradients.

    Megatron's pipeline schedules only synchronise gradients through hooks on the config:
    ``no_sync_func`` (accumulate locally across micro-batches) and ``finalize_model_grads_func``
    (data-parallel reduce-scatter into the distributed optimizer's shards, plus the all-reduce of
    sequence-parallel norm grads and of embedding grads shared across pipeline stages; an
    all-reduce instead with ``use_distributed_optimizer=False``). Without
    them every data-parallel rank would step on its own local gradient. With
    ``overlap_grad_reduce`` DDP starts each bucket's reduce-scatter as soon as its gradients are
    ready (during the backward of the last micro-batch); the schedule's ``grad_sync_func`` hook
    is what lets the pipeline schedules launch them, and ``finalize_model_grads`` waits for them.
    """
    from megatron.core.distributed import (DistributedDataParallel,
                                           DistributedDataParallelConfig, finalize_model_grads)
    from megatron.core.transformer.module import Float16Module

    if bf16:
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=use_distributed_optimizer, grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
    )
    ddp = DistributedDataParallel(config, ddp_config, model)
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    if overlap_grad_reduce:
        config.grad_sync_func = ddp.start_grad_sync
    return ddp


def resolve_overlap_grad_reduce(train: dict) -> bool:
    """``train.overlap_grad_reduce``: null -> on when there is a GPU (NCCL) and the step is not a
    CUDA graph (``train.cuda_graph``: no collective inside the graph), off on CPU (gloo)."""
    v = train["overlap_grad_reduce"]
    if v is None:
        return torch.cuda.is_available() and not train.get("cuda_graph", False)
    return bool(v)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingStack:
    """What ``pretrain.py`` trains: this stage's model, its DDP wrapper, the optimizer."""

    model: Any  # this pipeline stage's GPTModel or HybridModel (unwrapped)
    ddp: Any  # Megatron DistributedDataParallel around Float16Module(model) (BF16) or model
    optimizer: Any  # Megatron's distributed optimizer (train.use_distributed_optimizer=false: not)
    config: Any  # the TransformerConfig
    table: Any  # the precision table (what each GEMM runs), or None without the quant spec
    recipe: Any


def build_training_stack(cfg: dict, recipe=None, *, log=print) -> TrainingStack:
    """Model -> precision policy -> Float16Module -> DDP -> distributed optimizer, as the training
    loop builds them. ``cfg`` is the composed config as plain Python (``cli.compose.to_plain``);
    ``recipe`` defaults to the one ``cfg.precision`` names. Benchmarks and multi-GPU comparisons
    build through this function so that they measure what ``pretrain.py`` runs; Megatron's model
    parallel state must be initialised first (``platform.distributed``)."""
    from nvfp4_megatron.training.optim import build_optimizer

    t = cfg["train"]
    if not t["use_distributed_optimizer"] and (t["save"] or t["load"]):
        # training/checkpoint.py saves and restores the distributed optimizer's state only (its
        # Adam steps live in the param groups); a non-distributed one could not be resumed
        raise ValueError("train.use_distributed_optimizer=false needs train.save=false and no "
                         "train.load: the training loop's checkpoints hold the distributed "
                         "optimizer's state only")
    if recipe is None:
        recipe = recipe_from_config(cfg["precision"])
    model, config, table = build_model(cfg, recipe, log=log)
    ddp = wrap_model(model, config, bf16=t["bf16"],
                     overlap_grad_reduce=resolve_overlap_grad_reduce(t),
                     use_distributed_optimizer=t["use_distributed_optimizer"])
    optimizer = build_optimizer(ddp, t, bf16=t["bf16"])
    return TrainingStack(model=model, ddp=ddp, optimizer=optimizer, config=config, table=table,
                         recipe=recipe)


def model_shape(cfg: dict) -> dict:
    keys = MODEL_SHAPE_KEYS + (HYBRID_SHAPE_KEYS if is_hybrid(cfg["model"]) else ())
    return {k: cfg["model"][k] for k in keys}
