"""Quantized linear layer: the three GEMMs of ``Y = X Wᵀ`` on the operand copies a recipe asks for.

GEMM/role table (DESIGN.md §2; NVFP4 paper arXiv 2509.25149 §4 and Fig. 5)::

    Fprop  Y  = X · Wᵀ    X rowwise (blocks along in)      W rowwise (blocks along in)
    Dgrad  dX = dY · W    dY rowwise (blocks along out)    W columnwise (blocks along out)
    Wgrad  dW = dYᵀ · X   dY columnwise (along tokens)     X columnwise (along tokens)

Each copy is quantized independently from the high-precision tensor (own amax; post-RHT amax when
the random Hadamard transform is on). The operands reach the quantizers in their own dtype (BF16
in training, never upcast here), so an RHT copy is transformed and then rounded to that dtype
before its amax and its codes (DESIGN.md §RHT), which is what Transformer Engine computes. The
columnwise copies are made by transposing the high-precision tensor so the blocks run along the
token dimension. With 2D (16x16 or 128x128) weight tiles, the Dgrad copy of W is the transpose
of the Fprop copy: a square tile has the same amax whichever way it is read, so both GEMMs see
the same numbers and W is quantized once.

Emulated GEMM (DESIGN.md §1): every quantizer result is turned into its *exact* block-scaled values
``q * s_b`` in FP32 (NVFP4: at most 6 significant bits; MX and power-of-two FP8 block scales: a
power of two times an FP8/FP4 element; FP8 per-tensor: the FP8 element), multiplied in FP32, and
the per-tensor decode scales ``S_dec(A) * S_dec(B)`` (NVFP4 global scales, FP8 ``scale_inv``) are
applied to the FP32 output once, as the hardware GEMM's alpha. The operand values have at most 6
significant bits, so they are exact in BF16 and TF32 too: a TF32 matmul gives the same products,
only the FP32 accumulation order may differ. Outputs go back to the activation
dtype; weight gradients stay FP32 when accumulated into Megatron's ``main_grad``.

Where the GEMM runs (``quant.gemm``): FP8 per-tensor copies on CUDA with compute capability >= 8.9
use a real FP8 tensor-core GEMM (``torch._scaled_mm``, the two ``scale_inv`` as its scales);
NVFP4 / MX (and FP8 on older GPUs) on CUDA dequantize to exact BF16 ``q * s_b`` in one Triton pass
and multiply on the BF16 tensor cores with FP32 accumulation, alpha on the FP32 output; on CPU the
FP32 reference above. All three compute the same contract up to FP32 accumulation order.

Saved activations: by default the forward pass quantizes the Wgrad (columnwise) copy of X and
saves only it (packed E2M1 codes + E4M3 scales, FP8 + scale, ...), never X in BF16; the Dgrad copy
of a 2D-tiled weight is the saved Fprop copy. Per-tensor FP8 copies with the same settings are
transposes of each other bit for bit (one scale, elementwise), so with FP8-CS X, W and dY are each
quantized once and the Wgrad/Dgrad copies are their transposes (the saved X is then the Fprop
FP8 copy, kept in the Wgrad orientation). On CUDA the cast-transpose kernel writes both byte
orientations of such a copy in one pass (``QuantizedOperand.fp8_t``), since Hopper's FP8 GEMM
needs Dgrad's W and Wgrad's dY and X transposed in memory; ``set_fp8_cast_transpose(False)``
makes them by a strided copy instead (same bytes), to measure the kernel. ``set_saved_input_mode("bf16")`` saves X instead and quantizes its Wgrad copy in
backward (same numbers), to measure the saving.

Distributed rules: with sequence parallelism the input is all-gathered *before* quantization
(so the Wgrad copy is quantized along the full token dimension) and dX is reduce-scattered; without
it dX is all-reduced when Megatron asks. For formats with a per-tensor scale (NVFP4, FP8) the amax
of every operand is all-reduced (MAX) over the layer's tensor-parallel group, so every rank uses
the scale of the logical (unsharded) tensor and TP=N computes what TP=1 computes, up to summation
order. With context parallelism one activation / gradient tensor of a non-expert layer also spans
the CP ranks (each holds two chunks of the sequence), so those layers reduce over TP x CP
(``LinearCall.amax_reduce_group``, set by ``mcore/layers.py``; Megatron-Core's FP8 amax group
includes CP likewise): CP=2 then uses CP=1's scales (CPU: tests/megatron/test_context_parallel.py).
Weights are the same on every CP rank, so the wider group changes nothing for them.

Token padding: the columnwise copies need the token count to be a multiple of the block (16 for
NVFP4, 32 for MX, 128 for block FP8); MoE experts see arbitrary counts. Zero rows are appended
before quantizing; they change no amax and contribute nothing to dW (with RHT, both operands are
padded the same way, and (dYᵀH)(XᵀH)ᵀ = dYᵀX still holds exactly).

Non-finite input: the quantizers saturate, so Inf/NaN would turn into finite FP4/FP8 codes and a
diverged run would look healthy. Instead, a GEMM whose high-precision operand contains Inf or NaN
returns NaN in every output element, so the training loop's NaN check fires. Finite inputs always
give finite outputs.

Microsoft FP4 options (arXiv 2501.17116 §3), on top of an FP4 (NVFP4, MXFP4 or ``e2m1_vector``)
Fprop: OCC clamps the Fprop input at its [1-α, α] quantiles before quantizing and, with
compensation (the default), adds ``(X - clamp(X)) · Wᵀ`` in high precision (FP32; the residual is
≈ 2(1-α) sparse, stored dense here: emulation); with TP the quantiles are those of the local shard.
For NVFP4/MXFP4 the Wgrad copy of X is quantized from the unclamped tensor, like every columnwise
copy. DGE multiplies dW by f'(W scaled into its E2M1 grid), capped. The clamp and the DGE
derivative are the formats reference implementations.

``e2m1_vector`` (the ``msfp4`` recipes): X per token and W per output channel, E2M1 with one FP32
absmax scale per row (``formats.quantize_absmax_e2m1``; no Triton kernel, so it quantizes through
``formats`` directly and its GEMMs run the FP32 reference on every device: ``q / scale`` is not
exact in BF16). The backward follows the paper's implementation (MS-AMP): the Dgrad and Wgrad
copies of W and X are the Fprop copies (the autograd of ``Y = Q(X)·Q(W)ᵀ``, never requantized),
multiplied by the FP8 gradient copies; with OCC + compensation the Wgrad activation is the one the
Fprop effectively used, ``Q(clamp(X)) + residual``, so dW gets ``dŶᵀ·residual`` (FP32) added to the
quantized GEMM before DGE multiplies the sum.

Telemetry (``quant/telemetry.py``): while the collector is on (every
``logging.quant_stats_interval`` steps), each quantizer call records how far its copy is from
the high-precision tensor; copies that reuse another copy are recorded under their own role too.

Stochastic rounding draws are seeded by ``quant.state.sr_seed`` (run seed, step, layer key, role,
rank, call index), so a resumed run reproduces them: on the CPU through a generator for the
reference, on CUDA as the Triton kernel's Philox seed in device memory (its low 31 bits;
``sr_seed_tensor``), which a captured CUDA graph of the step refills before every replay.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from nvfp4_megatron.formats.msfp4 import (dge_derivative_e2m1, outlier_clamp_unchecked,
                                           quantize_absmax_e2m1)
from nvfp4_megatron.kernels import dispatch
from nvfp4_megatron.quant import gemm
from nvfp4_megatron.quant import state as qstate
from nvfp4_megatron.quant import telemetry as qtelemetry
from nvfp4_megatron.quant.recipe import GLOBAL_SCALE_FORMATS, LinearRecipe, TensorQuant

ROLES = ("fprop.input", "fprop.weight", "dgrad.grad_output", "dgrad.weight",
         "wgrad.grad_output", "wgrad.input")

_FP8_TORCH = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}

# Observers see every quantizer call: fn(layer_key, role, tensor_quant). Used by tests (count
# calls per layer and role) and telemetry; an empty list costs nothing. A per-tensor FP8 copy made
# by transposing another role's copy (the same codes quantizing the transposed tensor gives) is
# reported under its own role too; the Dgrad weight copy of a 2D-tiled weight, which *is* the
# Fprop copy, is not.
_observers: list[Callable[[str, str, TensorQuant], None]] = []


def add_quantize_observer(fn: Callable[[str, str, TensorQuant], None]) -> Callable[[], None]:
    """Register ``fn(layer_key, role, tensor_quant)``; returns a function that removes it."""
    _observers.append(fn)

    def remove() -> None:
        if fn in _observers:
            _observers.remove(fn)

    return remove


@dataclass(frozen=True)
class QuantizedOperand:
    """One quantized operand copy, ready for the emulated GEMM."""

    q: Any                  # the formats result (NVFP4Quantized, MXQuantized, FP8Quantized, FP8BlockQuantized)
    tq: TensorQuant
    finite: torch.Tensor    # bool 0-d: the high-precision tensor had no Inf/NaN
    transposed: bool = False
    # per-tensor FP8 on CUDA only: the contiguous bytes of the other orientation (``q.data``'s
    # transpose), written by the same cast-transpose kernel; ``t()`` then swaps the two copies
    fp8_t: torch.Tensor | None = None
    # per-tensor FP8 from the CUDA kernel, amax neither reduced nor OCC-checked: the kernel's
    # ``q.gemm_scale_inv`` is NaN exactly when ``finite`` is False (both from the same amax)
    scale_guarded: bool = False

    def values(self) -> torch.Tensor:
        """FP32 exact block-scaled values (``q * s_b``), without the per-tensor decode scale."""
        fmt = self.tq.format
        if fmt == "nvfp4":
            v = self.q.dequantize_unscaled()
        elif fmt == "fp8":
            v = self.q.data.float()
        else:  # mxfp8, mxfp4, fp8_block, e2m1_vector: scales inside the blocks / rows only
            v = self.q.dequantize(torch.float32)
        v = v.reshape(-1, v.shape[-1])
        return v.t() if self.transposed else v

    def alpha(self) -> torch.Tensor | None:
        """FP32 0-d per-tensor decode scale applied to the GEMM output, or None."""
        if self.tq.format == "nvfp4":
            return self.q.scale_dec
        if self.tq.format == "fp8":
            return self.q.scale_inv
        return None

    def gemm_scale(self) -> torch.Tensor:
        """FP32 0-d ``scale_inv`` for a real FP8 GEMM, NaN unless ``finite`` (a NaN scale makes
        every output NaN): the kernel's guarded scale when it is that, else one ``where``."""
        if self.scale_guarded:
            return self.q.gemm_scale_inv
        nan = torch.full((), float("nan"), dtype=torch.float32, device=self.finite.device)
        return torch.where(self.finite, self.q.scale_inv.float(), nan)

    def bf16_values(self, finite: torch.Tensor) -> torch.Tensor:
        """BF16 exact ``q * s_b`` (CUDA, one Triton pass), NaN everywhere unless ``finite``."""
        v = gemm.dequant_bf16(self.q, self.tq.format, finite)
        return v.t() if self.transposed else v

    def fp8_data(self) -> torch.Tensor:
        """The FP8 elements of a per-tensor FP8 copy as a contiguous 2-D ``[rows, K]`` tensor
        (a transposed copy without ``fp8_t`` is materialised here, through uint8)."""
        d = self.q.data.reshape(-1, self.q.data.shape[-1])
        if not self.transposed:
            return d.contiguous()
        return d.view(torch.uint8).t().contiguous().view(d.dtype)

    def t(self) -> "QuantizedOperand":
        """The transposed operand: with ``fp8_t`` the two byte copies swap (no copy, no flag),
        otherwise a flag that ``values``/``fp8_data`` honour."""
        if self.fp8_t is None:
            return dataclasses.replace(self, transposed=not self.transposed)
        data = self.q.data.reshape(-1, self.q.data.shape[-1])
        q = dataclasses.replace(self.q, data=self.fp8_t, shape=self.fp8_t.shape)
        return dataclasses.replace(self, q=q, fp8_t=data)

    def one_orientation(self) -> "QuantizedOperand":
        """Only the copy this operand is read in (what the backward pass saves)."""
        return self if self.fp8_t is None else dataclasses.replace(self, fp8_t=None)


def _notify(layer_key: str, role: str, tq: TensorQuant) -> None:
    for fn in _observers:
        fn(layer_key, role, tq)


def _token_multiple(tq: TensorQuant) -> int:
    return 1 if tq.tile is None else tq.tile[1]


def pad_rows(x2d: torch.Tensor, multiple: int) -> torch.Tensor:
    """Append zero rows so ``x2d.shape[0]`` is a multiple of ``multiple``."""
    pad = (-x2d.shape[0]) % multiple
    return F.pad(x2d, (0, 0, 0, pad)) if pad else x2d


def _reduce_amax(amax: torch.Tensor, group) -> torch.Tensor:
    amax = amax.detach().float().clone()
    torch.distributed.all_reduce(amax, op=torch.distributed.ReduceOp.MAX, group=group)
    return amax


def quantize_operand(x2d: torch.Tensor, tq: TensorQuant, *, layer_key: str = "", role: str = "",
                     amax_group=None, occ: tuple | None = None,
                     transposed_copy: bool = False,
                     amax: torch.Tensor | None = None) -> QuantizedOperand:
    """Quantize a 2-D high-precision tensor along its last dim as ``tq`` says (via dispatch).

    ``amax_group``: a process group over which the per-tensor amax is reduced (MAX), or None.
    ``transposed_copy``: the caller will also use the transposed operand; for per-tensor FP8
    with a Triton kernel, the cast-transpose kernel writes both byte copies from one read
    (``fp8_t``), so the real FP8 GEMMs of Dgrad/Wgrad get them without a strided copy. Same bits
    either way (tests/kernels, tests/gpu).
    ``occ``: ``(unclamped X, residual, compensate)`` when ``x2d`` is an OCC-clamped input: the copy
    is finite only if the unclamped X is (a clamp can turn an Inf into a finite value, and OCC
    clamps without a check, which would read the GPU back), and the telemetry compares the
    unclamped X with what the Fprop GEMM effectively uses.
    ``amax``: this copy's local amax (post-RHT when the copy is transformed), already computed
    from the same elements (``_copy_amaxes``), so it is not read again here; None: computed here.
    """
    if not tq.is_quantized:
        raise ValueError(f"quantize_operand: {role or 'operand'} is bf16; nothing to quantize")
    for fn in _observers:
        fn(layer_key, role, tq)
    x2d = x2d.detach()
    fmt = tq.format
    fp8_t = None
    # One amax pass serves three purposes: the non-finite check, the TP reduction, and (passed
    # as amax=) the quantizer's own global amax. Post-RHT when the copy is transformed; a linear
    # transform of finite values is finite, so the check is unchanged.
    if amax is None:
        amax = dispatch.amax(x2d, rht=_rht(tq))
    finite = torch.isfinite(amax)
    if occ is not None:
        finite = finite & torch.isfinite(occ[0]).all()
    if amax_group is not None and fmt in GLOBAL_SCALE_FORMATS:
        amax = _reduce_amax(amax, amax_group)
    if fmt == "nvfp4":
        gen = seed = None
        if tq.stochastic_rounding and dispatch.uses_kernel(x2d):
            seed = qstate.sr_seed_tensor(layer_key, role, x2d.device)  # graph-capturable
        elif tq.stochastic_rounding:
            gen = qstate.sr_generator(layer_key, role, x2d.device)
        q = dispatch.quantize_nvfp4(x2d, tile=tq.tile, rht=tq.rht,
                                    stochastic_rounding=tq.stochastic_rounding, generator=gen,
                                    amax=amax, seed=seed)
    elif fmt == "mxfp8":
        q = dispatch.quantize_mx(x2d, _FP8_TORCH[tq.fp8_dtype], block=tq.tile[1])
    elif fmt == "mxfp4":
        q = dispatch.quantize_mx(x2d, "e2m1", block=tq.tile[1])
    elif fmt == "fp8" and transposed_copy and _fp8_cast_transpose and dispatch.uses_kernel(x2d):
        q, fp8_t = dispatch.quantize_fp8_current_transposed(
            x2d, _FP8_TORCH[tq.fp8_dtype], pow2_scale=tq.pow2_scale, amax=amax)
    elif fmt == "fp8":
        q = dispatch.quantize_fp8_current(x2d, _FP8_TORCH[tq.fp8_dtype], pow2_scale=tq.pow2_scale,
                                          amax=amax)
    elif fmt == "fp8_block":
        q = dispatch.quantize_fp8_block(x2d, _FP8_TORCH[tq.fp8_dtype], tile=tq.tile,
                                        pow2_scale=tq.pow2_scale)
    elif fmt == "e2m1_vector":  # no kernel: the formats reference (see the module docstring)
        q = quantize_absmax_e2m1(x2d, dim=-1)
    else:  # pragma: no cover - TensorQuant validates the format
        raise ValueError(f"unknown format {fmt!r}")
    if qtelemetry.is_active():
        desc = tq.describe()
        if occ is None:
            sums = qtelemetry.operand_sums(x2d, q, fmt, rht=tq.rht)
        else:
            sums = qtelemetry.operand_sums(x2d, q, fmt, occ_ref=occ[0], occ_residual=occ[1],
                                           occ_compensate=occ[2])
            desc += " OCC" + ("+comp" if occ[2] else "")
        qtelemetry.record(layer_key, role, sums, desc)
    guarded = (fmt == "fp8" and occ is None and amax_group is None
               and getattr(q, "gemm_scale_inv", None) is not None)
    return QuantizedOperand(q=q, tq=tq, finite=finite, fp8_t=fp8_t, scale_guarded=guarded)


def _rht(tq: TensorQuant) -> bool:
    return tq.format == "nvfp4" and tq.rht


def _copy_amaxes(x2d: torch.Tensor, row: TensorQuant, col: TensorQuant
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The local amaxes of the row-wise copy of ``x2d`` [tokens, features] (``row``) and of the
    column-wise copy of its transpose (``col``), from one read of ``x2d`` where they allow it, else
    ``(None, None)`` (each quantizer call then reads ``x2d`` for its own).

    Neither copy RHT'd: both are ``max |x2d|`` (zero tokens appended for the column-wise copy
    change no max). RHT on the column-wise copy only (the NVFP4 recipes' Wgrad copies):
    ``dispatch.amax_and_transposed_rht`` (one kernel on CUDA) when the token count is a multiple
    of 16 (otherwise the RHT sees appended zero tokens, which the column-wise quantizer call
    handles). The same numbers as the two separate amax passes, bit for bit.
    ``set_copy_amax_sharing(False)``: always ``(None, None)``."""
    if not _copy_amax_sharing:
        return None, None
    x2d = x2d.detach()
    if not _rht(row) and not _rht(col):
        a = dispatch.amax(x2d)
        return a, a
    if _rht(col) and not _rht(row) and x2d.shape[0] % 16 == 0:
        return dispatch.amax_and_transposed_rht(x2d)
    return None, None


def quantized_gemm(a: QuantizedOperand, b: QuantizedOperand, *,
                   out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``A · Bᵀ`` on exact block-scaled values, times alpha = S_dec(A)·S_dec(B) once, in FP32.

    The backend (``quant.gemm``: real FP8 ``_scaled_mm``, BF16-dequant emulation on CUDA, FP32
    reference on CPU) depends only on the formats and the device; the result is rounded to
    ``out_dtype`` once, after alpha.
    """
    fp8_dtypes = (a.tq.fp8_dtype, b.tq.fp8_dtype)
    backend = gemm.select_gemm_kernel(a.tq.format, b.tq.format, a.finite.device,
                                  fp8_dtypes=fp8_dtypes)
    if backend == "fp8_scaled_mm":
        # each scale NaN when its operand is not finite: the epilogue multiplies both, so one
        # NaN makes every output NaN (no AND of the flags, no per-GEMM launches on the host)
        return gemm.scaled_mm_fp8(a.fp8_data(), b.fp8_data(), a.gemm_scale(), b.gemm_scale(),
                                  out_dtype)
    finite = a.finite & b.finite
    alpha = _alpha(a, b)
    if backend == "bf16_dequant":
        return gemm.bf16_mm(a.bf16_values(finite), b.bf16_values(finite).t(), alpha, out_dtype)
    out = torch.matmul(a.values(), b.values().t())
    if alpha is not None:
        out = out * alpha
    return torch.where(finite, out, torch.full_like(out, float("nan"))).to(out_dtype)


def _alpha(a: QuantizedOperand, b: QuantizedOperand) -> torch.Tensor | None:
    alpha_a, alpha_b = a.alpha(), b.alpha()
    if alpha_a is not None and alpha_b is not None:
        return alpha_a.float() * alpha_b.float()
    if alpha_a is not None or alpha_b is not None:
        return (alpha_a if alpha_a is not None else alpha_b).float()
    return None


_fp8_cast_transpose = True


def set_fp8_cast_transpose(enabled: bool) -> bool:
    """Whether per-tensor FP8 copies that are also used transposed come from the cast-transpose
    kernel (default) or, as before it, from a strided copy of the row-major bytes before the GEMM
    (same bytes; exists to measure the kernel: ``scripts/bench_step.py --fp8-transpose copy``).
    Returns the previous setting."""
    global _fp8_cast_transpose
    prev, _fp8_cast_transpose = _fp8_cast_transpose, bool(enabled)
    return prev


_copy_amax_sharing = True


def set_copy_amax_sharing(enabled: bool) -> bool:
    """Whether the row-wise and column-wise copies of X (forward) and of dY (backward) get their
    amaxes from one read of the tensor (default; ``_copy_amaxes``) or each from its own amax pass,
    as before (same numbers; exists to measure it: ``scripts/bench_step.py`` suffix ``+amax2``).
    Returns the previous setting."""
    global _copy_amax_sharing
    prev, _copy_amax_sharing = _copy_amax_sharing, bool(enabled)
    return prev


SAVED_INPUT_MODES = ("quantized", "bf16")
_saved_input_mode = "quantized"


def set_saved_input_mode(mode: str) -> str:
    """What the forward pass keeps of X for Wgrad; returns the previous mode.

    ``"quantized"`` (default): the Wgrad (columnwise) copy of X is quantized in the forward pass
    and only it is saved (packed FP4 + E4M3 scales, FP8 + scale, ...): no BF16 activation is kept
    for the backward pass. ``"bf16"``: X is saved in its own dtype and the Wgrad copy is quantized
    in the backward pass (same numbers; more memory). Exists to measure the saving
    (``scripts/bench_step.py --saved-input``).
    """
    global _saved_input_mode
    if mode not in SAVED_INPUT_MODES:
        raise ValueError(f"set_saved_input_mode({mode!r}): use one of {SAVED_INPUT_MODES}")
    prev, _saved_input_mode = _saved_input_mode, mode
    return prev


class WeightCopies:
    """The quantized weight copies made inside one :func:`reuse_weight_copies` scope.

    ``made``: copies quantized; ``reused``: quantizer calls answered from a copy already made.
    """

    def __init__(self) -> None:
        self._copies: dict[tuple, tuple[torch.Tensor, QuantizedOperand]] = {}
        self.made = 0
        self.reused = 0

    def get(self, weight: torch.Tensor, tq: TensorQuant, key: str, role: str, variant: tuple,
            make: Callable[[], QuantizedOperand]) -> QuantizedOperand:
        k = (id(weight), weight.data_ptr(), tuple(weight.shape), weight.dtype, key, role, tq,
             variant)
        hit = self._copies.get(k)
        if hit is not None:
            self.reused += 1
            _notify(key, role, tq)  # the observers see every use of a copy, as without the scope
            qtelemetry.record_alias(key, role, role)  # the same numbers as the first use
            return hit[1]
        op = make()
        self._copies[k] = (weight, op)  # the weight held too: its id is not reused in the scope
        self.made += 1
        return op


_weight_copies: WeightCopies | None = None


@contextlib.contextmanager
def reuse_weight_copies(enabled: bool = True):
    """Inside, each weight is quantized once per (layer, role, settings) and the copy is reused by
    every later micro-batch (issue 16; Transformer Engine's ``is_first_microbatch`` cache).

    The caller promises that no weight changes inside the scope: the training loop wraps one
    step's forward/backward schedule (the optimizer steps after it) and an evaluation. Weights
    are quantized with round-to-nearest (stochastic rounding is for gradients only; a copy with
    SR would never be reused), so a reused copy has the bits a new quantization would give: the
    numbers are those without the scope (tests/quant/test_linear.py). The copies are dropped on
    exit. ``enabled=False`` runs the scope without reuse (to measure it:
    ``scripts/bench_step.py --weight-copies fresh``). Yields the :class:`WeightCopies` (or None).
    """
    global _weight_copies
    if _weight_copies is not None:
        raise RuntimeError("reuse_weight_copies: already inside a scope (scopes do not nest)")
    _weight_copies = WeightCopies() if enabled else None
    try:
        yield _weight_copies
    finally:
        _weight_copies = None


def _weight_operand(weight: torch.Tensor, tq: TensorQuant, *, key: str, role: str,
                    variant: tuple, make: Callable[[], QuantizedOperand]) -> QuantizedOperand:
    if _weight_copies is None or tq.stochastic_rounding:
        return make()
    return _weight_copies.get(weight, tq, key, role, variant, make)


def _same_weight_copy(recipe: LinearRecipe) -> bool:
    """Dgrad may reuse the transposed Fprop weight copy: same settings and a square 2D tile, or
    per-tensor FP8 (elementwise with one scale from the same amax), or ``e2m1_vector`` (whose
    Dgrad copy *is* the Fprop copy by definition: LinearRecipe enforces equal settings)."""
    w_f, w_d = recipe.fprop.weight, recipe.dgrad.weight
    return w_f.is_quantized and w_f == w_d and (
        w_f.format in ("fp8", "e2m1_vector")
        or (w_f.tile is not None and w_f.tile[0] == w_f.tile[1]))


def _fprop_copy_t(x2d: torch.Tensor, tq: TensorQuant, *, layer_key: str, role: str,
                  amax_group) -> QuantizedOperand:
    """An ``e2m1_vector`` backward copy made when the Fprop did not quantize (the Fprop BF16
    switch): quantized along the Fprop's reduction dim, as the Fprop copy would be, transposed."""
    return quantize_operand(x2d, tq, layer_key=layer_key, role=role, amax_group=amax_group).t()


def _fp8_transpose_reuse(a: TensorQuant, b: TensorQuant) -> bool:
    """Copy ``b`` is the transpose of copy ``a`` bit for bit: both per-tensor FP8, same settings.

    Per-tensor FP8 quantization is elementwise with one scale from the tensor's amax, and
    ``amax(X) == amax(Xᵀ)`` (no token padding: the format has no block), so quantizing Xᵀ gives
    the transposed codes and the same ``scale_inv``; the copy is reused, not requantized.
    """
    return a.format == "fp8" and a == b


@dataclass(frozen=True, kw_only=True)
class LinearCall:
    """Everything one call of the quantized linear needs besides tensors."""

    recipe: LinearRecipe
    layer_key: str = ""
    tp_group: Any = None            # the layer's TP group (amax reduction, SP comms, dgrad AR)
    sequence_parallel: bool = False
    allreduce_dgrad: bool = False
    gradient_accumulation_fusion: bool = False
    amax_reduce_group: Any = None   # overrides tp_group for the amax (TP x CP; see module doc)

    @property
    def amax_group(self):
        g = self.amax_reduce_group if self.amax_reduce_group is not None else self.tp_group
        return g if g is not None and g.size() > 1 else None


def _gather_sp(x: torch.Tensor, group) -> torch.Tensor:
    from megatron.core.tensor_parallel import mappings
    return mappings._gather_along_first_dim(x, group)


def _reduce_scatter_sp(x: torch.Tensor, group) -> torch.Tensor:
    from megatron.core.tensor_parallel import mappings
    return mappings._reduce_scatter_along_first_dim(x, group)


class QuantizedLinearFunction(torch.autograd.Function):
    """Autograd for ``Y = X Wᵀ (+ b)`` with per-GEMM quantization (see the module docstring)."""

    @staticmethod
    def forward(ctx, input, weight, bias, call: LinearCall):
        recipe = call.recipe
        group = call.amax_group
        key = call.layer_key
        main_grad = weight.main_grad if (call.gradient_accumulation_fusion
                                         and hasattr(weight, "main_grad")) else None
        total = _gather_sp(input, call.tp_group) if call.sequence_parallel else input
        k = total.shape[-1]
        x2d = total.reshape(-1, k)

        w_fprop = xq = residual = None
        ms = recipe.msfp4
        need_wgrad = ctx.needs_input_grad[1]  # False under no_grad / frozen weights
        # per-tensor FP8: the Wgrad copy of X and the Dgrad copy of W are the transposes of the
        # Fprop copies; the cast-transpose kernel makes them in the same pass
        x_col_is_fprop_t = (need_wgrad and _saved_input_mode == "quantized"
                            and recipe.fprop.input.is_quantized
                            and _fp8_transpose_reuse(recipe.fprop.input, recipe.wgrad.input))
        w_t_needed = any(ctx.needs_input_grad) and _same_weight_copy(recipe)
        # X's Fprop copy and its Wgrad copy (quantized below from the same x2d): amaxes from one read
        amax_x = amax_x_col = None
        if (recipe.fprop.input.is_quantized and not (ms is not None and ms.occ) and need_wgrad
                and _saved_input_mode == "quantized" and recipe.wgrad.input.is_quantized
                and recipe.wgrad.input.format != "e2m1_vector" and not x_col_is_fprop_t):
            amax_x, amax_x_col = _copy_amaxes(x2d, recipe.fprop.input, recipe.wgrad.input)
        if recipe.fprop.input.is_quantized:
            x_fprop, residual, occ_info = x2d, None, None
            if ms is not None and ms.occ:
                # No host read-back here (each one waits for the GPU queue): a non-finite X gives
                # meaningless quantiles; quantize_operand makes the copy non-finite (output NaN)
                x_fprop, residual = outlier_clamp_unchecked(x2d.float(), ms.occ_quantile)
                occ_info = (x2d, residual, ms.occ_compensate)
                if not ms.occ_compensate:
                    residual = None  # clamped values are dropped (the paper's Table 1 ablation)
            xq = quantize_operand(x_fprop, recipe.fprop.input, layer_key=key, role="fprop.input",
                                  amax_group=group, occ=occ_info,
                                  transposed_copy=x_col_is_fprop_t and residual is None,
                                  amax=amax_x)
            w_fprop = _weight_operand(
                weight, recipe.fprop.weight, key=key, role="fprop.weight", variant=(w_t_needed,),
                make=lambda: quantize_operand(weight, recipe.fprop.weight, layer_key=key,
                                              role="fprop.weight", amax_group=group,
                                              transposed_copy=w_t_needed))
            out = quantized_gemm(xq, w_fprop,
                                 out_dtype=torch.float32 if residual is not None else input.dtype)
            if residual is not None:  # OCC compensation, high precision (sparse in the paper)
                out = out + residual @ weight.detach().float().t()
            out = out.to(input.dtype).reshape(*total.shape[:-1], weight.shape[0])
        else:
            out = torch.matmul(total, weight.t())
        if bias is not None:
            out = out + bias

        x_col = None
        save_input = None
        x_residual = None
        if need_wgrad:
            tq = recipe.wgrad.input
            if tq.format == "e2m1_vector":
                # the Fprop copy (Q(clamp(X)) with OCC) and, compensated, the OCC residual
                if xq is not None:  # *is* the Fprop copy: not a quantizer call (observers)
                    x_col = xq.t()
                    qtelemetry.record_alias(key, "fprop.input", "wgrad.input")
                    x_residual = residual
                else:  # Fprop in BF16 (precision switch): no OCC, the copy it would have made
                    x_col = _fprop_copy_t(x2d, tq, layer_key=key, role="wgrad.input",
                                          amax_group=group)
            elif x_col_is_fprop_t and residual is None:
                x_col = xq.t().one_orientation()  # X's FP8 bytes, saved in the Wgrad orientation
                _notify(key, "wgrad.input", tq)
                qtelemetry.record_alias(key, "fprop.input", "wgrad.input")
            elif tq.is_quantized and _saved_input_mode == "quantized":
                x_col = quantize_operand(pad_rows(x2d, _token_multiple(tq)).t(), tq,
                                         layer_key=key, role="wgrad.input", amax_group=group,
                                         amax=amax_x_col)
            else:
                save_input = input
        w_dgrad = w_fprop.t().one_orientation() if (w_fprop is not None and w_t_needed) else None
        ctx.save_for_backward(save_input, weight)
        ctx.x_col, ctx.w_dgrad, ctx.x_residual = x_col, w_dgrad, x_residual
        ctx.w_dge = w_fprop if (ms is not None and ms.dge and need_wgrad) else None
        ctx.call, ctx.main_grad = call, main_grad
        ctx.use_bias = bias is not None
        ctx.need_wgrad = need_wgrad
        ctx.total_shape = total.shape
        return out

    @staticmethod
    def backward(ctx, grad_output):
        saved_input, weight = ctx.saved_tensors
        call: LinearCall = ctx.call
        recipe, group, key = call.recipe, call.amax_group, call.layer_key
        n = grad_output.shape[-1]
        dy2d = grad_output.reshape(-1, n)

        # Dgrad: dX = dY · W
        dyq = None
        dy_reused = ctx.need_wgrad and _fp8_transpose_reuse(recipe.dgrad.grad_output,
                                                            recipe.wgrad.grad_output)
        # dY's Dgrad copy and its Wgrad copy (quantized below from the same dy2d): one amax read
        amax_dy = amax_dy_col = None
        if (recipe.dgrad.grad_output.is_quantized and ctx.need_wgrad and not dy_reused
                and recipe.wgrad.grad_output.is_quantized):
            amax_dy, amax_dy_col = _copy_amaxes(dy2d, recipe.dgrad.grad_output,
                                                recipe.wgrad.grad_output)
        if recipe.dgrad.grad_output.is_quantized:
            dyq = quantize_operand(dy2d, recipe.dgrad.grad_output, layer_key=key,
                                   role="dgrad.grad_output", amax_group=group,
                                   transposed_copy=dy_reused, amax=amax_dy)
            wq = ctx.w_dgrad
            if wq is not None and wq.tq.format == "fp8":
                _notify(key, "dgrad.weight", recipe.dgrad.weight)
            if wq is not None:
                qtelemetry.record_alias(key, "fprop.weight", "dgrad.weight")
            elif recipe.dgrad.weight.format == "e2m1_vector":  # Fprop in BF16: its copy, made now
                wq = _weight_operand(
                    weight, recipe.dgrad.weight, key=key, role="dgrad.weight",
                    variant=("fprop_copy_t",),
                    make=lambda: _fprop_copy_t(weight, recipe.dgrad.weight, layer_key=key,
                                               role="dgrad.weight", amax_group=group))
            else:
                wq = _weight_operand(
                    weight, recipe.dgrad.weight, key=key, role="dgrad.weight",
                    variant=("transposed",),
                    make=lambda: quantize_operand(weight.t(), recipe.dgrad.weight, layer_key=key,
                                                  role="dgrad.weight", amax_group=group))
            grad_input = quantized_gemm(dyq, wq, out_dtype=grad_output.dtype)
            grad_input = grad_input.reshape(ctx.total_shape)
        else:
            grad_input = grad_output.matmul(weight)
        if call.sequence_parallel:
            grad_input = _reduce_scatter_sp(grad_input, call.tp_group)
        elif call.allreduce_dgrad:
            torch.distributed.all_reduce(grad_input, group=call.tp_group)

        # Wgrad: dW = dYᵀ · X
        grad_weight = None
        if ctx.need_wgrad:
            tq = recipe.wgrad.grad_output
            if tq.is_quantized:
                if dyq is not None and dy_reused:
                    dy_col = dyq.t()
                    _notify(key, "wgrad.grad_output", tq)
                    qtelemetry.record_alias(key, "dgrad.grad_output", "wgrad.grad_output")
                else:
                    dy_col = quantize_operand(pad_rows(dy2d, _token_multiple(tq)).t(), tq,
                                              layer_key=key, role="wgrad.grad_output",
                                              amax_group=group, amax=amax_dy_col)
                x_col = ctx.x_col
                if x_col is None:  # saved-input mode "bf16": quantize the Wgrad copy now
                    total = (_gather_sp(saved_input, call.tp_group) if call.sequence_parallel
                             else saved_input)
                    x_col = quantize_operand(
                        pad_rows(total.reshape(-1, total.shape[-1]),
                                 _token_multiple(recipe.wgrad.input)).t(),
                        recipe.wgrad.input, layer_key=key, role="wgrad.input", amax_group=group)
                direct = (ctx.w_dge is None and ctx.x_residual is None
                          and not (call.gradient_accumulation_fusion and ctx.main_grad is not None))
                dw = quantized_gemm(dy_col, x_col,
                                    out_dtype=weight.dtype if direct else torch.float32)
                if ctx.x_residual is not None:
                    # OCC compensation in Wgrad: dŶᵀ · residual in FP32 (dŶ = the FP8 copy)
                    dy_hat = dy_col.values()
                    alpha = dy_col.alpha()
                    if alpha is not None:
                        dy_hat = dy_hat * alpha.float()
                    dw = dw + dy_hat @ ctx.x_residual
            else:
                total = (_gather_sp(saved_input, call.tp_group) if call.sequence_parallel
                         else saved_input)
                dw = dy2d.t().matmul(total.reshape(-1, total.shape[-1]))
            if ctx.w_dge is not None:
                ms = recipe.msfp4
                dw = dw * dge_factor(ctx.w_dge, weight, k=ms.dge_k, cap=ms.dge_cap)
            if call.gradient_accumulation_fusion and ctx.main_grad is not None:
                ctx.main_grad.add_(dw)
                if hasattr(weight, "grad_added_to_main_grad"):
                    # Megatron's convention: a dummy grad tells DDP the main_grad holds it.
                    grad_weight = torch.zeros(weight.shape, dtype=grad_output.dtype,
                                              device=weight.device)
                    weight.grad_added_to_main_grad = True
            else:
                grad_weight = dw.to(weight.dtype)
        grad_bias = dy2d.sum(dim=0) if ctx.use_bias else None
        ctx.x_col = ctx.w_dgrad = ctx.w_dge = ctx.x_residual = None
        return grad_input, grad_weight, grad_bias, None


def dge_factor(w_op: QuantizedOperand, weight: torch.Tensor, *, k: float, cap: float
               ) -> torch.Tensor:
    """Microsoft FP4 DGE (arXiv 2501.17116 §3.1): f'(W scaled into its E2M1 grid), FP32.

    The scaled value is W divided by the decode scale of its block (NVFP4: s_b·S_dec; MXFP4: the
    E8M0 scale), i.e. the value the E2M1 rounding saw; zero blocks get the factor at 0. For
    ``e2m1_vector`` it is ``clamp(W · scale, -6, 6)``, exactly what the quantizer rounded (absmax
    scaling maps each row's absmax to 6 up to FP32 rounding, which the clamp absorbs; without it the
    row's absmax element could land a rounding step above 6, where f' is 0).
    """
    q = w_op.q
    if w_op.tq.format == "e2m1_vector":
        y = torch.clamp(weight.detach().float() * q.scale, -6.0, 6.0)
        return dge_derivative_e2m1(y, k=k, cap=cap)
    if w_op.tq.format == "nvfp4":
        scale = q.scale.float() * q.scale_dec
    elif w_op.tq.format == "mxfp4":
        scale = q.scale.float()
    else:  # LinearRecipe validates msfp4 against the Fprop format
        raise ValueError(f"DGE needs an FP4 weight, got {w_op.tq.format!r}")
    rows, k_dim = weight.shape
    nb = scale.shape[-1]
    w3 = weight.detach().float().reshape(rows, nb, k_dim // nb)
    s3 = scale.reshape(rows, nb, 1)
    y = torch.where(s3 > 0, w3 / torch.where(s3 > 0, s3, torch.ones_like(s3)), torch.zeros_like(w3))
    return dge_derivative_e2m1(y.reshape(rows, k_dim), k=k, cap=cap)


def quantized_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     call: LinearCall) -> torch.Tensor:
    """``Y = X Wᵀ (+ b)`` with the GEMMs quantized as ``call.recipe`` says."""
    if (call.tp_group is not None and call.tp_group.size() > 1 and any(
            t.format == "e2m1_vector" for t in call.recipe.operands().values())):
        # A row-parallel layer shards the reduction dim that the per-row scales span; reducing
        # their amax over TP is not implemented, and a local-shard scale would make TP=2 compute
        # other numbers than TP=1. Refused rather than silently different.
        raise ValueError(f"{call.layer_key}: the e2m1_vector format (msfp4 recipes) supports "
                         "parallel.tensor_model_parallel_size=1 only (its per-token / per-channel "
                         "scales are not reduced over TP); use data/pipeline/context parallelism")
    if input.numel() == 0 and not call.sequence_parallel:
        # An MoE expert that received no tokens (Megatron's SequentialMLP calls every local
        # expert): Y is empty and dW is exactly zero, so there is nothing to quantize. Exact, not
        # a higher-precision fallback.
        return F.linear(input, weight, bias)
    return QuantizedLinearFunction.apply(input, weight, bias, call)
