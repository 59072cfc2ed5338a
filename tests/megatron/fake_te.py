"""A stand-in for Transformer Engine's public Python API, per release, for machines without TE.

TE cannot be installed next to Megatron-Core on a machine without a GPU, so the TE backend is
tested against this double. It reproduces TE's *API data* -- class names, dataclass field names,
order and defaults (including the ``NVTE_*`` environment variables read when the module is
imported), the autocast entry points and their signatures, and the capability checks -- for the
releases whose sources were read (github.com/NVIDIA/TransformerEngine):

=========  ==========================================  ===========================================
release    recipe classes                              autocast / support checks
=========  ==========================================  ===========================================
2.8.0      ``transformer_engine/common/recipe/         ``transformer_engine/pytorch/fp8.py``:
           __init__.py`` at tag v2.8 (70f5366)         ``fp8_autocast`` only; ``check_*_support``
2.9.0      same file at v2.9 (27486e0): + CustomRecipe ``pytorch/quantization.py``: ``autocast``
                                                       (contextmanager), ``fp8_autocast`` deprecated
                                                       and forwarding to it; checks moved there
2.18.0     same file at v2.18 (40c69e7, newest tag):   ``autocast`` is a class; ``fp8_autocast``
           + backward_override (2.15),                 returns an ``autocast``
           row_scaled_activation (2.16),
           nvfp4_4over6* (2.17)
=========  ==========================================  ===========================================

Behaviour is minimal and written here, not taken from TE: constructors are plain dataclasses (so
an unknown keyword is a ``TypeError``, as with TE's pydantic dataclasses); ``__post_init__``
derives the per-role ``QParams`` the way TE's recipe documents them (RHT on inputs and gradients,
SR on gradients, 2D on weights); ``Float8CurrentScaling`` / ``Float8BlockScaling`` keep their
``fp8_quant_*`` as class attributes computed from the environment at import, as TE does; entering
an autocast runs the release's ``check_recipe_support`` and records the recipe object.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import importlib.machinery
import os
import sys
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

VERSIONS = ("2.8.0", "2.9.0", "2.18.0")


def _v(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


class FakeTE:
    """The modules of one fake TE release, and what its autocast was entered with."""

    def __init__(self, version: str, *, compute_capability=(10, 0), cuda_version=12.9):
        self.version = version
        self.compute_capability = tuple(compute_capability)
        self.cuda_version = float(cuda_version)
        self.events: list[tuple] = []  # ("enter", entry point, recipe, group) / ("exit", ...)
        self.modules = _build(self)

    @property
    def recipe(self) -> types.ModuleType:
        return self.modules["transformer_engine.common.recipe"]

    @property
    def pytorch(self) -> types.ModuleType:
        return self.modules["transformer_engine.pytorch"]

    @contextlib.contextmanager
    def installed(self):
        """Put the fake modules in ``sys.modules`` (restoring whatever was there on exit)."""
        saved = {name: sys.modules.get(name, _MISSING) for name in self.modules}
        sys.modules.update(self.modules)
        try:
            yield self
        finally:
            for name, mod in saved.items():
                if mod is _MISSING:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = mod


_MISSING = object()


# ---------------------------------------------------------------- transformer_engine.common.recipe

def _recipe_module(v: tuple[int, int]) -> types.ModuleType:
    env = os.environ.get  # read once, here: TE evaluates these defaults when it is imported
    mod = types.ModuleType("transformer_engine.common.recipe")

    class Format(enum.Enum):
        # (max forward, max backward), as TE's _FormatHelper
        E2M1 = (6, 6)
        E4M3 = (448, 448)
        E5M2 = (57344, 57344)
        HYBRID = (448, 57344)

    @dataclass(frozen=True)
    class MMParams:
        use_split_accumulator: bool = True

    @dataclass(frozen=True)
    class QParams:
        power_2_scale: bool = False
        amax_epsilon: float = 0.0
        random_hadamard_transform: bool = False
        stochastic_rounding: bool = False
        fp4_2d_quantization: bool = False

    class Recipe:
        def __repr__(self) -> str:  # the shape of TE's repr: "recipe_type=Name, field=value, ..."
            parts = [f"recipe_type={type(self).__name__}"]
            parts += [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)]
            return ", ".join(parts)

    overrides = (None, "high_precision", "dequantized")

    def since(minor: int, fields: list) -> list:
        return fields if v >= (2, minor) else []

    def backward_override() -> list:
        return since(15, [("backward_override", Optional[str],
                           field(default=env("NVTE_BACKWARD_OVERRIDE", None)))])

    def check_backward_override(self) -> None:
        if v >= (2, 15):
            assert self.backward_override in overrides, "NVTE_BACKWARD_OVERRIDE must be unset or..."

    def no_e5m2(self) -> None:
        assert self.fp8_format != Format.E5M2, "Pure E5M2 training is not supported."

    def make(name: str, fields: list, post_init: Callable | None = None, **class_attrs):
        ns = dict(class_attrs)
        if post_init is not None:
            ns["__post_init__"] = post_init
        cls = dataclasses.make_dataclass(name, fields, bases=(Recipe,), namespace=ns, repr=False)
        cls.__module__ = mod.__name__
        return cls

    def delayed_post(self):
        no_e5m2(self)
        check_backward_override(self)

    DelayedScaling = make("DelayedScaling", [
        ("margin", int, field(default=0)),
        ("fp8_format", Format, field(default=Format.HYBRID)),
        ("amax_history_len", int, field(default=1024)),
        ("amax_compute_algo", Any, field(default="max")),
        ("scaling_factor_compute_algo", Optional[Callable], field(default=None)),
        ("reduce_amax", bool, field(default=True)),
        ("fp8_dpa", bool, field(default=False)),
        ("fp8_mha", bool, field(default=False)),
        *backward_override(),
    ], delayed_post)

    pow2 = env("NVTE_FP8_CURRENT_SCALING_POWER_2_SCALES", "0") == "1"

    def cs_post(self):
        no_e5m2(self)
        check_backward_override(self)

    Float8CurrentScaling = make("Float8CurrentScaling", [
        ("use_power_2_scales", bool, field(default=pow2)),
        ("fp8_format", Format, field(default=Format.HYBRID)),
        ("fp8_gemm_fprop", MMParams, field(default=MMParams(use_split_accumulator=False))),
        ("fp8_gemm_dgrad", MMParams, field(default=MMParams(use_split_accumulator=True))),
        ("fp8_gemm_wgrad", MMParams, field(default=MMParams(use_split_accumulator=True))),
        ("fp8_dpa", bool, field(default=False)),
        ("fp8_mha", bool, field(default=False)),
        *backward_override(),
    ], cs_post,
        # class attributes, not fields: fixed by the environment at import
        fp8_quant_fwd_inp=QParams(power_2_scale=pow2, amax_epsilon=0.0),
        fp8_quant_fwd_weight=QParams(power_2_scale=pow2, amax_epsilon=0.0),
        fp8_quant_bwd_grad=QParams(power_2_scale=pow2, amax_epsilon=0.0))

    def mx_post(self):
        no_e5m2(self)
        check_backward_override(self)

    MXFP8BlockScaling = make("MXFP8BlockScaling", [
        ("margin", int, field(default=0)),
        ("fp8_format", Format, field(default=Format.E4M3)),
        ("fp8_dpa", bool, field(default=False)),
        ("fp8_mha", bool, field(default=False)),
        *backward_override(),
    ], mx_post)

    f32 = env("NVTE_FP8_BLOCK_SCALING_FP32_SCALES", "0") == "1"

    def block_post(self):
        dims = (self.x_block_scaling_dim, self.w_block_scaling_dim, self.grad_block_scaling_dim)
        assert all(d in (1, 2) for d in dims), "Only 1D or 2D blocks supported"
        assert sum(d == 2 for d in dims) <= 1, "2D by 2D block gemm not supported."
        for g in (self.fp8_gemm_fprop, self.fp8_gemm_dgrad, self.fp8_gemm_wgrad):
            assert g.use_split_accumulator, "Split accumulator required."
        assert not self.fp8_dpa and not self.fp8_mha, "FP8 attention is not supported"
        if v >= (2, 9):
            no_e5m2(self)
        check_backward_override(self)

    Float8BlockScaling = make("Float8BlockScaling", [
        ("use_f32_scales", bool, field(default=f32)),
        ("fp8_format", Format, field(default=Format.E4M3)),
        ("x_block_scaling_dim", int, field(default=1)),
        ("w_block_scaling_dim", int, field(default=2)),
        ("grad_block_scaling_dim", int, field(default=1)),
        ("fp8_gemm_fprop", MMParams, field(default=MMParams(use_split_accumulator=True))),
        ("fp8_gemm_dgrad", MMParams, field(default=MMParams(use_split_accumulator=True))),
        ("fp8_gemm_wgrad", MMParams, field(default=MMParams(use_split_accumulator=True))),
        ("fp8_dpa", bool, field(default=False)),
        ("fp8_mha", bool, field(default=False)),
        *backward_override(),
    ], block_post,
        fp8_quant_fwd_inp=QParams(power_2_scale=not f32, amax_epsilon=0.0),
        fp8_quant_fwd_weight=QParams(power_2_scale=not f32, amax_epsilon=0.0),
        fp8_quant_bwd_grad=QParams(power_2_scale=not f32, amax_epsilon=0.0))

    scopes = ("none", "weights", "activations", "all")

    def nvfp4_post(self):
        assert self.fp4_format == Format.E2M1, "Only E2M1 is supported for NVFP4 scaling"
        assert self.fp8_format == Format.E4M3, "Only E4M3 is supported for NVFP4 scaling"
        check_backward_override(self)
        if v >= (2, 17):
            assert self.nvfp4_4over6 in scopes and self.nvfp4_4over6_e4m3_use_256 in scopes
            assert self.nvfp4_4over6_err_mode in ("MAE", "MSE")
        # per role, as TE documents its recipe: RHT only for inputs and gradients (applied to
        # their columnwise copies), SR only for gradients, 2D only for weights
        rht = not self.disable_rht
        self.fp4_quant_fwd_inp = QParams(random_hadamard_transform=rht)
        self.fp4_quant_fwd_weight = QParams(fp4_2d_quantization=not self.disable_2d_quantization)
        self.fp4_quant_bwd_grad = QParams(random_hadamard_transform=rht,
                                          stochastic_rounding=not self.disable_stochastic_rounding)

    NVFP4BlockScaling = make("NVFP4BlockScaling", [
        ("disable_rht", bool, field(default=env("NVTE_NVFP4_DISABLE_RHT", "0") == "1")),
        ("disable_stochastic_rounding", bool,
         field(default=env("NVTE_NVFP4_DISABLE_STOCHASTIC_ROUNDING", "0") == "1")),
        ("disable_2d_quantization", bool,
         field(default=env("NVTE_NVFP4_DISABLE_2D_QUANTIZATION", "0") == "1")),
        *since(16, [("row_scaled_activation", bool,
                     field(default=env("NVTE_NVFP4_ROW_SCALED_ACTIVATION", "0") == "1"))]),
        *since(17, [("nvfp4_4over6", str, field(default=env("NVTE_NVFP4_4OVER6", "none"))),
                    ("nvfp4_4over6_e4m3_use_256", str,
                     field(default=env("NVTE_NVFP4_4OVER6_E4M3_USE_256", "all"))),
                    ("nvfp4_4over6_err_mode", str,
                     field(default=env("NVTE_NVFP4_4OVER6_ERR_MODE", "MAE").upper()))]),
        ("fp4_format", Format, field(default=Format.E2M1)),
        ("fp8_format", Format, field(default=Format.E4M3)),
        ("fp8_dpa", bool, field(default=False)),
        ("fp8_mha", bool, field(default=False)),
        *backward_override(),
    ], nvfp4_post)

    classes = dict(Format=Format, MMParams=MMParams, QParams=QParams, Recipe=Recipe,
                   DelayedScaling=DelayedScaling, Float8CurrentScaling=Float8CurrentScaling,
                   MXFP8BlockScaling=MXFP8BlockScaling, Float8BlockScaling=Float8BlockScaling,
                   NVFP4BlockScaling=NVFP4BlockScaling)
    if v >= (2, 9):
        classes["CustomRecipe"] = make("CustomRecipe", [
            ("qfactory", Callable[..., Any]),
            *since(16, [("fp8_format", Format, field(default=Format.HYBRID))]),
            ("fp8_dpa", bool, field(default=False)),
            ("fp8_mha", bool, field(default=False)),
            *backward_override(),
        ], lambda self: check_backward_override(self))
    for name, obj in classes.items():
        setattr(mod, name, obj)
    return mod


# ------------------------------------------------------------ capability checks and autocast

def _support_checks(fake: FakeTE, rec: types.ModuleType) -> dict[str, Callable]:
    cc, cuda, v = fake.compute_capability, fake.cuda_version, _v(fake.version)

    def check_fp8_support():
        if cc >= (9, 0):
            return True, ""
        if cc < (8, 9):
            return False, "Device compute capability 8.9 or higher required for FP8 execution."
        return True, ""  # Ada: TE also checks the cuBLASLt and CUDA versions (not modelled)

    def check_mxfp8_support():
        if cc >= (12, 0):
            return False, ("MXFP8 (for all gemm layouts) is not supported on 12.0+ "
                           "architectures yet.")
        if cc >= (10, 0):
            return True, ""
        return False, "Device compute capability 10.0 or higher required for MXFP8 execution."

    def check_nvfp4_support():
        if cc >= (10, 0):
            return True, ""
        return False, "Device compute capability 10.0 or higher required for NVFP4 execution."

    def check_fp8_block_scaling_support():
        if v < (2, 9):  # 2.8: Hopper only
            if (9, 0) <= cc < (10, 0) and cuda >= 12.9:
                return True, ""
            return False, "FP8 block scaled GEMM requires Hopper and CUDA >= 12.9."
        if cc >= (9, 0) and cuda >= 12.9:
            return True, ""
        return False, ("FP8 block scaled GEMM requires compute capability 9.0 or higher and "
                       "CUDA >= 12.9.")

    def check_recipe_support(recipe) -> None:  # NVFP4 is not checked here (as in TE)
        ok, why = True, ""
        if isinstance(recipe, (rec.DelayedScaling, rec.Float8CurrentScaling)):
            ok, why = check_fp8_support()
        elif isinstance(recipe, rec.Float8BlockScaling):
            ok, why = check_fp8_block_scaling_support()
        elif isinstance(recipe, rec.MXFP8BlockScaling):
            ok, why = check_mxfp8_support()
        if not ok:
            if v >= (2, 18):
                raise RuntimeError(why)
            raise AssertionError(why)

    return dict(check_fp8_support=check_fp8_support, check_mxfp8_support=check_mxfp8_support,
                check_nvfp4_support=check_nvfp4_support,
                check_fp8_block_scaling_support=check_fp8_block_scaling_support,
                check_recipe_support=check_recipe_support)


def _autocasts(fake: FakeTE, checks: dict[str, Callable]) -> dict[str, Callable]:
    v = _v(fake.version)
    events = fake.events

    def enter(entry, enabled, recipe, group):
        if enabled:
            checks["check_recipe_support"](recipe)
        events.append(("enter", entry, recipe, group))

    def leave(entry, recipe):
        events.append(("exit", entry, recipe))

    if v < (2, 9):
        @contextlib.contextmanager
        def fp8_autocast(enabled: bool = True, calibrating: bool = False,
                         fp8_recipe=None, fp8_group=None, _graph: bool = False):
            enter("fp8_autocast", enabled, fp8_recipe, fp8_group)
            try:
                yield
            finally:
                leave("fp8_autocast", fp8_recipe)

        return {"fp8_autocast": fp8_autocast}

    deprecated = ("fp8_autocast is deprecated and will be removed in a future release. Use "
                  "autocast(enabled=..., calibrating=..., recipe=..., group=..., _graph=...) "
                  "instead.")
    if v < (2, 18):
        @contextlib.contextmanager
        def autocast(enabled: bool = True, calibrating: bool = False, recipe=None,
                     amax_reduction_group=None, _graph: bool = False):
            enter("autocast", enabled, recipe, amax_reduction_group)
            try:
                yield
            finally:
                leave("autocast", recipe)

        @contextlib.contextmanager
        def fp8_autocast(enabled: bool = True, calibrating: bool = False,
                         fp8_recipe=None, fp8_group=None, _graph: bool = False):
            warnings.warn(deprecated, category=DeprecationWarning, stacklevel=2)
            with autocast(enabled=enabled, calibrating=calibrating, recipe=fp8_recipe,
                          amax_reduction_group=fp8_group, _graph=_graph):
                yield

        return {"fp8_autocast": fp8_autocast, "autocast": autocast}

    class autocast:  # noqa: N801 - TE's class name (2.18)
        def __init__(self, enabled: bool = True, calibrating: bool = False, recipe=None,
                     amax_reduction_group=None, _graph: bool = False) -> None:
            self._enabled, self._recipe, self._group = enabled, recipe, amax_reduction_group

        def __enter__(self):
            enter("autocast", self._enabled, self._recipe, self._group)
            return self

        def __exit__(self, *exc) -> None:
            leave("autocast", self._recipe)

    def fp8_autocast(enabled: bool = True, calibrating: bool = False, fp8_recipe=None,
                     fp8_group=None, _graph: bool = False) -> autocast:
        warnings.warn(deprecated, category=DeprecationWarning, stacklevel=2)
        return autocast(enabled=enabled, calibrating=calibrating, recipe=fp8_recipe,
                        amax_reduction_group=fp8_group, _graph=_graph)

    return {"fp8_autocast": fp8_autocast, "autocast": autocast}


def _build(fake: FakeTE) -> dict[str, types.ModuleType]:
    v = _v(fake.version)
    te = types.ModuleType("transformer_engine")
    te.__version__ = fake.version
    common = types.ModuleType("transformer_engine.common")
    rec = _recipe_module(v)
    pt = types.ModuleType("transformer_engine.pytorch")
    fp8 = types.ModuleType("transformer_engine.pytorch.fp8")
    tensor = types.ModuleType("transformer_engine.pytorch.tensor")
    tensor.QuantizedTensor = type("QuantizedTensor", (), {})  # Megatron imports it (isinstance)
    checks = _support_checks(fake, rec)
    casts = _autocasts(fake, checks)

    @contextlib.contextmanager
    def fp8_model_init(enabled: bool = True, recipe=None,
                       preserve_high_precision_init_val: bool = False):
        yield

    fp8.FP8GlobalStateManager = type("FP8GlobalStateManager", (), {})
    for name, fn in (*checks.items(), ("fp8_autocast", casts["fp8_autocast"]),
                     ("fp8_model_init", fp8_model_init)):
        setattr(fp8, name, fn)  # 2.8: defined here; 2.9+: re-exported by the deprecated shim
    pt.fp8_autocast = casts["fp8_autocast"]
    pt.fp8_model_init = fp8_model_init
    te.common, common.recipe, te.pytorch, pt.fp8, pt.tensor = common, rec, pt, fp8, tensor
    modules = {"transformer_engine": te, "transformer_engine.common": common,
               "transformer_engine.common.recipe": rec, "transformer_engine.pytorch": pt,
               "transformer_engine.pytorch.fp8": fp8, "transformer_engine.pytorch.tensor": tensor}
    if v >= (2, 9):
        quant = types.ModuleType("transformer_engine.pytorch.quantization")
        modules[quant.__name__] = quant
        for name, fn in (*checks.items(), *casts.items()):
            setattr(quant, name, fn)
        pt.quantization = quant
        pt.autocast = casts["autocast"]
        pt.quantized_model_init = fp8_model_init
        for short, check in (("fp8", "check_fp8_support"), ("mxfp8", "check_mxfp8_support"),
                             ("fp8_block_scaling", "check_fp8_block_scaling_support"),
                             ("nvfp4", "check_nvfp4_support")):
            fn = checks[check]
            setattr(pt, f"is_{short}_available",
                    lambda return_reason=False, fn=fn: fn() if return_reason else fn()[0])
    for name, mod in modules.items():  # importable names, as importlib.util.find_spec sees them
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    return modules
