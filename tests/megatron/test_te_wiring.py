"""The TE backend against a fake Transformer Engine per release (2.8, 2.9, 2.18: fake_te.py).

The fake has TE's real recipe signatures (unknown keywords are errors), both autocast spellings
and TE's capability checks. Megatron-Core decides ``HAVE_TE`` when it is imported, so
``megatron_sees_te`` re-imports ``fp8_utils`` / ``fp4_utils`` with the fake in place (and points
the names ``TransformerBlock`` imported from them at the re-imported functions), as if TE had been
installed: the tests then run Megatron's own ``get_fp4_context`` / ``get_fp8_context``,
``TransformerLayer.get_inner_quantization_context`` (what the fine-grained / EP-overlap schedules
call instead of ``forward``) and its MoE padding helpers. Nothing depends on TE being absent.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import sys
import types
import warnings
from types import SimpleNamespace

import megatron.core.fp4_utils as fp4_utils
import megatron.core.fp8_utils as fp8_utils
import megatron.core.utils as mcore_utils
import pytest
import torch
from megatron.core.models.common.model_chunk_schedule_plan import TransformerLayerSchedulePlan
from megatron.core.transformer import transformer_block
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer

import fake_te
from nvfp4_megatron.mcore import backend as be
from nvfp4_megatron.mcore import te_adapter as ta
from nvfp4_megatron.mcore.backend import BackendChoice, DeviceCaps, resolve_backend
from nvfp4_megatron.mcore.te_adapter import TEAPIMismatch, TEUnsupported
from nvfp4_megatron.quant import state as qstate
from nvfp4_megatron.quant.registry import build_recipe, get_recipe

TE_RECIPES = ("nvfp4", "nvfp4_no_rht", "nvfp4_no_sr", "nvfp4_no_2d", "fp8_cs", "mxfp8",
              "fp8_block")
_EXT = "megatron.core.extensions.transformer_engine"


def _stub_megatron_te_extension() -> types.ModuleType:
    """The names fp8_utils imports from Megatron's TE wrappers when TE is present."""
    mod = types.ModuleType(_EXT)
    for name in ("TEColumnParallelLinear", "TELayerNormColumnParallelLinear", "TELinear",
                 "TERowParallelLinear", "TEDelayedScaling", "Fp8Padding", "Fp8Unpadding"):
        setattr(mod, name, type(name, (), {}))
    return mod


@contextlib.contextmanager
def megatron_sees_te(fake: fake_te.FakeTE):
    saved_ext, saved_version = sys.modules[_EXT], mcore_utils._te_version
    saved_names = {n: getattr(transformer_block, n) for n in ("get_fp8_context", "get_fp4_context")}
    with fake.installed():
        sys.modules[_EXT] = _stub_megatron_te_extension()
        mcore_utils._te_version = None
        try:
            importlib.reload(fp8_utils)
            importlib.reload(fp4_utils)
        finally:
            sys.modules[_EXT] = saved_ext
        assert fp8_utils.HAVE_TE and fp4_utils.HAVE_TE
        # TransformerBlock imported these by name when Megatron was imported
        transformer_block.get_fp8_context = fp8_utils.get_fp8_context
        transformer_block.get_fp4_context = fp4_utils.get_fp4_context
        try:
            yield fake
        finally:
            for name in fake.modules:
                sys.modules[name] = None  # TE unimportable while Megatron's modules re-import
            mcore_utils._te_version = None
            importlib.reload(fp8_utils)
            importlib.reload(fp4_utils)
            for n, fn in saved_names.items():
                setattr(transformer_block, n, fn)
            ta.uninstall_te_recipe_hooks()
    mcore_utils._te_version = saved_version
    assert not fp8_utils.HAVE_TE and not fp4_utils.HAVE_TE


@pytest.fixture(params=fake_te.VERSIONS)
def version(request):
    return request.param


@pytest.fixture
def fresh_state():
    qstate.reset_state()
    yield
    qstate.reset_state()
    ta.uninstall_te_recipe_hooks()


TELinear = type("TELayerNormColumnParallelLinear", (torch.nn.Module,), {"__module__": _EXT})


class FakeLayer(TransformerLayer):
    """A TransformerLayer without Megatron's constructor: a real config, the global
    ``layer_number`` and a TE linear (Megatron's methods, e.g. the quantization context, run)."""

    def __init__(self, layer_number, config, te_linear=True):
        torch.nn.Module.__init__(self)
        self.layer_number = layer_number
        self.config = config
        if te_linear:
            self.linear_qkv = TELinear()


class Experts(torch.nn.Module):
    """Like Megatron's SequentialMLP: experts built from a deep copy of the config."""

    def __init__(self, config):
        super().__init__()
        self.config = copy.deepcopy(config)


def _config(num_layers=4, **fields):
    return TransformerConfig(num_layers=num_layers, hidden_size=64, num_attention_heads=4,
                             add_bias_linear=False, **fields)


def _entered(fake):
    return [(e[1], e[2]) for e in fake.events if e[0] == "enter"]


# ------------------------------------------------------------------ recipe objects and fields

def test_every_installed_field_is_passed_explicitly(version):
    fake = fake_te.FakeTE(version)
    with fake.installed():
        for name in TE_RECIPES:
            desc = ta.describe_te_recipe(get_recipe(name), num_layers=62)
            cls = getattr(fake.recipe, desc["te_class"])
            kwargs = ta.te_recipe_kwargs(desc)
            assert set(kwargs) == {f.name for f in dataclasses.fields(cls)}, (version, name)
            obj = ta.build_te_recipe(desc)
            assert type(obj) is cls
            for f in dataclasses.fields(cls):
                assert ta._from_te(getattr(obj, f.name)) == desc["te_fields"][f.name].value
        nv = ta.build_te_recipe(ta.describe_te_recipe(get_recipe("nvfp4"), num_layers=62))
        names = {f.name for f in dataclasses.fields(type(nv))}
        assert ("backward_override" in names) == (version == "2.18.0")  # added in TE 2.15
        assert nv.fp4_quant_bwd_grad.stochastic_rounding
        assert nv.fp4_quant_fwd_inp.random_hadamard_transform
        assert nv.fp4_quant_fwd_weight.fp4_2d_quantization
        assert ta.build_te_recipe(ta.describe_te_recipe(get_recipe("bf16"), num_layers=2)) is None


def test_nvte_environment_does_not_change_the_recipe(version, monkeypatch):
    for var, value in (("NVTE_NVFP4_DISABLE_RHT", "1"),
                       ("NVTE_NVFP4_DISABLE_STOCHASTIC_ROUNDING", "1"),
                       ("NVTE_NVFP4_DISABLE_2D_QUANTIZATION", "1"),
                       ("NVTE_NVFP4_ROW_SCALED_ACTIVATION", "1"), ("NVTE_NVFP4_4OVER6", "all"),
                       ("NVTE_BACKWARD_OVERRIDE", "dequantized")):
        monkeypatch.setenv(var, value)
    fake = fake_te.FakeTE(version)  # TE reads these when it is imported
    with fake.installed():
        default = fake.recipe.NVFP4BlockScaling()  # what Megatron's own get_fp4_recipe builds
        assert default.disable_rht and default.disable_stochastic_rounding
        ours = ta.build_te_recipe(ta.describe_te_recipe(get_recipe("nvfp4"), num_layers=62))
        assert not (ours.disable_rht or ours.disable_stochastic_rounding
                    or ours.disable_2d_quantization)
        if version == "2.18.0":
            assert (ours.backward_override, ours.nvfp4_4over6, ours.row_scaled_activation) == \
                (None, "none", False)


@pytest.mark.parametrize("recipe,var", [("fp8_cs", "NVTE_FP8_CURRENT_SCALING_POWER_2_SCALES"),
                                        ("fp8_block", "NVTE_FP8_BLOCK_SCALING_FP32_SCALES")])
def test_environment_fixed_class_attributes_are_refused(version, monkeypatch, recipe, var):
    # these recipes keep their per-role QParams as class attributes computed at TE import, so an
    # explicit field cannot override them: the built object is read back and refused
    monkeypatch.setenv(var, "1")
    fake = fake_te.FakeTE(version)
    with fake.installed():
        with pytest.raises(TEAPIMismatch, match=rf"Transformer Engine {version}.*{var}"):
            ta.build_te_recipe(ta.describe_te_recipe(get_recipe(recipe), num_layers=62))


def test_unknown_or_missing_field_names_the_te_version():
    fake = fake_te.FakeTE("2.18.0")
    rec = fake.recipe
    orig = rec.NVFP4BlockScaling
    desc = ta.describe_te_recipe(get_recipe("nvfp4"), num_layers=62)
    with fake.installed():
        rec.NVFP4BlockScaling = dataclasses.make_dataclass(
            "NVFP4BlockScaling", [("nvfp4_future_knob", bool, dataclasses.field(default=True))],
            bases=(orig,))
        with pytest.raises(TEAPIMismatch, match=r"2\.18\.0.*nvfp4_future_knob"):
            ta.build_te_recipe(desc)
        renamed = [(f.name, f.type, dataclasses.field(default=f.default))
                   for f in dataclasses.fields(orig) if f.name != "disable_rht"]
        rec.NVFP4BlockScaling = dataclasses.make_dataclass(
            "NVFP4BlockScaling", [("rht", bool, dataclasses.field(default=True)), *renamed],
            bases=(rec.Recipe,))
        with pytest.raises(TEAPIMismatch, match=r"2\.18\.0.*'rht'.*disable_rht"):
            ta.build_te_recipe(desc)
        rec.NVFP4BlockScaling = orig
        # a field TE 2.18 has must not be missing from it; the same field absent from 2.9 is fine
        del fake.pytorch.fp8_autocast
        with pytest.raises(TEAPIMismatch, match=r"2\.18\.0 has no .*fp8_autocast.*Megatron-Core"):
            ta.check_megatron_autocast_entry()
    old = fake_te.FakeTE("2.9.0")
    old.modules["transformer_engine"].__version__ = "2.7.0"
    with old.installed():
        with pytest.raises(TEAPIMismatch, match="2.7.0 is older than 2.8"):
            ta.build_te_recipe(desc)


def test_support_is_asked_from_te(monkeypatch):
    cases = [("2.8.0", (10, 0), 12.9, "Float8BlockScaling", False, "requires Hopper"),
             ("2.9.0", (10, 0), 12.9, "Float8BlockScaling", True, ""),
             ("2.18.0", (10, 0), 12.8, "Float8BlockScaling", False, "CUDA >= 12.9"),
             ("2.18.0", (12, 0), 12.9, "MXFP8BlockScaling", False, "12.0+ architectures"),
             ("2.18.0", (12, 0), 12.9, "NVFP4BlockScaling", True, ""),
             ("2.9.0", (9, 0), 12.9, "NVFP4BlockScaling", False, "10.0 or higher")]
    for version, cc, cuda, te_class, ok, why in cases:
        fake = fake_te.FakeTE(version, compute_capability=cc, cuda_version=cuda)
        with fake.installed():
            got = ta.te_support(te_class)
            assert got[0] is ok and why in got[1], (version, cc, te_class, got)
    # probe_device fills DeviceCaps from TE's checks; backend=te refuses with TE's reason
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (12, 0))
    fake = fake_te.FakeTE("2.18.0", compute_capability=(12, 0))
    with fake.installed():
        caps = be.probe_device()
        assert caps.te_available and caps.te_version == "2.18.0"
        assert caps.te_support["NVFP4BlockScaling"] == (True, "")
        assert caps.te_support["MXFP8BlockScaling"][0] is False
        with pytest.raises(ValueError, match="2.18.0 does not run MXFP8BlockScaling.*12.0"):
            resolve_backend(build_recipe("mxfp8", backend="te"), num_layers=4, caps=caps)


def test_auto_picks_te_where_validated(version, fresh_state):
    fake = fake_te.FakeTE(version)
    with fake.installed():
        caps = DeviceCaps(te_available=True, te_version=version, compute_capability=(10, 0),
                          te_support={c: ta.te_support(c) for c in ta.TE_SUPPORT_CHECKS})
        validated = {("nvfp4", (10, 0)): "B200, TE x.y, tests/gpu/..."}
        c = resolve_backend(get_recipe("nvfp4"), num_layers=62, caps=caps, validated=validated)
        assert (c.backend, c.requested) == ("te", "auto") and "validated: B200" in c.reason
        assert resolve_backend(get_recipe("nvfp4_no_rht"), num_layers=62, caps=caps,
                               validated=validated).backend == "emulated"
        te = resolve_backend(build_recipe("nvfp4_no_rht", backend="te"), num_layers=62, caps=caps)
        assert te.backend == "te" and "NOT validated" in te.reason
        assert f"Transformer Engine {version}" in te.reason


# -------------------------------------------------------- through Megatron's own code paths

def test_megatron_quantizes_each_layer_with_our_recipe_object(version, fresh_state):
    fake = fake_te.FakeTE(version)
    with megatron_sees_te(fake):
        recipe = build_recipe("nvfp4", bf16_first_blocks=1, bf16_last_blocks=1)
        plan = ta.prepare_te(recipe, num_layers=4)
        config = _config(**plan.megatron_config)
        layers = [FakeLayer(n, config) for n in (1, 2, 3, 4)]
        spelling = "fp8_autocast" if version == "2.8.0" else "autocast"
        paths = {
            # TransformerBlock.forward: get_fp4_context(self.config, layer.layer_number - 1)
            "block": lambda layer: transformer_block.get_fp4_context(config,
                                                                    layer.layer_number - 1),
            # fine-grained / EP-overlap schedules: the layer's inner quantization context
            "inner": lambda layer: layer.get_inner_quantization_context(),
            "schedule_plan": lambda layer: TransformerLayerSchedulePlan.get_low_precision_context(
                SimpleNamespace(layer=layer)),
        }
        for path, context in paths.items():
            fake.events.clear()
            for layer in layers:
                if version != "2.8.0" and layer.layer_number in (2, 3):
                    # Megatron calls the deprecated spelling; TE 2.9+ forwards it to autocast
                    with pytest.warns(DeprecationWarning, match="fp8_autocast is deprecated"):
                        ctx = context(layer)
                        with ctx:
                            pass
                else:
                    with context(layer):
                        pass
            entered = _entered(fake)
            assert entered == [(spelling, plan.te_recipe)] * 2, (path, entered)
            assert entered[0][1] is plan.te_recipe  # the object build_te_recipe made
        model = torch.nn.ModuleList(layers)
        table = ta.apply_te_precision(model, recipe, log=False)
        assert table.backend == "te:NVFP4BlockScaling" and table.quantized_blocks() == (1, 2)
        assert table.bf16_blocks == (0, 3)
        text = table.format()
        assert f"TE recipe: transformer_engine {version}: " in text
        assert " ".join(repr(plan.te_recipe).split()) in text
        assert all("forward" not in vars(layer) for layer in layers)  # nothing patched


@pytest.mark.parametrize("name,te_class,fp8", [("fp8_cs", "Float8CurrentScaling", "hybrid"),
                                               ("mxfp8", "MXFP8BlockScaling", "e4m3"),
                                               ("fp8_block", "Float8BlockScaling", "e4m3")])
def test_fp8_recipes_reach_megatron_the_same_way(version, fresh_state, name, te_class, fp8):
    # Hopper for block FP8 (TE 2.8 runs it only there), Blackwell otherwise
    cc = (9, 0) if name == "fp8_block" else (10, 0)
    fake = fake_te.FakeTE(version, compute_capability=cc)
    with megatron_sees_te(fake), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        plan = ta.prepare_te(build_recipe(name, bf16_first_blocks=0, bf16_last_blocks=1),
                             num_layers=2)
        config = _config(num_layers=2, **plan.megatron_config)
        assert (config.fp8, config.fp8_recipe, config.fp4) == (fp8, plan.megatron_config[
            "fp8_recipe"], None)
        for n in (1, 2):
            with FakeLayer(n, config).get_inner_quantization_context():
                pass
            with transformer_block.get_fp8_context(config, n - 1):
                pass
        entered = _entered(fake)
        assert [type(r).__name__ for _, r in entered] == [te_class] * 2
        assert all(r is plan.te_recipe for _, r in entered)
        assert fp8_utils.get_fp8_recipe(config) is plan.te_recipe
        # a config the adapter did not build gets no recipe from the hook
        other = _config(num_layers=2, fp8=fp8, fp8_recipe="delayed")
        with pytest.raises(ValueError, match="TE adapter configured"):
            fp8_utils.get_fp8_recipe(other)


def test_moe_padding_fields(version, fresh_state):
    fake = fake_te.FakeTE(version)
    moe = dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=64)
    with megatron_sees_te(fake), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for name, align in (("nvfp4_all_layers", 128), ("mxfp8", 32)):
            plan = ta.prepare_te(get_recipe(name), num_layers=4, num_moe_experts=4,
                                 moe_token_dispatcher_type="alltoall")
            config = _config(moe_token_dispatcher_type="alltoall", **moe,
                             **plan.megatron_config)
            assert config.moe_router_padding_for_quantization is True
            # Megatron's own helpers: tokens padded per expert to the quantized GEMM's alignment
            assert moe_utils.get_align_size_for_quantization(config) == align
            assert moe_utils.skip_routed_expert_padding(config)  # the router pads, experts don't
        plan = ta.prepare_te(get_recipe("nvfp4_all_layers"), num_layers=4, num_moe_experts=4,
                             moe_token_dispatcher_type="allgather")
        config = _config(moe_token_dispatcher_type="allgather", **moe, **plan.megatron_config)
        assert config.moe_router_padding_for_quantization is False
        assert config.fp4 and not moe_utils.skip_routed_expert_padding(config)  # experts pad
        with pytest.raises(ValueError, match="allgather"):  # why not the router there
            _config(moe_token_dispatcher_type="allgather", **moe,
                    **{**plan.megatron_config, "moe_router_padding_for_quantization": True})


def test_bf16_switch_acts_through_the_config_fields(version, fresh_state):
    fake = fake_te.FakeTE(version)
    with megatron_sees_te(fake), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        recipe = build_recipe("nvfp4_all_layers", switch_to_bf16={"at_step": 10})
        plan = ta.prepare_te(recipe, num_layers=2, num_moe_experts=4,
                             moe_token_dispatcher_type="alltoall")
        config = _config(num_layers=2, num_moe_experts=4, moe_router_topk=2,
                         moe_ffn_hidden_size=64, moe_token_dispatcher_type="alltoall",
                         **plan.megatron_config)
        layers = [FakeLayer(1, config), FakeLayer(2, config)]
        experts = Experts(config)
        model = torch.nn.ModuleList([*layers, experts])
        ta.apply_te_precision(model, recipe, log=False)

        def run():
            fake.events.clear()
            for layer in layers:
                with layer.get_inner_quantization_context():
                    pass
                with transformer_block.get_fp4_context(config, layer.layer_number - 1):
                    pass
            return len(_entered(fake))

        assert run() == 4
        qstate.set_bf16_switch("all")
        for cfg in (config, experts.config):
            assert (cfg.fp4, cfg.fp8, cfg.moe_router_padding_for_quantization) == (None, None,
                                                                                     False)
        assert run() == 0
        assert moe_utils.get_align_size_for_quantization(config) == 0
        qstate.set_bf16_switch(None)
        assert (experts.config.fp4, experts.config.moe_router_padding_for_quantization) == \
            ("e2m1", True)
        assert run() == 4
        with pytest.raises(TEUnsupported, match="scope=all"):
            qstate.set_bf16_switch("fprop")
        assert qstate.get_state().bf16_switch is None and config.fp4 == "e2m1"
        # resume with the switch already active: a model wired afterwards starts in BF16
        qstate.set_bf16_switch("all")
        plan2 = ta.prepare_te(recipe, num_layers=2)
        config2 = _config(num_layers=2, **plan2.megatron_config)
        model2 = torch.nn.ModuleList([FakeLayer(1, config2), FakeLayer(2, config2)])
        ta.apply_te_precision(model2, recipe, log=False)
        assert config2.fp4 is None
        qstate.reset_state()
        assert config2.fp4 == "e2m1" and config.fp4 == "e2m1"


def test_refusals_after_the_build(fresh_state):
    fake = fake_te.FakeTE("2.9.0")
    recipe = get_recipe("nvfp4_all_layers")
    with megatron_sees_te(fake), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        plan = ta.prepare_te(recipe, num_layers=2)
        config = _config(num_layers=2, **plan.megatron_config)
        with pytest.raises(ValueError, match="te_gpt_layer_spec"):
            ta.apply_te_precision([FakeLayer(1, config, te_linear=False)], recipe, log=False)
        plain = _config(num_layers=2)
        with pytest.raises(ValueError, match="does not carry the TE adapter's fields"):
            ta.apply_te_precision([FakeLayer(1, plain)], recipe, log=False)
        graphed = _config(num_layers=2, **plan.megatron_config)
        graphed.cuda_graph_impl = "transformer_engine"
        with pytest.raises(ValueError, match="cuda_graph_impl"):
            ta.apply_te_precision([FakeLayer(1, graphed)], recipe, log=False)
        model = torch.nn.ModuleList([FakeLayer(1, config), FakeLayer(2, config)])
        ta.apply_te_precision(model, recipe, log=False)
        with pytest.raises(ValueError, match="already wired"):
            ta.apply_te_precision(model, recipe, log=False)
        with pytest.raises(TEUnsupported, match="mxfp4"):
            ta.prepare_te(get_recipe("mxfp4"), num_layers=2)
        ta.uninstall_te_recipe_hooks()
        with pytest.raises(ValueError, match="get_fp4_recipe does not return"):
            ta.apply_te_precision([FakeLayer(1, config)], recipe, log=False)
        # without an installed recipe the hook is Megatron's own function
        ta.install_te_recipe(None, ta.describe_te_recipe(get_recipe("bf16"),
                                                         num_layers=2)["megatron_config"])
        assert type(fp4_utils.get_fp4_recipe(config)).__name__ == "NVFP4BlockScaling"


def test_build_gpt_builds_the_config_with_the_te_fields(fresh_state, monkeypatch):
    from megatron.core import parallel_state
    import megatron.core.models.gpt as gpt

    from nvfp4_megatron.cli.compose import compose_config, to_plain
    from nvfp4_megatron.training import model as model_lib

    fake = fake_te.FakeTE("2.18.0")
    cfg = to_plain(compose_config(["model.num_layers=4", "precision.recipe=nvfp4",
                                   "precision.backend=te", "precision.bf16_first_blocks=1",
                                   "precision.bf16_last_blocks=1"]))
    built = {}

    def fake_gpt(*, config, transformer_layer_spec, **kw):
        built["config"], built["spec"] = config, transformer_layer_spec
        return torch.nn.ModuleList([FakeLayer(n, config) for n in (1, 2, 3, 4)])

    monkeypatch.setattr(gpt, "GPTModel", fake_gpt)
    monkeypatch.setattr(ta, "te_gpt_layer_spec", lambda config, **kw: "TE-SPEC")
    for name, value in (("is_pipeline_first_stage", True), ("is_pipeline_last_stage", True),
                        ("get_pipeline_model_parallel_rank", 0)):
        monkeypatch.setattr(parallel_state, name, lambda *a, value=value, **k: value)
    with megatron_sees_te(fake), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        monkeypatch.setattr(be, "probe_device", lambda: DeviceCaps(
            te_available=True, te_version="2.18.0", compute_capability=(10, 0),
            te_support={c: ta.te_support(c) for c in ta.TE_SUPPORT_CHECKS}))
        logs = []
        recipe = model_lib.recipe_from_config(cfg["precision"])
        model, config, table = model_lib.build_gpt(cfg, recipe, log=logs.append)
        assert built["spec"] == "TE-SPEC" and built["config"] is config
        assert (config.fp4, config.fp4_recipe, config.first_last_layers_bf16,
                config.num_layers_at_start_in_bf16, config.num_layers_at_end_in_bf16) == \
            ("e2m1", "nvfp4", True, 1, 1)
        assert type(fp4_utils.get_fp4_recipe(config)).__name__ == "NVFP4BlockScaling"
        assert table.backend == "te:NVFP4BlockScaling" and table.quantized_blocks() == (1, 2)
        head = table.format().splitlines()[0]
        assert "backend choice: te (precision.backend=te): Transformer Engine 2.18.0" in head
        assert "NOT validated" in head
        assert any(line.startswith("[precision] backend te (precision.backend=te)")
                   for line in logs)


def test_emulated_backend_sets_no_megatron_fields_and_prints_the_choice(monkeypatch):
    choice = BackendChoice(backend="emulated", requested="auto", reason="test reason")
    assert be.backend_config_fields(choice, get_recipe("nvfp4"), num_layers=62) == {}
    import nvfp4_megatron.mcore.policy as policy

    table = policy.PrecisionTable(recipe="nvfp4", backend="emulated:x", num_blocks=1,
                                  bf16_blocks=(), schedule="none", rows=())
    seen = {}
    monkeypatch.setattr(policy, "apply_precision",
                        lambda chunks, recipe, log=True: seen.setdefault("r", recipe) and table)
    out = be.apply_backend_precision([], get_recipe("nvfp4"), choice, log=False)
    assert seen["r"].backend == "emulated"
    assert out.format().splitlines()[0].endswith(
        "| backend choice: emulated (precision.backend=auto): test reason")
