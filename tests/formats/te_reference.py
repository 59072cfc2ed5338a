"""Transformer Engine's pure-PyTorch reference quantizers, loaded from a TE source tree, and the
cases that compare them with ``nvfp4_megatron.formats`` (fixture script and tests share this).

Transformer Engine (TE) cannot be installed on a machine without a GPU (its ``__init__`` loads
CUDA libraries), but its reference quantizers are plain PyTorch:
``transformer_engine/pytorch/custom_recipes/reference_nvfp4.py`` (``NVFP4QuantizerRef``; TE's
NVFP4 CUDA kernels are tested against it with ``atol=0, rtol=0``) and
``reference_current_scaling.py`` (``CurrentScalingQuantizerRef``). ``load_te_reference(te_src)``
executes those two files from a TE checkout (``te_src`` is the directory that holds
``transformer_engine/``) with minimal stand-ins for the TE modules they import:

* ``transformer_engine.pytorch.quantized_tensor``: ``QuantizedTensorStorage`` (an empty base
  class) and ``Quantizer`` (stores ``rowwise_usage`` / ``columnwise_usage``, as TE's does);
* ``transformer_engine.pytorch.custom_recipes.gemm``: ``GEMMType`` and ``MMParams`` (used only in
  the GEMM signatures, which the comparison does not call).

``reference_utils.py`` is TE's own file. Nothing of TE is copied into this repository; the
comparison needs the TE checkout only when the fixture is (re)made or when
``NVFP4_TE_SRC`` points the tests at one.

TE does not return its per-tensor encode scale; ``te_global_scales`` records the local
``global_encode_scale`` of ``_quantize_blockwise_reference`` as it returns (a profile hook), so the
value compared is the one TE computed, not a re-derivation.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
import pathlib
import sys
import types

import numpy as np
import torch

from nvfp4_megatron import formats

# Fixed inputs: 4 shapes (rows a multiple of 16, so 2D tiles and 16-token columnwise blocks fit)
# x 6 kinds, each quantized as FP32 and as BF16.
SHAPES = ((16, 32), (32, 64), (48, 80), (32, 128))
KINDS = ("normal", "outlier", "wide", "tiny", "underflow", "zero")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
# The three NVFP4 operand kinds of the paper recipe (DESIGN.md §2).
OPERANDS = ("row", "2d", "colrht")
FIXTURE = pathlib.Path(__file__).parent / "data" / "te_reference_fixture.npz"


def case_id(shape: tuple[int, int], kind: str) -> str:
    return f"{shape[0]}x{shape[1]}_{kind}"


def make_input(shape: tuple[int, int], kind: str, seed: int) -> torch.Tensor:
    """FP32 input of one kind (the BF16 case is this tensor rounded to BF16).

    normal: N(0, 1). outlier: N(0, 1) with one element 3000. wide: N(0, 1) times 2^[-30, 30] per
    element. tiny: N(0, 1) * 2^-100. underflow: N(0, 1) * 2^-126 (FP32 subnormals; 448 / amax
    overflows to Inf, FP8 current scaling's infinite-scale case). zero: all zeros.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if kind == "outlier":
        r = int(torch.randint(0, shape[0], (1,), generator=g))
        c = int(torch.randint(0, shape[1], (1,), generator=g))
        x[r, c] = 3000.0
    elif kind == "wide":
        x = x * torch.exp2(torch.randint(-30, 31, shape, generator=g).float())
    elif kind == "tiny":
        x = x * 2.0**-100
    elif kind == "underflow":
        x = x * 2.0**-126
    elif kind == "zero":
        x = torch.zeros(shape)
    elif kind != "normal":
        raise ValueError(f"unknown input kind {kind!r}; use one of {KINDS}")
    return x


def fixture_inputs(seed: int = 2101) -> dict[str, torch.Tensor]:
    """The fixture's FP32 inputs by case id (deterministic; the fixture stores them anyway)."""
    out = {}
    for i, shape in enumerate(SHAPES):
        for j, kind in enumerate(KINDS):
            out[case_id(shape, kind)] = make_input(shape, kind, seed + 100 * i + j)
    return out


# --------------------------------------------------------------------------- TE loading


def _stub_modules() -> dict[str, types.ModuleType]:
    def module(name: str, path: list[str] | None = None) -> types.ModuleType:
        m = types.ModuleType(name)
        if path is not None:
            m.__path__ = path
        return m

    te = module("transformer_engine", [])
    te_pt = module("transformer_engine.pytorch", [])
    qt = module("transformer_engine.pytorch.quantized_tensor")

    class QuantizedTensorStorage:  # stand-in: TE's base class carries no state the refs use
        pass

    class Quantizer:  # stand-in: the part of TE's Quantizer.__init__ the references use
        def __init__(self, *, rowwise: bool, columnwise: bool) -> None:
            self.rowwise_usage = rowwise
            self.columnwise_usage = columnwise
            self.internal = False
            self.optimize_for_gemm = False

    qt.QuantizedTensorStorage = QuantizedTensorStorage
    qt.Quantizer = Quantizer

    gemm = module("transformer_engine.pytorch.custom_recipes.gemm")

    class GEMMType(enum.Enum):
        FPROP = "fprop"
        DGRAD = "dgrad"
        WGRAD = "wgrad"

    @dataclasses.dataclass(frozen=True)
    class MMParams:
        out_dtype: torch.dtype | None = None
        use_split_accumulator: bool = True

    gemm.GEMMType = GEMMType
    gemm.MMParams = MMParams
    return {
        "transformer_engine": te,
        "transformer_engine.pytorch": te_pt,
        "transformer_engine.pytorch.quantized_tensor": qt,
        "transformer_engine.pytorch.custom_recipes.gemm": gemm,
    }


def load_te_reference(te_src: str | pathlib.Path) -> types.SimpleNamespace:
    """TE's ``reference_nvfp4`` and ``reference_current_scaling`` modules from a TE source tree.

    The modules are registered under their TE names only while they execute, so nothing else
    in the process sees a fake ``transformer_engine``. ValueError if ``te_src`` lacks the files.
    """
    root = pathlib.Path(te_src).expanduser().resolve()
    recipes = root / "transformer_engine" / "pytorch" / "custom_recipes"
    needed = ("reference_nvfp4.py", "reference_current_scaling.py", "reference_utils.py")
    missing = [n for n in needed if not (recipes / n).is_file()]
    if missing:
        raise ValueError(
            f"{root} is not a Transformer Engine source tree: {recipes} lacks {missing}; pass the "
            f"directory that contains transformer_engine/ (a git clone or an unpacked sdist)"
        )
    saved = {k: v for k, v in sys.modules.items() if k == "transformer_engine" or k.startswith("transformer_engine.")}
    try:
        for k in saved:
            del sys.modules[k]
        sys.modules.update(_stub_modules())
        pkg = types.ModuleType("transformer_engine.pytorch.custom_recipes")
        pkg.__path__ = [str(recipes)]
        pkg.gemm = sys.modules[f"{pkg.__name__}.gemm"]
        sys.modules[pkg.__name__] = pkg
        loaded = {}
        for name in ("reference_utils", "reference_nvfp4", "reference_current_scaling"):
            full = f"{pkg.__name__}.{name}"
            spec = importlib.util.spec_from_file_location(full, recipes / f"{name}.py")
            mod = importlib.util.module_from_spec(spec)
            sys.modules[full] = mod
            setattr(pkg, name, mod)
            spec.loader.exec_module(mod)
            loaded[name] = mod
    finally:
        for k in [k for k in sys.modules if k == "transformer_engine" or k.startswith("transformer_engine.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    return types.SimpleNamespace(nvfp4=loaded["reference_nvfp4"],
                                 current_scaling=loaded["reference_current_scaling"],
                                 utils=loaded["reference_utils"], root=root)


class te_global_scales:  # noqa: N801 - used as a context manager
    """Records TE's ``global_encode_scale`` each time ``_quantize_blockwise_reference`` returns."""

    def __init__(self, te) -> None:
        fn = te.nvfp4.NVFP4QuantizerRef._quantize_blockwise_reference
        self._code = getattr(fn, "__func__", fn).__code__
        self.values: list[torch.Tensor] = []

    def _hook(self, frame, event, arg):
        if event == "return" and frame.f_code is self._code:
            s = frame.f_locals.get("global_encode_scale")
            if s is not None:
                self.values.append(s.detach().reshape(()).clone())

    def __enter__(self):
        self._old = sys.getprofile()
        sys.setprofile(self._hook)
        return self

    def __exit__(self, *exc):
        sys.setprofile(self._old)


# --------------------------------------------------------------------------- both sides


def _u8(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.uint8).numpy().copy()


def _f32(t: torch.Tensor) -> np.ndarray:
    return np.asarray(t.detach().float().reshape(()).numpy(), dtype=np.float32).copy()


def run_te(te, x: torch.Tensor) -> dict[str, np.ndarray]:
    """TE's reference on one 2-D tensor: the three NVFP4 operand kinds and FP8 current scaling.

    row / colrht: one ``NVFP4QuantizerRef(quant_tile_shape=(1, 16), with_rht=True)`` call, rowwise
    (no RHT: TE applies it to the columnwise copy only) and columnwise (``x.t()`` with RHT and the
    post-RHT amax); 2d: ``quant_tile_shape=(16, 16)``, rowwise. Fields ``{op}_data`` (packed
    codes), ``{op}_scale`` (E4M3 bytes), ``{op}_amax``, ``{op}_senc`` (TE's S_enc), and
    ``fp8_{e4m3,e5m2}_{data,scale,scale_inv}``.
    """
    ref = te.nvfp4
    e2m1 = te.utils.Fp4Formats.E2M1
    out: dict[str, np.ndarray] = {}
    q1 = ref.NVFP4QuantizerRef(dtype=e2m1, rowwise=True, columnwise=True, quant_tile_shape=(1, 16),
                               with_rht=True, with_random_sign_mask=True)
    with te_global_scales(te) as gs:
        r = q1.quantize(x)
    assert len(gs.values) == 2, "TE reference: expected one rowwise and one columnwise scale"
    out.update(row_data=_u8(r.data), row_scale=_u8(r.scale), row_amax=_f32(r.global_amax_row),
               row_senc=_f32(gs.values[0]),
               colrht_data=_u8(r.data_t), colrht_scale=_u8(r.scale_t),
               colrht_amax=_f32(r.global_amax_col), colrht_senc=_f32(gs.values[1]))
    q2 = ref.NVFP4QuantizerRef(dtype=e2m1, rowwise=True, columnwise=False,
                               quant_tile_shape=(16, 16), with_rht=False)
    with te_global_scales(te) as gs:
        r = q2.quantize(x)
    out.update(**{"2d_data": _u8(r.data), "2d_scale": _u8(r.scale),
                  "2d_amax": _f32(r.global_amax_row), "2d_senc": _f32(gs.values[0])})
    cs = te.current_scaling.CurrentScalingQuantizerRef
    for name, dt in FP8.items():
        r = cs(dtype=dt, rowwise=True, columnwise=False).quantize(x)
        scale, _scale_inv, _amax = cs.compute_scale(x, dt)
        out[f"fp8_{name}_data"] = _u8(r.data)
        out[f"fp8_{name}_scale"] = _f32(scale)
        out[f"fp8_{name}_scale_inv"] = _f32(r.scale)
    return out


def run_project(x: torch.Tensor) -> dict[str, np.ndarray]:
    """The same fields from ``nvfp4_megatron.formats`` (columnwise copy: ``x.t()``, as the linear)."""
    out: dict[str, np.ndarray] = {}
    for op, q in (("row", formats.quantize_nvfp4(x)),
                  ("2d", formats.quantize_nvfp4(x, tile=(16, 16))),
                  ("colrht", formats.quantize_nvfp4(x.t(), rht=True))):
        out.update({f"{op}_data": _u8(q.data), f"{op}_scale": _u8(q.scale),
                    f"{op}_amax": _f32(q.amax), f"{op}_senc": _f32(q.scale_enc)})
    for name, dt in FP8.items():
        q = formats.quantize_fp8_current(x, dt)
        out[f"fp8_{name}_data"] = _u8(q.data)
        out[f"fp8_{name}_scale"] = _f32(q.scale)
        out[f"fp8_{name}_scale_inv"] = _f32(q.scale_inv)
    return out


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Same shape and the same bytes (FP32 compared bit for bit, so -0.0 != 0.0)."""
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def differing_fields(te_out: dict[str, np.ndarray], ours: dict[str, np.ndarray], prefix: str) -> list[str]:
    """Names of the fields starting with ``prefix`` whose bits differ."""
    return sorted(k for k in te_out if k.startswith(prefix) and not bits_equal(te_out[k], ours[k]))


# --------------------------------------------------------------------------- classification

FLT_MAX = np.float32(np.finfo(np.float32).max)
BF16_MAX = np.float32(torch.finfo(torch.bfloat16).max)


def _zero_sign_only(te_codes: np.ndarray, our_codes: np.ndarray) -> bool:
    """Packed E2M1 bytes that differ only where both nibbles have magnitude 0 (±0)."""
    if te_codes.shape != our_codes.shape:
        return False
    nib = lambda b: np.stack([b & 0xF, b >> 4], axis=-1)  # noqa: E731
    a, b = nib(te_codes), nib(our_codes)
    diff = a != b
    return bool(np.all(((a & 7) == 0) & ((b & 7) == 0) | ~diff))


def classify(te_out: dict[str, np.ndarray], ours: dict[str, np.ndarray], op: str) -> str:
    """How one operand (``row``, ``2d``, ``colrht``, ``fp8_e4m3``, ``fp8_e5m2``) compares.

    ``identical``: every field bit for bit. Otherwise the documented difference it is
    (docs/formats.md "Equality with Transformer Engine"), or ``other`` (a bug):

    * ``zero-amax S_enc``: amax 0; TE's reference uses S_enc = FLT_MAX, the project (and TE's
      CUDA kernel) 1; codes and scales identical (all zero).
    * ``sign of zero``: only codes of ±0 differ (TE's reference encodes -0.0 as +0, code 0x0).
    * ``fp8 infinite scale``: 448/amax or 57344/amax overflows; TE's reference uses the input
      dtype's max (BF16: 3.39e38), the project (and TE's CUDA kernel) FLT_MAX.
    * ``rht summation order``: columnwise RHT of an FP32 input; TE's reference sums ``x @ H`` in
      a BLAS GEMM, the project in the fixed butterfly, and the FP32 sums round differently.
    """
    diff = differing_fields(te_out, ours, f"{op}_")
    if not diff:
        return "identical"
    if op.startswith("fp8"):
        te_s, our_s = te_out[f"{op}_scale"], ours[f"{op}_scale"]
        if set(diff) <= {f"{op}_scale", f"{op}_scale_inv", f"{op}_data"} and te_s == BF16_MAX and our_s == FLT_MAX:
            return "fp8 infinite scale"
        return "other"
    if diff == [f"{op}_senc"] and ours[f"{op}_amax"] == 0 and te_out[f"{op}_senc"] == FLT_MAX and ours[f"{op}_senc"] == 1:
        return "zero-amax S_enc"
    if diff == [f"{op}_data"] and _zero_sign_only(te_out[f"{op}_data"], ours[f"{op}_data"]):
        return "sign of zero"
    if op == "colrht" and te_out[f"{op}_amax"].dtype == np.float32:
        return "rht summation order"
    return "other"
