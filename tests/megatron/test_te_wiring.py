"""Transformer Engine wiring (backend 'te') with a fake ``transformer_engine`` in ``sys.modules``.

TE is never installed here (test_te_adapter checks that); these tests replace it with a small fake
that records which recipe object each autocast was entered with, and check the decision logic and
the call sequence: which blocks run under autocast, with what TE recipe, in what order.
"""

import enum
import sys
import types
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from megatron.core.transformer.transformer_layer import TransformerLayer

from nvfp4_megatron.megatron import backend as be
from nvfp4_megatron.megatron.backend import BackendChoice, DeviceCaps, resolve_backend
from nvfp4_megatron.megatron.te_adapter import TEUnsupported, apply_te_precision, build_te_recipe
from nvfp4_megatron.megatron.te_adapter import describe_te_recipe
from nvfp4_megatron.quant import state as qstate
from nvfp4_megatron.quant.registry import build_recipe, get_recipe


@pytest.fixture
def fake_te(monkeypatch):
    events = []
    te = types.ModuleType("transformer_engine")
    common = types.ModuleType("transformer_engine.common")
    rec = types.ModuleType("transformer_engine.common.recipe")
    pt = types.ModuleType("transformer_engine.pytorch")

    class Format(enum.Enum):
        E4M3 = "E4M3"
        HYBRID = "HYBRID"

    class _Recipe:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    rec.Format = Format
    for name in ("NVFP4BlockScaling", "MXFP8BlockScaling", "Float8CurrentScaling",
                 "Float8BlockScaling"):
        setattr(rec, name, type(name, (_Recipe,), {}))

    @contextmanager
    def autocast(*, enabled, recipe, amax_reduction_group=None):
        events.append(("enter", recipe))
        try:
            yield
        finally:
            events.append(("exit", recipe))

    pt.autocast = autocast
    te.common, common.recipe, te.pytorch = common, rec, pt
    for name, mod in (("transformer_engine", te), ("transformer_engine.common", common),
                      ("transformer_engine.common.recipe", rec),
                      ("transformer_engine.pytorch", pt)):
        monkeypatch.setitem(sys.modules, name, mod)
    qstate.reset_state()
    yield SimpleNamespace(events=events, recipe=rec)
    qstate.reset_state()


TELinear = type("TELayerNormColumnParallelLinear", (torch.nn.Module,),
                {"__module__": "megatron.core.extensions.transformer_engine"})


class FakeLayer(TransformerLayer):
    """A TransformerLayer without Megatron's constructor: global ``layer_number`` + a TE linear."""

    def __init__(self, layer_number, num_layers, events, te_linear=True):
        torch.nn.Module.__init__(self)
        self.layer_number = layer_number
        self.config = SimpleNamespace(num_layers=num_layers, cuda_graph_impl="none")
        self.events = events
        if te_linear:
            self.linear_qkv = TELinear()

    def forward(self, x):
        self.events.append(("forward", self.layer_number - 1))
        if x is None:
            raise RuntimeError("boom")
        return x


def _model(events, numbers=(1, 2, 3, 4), num_layers=4, te_linear=True):
    return torch.nn.ModuleList(FakeLayer(n, num_layers, events, te_linear) for n in numbers)


def _run(model, x=torch.zeros(1)):
    for layer in model:
        layer(x)


def test_build_te_recipe_passes_our_switches_as_constructor_args(fake_te):
    nv = build_te_recipe(describe_te_recipe(get_recipe("nvfp4"), num_layers=62))
    assert type(nv).__name__ == "NVFP4BlockScaling"
    assert nv.kwargs == {"disable_rht": False, "disable_stochastic_rounding": False,
                         "disable_2d_quantization": False}
    no_sr = build_te_recipe(describe_te_recipe(get_recipe("nvfp4_no_sr"), num_layers=62))
    assert no_sr.kwargs["disable_stochastic_rounding"] is True
    cs = build_te_recipe(describe_te_recipe(get_recipe("fp8_cs"), num_layers=62))
    assert type(cs).__name__ == "Float8CurrentScaling"
    assert cs.kwargs == {"fp8_format": fake_te.recipe.Format.HYBRID}


def test_quantized_blocks_run_under_autocast_bf16_blocks_do_not(fake_te):
    ev = fake_te.events
    model = _model(ev)
    table = apply_te_precision(model, build_recipe("nvfp4", bf16_first_blocks=1,
                                                   bf16_last_blocks=1), log=False)
    assert table.backend == "te" and table.bf16_blocks == (0, 3)
    assert table.quantized_blocks() == (1, 2)
    _run(model)
    rec = ev[1][1]
    assert type(rec).__name__ == "NVFP4BlockScaling"
    assert ev == [("forward", 0), ("enter", rec), ("forward", 1), ("exit", rec),
                  ("enter", rec), ("forward", 2), ("exit", rec), ("forward", 3)]
    assert {r.backend for r in table.rows if r.quantized} == {"te:NVFP4BlockScaling"}


def test_pipeline_stage_uses_global_block_numbers(fake_te):
    ev = fake_te.events
    stage1 = _model(ev, numbers=(3, 4), num_layers=4)  # PP2, second stage
    table = apply_te_precision(stage1, build_recipe("nvfp4", bf16_first_blocks=0,
                                                    bf16_last_blocks=1), log=False)
    assert table.quantized_blocks() == (2,)
    _run(stage1)
    assert [e[0] for e in ev] == ["enter", "forward", "exit", "forward"]
    assert ev[1] == ("forward", 2) and ev[3] == ("forward", 3)


def test_bf16_switch_and_exceptions(fake_te):
    ev = fake_te.events
    model = _model(ev, numbers=(1,), num_layers=1)
    apply_te_precision(model, get_recipe("nvfp4_all_layers"), log=False)
    qstate.set_bf16_switch("all")
    _run(model)
    assert ev == [("forward", 0)]
    qstate.set_bf16_switch(None)
    ev.clear()
    with pytest.raises(RuntimeError, match="boom"):
        model[0](None)
    assert [e[0] for e in ev] == ["enter", "forward", "exit"]  # autocast left on error


def test_refusals(fake_te):
    ev = fake_te.events
    with pytest.raises(ValueError, match="te_gpt_layer_spec"):
        apply_te_precision(_model(ev, te_linear=False), get_recipe("nvfp4_all_layers"), log=False)
    model = _model(ev)
    apply_te_precision(model, get_recipe("nvfp4_all_layers"), log=False)
    with pytest.raises(ValueError, match="already wired"):
        apply_te_precision(model, get_recipe("nvfp4_all_layers"), log=False)
    with pytest.raises(TEUnsupported, match="mxfp4"):
        apply_te_precision(_model(ev), get_recipe("mxfp4"), log=False)
    graphed = _model(ev)
    graphed[0].config.cuda_graph_impl = "transformer_engine"
    with pytest.raises(ValueError, match="cuda_graph_impl"):
        apply_te_precision(graphed, get_recipe("nvfp4_all_layers"), log=False)
    bf = _model(ev)
    table = apply_te_precision(bf, get_recipe("bf16"), log=False)
    _run(bf)
    assert table.quantized_blocks() == () and not any(e[0] == "enter" for e in ev)


def test_backend_dispatch(monkeypatch):
    blackwell = DeviceCaps(te_available=True, compute_capability=(10, 0))
    choice = resolve_backend(get_recipe("nvfp4"), num_layers=62, caps=blackwell)
    assert choice.backend == "te"
    seen = {}
    import megatron.core.models.gpt.gpt_layer_specs as specs

    monkeypatch.setattr(specs, "get_gpt_layer_with_transformer_engine_spec",
                        lambda **kw: seen.setdefault("te_spec", kw) and "TE-SPEC")
    cfg = SimpleNamespace(num_moe_experts=4, moe_grouped_gemm=True)
    assert be.gpt_layer_spec_for(choice, cfg) == "TE-SPEC"
    assert seen["te_spec"] == {"num_experts": 4, "moe_grouped_gemm": True, "qk_layernorm": False}

    import nvfp4_megatron.megatron.policy as policy

    monkeypatch.setattr(policy, "apply_precision",
                        lambda chunks, recipe, log=True: seen.setdefault("emulated", recipe))
    be.apply_backend_precision([], get_recipe("nvfp4"),
                               BackendChoice(backend="emulated", reason="test"))
    assert seen["emulated"].backend == "emulated" and seen["emulated"].name == "nvfp4"
