"""Precision recipes: what each operand of each GEMM of a linear layer is quantized to.

A linear layer ``Y = X Wᵀ`` runs three GEMMs (DESIGN.md §2)::

    Fprop  Y  = X · Wᵀ    operands: X rowwise (blocks along in),  W rowwise (blocks along in)
    Dgrad  dX = dY · W    operands: dY rowwise (blocks along out), W columnwise (blocks along out)
    Wgrad  dW = dYᵀ · X   operands: dY columnwise (along tokens), X columnwise (along tokens)

A recipe spells out, for every operand of every GEMM, a :class:`TensorQuant` (format, tile, random
Hadamard transform, stochastic rounding, FP8 element type, power-of-two scales). A GEMM whose two
operands are ``bf16`` runs in high precision.

``e2m1_vector`` is the Microsoft FP4 paper's format (arXiv 2501.17116 §3, "vector-wise"
quantization): E2M1 elements with one FP32 absmax scale per row along the reduction dimension,
i.e. per token for X and per output channel for W. Its Dgrad/Wgrad copies are the Fprop copies
(transposed, never requantized), and it meets FP8 gradients in the backward GEMMs: the paper's
backward multiplies FP8 gradients by the forward's FP4 operands (docs/recipes.md). On top of the per-GEMM description come a per-layer
policy (which transformer blocks stay BF16; NVFP4 paper arXiv 2509.25149 §4.1 keeps the first 2 and
last 8 of 62 blocks in BF16), a precision schedule (switch to BF16 near the end of training, paper
App. D) and the backend choice (Transformer Engine or the project's emulation).

Everything here is a frozen keyword-only dataclass validated at construction; derived recipes are
made with functions returning new objects (:func:`with_layer_policy`, ...), never by mutation.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

FORMATS = ("bf16", "nvfp4", "mxfp8", "mxfp4", "fp8", "fp8_block", "e2m1_vector")
FP8_DTYPES = ("e4m3", "e5m2")
BACKENDS = ("auto", "te", "emulated")
SWITCH_SCOPES = ("all", "fprop")

# Allowed tiles per format, written (rows, cols) with cols along the GEMM reduction dimension.
# None = the format has no tile (bf16) or one scale per tensor (fp8 current scaling).
_TILES: dict[str, tuple[tuple[int, int] | None, ...]] = {
    "bf16": (None,),
    "nvfp4": ((1, 16), (16, 16)),
    "mxfp8": ((1, 32),),
    "mxfp4": ((1, 32),),
    "fp8": (None,),
    "fp8_block": ((1, 128), (128, 128)),
    "e2m1_vector": (None,),  # one scale per row: the block is the whole reduction dimension
}
_DEFAULT_TILE = {"bf16": None, "nvfp4": (1, 16), "mxfp8": (1, 32), "mxfp4": (1, 32),
                 "fp8": None, "fp8_block": (1, 128), "e2m1_vector": None}
# Formats that carry a per-tensor (global) scale, whose amax is reduced over the TP group.
GLOBAL_SCALE_FORMATS = ("nvfp4", "fp8")
# FP4 formats: the Fprop of a recipe with Microsoft FP4 options (DGE / OCC) must use one of them.
FP4_FORMATS = ("nvfp4", "mxfp4", "e2m1_vector")


@dataclass(frozen=True, kw_only=True)
class TensorQuant:
    """How one operand copy (rowwise or columnwise) of one GEMM is quantized.

    ``format``: bf16 | nvfp4 | mxfp8 | mxfp4 | fp8 (per-tensor current scaling) | fp8_block |
    e2m1_vector (E2M1, one FP32 absmax-to-6 scale per row along the reduction dim: per token /
    per output channel, Microsoft FP4 arXiv 2501.17116 §3).
    ``tile``: (rows, cols), cols along the reduction dim; None means the format's default.
    ``rht``: random Hadamard transform on 16-element chunks along the reduction dim (NVFP4 only;
    both operands of a GEMM must agree, so it cancels: (A H)(B H)ᵀ = A Bᵀ).
    ``stochastic_rounding``: SR to E2M1 (NVFP4 only, gradient operands only).
    ``fp8_dtype``: e4m3 | e5m2 element type for fp8 / fp8_block / mxfp8.
    ``pow2_scale``: round FP8 scales down to a power of two (fp8 / fp8_block).
    """

    format: str = "bf16"
    tile: tuple[int, int] | None = None
    rht: bool = False
    stochastic_rounding: bool = False
    fp8_dtype: str = "e4m3"
    pow2_scale: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"TensorQuant.format={self.format!r} is not a known format; "
                             f"use one of {FORMATS}")
        tile = self.tile
        if tile is None:
            object.__setattr__(self, "tile", _DEFAULT_TILE[self.format])
        else:
            tile = tuple(int(t) for t in tile)
            object.__setattr__(self, "tile", tile)
            if tile not in _TILES[self.format]:
                raise ValueError(f"TensorQuant.tile={tile} is not allowed for format "
                                 f"{self.format!r}; allowed: {_TILES[self.format]}")
        if self.fp8_dtype not in FP8_DTYPES:
            raise ValueError(f"TensorQuant.fp8_dtype={self.fp8_dtype!r}; use one of {FP8_DTYPES}")
        if self.rht and self.format != "nvfp4":
            raise ValueError(f"TensorQuant.rht=True needs format 'nvfp4' (got {self.format!r}); "
                             "the random Hadamard transform is part of the NVFP4 recipe only")
        if self.rht and self.tile == (16, 16):
            raise ValueError("TensorQuant.rht=True with 2D tile (16, 16) is not supported: the "
                             "transform mixes one dimension of a tile; use tile (1, 16)")
        if self.stochastic_rounding and self.format != "nvfp4":
            raise ValueError(f"TensorQuant.stochastic_rounding=True needs format 'nvfp4' "
                             f"(got {self.format!r})")
        if self.format in ("mxfp4", "e2m1_vector") and self.fp8_dtype != "e4m3":
            raise ValueError(f"TensorQuant.fp8_dtype does not apply to {self.format}; leave it "
                             "'e4m3'")
        if self.pow2_scale and self.format not in ("fp8", "fp8_block"):
            raise ValueError(f"TensorQuant.pow2_scale=True applies to fp8 / fp8_block only "
                             f"(got {self.format!r}); MX scales are powers of two already")

    @property
    def is_quantized(self) -> bool:
        return self.format != "bf16"

    def describe(self) -> str:
        """Short human-readable form used by the precision table, e.g. ``nvfp4 1x16 RHT SR``."""
        if not self.is_quantized:
            return "bf16"
        parts = [self.format]
        if self.format in ("fp8", "fp8_block", "mxfp8"):
            parts.append(self.fp8_dtype)
        if self.format == "e2m1_vector":
            parts.append("1xK absmax")  # one scale per row, over the whole reduction dim
        else:
            parts.append("tensor" if self.tile is None else f"{self.tile[0]}x{self.tile[1]}")
        if self.rht:
            parts.append("RHT")
        if self.stochastic_rounding:
            parts.append("SR")
        if self.pow2_scale:
            parts.append("pow2")
        return " ".join(parts)


BF16 = TensorQuant(format="bf16")


def _check_pair(gemm: str, a_name: str, a: TensorQuant, b_name: str, b: TensorQuant, *,
                backward: bool = False) -> None:
    if a.is_quantized != b.is_quantized:
        raise ValueError(f"{gemm}: operands {a_name}={a.describe()!r} and {b_name}={b.describe()!r} "
                         "must both be bf16 or both quantized (a GEMM runs in one precision)")
    if a.is_quantized:
        fam = {"fp8": "fp8", "fp8_block": "fp8_block", "nvfp4": "nvfp4", "mxfp8": "mx",
               "mxfp4": "mx", "e2m1_vector": "e2m1_vector"}
        mixed_fp8_fp4 = {a.format, b.format} == {"fp8", "e2m1_vector"}
        if mixed_fp8_fp4 and not backward:
            raise ValueError(f"{gemm}: an FP8 x e2m1_vector GEMM is the Microsoft FP4 backward "
                             "(FP8 gradient times the FP4 forward copy); Fprop operands must be "
                             "of one family")
        if fam[a.format] != fam[b.format] and not mixed_fp8_fp4:
            raise ValueError(f"{gemm}: operand formats {a.format!r} ({a_name}) and {b.format!r} "
                             f"({b_name}) cannot meet in one GEMM; use the same scaling family")
        if a.rht != b.rht:
            raise ValueError(f"{gemm}: rht must be the same on {a_name} and {b_name} (the "
                             "transform only cancels when both operands carry it)")


@dataclass(frozen=True, kw_only=True)
class Fprop:
    """Y = X·Wᵀ: ``input`` (X rowwise) and ``weight`` (W rowwise), blocks along in-features."""

    input: TensorQuant = BF16
    weight: TensorQuant = BF16

    def __post_init__(self) -> None:
        _check_pair("Fprop", "input", self.input, "weight", self.weight)
        if self.input.stochastic_rounding or self.weight.stochastic_rounding:
            raise ValueError("Fprop: stochastic_rounding is for gradient operands only")


@dataclass(frozen=True, kw_only=True)
class Dgrad:
    """dX = dY·W: ``grad_output`` (dY rowwise) and ``weight`` (W columnwise), blocks along out."""

    grad_output: TensorQuant = BF16
    weight: TensorQuant = BF16

    def __post_init__(self) -> None:
        _check_pair("Dgrad", "grad_output", self.grad_output, "weight", self.weight, backward=True)
        if self.grad_output.format == "e2m1_vector":
            raise ValueError("Dgrad.grad_output: e2m1_vector is a forward-operand format (per "
                             "token / per channel); quantize gradients with fp8, nvfp4, ...")
        if self.weight.stochastic_rounding:
            raise ValueError("Dgrad.weight: stochastic_rounding is for gradient operands only")


@dataclass(frozen=True, kw_only=True)
class Wgrad:
    """dW = dYᵀ·X: ``grad_output`` (dY columnwise) and ``input`` (X columnwise), along tokens."""

    grad_output: TensorQuant = BF16
    input: TensorQuant = BF16

    def __post_init__(self) -> None:
        _check_pair("Wgrad", "grad_output", self.grad_output, "input", self.input, backward=True)
        if self.grad_output.format == "e2m1_vector":
            raise ValueError("Wgrad.grad_output: e2m1_vector is a forward-operand format (per "
                             "token / per channel); quantize gradients with fp8, nvfp4, ...")
        if self.input.stochastic_rounding:
            raise ValueError("Wgrad.input: stochastic_rounding is for gradient operands only")


@dataclass(frozen=True, kw_only=True)
class MsFp4Options:
    """Microsoft FP4 training components (arXiv 2501.17116 §3), both optional.

    ``dge``: differentiable gradient estimator for weights, f'(x) = (1/k)|2x/δ-1|^(1/k-1), capped
    at ``dge_cap``, multiplies dW (§3.1).
    ``occ``: outlier clamping of the Fprop input to its [1-α, α] quantiles, α = ``occ_quantile``
    (§3.2); ``occ_compensate`` adds ``(X - clamp(X)) · Wᵀ`` back in high precision (the sparse
    residual); without it the clamped values are simply lost (the paper's Table 1 ablation).
    """

    dge: bool = False
    dge_k: float = 5.0
    dge_cap: float = 3.0
    occ: bool = False
    occ_quantile: float = 0.99
    occ_compensate: bool = True

    def __post_init__(self) -> None:
        if not self.dge and not self.occ:
            raise ValueError("MsFp4Options: set dge=True and/or occ=True, or leave msfp4=None")
        if not self.occ and not self.occ_compensate:
            raise ValueError("MsFp4Options.occ_compensate=False applies to OCC only; set occ=True")
        if self.dge_k <= 1:
            raise ValueError(f"MsFp4Options.dge_k={self.dge_k}; it must be > 1 (paper: 5)")
        if self.dge_cap <= 0:
            raise ValueError(f"MsFp4Options.dge_cap={self.dge_cap}; it must be > 0 (paper: 3.0)")
        if not 0.5 < self.occ_quantile < 1.0:
            raise ValueError(f"MsFp4Options.occ_quantile={self.occ_quantile}; use a value in "
                             "(0.5, 1) (paper: 0.99)")


@dataclass(frozen=True, kw_only=True)
class LinearRecipe:
    """The three GEMMs of one quantized linear layer."""

    fprop: Fprop = field(default_factory=Fprop)
    dgrad: Dgrad = field(default_factory=Dgrad)
    wgrad: Wgrad = field(default_factory=Wgrad)
    msfp4: MsFp4Options | None = None

    def __post_init__(self) -> None:
        if self.msfp4 is not None and self.fprop.weight.format not in FP4_FORMATS:
            raise ValueError("LinearRecipe.msfp4 (DGE/OCC) needs an FP4 Fprop: set fprop.input "
                             f"and fprop.weight to one of {FP4_FORMATS}")
        # e2m1_vector backward copies are the Fprop copies (the autograd of Y = Q(X)·Q(W)ᵀ), so
        # they must be described exactly as the Fprop operand they reuse. With Fprop in BF16 (the
        # precision switch) the same copy is made in the backward pass instead.
        for name, back, fwd in (("dgrad.weight", self.dgrad.weight, self.fprop.weight),
                                ("wgrad.input", self.wgrad.input, self.fprop.input)):
            if back.format == "e2m1_vector" and fwd.is_quantized and back != fwd:
                raise ValueError(f"LinearRecipe.{name}={back.describe()!r} is the Fprop copy of "
                                 f"the same tensor; it must equal fprop.{name.split('.')[1]}="
                                 f"{fwd.describe()!r}")
            if fwd.format == "e2m1_vector" and back.is_quantized and back != fwd:
                raise ValueError(f"LinearRecipe.{name}={back.describe()!r}: with an e2m1_vector "
                                 f"Fprop the backward GEMMs use the Fprop copy; set {name} to "
                                 f"{fwd.describe()!r} (or bf16)")

    @property
    def is_quantized(self) -> bool:
        return any(t.is_quantized for t in self.operands().values())

    def weight_multiples(self) -> tuple[int, int]:
        """``(out_features, in_features)``: what a weight ``[out, in]`` (one TP rank's shard) must
        be a multiple of for the block-scaled operand copies of this recipe (1: no constraint).

        A tile ``(r, k)`` runs along the copy's last (reduction) dimension ``k``: Fprop's input
        ``X [T, in]`` and weight ``W [out, in]`` along ``in`` (W's rows by ``r``), Dgrad's
        gradient ``dY [T, out]`` and weight ``Wᵀ [in, out]`` along ``out`` (``in`` by ``r``),
        Wgrad's ``dYᵀ [out, T]`` / ``Xᵀ [in, T]`` along the tokens (padded) with rows by ``r``.
        Formats without blocks (bf16, per-tensor fp8, e2m1_vector) add nothing."""
        out_m = in_m = 1
        ops = self.operands()
        uses = (("fprop.input", None, "in"), ("fprop.weight", "out", "in"),
                ("dgrad.grad_output", None, "out"), ("dgrad.weight", "in", "out"),
                ("wgrad.grad_output", "out", None), ("wgrad.input", "in", None))
        for role, row_dim, col_dim in uses:
            tq = ops[role]
            if not tq.is_quantized or tq.tile is None:
                continue
            for dim, size in ((row_dim, tq.tile[0]), (col_dim, tq.tile[1])):
                if dim == "out":
                    out_m = math.lcm(out_m, size)
                elif dim == "in":
                    in_m = math.lcm(in_m, size)
        return out_m, in_m

    def operands(self) -> dict[str, TensorQuant]:
        """``{"fprop.input": ..., ...}`` for all six operand copies."""
        return {
            "fprop.input": self.fprop.input, "fprop.weight": self.fprop.weight,
            "dgrad.grad_output": self.dgrad.grad_output, "dgrad.weight": self.dgrad.weight,
            "wgrad.grad_output": self.wgrad.grad_output, "wgrad.input": self.wgrad.input,
        }


BF16_LINEAR = LinearRecipe()


def with_fprop_bf16(linear: LinearRecipe) -> LinearRecipe:
    """The same recipe with Fprop in BF16 (the ``fprop`` precision switch, paper App. D).

    DGE and OCC act on the Fprop quantization, so they go with it."""
    return dataclasses.replace(linear, fprop=Fprop(), msfp4=None)


@dataclass(frozen=True, kw_only=True)
class LayerPolicy:
    """Which transformer blocks keep all their linear layers in BF16.

    Block indices are global and 0-based (pipeline offset applied; in hybrid models every pattern
    symbol is a block). ``bf16_first_blocks``/``bf16_last_blocks`` select the first N / last M
    blocks, ``bf16_blocks`` lists explicit indices; the result is their union.
    """

    bf16_first_blocks: int = 0
    bf16_last_blocks: int = 0
    bf16_blocks: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("bf16_first_blocks", "bf16_last_blocks"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"LayerPolicy.{name}={v!r}; it must be an integer >= 0")
        blocks = tuple(self.bf16_blocks)
        for b in blocks:
            if isinstance(b, bool) or not isinstance(b, int) or b < 0:
                raise ValueError(f"LayerPolicy.bf16_blocks contains {b!r}; indices are global "
                                 "0-based integers >= 0")
        if len(set(blocks)) != len(blocks):
            raise ValueError(f"LayerPolicy.bf16_blocks={blocks} lists an index twice")
        object.__setattr__(self, "bf16_blocks", tuple(sorted(blocks)))


def bf16_block_set(policy: LayerPolicy, num_blocks: int) -> frozenset[int]:
    """The global 0-based indices of the BF16 blocks of a model with ``num_blocks`` blocks.

    A selector that matches nothing (or reaches past the model) is an error, not a no-op.
    """
    if num_blocks <= 0:
        raise ValueError(f"num_blocks={num_blocks}; a model has at least one block")
    first, last = policy.bf16_first_blocks, policy.bf16_last_blocks
    if first + last > num_blocks:
        raise ValueError(f"bf16_first_blocks={first} + bf16_last_blocks={last} exceeds the "
                         f"model's {num_blocks} blocks; lower them (e.g. precision."
                         "bf16_first_blocks=0) for this model")
    out = set(range(first)) | set(range(num_blocks - last, num_blocks))
    bad = [b for b in policy.bf16_blocks if b >= num_blocks]
    if bad:
        raise ValueError(f"bf16_blocks={list(policy.bf16_blocks)}: {bad} match no block of a "
                         f"{num_blocks}-block model (valid: 0..{num_blocks - 1})")
    return frozenset(out | set(policy.bf16_blocks))


@dataclass(frozen=True, kw_only=True)
class PrecisionSchedule:
    """Switch to BF16 late in training (paper App. D): at a step or a token count.

    ``scope='all'`` runs every GEMM in BF16 after the switch; ``scope='fprop'`` only Fprop.
    """

    at_step: int | None = None
    at_tokens: int | None = None
    scope: str = "all"

    def __post_init__(self) -> None:
        if self.at_step is not None and self.at_tokens is not None:
            raise ValueError("PrecisionSchedule: set at_step or at_tokens, not both")
        for name in ("at_step", "at_tokens"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"PrecisionSchedule.{name}={v!r}; use an integer >= 0 or None")
        if self.scope not in SWITCH_SCOPES:
            raise ValueError(f"PrecisionSchedule.scope={self.scope!r}; use one of {SWITCH_SCOPES}")

    @property
    def enabled(self) -> bool:
        return self.at_step is not None or self.at_tokens is not None

    def describe(self) -> str:
        """The schedule as the precision table prints it, e.g. ``bf16 switch (all) at step 90``."""
        if not self.enabled:
            return "none"
        when = f"step {self.at_step}" if self.at_step is not None else f"{self.at_tokens} tokens"
        return f"bf16 switch ({self.scope}) at {when}"


def switch_scope(schedule: PrecisionSchedule, *, step: int, tokens: int) -> str | None:
    """The BF16 switch in force at ``step`` (0-based, about to run) after ``tokens`` consumed."""
    if schedule.at_step is not None and step >= schedule.at_step:
        return schedule.scope
    if schedule.at_tokens is not None and tokens >= schedule.at_tokens:
        return schedule.scope
    return None


@dataclass(frozen=True, kw_only=True)
class PrecisionRecipe:
    """A named recipe: per-GEMM quantization, per-layer BF16 policy, schedule, backend."""

    name: str
    linear: LinearRecipe = field(default_factory=LinearRecipe)
    layers: LayerPolicy = field(default_factory=LayerPolicy)
    schedule: PrecisionSchedule = field(default_factory=PrecisionSchedule)
    backend: str = "auto"
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("PrecisionRecipe.name must be a non-empty string")
        if self.backend not in BACKENDS:
            raise ValueError(f"PrecisionRecipe.backend={self.backend!r}; use one of {BACKENDS}")

    @property
    def is_quantized(self) -> bool:
        return self.linear.is_quantized


def with_layer_policy(recipe: PrecisionRecipe, layers: LayerPolicy) -> PrecisionRecipe:
    return dataclasses.replace(recipe, layers=layers)


def with_schedule(recipe: PrecisionRecipe, schedule: PrecisionSchedule) -> PrecisionRecipe:
    return dataclasses.replace(recipe, schedule=schedule)


def with_backend(recipe: PrecisionRecipe, backend: str) -> PrecisionRecipe:
    return dataclasses.replace(recipe, backend=backend)

