"""The fused RoPE kernel against Megatron's unfused ``_apply_rotary_pos_emb_bshd``, bit for bit,
forward and backward, under Triton's CPU interpreter (the GPU twin is in tests/gpu).

Runs in a fresh subprocess with ``TRITON_INTERPRET=1`` (the interpreter must be on before the
kernel is wrapped). Cases: BF16 and FP16, two head dimensions, a head count that is not a multiple
of the kernel's head block, ``mscale`` 1 and 0.7071, a strided query view (a slice of a fused QKV
tensor), heavy-tailed values with exact zeros and -0.0, and an upstream gradient with -0.0.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytest.importorskip("megatron.core")

_SCRIPT = r"""
import torch
from megatron.core.models.common.embeddings import rope_utils
from nvfp4_megatron.kernels import rope

orig = rope_utils._apply_rotary_pos_emb_bshd


def freqs_for(s, d, base=10000.0, offset=1000):
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    f = torch.outer(torch.arange(offset, offset + s, dtype=torch.float32), inv)
    return torch.cat((f, f), dim=-1)[:, None, None, :]


def bits(x):
    return x.view(torch.int16)


g = torch.Generator().manual_seed(0)
n = 0
for dtype in (torch.bfloat16, torch.float16):
    for (s, b, h, d) in ((6, 2, 3, 16), (5, 1, 5, 32)):
        for mscale in (1.0, 0.7071):
            for strided in (False, True):
                base = torch.randn(s, b, h, 3 * d, generator=g) * torch.exp(2 * torch.randn(s, b, h, 3 * d, generator=g))
                base[0, 0, 0, :4] = 0.0
                base[1, 0, 0, :] = -0.0  # a whole row of -0.0: every product and sum is a signed zero
                if dtype == torch.float16:
                    base = base.clamp(-6e4, 6e4)
                base = base.to(dtype)
                x = base[..., :d] if strided else base[..., :d].contiguous()
                fr = freqs_for(s, d)
                up = torch.randn(s, b, h, d, generator=g).to(dtype)
                up[2, 0, 0, :3] = -0.0
                up[3, 0, 0, :] = -0.0
                outs, grads = [], []
                for fn in (lambda t: orig(t, fr, mscale=mscale),
                           lambda t: rope.fused_apply_rotary_pos_emb_bshd(t, fr, mscale=mscale, _original=orig,
                                                                          _on_cpu_ok=True)):
                    t = x.detach().clone().requires_grad_(True) if not strided else x.detach()
                    if strided:  # keep the strided view: grad flows to the QKV base
                        bb = base.detach().clone().requires_grad_(True)
                        t = bb[..., :d]
                    out = fn(t)
                    out.backward(up)
                    outs.append(out.detach())
                    grads.append((bb.grad[..., :d] if strided else t.grad).contiguous())
                case = (dtype, s, b, h, d, mscale, strided)
                assert outs[0].shape == outs[1].shape, case
                assert torch.equal(bits(outs[0]), bits(outs[1])), (case, "forward", int((bits(outs[0]) != bits(outs[1])).sum()))
                assert torch.equal(bits(grads[0]), bits(grads[1])), (case, "backward", int((bits(grads[0]) != bits(grads[1])).sum()))
                n += 1
# the cases the kernel does not take go to Megatron's function (same result, one log line)
x = torch.randn(4, 1, 2, 16).to(torch.bfloat16)
fr = freqs_for(4, 16)
assert rope.why_not_fused(x, fr, rotary_interleaved=True, mla_rotary_interleaved=False, on_cpu_ok=True)
assert rope.why_not_fused(x.float(), fr, rotary_interleaved=False, mla_rotary_interleaved=False, on_cpu_ok=True)
assert rope.why_not_fused(x, fr[..., :8], rotary_interleaved=False, mla_rotary_interleaved=False, on_cpu_ok=True)
assert rope.why_not_fused(x, fr, rotary_interleaved=False, mla_rotary_interleaved=False) == "tensor not on a GPU"
y = rope.fused_apply_rotary_pos_emb_bshd(x, fr, rotary_interleaved=True, _original=orig, _on_cpu_ok=True)
assert torch.equal(bits(y), bits(orig(x, fr, rotary_interleaved=True)))
print("ROPE-OK", n)
"""


def test_fused_rope_matches_megatron_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "ROPE-OK 16" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
