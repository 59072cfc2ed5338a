"""5D parallel layout with MoE parallel folding: validation and rank -> group tables.

Megatron-Core lays out one world of ``W`` ranks twice (MoE Parallel Folding, Liu et al.,
arXiv 2504.14960, §3):

* the **attention** (dense) part as ``TP × CP × DP × PP = W``, and
* the **MoE** (expert) part as ``ETP × EP × EDP × PP = W``,

sharing only the pipeline dimension. "Folding" means the expert dimensions are chosen
independently of the attention ones (e.g. ETP=1 while TP=2, EP spanning TP and DP ranks),
instead of the classic constraint ``ETP = TP`` and ``EP`` a divisor of ``DP``.

Rank order. Megatron-Core's ``RankGenerator`` decomposes a global rank in mixed radix with
the dimension order string ``"tp-cp-ep-dp-pp"`` (first = fastest varying). The attention
generator uses it with EP = 1, the expert generator with CP = 1, TP -> ETP and DP -> EDP::

    attention: rank = tp + TP * (cp + CP * (dp + DP * pp))
    expert:    rank = etp + ETP * (ep + EP * (edp + EDP * pp))

PP is outermost in both, so every pipeline stage is one contiguous block of ``W / PP`` ranks and
the two decompositions re-partition the same block. A group "over dimensions D" is the set of
ranks whose coordinates agree on every dimension except those in D. ``dp_cp`` is the group the
distributed optimizer shards dense parameters over (DP × CP), ``edp`` the one it shards expert
parameters over.

Validation collects every violated rule (not only the first) and raises one
:class:`LayoutError` naming all the sizes involved.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the one list of model-shape fields; imported for the annotation only
    from .model_stats import ModelShape

__all__ = [
    "LayoutError",
    "LocalMambaRules",
    "check_world",
    "ParallelLayout",
    "local_mamba_problems",
    "make_layout",
    "mamba_proj_shards",
    "rank_coordinates",
    "rank_groups",
    "split_hybrid_pattern",
]

ATTENTION_ORDER = ("tp", "cp", "dp", "pp")  # Megatron "tp-cp-ep-dp-pp" with ep=1
EXPERT_ORDER = ("etp", "ep", "edp", "pp")  # the same order with cp=1, tp->etp, dp->edp
HYBRID_SYMBOLS = frozenset("M*-E")
PIPE_SEPARATOR = "|"


class LayoutError(ValueError):
    """A parallel layout that does not fit the world size or the model; lists every violation."""

    def __init__(self, problems: list[str], *, summary: str) -> None:
        self.problems = list(problems)
        text = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid parallel layout ({summary}):\n{text}")


@dataclass(frozen=True, kw_only=True)
class LocalMambaRules:
    """What the project's local Mamba mixer (the emulated backend; no mamba_ssm) adds to the
    layout rules: no context parallelism, and quantized ``in_proj`` / ``out_proj`` shards that are
    multiples of the recipe's blocks (``weight_multiples`` = ``LinearRecipe.weight_multiples()``
    of the recipe the Mamba blocks run; None when every Mamba block stays in BF16)."""

    recipe: str
    weight_multiples: tuple[int, int] | None


def mamba_proj_shards(m: "ModelShape", tp: int) -> dict[str, tuple[int, int]]:
    """One TP rank's ``[out, in]`` weight shard of a Mamba block's ``in_proj`` and ``out_proj``
    (Megatron's MambaMixer: in_proj packs ``[z, x, B, C, dt]``, each block split over TP)."""
    di = m.mamba_num_heads * m.mamba_head_dim
    rows = 2 * di + 2 * m.mamba_num_groups * m.mamba_state_dim + m.mamba_num_heads
    return {"in_proj": (rows // tp, m.hidden_size), "out_proj": (m.hidden_size, di // tp)}


def local_mamba_problems(m: "ModelShape", *, tp: int, cp: int, rules: LocalMambaRules) -> list[str]:
    """The rules of :class:`LocalMambaRules` for a model with Mamba blocks (else none)."""
    if not m.hybrid_override_pattern or "M" not in m.hybrid_override_pattern:
        return []
    problems = []
    if cp > 1:
        problems.append(
            f"CP={cp} > 1 with Mamba layers: the local Mamba mixer (emulated backend, no mamba_ssm)"
            " has no context parallelism; use context_parallel_size=1 (or TE + mamba_ssm, "
            "precision.backend=te, where Megatron's MambaMixer splits heads over CP)")
    if rules.weight_multiples is None or m.mamba_num_heads is None or m.hidden_size is None:
        return problems
    if m.mamba_num_heads % tp or m.mamba_num_groups % tp:
        return problems  # reported by the head / group rules
    out_m, in_m = rules.weight_multiples
    di = m.mamba_num_heads * m.mamba_head_dim
    for name, (rows, cols) in mamba_proj_shards(m, tp).items():
        bad = [f"{what} {n} is not a multiple of {mult}"
               for what, n, mult in (("rows", rows, out_m), ("columns", cols, in_m)) if n % mult]
        if not bad:
            continue
        how = (f"(2 x d_inner {di} + 2 x groups {m.mamba_num_groups} x state "
               f"{m.mamba_state_dim} + heads {m.mamba_num_heads}) / TP {tp}"
               if name == "in_proj" else f"d_inner {di} / TP {tp}")
        which = "rows" if name == "in_proj" else "columns"
        problems.append(
            f"Mamba {name} shard [{rows}, {cols}] per TP rank ({which} = {how}): "
            + ", ".join(bad) + f" (recipe {rules.recipe} quantizes in blocks of "
            f"[{out_m}, {in_m}]); change mamba_num_heads / mamba_head_dim / mamba_num_groups / "
            "mamba_state_dim or TP, or keep the Mamba blocks in BF16")
    return problems


@dataclass(frozen=True, kw_only=True)
class ParallelLayout:
    """A validated layout. Build it with :func:`make_layout`; ``dp``/``edp`` are derived."""

    world_size: int
    tp: int
    cp: int
    pp: int
    dp: int
    ep: int
    etp: int
    edp: int
    sequence_parallel: bool
    micro_batch_size: int
    global_batch_size: int
    has_experts: bool = False

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    def describe(self) -> str:
        experts = (f"experts ETP{self.etp} x EP{self.ep} x EDP{self.edp} x PP{self.pp}; "
                   if self.has_experts else "")
        return (
            f"attention TP{self.tp} x CP{self.cp} x DP{self.dp} x PP{self.pp}; {experts}"
            f"SP={'on' if self.sequence_parallel else 'off'}; world {self.world_size}"
        )

    def to_dict(self) -> dict:
        return {
            "world_size": self.world_size,
            "tensor_model_parallel_size": self.tp,
            "context_parallel_size": self.cp,
            "pipeline_model_parallel_size": self.pp,
            "data_parallel_size": self.dp,
            "expert_model_parallel_size": self.ep,
            "expert_tensor_parallel_size": self.etp,
            "expert_data_parallel_size": self.edp,
            "sequence_parallel": self.sequence_parallel,
            "micro_batch_size": self.micro_batch_size,
            "global_batch_size": self.global_batch_size,
            "num_microbatches": self.num_microbatches,
            "rank_order": "tp-cp-ep-dp-pp",
        }


def split_hybrid_pattern(pattern: str, pp: int) -> list[str]:
    """Split a hybrid pattern into ``pp`` stage patterns.

    With ``|`` separators the user chose the stage boundaries and there must be exactly
    ``pp`` segments; without them the layers are split evenly and ``len(pattern) % pp == 0``.
    Raises ``ValueError`` naming the pattern length, the segment count and ``pp``.
    """
    bad = sorted(set(pattern) - HYBRID_SYMBOLS - {PIPE_SEPARATOR})
    if bad:
        raise ValueError(
            f"hybrid_override_pattern has unknown symbols {bad}; allowed are M (Mamba), "
            f"* (attention), - (MLP), E (MoE) and | (pipeline boundary)"
        )
    if PIPE_SEPARATOR in pattern:
        segments = pattern.split(PIPE_SEPARATOR)
        if len(segments) != pp or any(not s for s in segments):
            raise ValueError(
                f"hybrid_override_pattern has {len(segments)} '|'-separated stages "
                f"(lengths {[len(s) for s in segments]}) but pipeline_model_parallel_size={pp}; "
                f"use exactly PP non-empty segments"
            )
        return segments
    if len(pattern) % pp:
        raise ValueError(
            f"hybrid_override_pattern has {len(pattern)} layers, not divisible by "
            f"pipeline_model_parallel_size={pp}; pick PP dividing {len(pattern)} or mark stage "
            f"boundaries with '|'"
        )
    n = len(pattern) // pp
    return [pattern[i * n : (i + 1) * n] for i in range(pp)]


def _world_problems(world_size: int, *, tp: int, cp: int, pp: int, ep: int, etp: int,
                    **other_sizes: int) -> tuple[list[str], int | None, int | None]:
    """The rules between the group sizes and the world: (problems, DP, EDP).

    Every size must be a positive integer (DP and EDP are None otherwise); TP x CP x PP and
    ETP x EP x PP must divide ``world_size`` (DP / EDP are 0 where they do not).
    """
    sizes = {
        "world_size": world_size,
        "tensor_model_parallel_size (TP)": tp,
        "context_parallel_size (CP)": cp,
        "pipeline_model_parallel_size (PP)": pp,
        "expert_model_parallel_size (EP)": ep,
        "expert_tensor_parallel_size (ETP)": etp,
        **other_sizes,
    }
    bad = [f"{k}={v!r} must be a positive integer" for k, v in sizes.items()
           if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if bad:
        return bad, None, None
    problems: list[str] = []
    attn = tp * cp * pp
    if world_size % attn:
        problems.append(
            f"attention group TP={tp} x CP={cp} x PP={pp} = {attn} does not divide "
            f"world_size={world_size} (data-parallel size would be {world_size / attn:.3g}); "
            f"change the layout or launch a multiple of {attn} processes"
        )
    expert = etp * ep * pp
    if world_size % expert:
        problems.append(
            f"expert group ETP={etp} x EP={ep} x PP={pp} = {expert} does not divide "
            f"world_size={world_size} (expert data-parallel size would be "
            f"{world_size / expert:.3g}); change the layout or launch a multiple of {expert} "
            f"processes"
        )
    dp = world_size // attn if not world_size % attn else 0
    edp = world_size // expert if not world_size % expert else 0
    return problems, dp, edp


def check_world(world_size: int, *, tp: int = 1, cp: int = 1, pp: int = 1, ep: int = 1,
                etp: int | None = None) -> int:
    """Check that the group sizes fit ``world_size``; return the (attention) data-parallel size.

    The world-size part of :func:`make_layout`, for callers that know no model (the process-group
    start-up). Raises :class:`LayoutError` naming every size.
    """
    etp = tp if etp is None else etp
    problems, dp, _ = _world_problems(world_size, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp)
    if problems:
        raise LayoutError(problems, summary=f"world={world_size} TP={tp} CP={cp} PP={pp} "
                                            f"EP={ep} ETP={etp}")
    return dp


def make_layout(
    *,
    world_size: int,
    tp: int = 1,
    cp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    sequence_parallel: bool = False,
    micro_batch_size: int = 1,
    global_batch_size: int,
    model: "ModelShape",
    local_mamba: LocalMambaRules | None = None,
) -> ParallelLayout:
    """Validate a layout over ``world_size`` and return it with DP and EDP derived.

    ``etp=None`` means "same as TP" (Megatron's default when expert_tensor_parallel_size is
    unset). ``model`` is a :class:`~nvfp4_megatron.parallel.model_stats.ModelShape`. Raises
    :class:`LayoutError` listing every violated rule with the sizes involved. The world-size rules
    are :func:`check_world`'s, the one check ``platform.distributed`` runs before Megatron builds
    its groups. ``local_mamba``: the local Mamba mixer's rules apply (it runs:
    emulated backend).
    """
    etp = tp if etp is None else etp
    problems, dp, edp = _world_problems(world_size, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp,
                                        micro_batch_size=micro_batch_size,
                                        global_batch_size=global_batch_size)
    summary = (
        f"world={world_size} TP={tp} CP={cp} PP={pp} EP={ep} ETP={etp} "
        f"MBS={micro_batch_size} GBS={global_batch_size}"
    )
    if dp is None:  # a size is not a positive integer: nothing else can be checked
        raise LayoutError(problems, summary=summary)

    m = model
    if m.num_attention_heads % tp:
        problems.append(f"num_attention_heads={m.num_attention_heads} not divisible by TP={tp}")
    if m.num_query_groups % tp:
        problems.append(f"num_query_groups={m.num_query_groups} not divisible by TP={tp}")
    if m.ffn_hidden_size and m.ffn_hidden_size % tp:
        problems.append(f"ffn_hidden_size={m.ffn_hidden_size} not divisible by TP={tp}")
    if m.hybrid_override_pattern:
        try:
            split_hybrid_pattern(m.hybrid_override_pattern, pp)
        except ValueError as err:
            problems.append(str(err))
        n_layers = len(m.hybrid_override_pattern.replace(PIPE_SEPARATOR, ""))
        if n_layers != m.num_layers:
            problems.append(
                f"hybrid_override_pattern has {n_layers} layers but num_layers={m.num_layers}"
            )
        if "M" in m.hybrid_override_pattern:
            if m.mamba_num_heads and m.mamba_num_heads % tp:
                problems.append(f"mamba_num_heads={m.mamba_num_heads} not divisible by TP={tp}")
            if m.mamba_num_groups and m.mamba_num_groups % tp:
                problems.append(f"mamba_num_groups={m.mamba_num_groups} not divisible by TP={tp}")
            if (m.mamba_num_heads and m.mamba_num_groups
                    and m.mamba_num_heads % m.mamba_num_groups):
                problems.append(f"mamba_num_heads={m.mamba_num_heads} not a multiple of "
                                f"mamba_num_groups={m.mamba_num_groups}")
            if local_mamba is not None:
                problems.extend(local_mamba_problems(m, tp=tp, cp=cp, rules=local_mamba))
    elif m.num_layers % pp:
        problems.append(
            f"num_layers={m.num_layers} not divisible by PP={pp} "
            f"(divisors: {[d for d in range(1, m.num_layers + 1) if m.num_layers % d == 0]})"
        )
    is_moe = bool(m.num_moe_experts) or (
        m.hybrid_override_pattern is not None and "E" in m.hybrid_override_pattern
    )
    if is_moe:
        if not m.num_moe_experts:
            problems.append("hybrid pattern has MoE layers (E) but num_moe_experts is not set")
        elif m.num_moe_experts % ep:
            problems.append(f"num_moe_experts={m.num_moe_experts} not divisible by EP={ep}")
        if m.moe_ffn_hidden_size and m.moe_ffn_hidden_size % etp:
            problems.append(f"moe_ffn_hidden_size={m.moe_ffn_hidden_size} not divisible by ETP={etp}")
        if tp > 1 and not sequence_parallel:
            problems.append(
                f"MoE with TP={tp} > 1 requires sequence_parallel=true (Megatron-Core rule)"
            )
    else:
        if ep > 1:
            problems.append(f"EP={ep} > 1 but the model has no experts (num_moe_experts unset)")
        if etp != tp:
            problems.append(f"ETP={etp} differs from TP={tp} but the model has no experts")
    if sequence_parallel and tp == 1:
        problems.append("sequence_parallel=true needs TP > 1 (it shards along the TP group)")
    if sequence_parallel and m.seq_length % (tp * cp):
        problems.append(
            f"seq_length={m.seq_length} not divisible by TP={tp} x CP={cp} (sequence parallel)"
        )
    if cp > 1 and m.seq_length % (2 * cp):
        problems.append(
            f"seq_length={m.seq_length} not divisible by 2 x CP={cp} = {2 * cp} "
            f"(load-balanced context parallel splits each sequence into 2*CP chunks)"
        )
    if dp and global_batch_size % (micro_batch_size * dp):
        problems.append(
            f"global_batch_size={global_batch_size} not divisible by micro_batch_size="
            f"{micro_batch_size} x DP={dp} = {micro_batch_size * dp}"
        )
    if problems:
        raise LayoutError(problems, summary=summary)
    return ParallelLayout(
        world_size=world_size, tp=tp, cp=cp, pp=pp, dp=dp, ep=ep, etp=etp, edp=edp,
        sequence_parallel=sequence_parallel, micro_batch_size=micro_batch_size,
        global_batch_size=global_batch_size, has_experts=is_moe,
    )


def _sizes(layout: ParallelLayout, order: tuple[str, ...]) -> list[int]:
    return [getattr(layout, d) for d in order]


def _decompose(rank: int, sizes: list[int]) -> list[int]:
    coords = []
    for s in sizes:
        coords.append(rank % s)
        rank //= s
    return coords


def rank_coordinates(layout: ParallelLayout, rank: int) -> dict[str, int]:
    """Coordinates of ``rank`` in both decompositions (tp, cp, dp, pp, etp, ep, edp)."""
    if not 0 <= rank < layout.world_size:
        raise ValueError(f"rank={rank} outside world_size={layout.world_size}")
    out = dict(zip(ATTENTION_ORDER, _decompose(rank, _sizes(layout, ATTENTION_ORDER))))
    exp = dict(zip(EXPERT_ORDER, _decompose(rank, _sizes(layout, EXPERT_ORDER))))
    assert exp["pp"] == out["pp"], "PP is outermost in both orders"
    out.update({k: v for k, v in exp.items() if k != "pp"})
    return out


def _groups(sizes: list[int], order: tuple[str, ...], dims: tuple[str, ...]) -> list[list[int]]:
    """All groups varying exactly ``dims`` (others fixed), each sorted, in rank order."""
    idx = [order.index(d) for d in dims]
    fixed = [i for i in range(len(order)) if i not in idx]
    groups = []
    for fixed_vals in itertools.product(*(range(sizes[i]) for i in reversed(fixed))):
        fixed_vals = dict(zip(reversed(fixed), fixed_vals))
        ranks = []
        for var in itertools.product(*(range(sizes[i]) for i in idx)):
            coords = [0] * len(order)
            for i, v in fixed_vals.items():
                coords[i] = v
            for i, v in zip(idx, var):
                coords[i] = v
            r, stride = 0, 1
            for c, s in zip(coords, sizes):
                r += c * stride
                stride *= s
            ranks.append(r)
        groups.append(sorted(ranks))
    return sorted(groups)


def rank_groups(layout: ParallelLayout) -> dict[str, list[list[int]]]:
    """Process groups as Megatron-Core would build them, keyed by name.

    tp, cp, dp, pp, dp_cp (distributed-optimizer shard group for dense params), tp_cp, mp (TP×PP);
    etp, ep, edp (expert distributed-optimizer shard group), etp_ep.
    """
    a = _sizes(layout, ATTENTION_ORDER)
    e = _sizes(layout, EXPERT_ORDER)
    return {
        "tp": _groups(a, ATTENTION_ORDER, ("tp",)),
        "cp": _groups(a, ATTENTION_ORDER, ("cp",)),
        "dp": _groups(a, ATTENTION_ORDER, ("dp",)),
        "pp": _groups(a, ATTENTION_ORDER, ("pp",)),
        "dp_cp": _groups(a, ATTENTION_ORDER, ("cp", "dp")),
        "tp_cp": _groups(a, ATTENTION_ORDER, ("tp", "cp")),
        "mp": _groups(a, ATTENTION_ORDER, ("tp", "pp")),
        "etp": _groups(e, EXPERT_ORDER, ("etp",)),
        "ep": _groups(e, EXPERT_ORDER, ("ep",)),
        "edp": _groups(e, EXPERT_ORDER, ("edp",)),
        "etp_ep": _groups(e, EXPERT_ORDER, ("etp", "ep")),
    }


def is_partition(groups: list[list[int]], world: int) -> bool:
    """True when ``groups`` are equal-sized and cover ranks 0..world-1 exactly once."""
    flat = sorted(itertools.chain.from_iterable(groups))
    return flat == list(range(world)) and len({len(g) for g in groups}) == 1

