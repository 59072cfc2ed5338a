"""``train.cuda_graph`` (and the GPU-only ``train.cross_entropy_fusion``): what is refused, and the
stochastic-rounding seeds a replay uses.

The capture itself needs a GPU (tests/gpu/test_pretrain_gpu.py trains the same runs with and
without graphs and compares every loss bit for bit); here: the configuration check, the seed
slots (a replay must give each draw the seed the eager step gives it), and ``pretrain.py``
refusing graphs on a machine without a GPU before it writes anything.
"""

from __future__ import annotations

import copy

import pytest
import torch

from _train_launch import launch
from nvfp4_megatron.quant import state as qstate
from nvfp4_megatron.training.graphs import check_graph_config


def _cfg(**train):
    from nvfp4_megatron.cli.compose import compose_config, to_plain

    c = to_plain(compose_config(["+recipe=bf16_tiny"]))
    c["train"].update(cuda_graph=True, **train)
    return c


def test_a_one_gpu_dense_run_is_accepted_and_off_means_no_check():
    c = _cfg()
    check_graph_config(c, world_size=1, cuda=True)  # no error
    off = copy.deepcopy(c)
    off["train"]["cuda_graph"] = False
    off["parallel"]["tensor_model_parallel_size"] = 2
    check_graph_config(off, world_size=4, cuda=False)  # not asked for: nothing to refuse


@pytest.mark.parametrize("change, needle", [
    (lambda c: None, "there is no CUDA GPU"),
    (lambda c: c["parallel"].update(tensor_model_parallel_size=2),
     "parallel.tensor_model_parallel_size=2 (needs 1)"),
    (lambda c: c["parallel"].update(pipeline_model_parallel_size=2),
     "parallel.pipeline_model_parallel_size=2 (needs 1)"),
    (lambda c: c["model"].update(hidden_dropout=0.1), "model.hidden_dropout=0.1"),
    (lambda c: c["model"].update(attention_dropout=0.1), "model.attention_dropout=0.1"),
    (lambda c: c["model"].update(num_moe_experts=4), "model.num_moe_experts is set"),
    (lambda c: c["train"].update(overlap_grad_reduce=True), "train.overlap_grad_reduce=true"),
])
def test_each_unsupported_setting_is_named(change, needle):
    c = _cfg()
    change(c)
    cuda = needle != "there is no CUDA GPU"
    with pytest.raises(ValueError) as e:
        check_graph_config(c, world_size=1, cuda=cuda)
    msg = str(e.value)
    assert needle in msg and "train.cuda_graph=false" in msg, msg


def test_more_than_one_process_is_refused():
    with pytest.raises(ValueError, match="the run has 2 processes"):
        check_graph_config(_cfg(), world_size=2, cuda=True)


def test_overlap_grad_reduce_defaults_off_under_graphs():
    from nvfp4_megatron.training.model import resolve_overlap_grad_reduce

    assert resolve_overlap_grad_reduce({"overlap_grad_reduce": None, "cuda_graph": True}) is False
    assert resolve_overlap_grad_reduce({"overlap_grad_reduce": None, "cuda_graph": False}) \
        is torch.cuda.is_available()


def _eager_seeds(draws):
    return [int(qstate.sr_seed_tensor(k, r, torch.device("cpu"))) for k, r in draws]


def test_seed_slots_give_every_draw_the_eager_seed_of_the_current_step():
    draws = [("0.fc1", "dgrad.grad_output"), ("0.fc1", "wgrad.grad_output"),
             ("1.qkv", "dgrad.grad_output"), ("0.fc1", "dgrad.grad_output")]  # a 2nd micro-batch
    qstate.reset_state()
    qstate.set_run_seed(7)
    try:
        eager = {}
        for step in (3, 4):
            qstate.set_step(step)
            eager[step] = _eager_seeds(draws)
        assert eager[3] != eager[4] and len(set(eager[3])) == 4  # every draw its own seed
        assert all(0 <= s < 2**31 for s in eager[3] + eager[4])  # the kernel's int32 Philox seed
        # what the eager path hands the kernel is the low 31 bits of the documented sr_seed
        qstate.set_step(3)
        assert [qstate.kernel_seed(qstate.sr_seed(k, r)) for k, r in draws] == eager[3]

        qstate.set_step(3)  # "capture" during step 3: slots, no seed values
        slots = qstate.SeedSlots(torch.device("cpu"), capacity=8)
        with qstate.capture_seed_slots(slots):
            views = [qstate.sr_seed_tensor(k, r, torch.device("cpu")) for k, r in draws]
        assert all(v.data_ptr() == slots.buffer[i].data_ptr() for i, v in enumerate(views))
        assert slots.keys[3] == ("0.fc1", "dgrad.grad_output", 0, 1)  # call index 1
        for step in (3, 4):  # replays at steps 3 and 4 read the eager seeds of those steps
            qstate.set_step(step)
            slots.fill()
            assert [int(v) for v in views] == eager[step]
        assert int(qstate.sr_seed_tensor("x", "y", torch.device("cpu")).numel()) == 1  # eager again
    finally:
        qstate.reset_state()


def test_seed_slots_overflow_is_an_error():
    slots = qstate.SeedSlots(torch.device("cpu"), capacity=1)
    slots.slot("a", "b", 0, 0)
    with pytest.raises(RuntimeError, match="more than 1 stochastic-rounding draws"):
        slots.slot("a", "b", 0, 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal without a GPU")
def test_pretrain_refuses_graphs_without_a_gpu_before_writing(tmp_path, corpus_cache):
    run = tmp_path / "graph"
    run.mkdir()
    rc, out = launch(run, corpus_cache, "+recipe=bf16_tiny", "train.cuda_graph=true", nproc=1)
    assert rc != 0 and "exitcode  : 2" in out, out[-3000:]
    assert "train.cuda_graph=true cannot be used here: there is no CUDA GPU" in out, out[-3000:]
    assert list(run.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal without a GPU")
def test_gpu_only_fusions_are_refused_without_a_gpu():
    from nvfp4_megatron.training.model import transformer_config

    c = _cfg()
    with pytest.raises(ValueError, match="train.cross_entropy_fusion=true needs a GPU"):
        transformer_config(c["model"], c["parallel"], bf16=True, cross_entropy_fusion=True)
    with pytest.raises(ValueError, match="train.fused_rope=true needs a GPU"):
        transformer_config(c["model"], c["parallel"], bf16=True, fused_rope=True)
    with pytest.raises(ValueError, match="train.fused_cross_entropy=true needs a GPU"):
        transformer_config(c["model"], c["parallel"], bf16=True, fused_cross_entropy=True)
    with pytest.raises(ValueError, match="both replace the cross-entropy"):
        transformer_config(c["model"], c["parallel"], bf16=True, fused_cross_entropy=True,
                           cross_entropy_fusion=True)
    with pytest.raises(ValueError, match="train.gradient_accumulation_fusion=true needs a GPU"):
        transformer_config(c["model"], c["parallel"], bf16=True, gradient_accumulation_fusion=True)
    config = transformer_config(c["model"], c["parallel"], bf16=True)
    assert config.cross_entropy_loss_fusion is False  # off unless asked for
    assert config.gradient_accumulation_fusion is False
