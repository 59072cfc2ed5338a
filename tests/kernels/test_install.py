"""Installing the opt-in kernels in Megatron's place and taking them out (kernels/install.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("megatron.core")


def test_install_is_idempotent_and_uninstall_restores_megatrons_functions():
    from megatron.core import tensor_parallel
    from megatron.core.models.common.embeddings import rope_utils

    from nvfp4_megatron.kernels import cross_entropy, rope

    ce0, rope0 = tensor_parallel.vocab_parallel_cross_entropy, rope_utils._apply_rotary_pos_emb_bshd
    lines = []
    try:
        for _ in range(2):
            cross_entropy.enable_fused_cross_entropy(lines.append)
            rope.enable_fused_rope(lines.append)
        assert len(lines) == 2, lines  # the second install is a no-op
        ce1, rope1 = tensor_parallel.vocab_parallel_cross_entropy, rope_utils._apply_rotary_pos_emb_bshd
        assert ce1.func is cross_entropy.fused_vocab_parallel_cross_entropy and ce1.keywords["_original"] is ce0
        assert rope1.func is rope.fused_apply_rotary_pos_emb_bshd and rope1.keywords["_original"] is rope0
    finally:
        cross_entropy.disable_fused_cross_entropy()
        rope.disable_fused_rope()
    assert tensor_parallel.vocab_parallel_cross_entropy is ce0
    assert rope_utils._apply_rotary_pos_emb_bshd is rope0
    cross_entropy.disable_fused_cross_entropy()  # nothing installed: nothing changes
    assert tensor_parallel.vocab_parallel_cross_entropy is ce0
