"""Cases and bounds for the fused cross-entropy kernels against Megatron's
``vocab_parallel_cross_entropy`` (shared by the interpreter test and the GPU test).

Bounds (the kernels' docstring says why each exists):
* the loss equals Megatron's to a few FP32 ulps (``LOSS_REL``) and an FP64 reference to FP32
  accuracy (``REF_REL``, relative to max(|loss|, 1));
* FP32 gradients equal Megatron's to a few ulps (``GRAD32_REL``); BF16/FP16 gradients equal
  Megatron's bits except where the FP32 value sits next to a rounding boundary: one unit in the
  last place, on at most ``MAX_FLIPPED`` of the elements;
* the target's element ``p - 1`` cancels where ``p`` is near 1: there the bound is absolute, a
  few FP32 ulps of 1 times the loss gradient (``TARGET_ABS``);
* gradient elements below FP32's normal range (``TINY``) are not compared: the kernels' ``exp``
  flushes there (and NumPy's ``exp`` under the interpreter differs from torch's CPU ``exp``).
"""

from __future__ import annotations

import torch

LOSS_REL = 2e-6
# plus an absolute part: the sum of exponentials is >= 1 (the row max's own term), so another
# summation order moves log(sum) by a few FP32 ulps of 1 whatever the loss; a loss near 0 (the
# target the clear maximum) is all cancellation (the H200 run of session 13: 1.5497e-06 against
# Megatron's 1.6689e-06, 2^-23 apart)
LOSS_ABS = 2.0**-20
REF_REL = 1e-5
GRAD32_REL = 2e-6
MAX_FLIPPED = 0.01
TARGET_ABS = 4 * 2.0**-23
TINY = 2.0**-126


def case(s, b, v, dtype, seed, device="cpu"):
    """Heavy-tailed logits ``[s, b, v]``, targets (row 0's is its max), a loss gradient with one
    masked-out (zero) token."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(s, b, v, generator=g) * torch.exp(torch.randn(s, b, v, generator=g))
    if dtype == torch.float16:
        logits = logits.clamp(-6e4, 6e4)
    logits = logits.to(dtype)
    target = torch.randint(0, v, (s, b), generator=g)
    target[0, 0] = int(logits[0, 0].float().argmax())
    up = torch.rand(s, b, generator=g)
    up[1 % s, 0] = 0.0
    return logits.to(device), target.to(device), up.to(device)


def run(fn, logits, target, up, group):
    """(loss, logits gradient) of ``fn(logits, target, group)`` with loss gradient ``up``."""
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, target, group)
    loss.backward(up)
    return loss.detach(), x.grad


def ours(x, t, group, *, on_cpu_ok=True):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy as megatron_ce

    from nvfp4_megatron.kernels import cross_entropy as ce

    return ce.fused_vocab_parallel_cross_entropy(x, t, tp_group=group, _original=megatron_ce,
                                                 _on_cpu_ok=on_cpu_ok)


def megatron(x, t, group):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy as megatron_ce

    return megatron_ce(x, t, tp_group=group)


def compare(name, got, want, dtype, target, up, vocab_start=0):
    """Assert the module's bounds; returns (loss relative difference, share of elements one ulp
    off)."""
    (l1, g1), (l2, g2) = got, want
    rel = ((l1 - l2).abs() / l2.abs().clamp_min(1e-30)).max().item()
    excess = ((l1 - l2).abs() - (LOSS_REL * l2.abs() + LOSS_ABS)).max().item()
    assert excess <= 0, f"{name}: loss difference over {LOSS_REL} relative + {LOSS_ABS} (relative {rel:.3g})"
    v = g1.shape[-1]
    t = (target - vocab_start).reshape(-1).cpu()
    owned = (t >= 0) & (t < v)
    is_t = torch.zeros(g1.numel() // v, v, dtype=torch.bool)
    is_t[torch.arange(t.numel())[owned], t[owned]] = True
    is_t = is_t.view(g1.shape).to(g1.device)
    a, b = g1.float(), g2.float()
    t_ok = (a - b).abs() <= TARGET_ABS * up[..., None]
    tiny = (a.abs() < TINY) & (b.abs() < TINY)
    if dtype == torch.float32:
        r = (a - b).abs() / b.abs().clamp_min(1e-30)
        bad = (r > GRAD32_REL) & ~(is_t & t_ok) & ~tiny
        assert not bad.any(), f"{name}: {int(bad.sum())} FP32 gradient elements off (max rel {r[bad].max():.3g})"
        return rel, 0.0
    off = (g1.view(torch.int16).int() - g2.view(torch.int16).int()).abs()
    bad = (off > 1) & ~(is_t & t_ok) & ~tiny
    assert not bad.any(), f"{name}: {int(bad.sum())} gradient elements more than one ulp off Megatron's"
    flipped = (off[~is_t & ~tiny] != 0).float().mean().item()
    assert flipped <= MAX_FLIPPED, f"{name}: {flipped:.3%} of gradient elements off by one ulp"
    return rel, flipped


def check_one_process(shapes, dtypes, group, device="cpu", log=print) -> int:
    """Ours vs Megatron's on one rank (``group`` of size 1), and the loss vs FP64; returns the
    number of cases."""
    n = 0
    for (s, b, v) in shapes:
        for dtype in dtypes:
            logits, target, up = case(s, b, v, dtype, seed=n, device=device)
            got = run(ours, logits, target, up, group)
            rel, flipped = compare(f"{(s, b, v)} {dtype}", got, run(megatron, logits, target, up, group),
                                   dtype, target, up)
            x = logits.double()
            ref = torch.logsumexp(x, -1) - x.gather(-1, target[..., None])[..., 0]
            err = ((got[0].double() - ref).abs() / ref.abs().clamp_min(1.0)).max().item()
            assert err <= REF_REL, f"{(s, b, v)} {dtype}: loss {err:.3g} from the FP64 reference"
            assert not got[1][1 % s, 0].any(), "a masked-out token got a gradient"
            log(f"ok {(s, b, v)} {dtype}: loss rel {rel:.2e}, grad elements one ulp off {flipped:.3%}")
            n += 1
    return n
