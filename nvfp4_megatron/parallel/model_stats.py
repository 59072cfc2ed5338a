"""Exact parameter counts, model FLOPs and per-GPU memory for dense, MoE and hybrid models.

Parameters (counted the way Megatron-Core builds the modules; ``g = 2`` for gated (SwiGLU) FC1):

* attention layer: input RMSNorm ``h`` (LayerNorm ``2h``), QKV ``h·(n_q + 2 n_kv)·d_head``,
  output projection ``n_q d_head · h`` (+ biases when ``add_bias_linear``/``add_qkv_bias``);
* MLP: pre-norm ``h``, FC1 ``h·g·f``, FC2 ``f·h``;
* MoE: pre-norm ``h``, router ``E·h``, ``E`` experts of FC1 ``h·g·f_e`` + FC2 ``f_e·h``, an
  optional shared expert ``h·g·f_s + f_s·h`` (+ ``h`` for its sigmoid gate);
* Mamba-2 (Dao & Gu 2024, arXiv 2405.21060 §7; Megatron ``MambaMixer``) with
  ``d_in = expand·h = n_heads·d_head``: norm ``h``, in_proj ``h·(2 d_in + 2 G N + n_heads)``
  (z, x, B, C, dt), depthwise conv1d over x,B,C ``(d_in + 2GN)·(k + 1)`` (weight + bias),
  ``dt_bias``, ``A_log``, ``D`` (``n_heads`` each), gated RMSNorm ``d_in``, out_proj ``d_in·h``;
* embeddings ``V·h``, untied LM head ``V·h``, final norm ``h``.

In a hybrid model every pattern symbol is one layer (``M`` Mamba, ``*`` attention, ``-`` MLP,
``E`` MoE), as in Megatron's ``HybridModel``; in a plain GPT model each layer is attention plus
an MLP or MoE block. :func:`meta_param_count` builds the model on the ``meta`` device (GPT:
Megatron-Core's local spec; hybrid: Megatron's ``HybridModel`` with the project's local hybrid
spec, ``mcore/hybrid_spec.py``) and counts its tensors; tests check both agree exactly.

FLOPs (model FLOPs, forward + backward = 3x forward, 2 per multiply-add): every linear GEMM
``2·tokens·in·out``; causal attention ``2·s²·n_q·d_head`` per sequence forward (QKᵀ and AV, the
causal half, Megatron's convention); Mamba-2 SSD with chunk length Q per token and layer
``n_heads·(2QP + 4NP) + G·2QN`` (intra-chunk CBᵀ and its product with X, chunk states and
state-to-output), conv ``2·k·(d_in + 2GN)``; LM head ``2·h·V``. Each FLOP is labelled by the
precision it runs at: linears of quantized blocks at the recipe's class, everything else BF16.

Memory per GPU (Megatron with the distributed optimizer, Rajbhandari et al. ZeRO-1): BF16
weights 2 B/param, FP32 main gradients 4 B/param, FP32 master weights + Adam m, v = 12 B/param
sharded over DP×CP (dense) or EDP (experts), the quantized weight copies (rowwise + columnwise)
at the recipe's storage size, and activations (Korthikanti et al. 2022, arXiv 2205.05198 §4,
with flash attention so no s² term): per layer the tensors saved for backward, linear inputs at
the recipe's storage size (they are saved quantized for Wgrad), the rest BF16; the first
pipeline stage holds ``min(PP, microbatches)`` micro-batches in flight under 1F1B.
"""

from __future__ import annotations

import contextlib
import enum
import io
import logging
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from .layout import PIPE_SEPARATOR, ParallelLayout, split_hybrid_pattern

__all__ = [
    "ModelShape",
    "cfg_get",
    "flops_per_step",
    "memory_per_gpu",
    "meta_param_count",
    "param_count",
]

_ACTIVATIONS = ("gelu", "swiglu", "squared_relu", "relu", "geglu")


def cfg_get(node: Any, key: str, default: Any = None) -> Any:
    """``node[key]`` of a config (dict, DictConfig or object), enums as their value; a missing
    key or None gives ``default``."""
    if node is None:
        return default
    try:
        val = node.get(key, default) if hasattr(node, "get") else getattr(node, key, default)
    except Exception:  # omegaconf raises on missing keys in struct mode
        return default
    if isinstance(val, enum.Enum):  # structured-config Enums (cli/schema.py) -> their value
        return val.value
    return default if val is None else val


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """The model's shape: the one list of its fields (Megatron names, docs/ARCHITECTURE.md).

    Read by the planner (parameters, FLOPs, memory), by the layout check (``make_layout``) and,
    through :meth:`checkpoint_fields`, by the checkpoint metadata. :data:`PLANNER_ONLY` are
    Megatron options the training builder does not offer (so not ``cli/schema.ModelConfig``
    fields; the planner reads them for other models' recipes); ``mamba_*`` fields are hybrid
    fields.
    """

    # moe_router_topk changes which experts run, not a tensor shape: not in the checkpoint record
    NOT_RECORDED: ClassVar[tuple[str, ...]] = ("moe_router_topk",)
    PLANNER_ONLY: ClassVar[tuple[str, ...]] = ("add_qkv_bias", "moe_shared_expert_gate",
                                               "mamba_chunk_size")

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    seq_length: int
    activation: str = "swiglu"
    normalization: str = "RMSNorm"
    position_embedding_type: str = "rope"
    untie_embeddings_and_output_weights: bool = True
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    num_moe_experts: int | None = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None
    moe_shared_expert_intermediate_size: int | None = None
    moe_shared_expert_gate: bool = False
    hybrid_override_pattern: str | None = None
    mamba_num_heads: int | None = None
    mamba_head_dim: int = 64
    mamba_state_dim: int = 128
    mamba_num_groups: int = 8
    mamba_conv_kernel: int = 4
    mamba_expand: int = 2
    mamba_chunk_size: int = 128

    @classmethod
    def checkpoint_fields(cls, *, hybrid: bool) -> tuple[str, ...]:
        """The fields a checkpoint records: every model's, or (``hybrid=True``) the ``mamba_*``
        ones, recorded for hybrid models only (GPT checkpoints written before hybrids existed
        stay loadable)."""
        names = [f.name for f in fields(cls)
                 if f.name not in cls.PLANNER_ONLY + cls.NOT_RECORDED]
        return tuple(n for n in names if n.startswith("mamba_") == hybrid)

    @staticmethod
    def from_cfg(model: Any) -> "ModelShape":
        """Read ``cfg.model``; required fields missing -> ValueError naming them."""
        required = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length")
        missing = [k for k in required if cfg_get(model, k) is None]
        if missing:
            raise ValueError(f"model config lacks required fields {missing} (cfg.model.<field>)")
        h = int(cfg_get(model, "hidden_size"))
        nq = int(cfg_get(model, "num_attention_heads"))
        kw: dict[str, Any] = {
            "num_layers": int(cfg_get(model, "num_layers")),
            "hidden_size": h,
            "ffn_hidden_size": int(cfg_get(model, "ffn_hidden_size", 4 * h)),
            "num_attention_heads": nq,
            "num_query_groups": int(cfg_get(model, "num_query_groups", nq)),
            "kv_channels": int(cfg_get(model, "kv_channels", h // nq)),
            "vocab_size": int(cfg_get(model, "vocab_size")),
            "seq_length": int(cfg_get(model, "seq_length")),
        }
        for name in ("activation", "normalization", "position_embedding_type"):
            kw[name] = str(cfg_get(model, name, ModelShape.__dataclass_fields__[name].default))
        for name in ("untie_embeddings_and_output_weights", "add_bias_linear", "add_qkv_bias",
                     "moe_shared_expert_gate"):
            kw[name] = bool(cfg_get(model, name, ModelShape.__dataclass_fields__[name].default))
        for name in ("num_moe_experts", "moe_ffn_hidden_size",
                     "moe_shared_expert_intermediate_size", "mamba_num_heads"):
            v = cfg_get(model, name)
            kw[name] = None if v is None else int(v)
        for name in ("moe_router_topk", "mamba_head_dim", "mamba_state_dim", "mamba_num_groups",
                     "mamba_conv_kernel", "mamba_expand", "mamba_chunk_size"):
            kw[name] = int(cfg_get(model, name, ModelShape.__dataclass_fields__[name].default))
        pat = cfg_get(model, "hybrid_override_pattern")
        kw["hybrid_override_pattern"] = None if pat in (None, "") else str(pat)
        if kw["mamba_num_heads"] is None and pat and "M" in str(pat):
            # Megatron's MambaMixer without mamba_num_heads: d_inner = expand x hidden_size
            d_inner = kw["mamba_expand"] * h
            if d_inner % kw["mamba_head_dim"]:
                raise ValueError(f"mamba_expand x hidden_size = {d_inner} is not a multiple of "
                                 f"mamba_head_dim={kw['mamba_head_dim']} (mamba_num_heads unset)")
            kw["mamba_num_heads"] = d_inner // kw["mamba_head_dim"]
        shape = ModelShape(**kw)
        shape.check()
        return shape

    def check(self) -> None:
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"model.activation={self.activation!r}; allowed {_ACTIVATIONS}")
        if self.normalization not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"model.normalization={self.normalization!r}; allowed RMSNorm, LayerNorm")
        if self.num_moe_experts and not self.moe_ffn_hidden_size:
            raise ValueError("model.num_moe_experts is set but model.moe_ffn_hidden_size is not")
        if self.hybrid_override_pattern and "M" in self.hybrid_override_pattern:
            if self.mamba_num_heads * self.mamba_head_dim != self.d_inner:
                raise ValueError(
                    f"mamba_num_heads={self.mamba_num_heads} x mamba_head_dim={self.mamba_head_dim}"
                    f" = {self.mamba_num_heads * self.mamba_head_dim} must equal mamba_expand="
                    f"{self.mamba_expand} x hidden_size={self.hidden_size} = {self.d_inner}"
                )

    @property
    def gated(self) -> bool:
        return self.activation in ("swiglu", "geglu")

    @property
    def d_inner(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def norm_params(self) -> int:
        return 2 * self.hidden_size if self.normalization == "LayerNorm" else self.hidden_size

    def layer_kinds(self) -> list[str]:
        """One symbol per layer: M, *, -, E for hybrid; 'T' (attention+MLP) / 'X' (attention+MoE)."""
        if self.hybrid_override_pattern:
            return list(self.hybrid_override_pattern.replace(PIPE_SEPARATOR, ""))
        return ["X" if self.num_moe_experts else "T"] * self.num_layers

    def stage_kinds(self, pp: int) -> list[list[str]]:
        if self.hybrid_override_pattern:
            return [list(s) for s in split_hybrid_pattern(self.hybrid_override_pattern, pp)]
        n = self.num_layers // pp
        kinds = self.layer_kinds()
        return [kinds[i * n : (i + 1) * n] for i in range(pp)]


# ---------------------------------------------------------------------------------------------
# parameters


@dataclass(frozen=True, kw_only=True)
class Params:
    """Counts split by how they are sharded: ``linear`` (TP-sharded GEMM weights, quantizable),
    ``replicated`` (norms, biases kept whole, router, Mamba dt/A/D/conv), ``expert`` (EP x ETP)."""

    linear: int = 0
    replicated: int = 0
    expert: int = 0

    def __add__(self, o: "Params") -> "Params":
        return Params(linear=self.linear + o.linear, replicated=self.replicated + o.replicated,
                      expert=self.expert + o.expert)

    @property
    def total(self) -> int:
        return self.linear + self.replicated + self.expert


def _attention_params(m: ModelShape) -> Params:
    h, q, kv = m.hidden_size, m.num_attention_heads * m.kv_channels, m.num_query_groups * m.kv_channels
    qkv_out = q + 2 * kv
    bias = (qkv_out if (m.add_bias_linear or m.add_qkv_bias) else 0) + (h if m.add_bias_linear else 0)
    return Params(linear=h * qkv_out + q * h + bias, replicated=m.norm_params)


def _mlp_params(m: ModelShape, ffn: int, *, norm: bool = True) -> Params:
    h, g = m.hidden_size, (2 if m.gated else 1)
    bias = (g * ffn + h) if m.add_bias_linear else 0
    return Params(linear=h * g * ffn + ffn * h + bias, replicated=m.norm_params if norm else 0)


def _moe_params(m: ModelShape) -> Params:
    h, g, e = m.hidden_size, (2 if m.gated else 1), m.num_moe_experts
    expert = e * (h * g * m.moe_ffn_hidden_size + m.moe_ffn_hidden_size * h)
    p = Params(replicated=m.norm_params + e * h, expert=expert)
    if m.moe_shared_expert_intermediate_size:
        p = p + _mlp_params(m, m.moe_shared_expert_intermediate_size, norm=False)
        if m.moe_shared_expert_gate:
            p = p + Params(replicated=h)
    return p


def _mamba_params(m: ModelShape) -> Params:
    h, di, nh = m.hidden_size, m.d_inner, m.mamba_num_heads
    gn = m.mamba_num_groups * m.mamba_state_dim
    conv_ch = di + 2 * gn
    in_proj = h * (2 * di + 2 * gn + nh)
    # conv1d (weight + bias), dt_bias, A_log, D, and the gated RMSNorm over d_in are TP-sharded by
    # channel/head in Megatron; they are not GEMMs, so they are counted as "replicated" here and
    # divided by TP in memory_per_gpu via _stage_params.
    other = conv_ch * (m.mamba_conv_kernel + 1) + 3 * nh + di
    # no linear biases: Megatron's MambaMixer builds in_proj/out_proj with its own bias=False
    # whatever add_bias_linear says (that flag applies to the attention and MLP layers)
    return Params(linear=in_proj + di * h, replicated=m.norm_params + other)


def layer_params(m: ModelShape, kind: str) -> Params:
    if kind == "T":
        return _attention_params(m) + _mlp_params(m, m.ffn_hidden_size)
    if kind == "X":
        return _attention_params(m) + _moe_params(m)
    if kind == "*":
        return _attention_params(m)
    if kind == "-":
        return _mlp_params(m, m.ffn_hidden_size)
    if kind == "E":
        return _moe_params(m)
    if kind == "M":
        return _mamba_params(m)
    raise ValueError(f"unknown layer kind {kind!r}")


def embedding_params(m: ModelShape) -> int:
    pos = m.seq_length * m.hidden_size if m.position_embedding_type == "learned_absolute" else 0
    return m.vocab_size * m.hidden_size + pos


def output_params(m: ModelShape) -> int:
    return m.vocab_size * m.hidden_size if m.untie_embeddings_and_output_weights else 0


def param_count(m: ModelShape) -> dict[str, int]:
    """Exact analytic count: total, embedding, output, layers, experts, active (top-k experts)."""
    layers = Params()
    for k in m.layer_kinds():
        layers = layers + layer_params(m, k)
    emb, out, final_norm = embedding_params(m), output_params(m), m.norm_params
    total = layers.total + emb + out + final_norm
    inactive = 0
    if m.num_moe_experts:
        n_moe = sum(1 for k in m.layer_kinds() if k in ("X", "E"))
        per_expert = (2 if m.gated else 1) * m.hidden_size * m.moe_ffn_hidden_size + \
            m.moe_ffn_hidden_size * m.hidden_size
        inactive = n_moe * (m.num_moe_experts - m.moe_router_topk) * per_expert
    return {
        "total": total,
        "embedding": emb,
        "output_layer": out,
        "final_norm": final_norm,
        "layers": layers.total,
        "experts": layers.expert,
        "active": total - inactive,
    }


def meta_param_count(m: ModelShape) -> int | None:
    """Build the model on the ``meta`` device and count its tensors (no memory, no init).

    GPT: Megatron-Core's local spec. Hybrid (``hybrid_override_pattern``): Megatron's
    ``HybridModel`` with the local hybrid spec (Mamba-2 mixer without mamba_ssm); returns None for
    pattern symbols that spec does not build (MoE ``E``). Uses a private single-rank gloo group
    when torch.distributed is not initialised (and tears it down after), because Megatron-Core's
    modules look up their process groups at construction.
    """
    if m.hybrid_override_pattern and set(m.hybrid_override_pattern) - set("M*-|"):
        return None
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    owns_dist = not dist.is_initialized()
    if not owns_dist and dist.get_world_size() != 1:
        return None  # inside a real multi-rank job; the analytic count is the answer
    if owns_dist:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    owns_mp = not ps.model_parallel_is_initialized()
    try:
        if owns_mp:
            ps.initialize_model_parallel(1, 1)
        cfg = TransformerConfig(
            num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
            num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
            kv_channels=m.kv_channels, normalization=m.normalization,
            add_bias_linear=m.add_bias_linear, add_qkv_bias=m.add_qkv_bias,
            gated_linear_unit=m.gated, num_moe_experts=m.num_moe_experts,
            moe_router_topk=m.moe_router_topk if m.num_moe_experts else 2,
            moe_ffn_hidden_size=m.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
            moe_shared_expert_gate=m.moe_shared_expert_gate,
            use_cpu_initialization=True, perform_initialization=False,
            **_hybrid_config_fields(m),
        )
        # Megatron prints a deprecation banner for GPTModel and warns about missing apex/TE.
        with torch.device("meta"), contextlib.redirect_stdout(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.disable(logging.WARNING)
            if m.hybrid_override_pattern:
                model = _meta_hybrid_model(m, cfg)
            else:
                spec = get_gpt_layer_local_spec(num_experts=m.num_moe_experts,
                                                moe_grouped_gemm=False,
                                                normalization=m.normalization)
                model = GPTModel(
                    config=cfg, transformer_layer_spec=spec, vocab_size=m.vocab_size,
                    max_sequence_length=m.seq_length,
                    position_embedding_type=m.position_embedding_type,
                    share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
                )
        return sum(p.numel() for p in model.parameters())
    finally:
        logging.disable(logging.NOTSET)
        if owns_mp:
            ps.destroy_model_parallel()
        if owns_dist:
            dist.destroy_process_group()


def _hybrid_config_fields(m: ModelShape) -> dict:
    if not m.hybrid_override_pattern:
        return {}
    return {"is_hybrid_model": True, "mamba_state_dim": m.mamba_state_dim,
            "mamba_head_dim": m.mamba_head_dim, "mamba_num_groups": m.mamba_num_groups,
            "mamba_num_heads": m.mamba_num_heads}


def _meta_hybrid_model(m: ModelShape, cfg):
    """HybridModel with the local hybrid spec (built inside the caller's meta-device context)."""
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    from nvfp4_megatron.mcore.hybrid_spec import quantized_hybrid_stack_spec

    spec = quantized_hybrid_stack_spec(d_conv=m.mamba_conv_kernel, expand=m.mamba_expand,
                                       chunk_size=m.mamba_chunk_size)
    return HybridModel(
        config=cfg, hybrid_stack_spec=spec, vocab_size=m.vocab_size,
        max_sequence_length=m.seq_length,
        hybrid_layer_pattern=m.hybrid_override_pattern.replace(PIPE_SEPARATOR, ""),
        position_embedding_type=m.position_embedding_type,
        share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
    )


# ---------------------------------------------------------------------------------------------
# FLOPs


@dataclass(frozen=True, kw_only=True)
class Flops:
    """Model FLOPs per step split by the precision the work runs at."""

    quantized: float = 0.0  # linear GEMMs of quantized blocks (recipe's class)
    bf16: float = 0.0  # everything else

    @property
    def total(self) -> float:
        return self.quantized + self.bf16


def _layer_fwd_flops_per_token(m: ModelShape, kind: str) -> tuple[float, float]:
    """(linear GEMM FLOPs, other FLOPs) per token, forward, for one layer."""
    h, s = m.hidden_size, m.seq_length
    g = 2 if m.gated else 1
    lin = other = 0.0
    if kind in ("T", "X", "*"):
        q, kv = m.num_attention_heads * m.kv_channels, m.num_query_groups * m.kv_channels
        lin += 2 * h * (q + 2 * kv) + 2 * q * h
        other += 2 * s * q  # causal QK^T + AV: 2 * (s^2 / 2) * q * 2 GEMMs / s tokens
    if kind in ("T", "-"):
        lin += 2 * h * g * m.ffn_hidden_size + 2 * m.ffn_hidden_size * h
    if kind in ("X", "E"):
        k, fe = m.moe_router_topk, m.moe_ffn_hidden_size
        lin += k * (2 * h * g * fe + 2 * fe * h)
        other += 2 * h * m.num_moe_experts  # router (BF16)
        if m.moe_shared_expert_intermediate_size:
            fs = m.moe_shared_expert_intermediate_size
            lin += 2 * h * g * fs + 2 * fs * h
    if kind == "M":
        di, nh, p = m.d_inner, m.mamba_num_heads, m.mamba_head_dim
        n, grp, qc = m.mamba_state_dim, m.mamba_num_groups, min(m.mamba_chunk_size, s)
        lin += 2 * h * (2 * di + 2 * grp * n + nh) + 2 * di * h
        other += nh * (2 * qc * p + 4 * n * p) + grp * 2 * qc * n  # SSD
        other += 2 * m.mamba_conv_kernel * (di + 2 * grp * n)  # depthwise conv
    return lin, other


def flops_per_step(m: ModelShape, tokens: int, *, bf16_layers: set[int] | frozenset[int] = frozenset(),
                   quantized: bool = True) -> Flops:
    """Model FLOPs (fwd + bwd) for ``tokens`` tokens; layers in ``bf16_layers`` (0-based global
    indices) and all non-linear work count as BF16; the rest of the linears as quantized
    (all BF16 when ``quantized`` is False)."""
    q = b = 0.0
    for i, kind in enumerate(m.layer_kinds()):
        lin, other = _layer_fwd_flops_per_token(m, kind)
        if quantized and i not in bf16_layers:
            q += lin
        else:
            b += lin
        b += other
    b += 2 * m.hidden_size * m.vocab_size  # LM head (BF16)
    return Flops(quantized=3 * q * tokens, bf16=3 * b * tokens)


# ---------------------------------------------------------------------------------------------
# memory


@dataclass(frozen=True, kw_only=True)
class StageMemory:
    stage: int
    params: int  # parameters held by one GPU of this stage
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    quantized_weights_gib: float
    activations_gib: float
    inflight_microbatches: int
    breakdown: dict = field(default_factory=dict)

    @property
    def total_gib(self) -> float:
        return (self.weights_gib + self.grads_gib + self.optimizer_gib + self.quantized_weights_gib
                + self.activations_gib)


GIB = 1024**3


def _layer_activation_bytes(m: ModelShape, kind: str, lay: ParallelLayout, act_b: float) -> float:
    """Bytes saved for backward by one layer for one micro-batch on one GPU."""
    t = lay.micro_batch_size * m.seq_length / lay.cp  # tokens on this CP rank
    tp = lay.tp
    sp = tp if lay.sequence_parallel else 1
    h, b2 = m.hidden_size, 2.0
    g = 2 if m.gated else 1
    total = 0.0
    if kind in ("T", "X", "*"):
        q, kv = m.num_attention_heads * m.kv_channels, m.num_query_groups * m.kv_channels
        total += b2 * t * h / sp + act_b * t * h / sp  # norm input, QKV input
        total += b2 * t * (q + 2 * kv) / tp + b2 * t * q / tp  # q,k,v + flash output
        total += act_b * t * q / tp  # proj input
    if kind in ("T", "-"):
        f = m.ffn_hidden_size
        total += b2 * t * h / sp + act_b * t * h / sp + b2 * t * g * f / tp + act_b * t * f / tp
    if kind in ("X", "E"):
        fe = m.moe_ffn_hidden_size
        routed = m.moe_router_topk * t / sp * lay.etp  # tokens per GPU after dispatch (balanced)
        total += 2 * b2 * t * h / sp  # norm input + router input
        total += b2 * routed * h + act_b * routed * h  # permuted tokens + FC1 input
        total += b2 * routed * g * fe / lay.etp + act_b * routed * fe / lay.etp
        if m.moe_shared_expert_intermediate_size:
            fs = m.moe_shared_expert_intermediate_size
            total += act_b * t * h / sp + b2 * t * g * fs / tp + act_b * t * fs / tp
    if kind == "M":
        di, nh, n, grp = m.d_inner, m.mamba_num_heads, m.mamba_state_dim, m.mamba_num_groups
        total += b2 * t * h / sp + act_b * t * h / sp  # norm input, in_proj input
        total += b2 * t * (2 * di + 2 * grp * n + nh) / tp  # in_proj output z,x,B,C,dt
        total += b2 * t * (di + 2 * grp * n) / tp  # conv output
        total += 4.0 * (t / m.mamba_chunk_size) * nh * m.mamba_head_dim * n / tp  # chunk states
        total += b2 * t * di / tp + act_b * t * di / tp  # SSD output y, out_proj input
    return total


def _stage_params(m: ModelShape, lay: ParallelLayout, stage: int, kinds: list[str],
                  quantized_layer: list[bool]) -> tuple[int, int, int, int]:
    """(params on one GPU, of which dense, of which expert, of which quantizable) for a stage."""
    dense = expert = quant = 0
    for kind, is_q in zip(kinds, quantized_layer):
        p = layer_params(m, kind)
        lin = p.linear // lay.tp
        rep = p.replicated
        if kind == "M":  # Mamba's conv/dt/A/D/norm(d_in) are sharded by TP; its pre-norm is not
            rep = m.norm_params + (p.replicated - m.norm_params) // lay.tp
        exp = p.expert // (lay.ep * lay.etp)
        dense += lin + rep
        expert += exp
        if is_q:
            quant += lin + exp
    if stage == 0:
        dense += embedding_params(m) // lay.tp
    if stage == lay.pp - 1:
        dense += m.norm_params
        if m.untie_embeddings_and_output_weights or lay.pp > 1:
            dense += m.vocab_size * m.hidden_size // lay.tp
    return dense + expert, dense, expert, quant


def memory_per_gpu(m: ModelShape, lay: ParallelLayout, *, act_bytes: float, weight_bytes: float,
                   bf16_layers: set[int] | frozenset[int] = frozenset()) -> list[StageMemory]:
    """Per pipeline stage, the memory of one GPU (see module docstring for the model)."""
    stages = m.stage_kinds(lay.pp)
    out = []
    first = 0
    for s, kinds in enumerate(stages):
        q_flags = [(first + i) not in bf16_layers and weight_bytes > 0 for i in range(len(kinds))]
        total, dense, expert, quant = _stage_params(m, lay, s, kinds, q_flags)
        per_mb = 0.0
        for i, kind in enumerate(kinds):
            ab = act_bytes if q_flags[i] else 2.0
            per_mb += _layer_activation_bytes(m, kind, lay, ab)
        t = lay.micro_batch_size * m.seq_length / lay.cp
        sp = lay.tp if lay.sequence_parallel else 1
        if s == 0:
            per_mb += 2.0 * t * m.hidden_size / sp  # embedding output
        if s == lay.pp - 1:
            per_mb += 2.0 * t * m.hidden_size / sp + 4.0 * t * m.vocab_size / lay.tp  # FP32 logits
        inflight = max(1, min(lay.pp - s, lay.num_microbatches)) if lay.pp > 1 else 1
        opt = 12.0 * (dense / (lay.dp * lay.cp) + expert / lay.edp)
        out.append(StageMemory(
            stage=s, params=total, weights_gib=2.0 * total / GIB, grads_gib=4.0 * total / GIB,
            optimizer_gib=opt / GIB, quantized_weights_gib=2 * weight_bytes * quant / GIB,
            activations_gib=per_mb * inflight / GIB, inflight_microbatches=inflight,
            breakdown={"dense_params": dense, "expert_params": expert, "quantized_params": quant,
                       "activation_gib_per_microbatch": per_mb / GIB},
        ))
        first += len(kinds)
    return out
