"""Multi-tensor gradient norm and scaling for Megatron-Core on GPUs without Apex or TE.

Megatron-Core's gradient clipping and its FP32-master -> BF16 copy use Apex's / TE's
multi-tensor kernels when either is installed. Without them (Hopper here: Apex is not on PyPI,
Transformer Engine is for Blackwell) it falls back to ``megatron.core.utils.local_multi_tensor_*``,
whose L2 norm builds a CPU tensor from one 0-d GPU tensor per gradient, a host synchronisation for
every parameter tensor at every step (about 60 for an 8-block GPT), and whose scale is a Python
loop of one kernel per tensor. ``install_gpu_fastpaths()`` puts torch's ``_foreach`` kernels in
their place: the same mathematics, a handful of launches and no host synchronisation (the one
``.item()`` Megatron takes of the total norm remains; it is logged every step).

Applied by ``platform.distributed.init_distributed`` when there is a GPU and Megatron still has
its local fallbacks (it leaves Apex's or TE's kernels alone); never on CPU, where the CPU adapter
(``runtime/cpu_adapter.py``) applies instead.
"""

from __future__ import annotations

import torch

__all__ = ["foreach_l2_norm", "foreach_scale", "install_gpu_fastpaths"]

_INSTALLED: list[str] = []


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for ``amp_C.multi_tensor_l2norm``: (total L2 norm as a 1-element FP32 tensor, None)."""
    tensors = tensor_lists[0]
    if per_tensor:
        raise NotImplementedError("per-tensor norms are not used by Megatron's clipping")
    if not tensors:
        return torch.zeros(1, dtype=torch.float32, device=torch.cuda.current_device()), None
    norms = torch._foreach_norm([t.float() if t.dtype != torch.float32 else t for t in tensors])
    total = torch.linalg.vector_norm(torch.stack(norms)).reshape(1)
    return total, None


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for ``amp_C.multi_tensor_scale``: ``dst[i] = src[i] * scale`` (dtype of dst)."""
    src, dst = tensor_lists[0], tensor_lists[1]
    if not src:
        return
    if all(a is b for a, b in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    elif scale == 1.0:
        torch._foreach_copy_(dst, src)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def install_gpu_fastpaths() -> list[str]:
    """Replace Megatron's local multi-tensor fallbacks by the ``_foreach`` versions; returns what
    was replaced (empty when Apex / TE kernels are in use or it was done already)."""
    from megatron.core import utils as mutils
    from megatron.core.optimizer import clip_grads, optimizer

    if _INSTALLED:
        return list(_INSTALLED)
    done = []
    if clip_grads.l2_norm_impl is mutils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = foreach_l2_norm
        done.append("clip_grads.l2_norm_impl")
    if clip_grads.multi_tensor_scale_impl is mutils.local_multi_tensor_scale:
        clip_grads.multi_tensor_scale_impl = foreach_scale
        done.append("clip_grads.multi_tensor_scale_impl")
    if optimizer.multi_tensor_scale_impl is mutils.local_multi_tensor_scale:
        optimizer.multi_tensor_scale_impl = foreach_scale
        done.append("optimizer.multi_tensor_scale_impl")
    _INSTALLED.extend(done)
    return done
