"""Context parallelism (CP) for the local, non-Transformer-Engine layer spec.

Megatron-Core's local ``DotProductAttention`` asserts ``context_parallel_size == 1``; only TE's
attention implements CP. This module is the project's own CP for the local spec, in three pieces.

**Load-balanced causal chunking** (Megatron's scheme, also used by TE and by the "Context
Parallelism" section of the Megatron-Core docs). A sequence of length ``S`` is cut into ``2*CP``
chunks of ``c = S / (2*CP)`` tokens; CP rank ``r`` holds chunks ``r`` and ``2*CP-1-r``. Under a
causal mask the work of chunk ``g`` grows with ``g``, so pairing an early with a late chunk gives
every rank the same attention work. :func:`cp_chunk_ids` names the chunks, :func:`cp_positions`
gives the global token positions of the local sequence, and :func:`get_batch_on_this_cp_rank`
splits a batch (tokens, labels, loss mask, position ids; any ``[b, S, ...]`` tensor) the same way.
Megatron's rotary embedding already computes the table for the global length and keeps this
rank's two chunks (``rope_utils.get_pos_emb_on_this_cp_rank``), so RoPE sees global positions;
:func:`pos_emb_on_this_cp_rank` is the same selection without its hard-coded ``.cuda()`` (the
CPU adapter can route Megatron's call to it).

**Attention** (:func:`cp_attention`, used by ``mcore/attention.py``'s ``SDPAttention``).
K and V of the local sequence are all-gathered over the CP group (Megatron's
``gather_from_sequence_parallel_region`` with the CP group: forward all-gather along the sequence
dimension, backward reduce-scatter, so each rank receives the sum of every rank's dK/dV for its own
tokens). The gathered K/V are put back into global order; local query chunk ``g`` then attends to
keys ``[0, (g+1)*c)`` with a bottom-right-aligned causal mask (query ``i`` of the chunk sits at
global position ``g*c + i`` and sees keys ``<= g*c + i``), which is exactly the causal mask of the
full sequence restricted to these queries. Each chunk is one fused SDPA call
(``torch.nn.attention.bias.causal_lower_right``), so no ``S x S`` mask is materialised. Without a
causal mask every query attends to all gathered keys. Softmax and both BMMs stay high precision
(DESIGN.md §2). All-gathering K/V costs ``(CP-1)/CP`` of the K/V activations in memory; a ring
(send/recv) implementation would overlap that communication and is the next step if CP is used at
long sequence lengths.

**Loss.** Each CP rank computes the loss over its own tokens; the gradient all-reduce of Megatron's
DDP runs over the data-parallel *and* context-parallel group and averages, so a loss function that
returns ``(sum, num_tokens, ...)`` (Megatron's three-output form) gives the CP=1 gradient.
:func:`cp_reduce_loss` all-reduces ``(sum, num_tokens)`` over the CP group for reporting.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

__all__ = ["cp_chunk_ids", "cp_positions", "get_batch_on_this_cp_rank", "pos_emb_on_this_cp_rank",
           "cp_attention", "cp_reduce_loss",
           "route_megatron_rope_slice_to_cpu_safe"]


def _check(seq_len: int, cp_size: int, cp_rank: int, what: str) -> int:
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"{what}: cp_rank={cp_rank} / cp_size={cp_size}; need 0 <= rank < size")
    if seq_len % (2 * cp_size):
        raise ValueError(f"{what}: sequence length {seq_len} is not divisible by 2 x "
                         f"context_parallel_size = {2 * cp_size} (load-balanced CP cuts each "
                         "sequence into 2*CP chunks); change seq_length or the CP size")
    return seq_len // (2 * cp_size)


def cp_chunk_ids(cp_size: int, cp_rank: int) -> tuple[int, int]:
    """The two global chunk indices CP rank ``cp_rank`` holds: ``(r, 2*CP-1-r)``."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def cp_positions(seq_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global positions (int64, length ``seq_len / CP``) of this rank's local sequence."""
    c = _check(seq_len, cp_size, cp_rank, "cp_positions")
    a, b = cp_chunk_ids(cp_size, cp_rank)
    return torch.cat([torch.arange(a * c, (a + 1) * c), torch.arange(b * c, (b + 1) * c)])


def _take_chunks(t: torch.Tensor, dim: int, cp_size: int, cp_rank: int, what: str) -> torch.Tensor:
    _check(t.shape[dim], cp_size, cp_rank, what)
    if cp_size == 1:
        return t
    v = t.view(*t.shape[:dim], 2 * cp_size, t.shape[dim] // (2 * cp_size), *t.shape[dim + 1:])
    idx = torch.tensor(cp_chunk_ids(cp_size, cp_rank), device=t.device)
    v = v.index_select(dim, idx)
    return v.reshape(*t.shape[:dim], -1, *t.shape[dim + 1:])


def get_batch_on_this_cp_rank(batch: Mapping[str, torch.Tensor | None], *, cp_size: int,
                              cp_rank: int, seq_dim: int = 1) -> dict:
    """This CP rank's part of a batch: chunks ``r`` and ``2*CP-1-r`` of every tensor's sequence dim.

    ``batch`` maps names (tokens, labels, loss_mask, position_ids, ...) to ``[b, S, ...]`` tensors
    (``seq_dim`` 1) or None (passed through). A 4-D ``attention_mask`` ``[b, 1, S, S]`` is refused:
    the CP attention builds its causal mask from the global positions itself.
    """
    out = {}
    for name, t in batch.items():
        if t is None:
            out[name] = None
            continue
        if name == "attention_mask":
            raise ValueError("get_batch_on_this_cp_rank: an explicit attention_mask cannot be "
                             "split for context parallelism; pass attention_mask=None (causal)")
        out[name] = _take_chunks(t, seq_dim, cp_size, cp_rank, f"get_batch_on_this_cp_rank[{name}]")
    return out


def pos_emb_on_this_cp_rank(pos_emb: torch.Tensor, seq_dim: int, cp_group) -> torch.Tensor:
    """Megatron's ``get_pos_emb_on_this_cp_rank`` on any device (index built on ``pos_emb``'s)."""
    if cp_group is None:
        raise ValueError("pos_emb_on_this_cp_rank: cp_group must be given")
    return _take_chunks(pos_emb, seq_dim, cp_group.size(), cp_group.rank(),
                        "pos_emb_on_this_cp_rank")


def _global_order(gathered: torch.Tensor, cp_size: int) -> torch.Tensor:
    """[CP * 2c, ...] in rank order (r: chunks r, 2CP-1-r) -> [2CP * c, ...] in sequence order."""
    c = gathered.shape[0] // (2 * cp_size)
    chunks = gathered.view(2 * cp_size, c, *gathered.shape[1:])
    slot = [0] * (2 * cp_size)  # slot[g] = position of global chunk g in the gathered tensor
    for r in range(cp_size):
        a, b = cp_chunk_ids(cp_size, r)
        slot[a], slot[b] = 2 * r, 2 * r + 1
    return chunks.index_select(0, torch.tensor(slot, device=gathered.device)).reshape(
        -1, *gathered.shape[1:])


def cp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cp_group, causal: bool,
                 scale: float, dropout_p: float = 0.0, enable_gqa: bool = False) -> torch.Tensor:
    """Attention of this CP rank's queries over the whole sequence's keys.

    ``q``: ``[b, heads, s_local, d]``; ``k``/``v``: ``[b, groups, s_local, d]`` (local sequence =
    chunks ``r`` and ``2*CP-1-r``). Returns ``[b, heads, s_local, d]``.
    """
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
    from torch.nn.attention.bias import causal_lower_right

    cp = cp_group.size()
    rank = cp_group.rank()
    s_local = q.shape[2]
    c = _check(s_local * cp, cp, rank, "cp_attention")

    def gather(t):  # [b, g, s, d] -> sequence-first for the first-dim all-gather -> global order
        t = t.permute(2, 0, 1, 3).contiguous()
        t = gather_from_sequence_parallel_region(t, tensor_parallel_output_grad=True,
                                                 group=cp_group)
        return _global_order(t, cp).permute(1, 2, 0, 3)

    k_all, v_all = gather(k), gather(v)
    if enable_gqa and k_all.shape[1] != q.shape[1]:
        # Expand the KV groups to the query heads here rather than via SDPA's enable_gqa: the
        # fused kernels that take a bottom-right causal bias do not all take GQA.
        rep = q.shape[1] // k_all.shape[1]
        k_all, v_all = k_all.repeat_interleave(rep, dim=1), v_all.repeat_interleave(rep, dim=1)
    outs = []
    for i, g in enumerate(cp_chunk_ids(cp, rank)):
        qi = q[:, :, i * c:(i + 1) * c]
        if causal:
            end = (g + 1) * c
            mask = causal_lower_right(c, end)
            outs.append(F.scaled_dot_product_attention(
                qi, k_all[:, :, :end], v_all[:, :, :end], attn_mask=mask, dropout_p=dropout_p,
                scale=scale))
        else:
            outs.append(F.scaled_dot_product_attention(qi, k_all, v_all, dropout_p=dropout_p,
                                                       scale=scale))
    return torch.cat(outs, dim=2)


def cp_reduce_loss(loss_sum: torch.Tensor, num_tokens: torch.Tensor, cp_group) -> torch.Tensor:
    """Global mean loss over the CP group from each rank's (sum, token count); no gradient."""
    t = torch.stack([loss_sum.detach().float(), num_tokens.detach().float()])
    if cp_group is not None and cp_group.size() > 1:
        torch.distributed.all_reduce(t, group=cp_group)
    return t[0] / t[1].clamp(min=1)


def route_megatron_rope_slice_to_cpu_safe() -> None:
    """CPU only: make Megatron's RoPE use :func:`pos_emb_on_this_cp_rank` for its CP slice.

    Megatron's ``rope_utils.get_pos_emb_on_this_cp_rank`` builds its two-element index with
    ``pin_memory=True`` and ``.cuda()``, which fails on a machine without a GPU; the selection is
    otherwise identical. This is a CPU-adapter concern (``runtime/cpu_adapter.py`` is the place
    for it); the CP test workers and ``scripts/multigpu_check.py`` call it on CPU until it is there.
    Refuses to run where CUDA is available, so a GPU run always uses Megatron's own code.
    """
    if torch.cuda.is_available():
        raise RuntimeError("route_megatron_rope_slice_to_cpu_safe is for CPU-only processes")
    from megatron.core.models.common.embeddings import rotary_pos_embedding

    if not hasattr(rotary_pos_embedding, "get_pos_emb_on_this_cp_rank"):
        raise RuntimeError("rotary_pos_embedding.get_pos_emb_on_this_cp_rank does not exist in this "
                           "Megatron-Core; re-check route_megatron_rope_slice_to_cpu_safe")
    rotary_pos_embedding.get_pos_emb_on_this_cp_rank = pos_emb_on_this_cp_rank
