"""Per-layer precision: configure every quantized linear of a built model and log what runs.

``apply_precision(model_chunks, recipe)`` walks the model after Megatron built it. For each
block (a ``TransformerLayer``; in a hybrid model every pattern symbol: ``MambaLayer``, the
attention-only ``TransformerLayer``, ``MLPLayer``) it takes the global block index
``layer_number - 1`` (Megatron's ``layer_number`` is 1-based and already includes the
pipeline-stage offset, so the index is the same whichever stage holds the block), decides from
the recipe's ``LayerPolicy`` whether the block stays BF16 (NVFP4 paper arXiv 2509.25149 §4.1:
first 2 and last 8 of 62 blocks), and hands each quantized linear in it a ``LinearPrecision``
(recipe + a stable key ``"<block>.<module path>"`` used for SR seeds and telemetry).

Checks that keep a run honest (no silent BF16): a quantized recipe applied to a model with no
quantized linears is an error (it was built with a plain spec); a quantized linear outside any
transformer block is an error; ``backend='te'`` is refused here (TE models are built with the TE
spec and ``mcore/te_adapter.py``).

Rank 0 logs one table, block -> layer -> GEMM -> operand formats (format / tile / RHT / SR, and
the Microsoft FP4 options: OCC on the Fprop input, DGE on the Fprop weight) -> backend, gathered
over all ranks so pipeline stages appear in one place.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from megatron.core.ssm.mamba_layer import MambaLayer
from megatron.core.transformer.transformer_layer import TransformerLayer

from nvfp4_megatron.mcore.layers import QUANTIZED_LINEAR_TYPES, LinearPrecision
from nvfp4_megatron.quant import gemm as gemm_kernels
from nvfp4_megatron.quant.recipe import BF16_LINEAR, PrecisionRecipe, bf16_block_set

_log = logging.getLogger(__name__)

# A block of the BF16 policy: GPT layers, and every hybrid pattern symbol (Mamba, attention, MLP)
BLOCK_TYPES = (TransformerLayer, MambaLayer)

_GEMM_OPERANDS = (("fprop", "input", "weight"), ("dgrad", "grad_output", "weight"),
                  ("wgrad", "grad_output", "input"))


@dataclass(frozen=True, kw_only=True)
class PrecisionRow:
    block: int
    layer: str          # module path inside the block, e.g. "self_attention.linear_qkv"
    gemm: str           # fprop | dgrad | wgrad
    operand_a: str      # e.g. "nvfp4 1x16 RHT SR"
    operand_b: str
    backend: str
    quantized: bool


@dataclass(frozen=True, kw_only=True)
class PrecisionTable:
    recipe: str
    backend: str
    num_blocks: int
    bf16_blocks: tuple[int, ...]
    schedule: str
    rows: tuple[PrecisionRow, ...]
    choice: str = ""      # how the backend was chosen (mcore/backend.BackendChoice.describe)
    te_recipe: str = ""   # TE backend: the TE version and the recipe object's repr

    def quantized_blocks(self) -> tuple[int, ...]:
        return tuple(sorted({r.block for r in self.rows if r.quantized}))

    def format(self) -> str:
        head = [f"precision recipe={self.recipe} backend={self.backend} blocks={self.num_blocks} "
                f"bf16_blocks={list(self.bf16_blocks)} schedule={self.schedule}"
                + (f" | backend choice: {self.choice}" if self.choice else "")]
        cols = ("block", "layer", "gemm", "operand A", "operand B", "backend")
        body = [(str(r.block), r.layer, r.gemm, r.operand_a, r.operand_b, r.backend)
                for r in self.rows]
        widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c)
                  for i, c in enumerate(cols)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*cols)] + [fmt.format(*b) for b in body]
        tail = [f"TE recipe: {self.te_recipe}"] if self.te_recipe else []
        return "\n".join(head + lines + tail)


def _chunks(model_chunks) -> list[torch.nn.Module]:
    if isinstance(model_chunks, torch.nn.Module):
        return [model_chunks]
    return list(model_chunks)


def _gemm_kernel(tq_a, tq_b, device: torch.device) -> str:
    """What multiplies this GEMM on ``device``: a real FP8 GEMM or which emulation (quant.gemm)."""
    if not tq_a.is_quantized:
        return "bf16"
    chosen = gemm_kernels.select_gemm_kernel(tq_a.format, tq_b.format, device,
                                          fp8_dtypes=(tq_a.fp8_dtype, tq_b.fp8_dtype))
    return "native:fp8_scaled_mm" if chosen == "fp8_scaled_mm" else f"emulated:{chosen}"


def _num(v: float) -> str:
    return f"{v:g}"


def operand_label(recipe, gemm: str, operand: str) -> str:
    """``TensorQuant.describe()`` of one operand plus what the Microsoft FP4 options do to it:
    OCC on the Fprop input, DGE on the Fprop weight (its quantizer's gradient estimator, applied
    to dW), and which ``e2m1_vector`` backward copies are the Fprop copies."""
    tq = getattr(getattr(recipe, gemm), operand)
    text = tq.describe()
    ms = recipe.msfp4
    if ms is not None and gemm == "fprop" and operand == "input" and ms.occ:
        text += f" OCC q={_num(ms.occ_quantile)} " + ("comp" if ms.occ_compensate else "no-comp")
    if ms is not None and gemm == "fprop" and operand == "weight" and ms.dge:
        text += f" DGE k={_num(ms.dge_k)} cap={_num(ms.dge_cap)}"
    if tq.format == "e2m1_vector" and gemm != "fprop":
        src = recipe.fprop.weight if operand == "weight" else recipe.fprop.input
        text += " (Fprop copy" if src.is_quantized else " (made in backward"
        if operand == "input" and ms is not None and ms.occ and ms.occ_compensate:
            text += ", +OCC residual"
        text += ")"
    return text


def _rows_for(block: int, name: str, recipe, device: torch.device) -> list[PrecisionRow]:
    rows = []
    for gemm, a, b in _GEMM_OPERANDS:
        g = getattr(recipe, gemm)
        tq_a, tq_b = getattr(g, a), getattr(g, b)
        rows.append(PrecisionRow(block=block, layer=name, gemm=gemm,
                                 operand_a=f"{a}: {operand_label(recipe, gemm, a)}",
                                 operand_b=f"{b}: {operand_label(recipe, gemm, b)}",
                                 backend=_gemm_kernel(tq_a, tq_b, device),
                                 quantized=tq_a.is_quantized))
    return rows


def check_weight_blocks(linear: torch.nn.Module, lin_recipe, *, layer_key: str,
                        recipe_name: str) -> None:
    """Refuse, when the model is built, a quantized linear whose weight shard (this TP rank's
    ``[out, in]``) is not a multiple of the recipe's blocks (``LinearRecipe.weight_multiples``):
    the quantizers would otherwise fail in the first forward or backward pass. A layer may carry a
    ``shard_hint`` (the Mamba mixer's projections do) that explains where its sizes come from."""
    if not lin_recipe.is_quantized:
        return
    out_m, in_m = lin_recipe.weight_multiples()
    out_f, in_f = (int(n) for n in linear.weight.shape)
    bad = [f"{what}={n} is not a multiple of {m}"
           for what, n, m in (("out_features", out_f, out_m), ("in_features", in_f, in_m))
           if n % m]
    if bad:
        hint = getattr(linear, "shard_hint", None)
        raise ValueError(
            f"{layer_key}: this tensor-parallel rank's weight shard is [{out_f}, {in_f}] and "
            f"recipe {recipe_name!r} quantizes it in blocks that need multiples of [{out_m}, "
            f"{in_m}]: " + "; ".join(bad) + "."
            + (f" {hint}" if hint else " Change the layer's size or the TP size, or keep this "
               "block in BF16 (precision.bf16_blocks).")
        )


def apply_precision(model_chunks: torch.nn.Module | Sequence[torch.nn.Module],
                    recipe: PrecisionRecipe, *, log: bool = True) -> PrecisionTable:
    """Configure every quantized linear in ``model_chunks``; return (and log) the table."""
    if recipe.backend == "te":
        raise ValueError("apply_precision configures the emulated local layers; backend='te' "
                         "needs the Transformer Engine layer spec (mcore/te_adapter.py). Use "
                         "backend='auto' or 'emulated', or build the model with the TE spec")
    chunks = _chunks(model_chunks)
    layers = [m for c in chunks for m in c.modules() if isinstance(m, BLOCK_TYPES)]
    if not layers:
        raise ValueError("apply_precision: the model has no TransformerLayer")
    num_blocks = layers[0].config.num_layers
    bf16 = bf16_block_set(recipe.layers, num_blocks)
    backend = "emulated"
    rows: list[PrecisionRow] = []
    seen: set[int] = set()
    n_quant = 0
    for layer in layers:
        block = layer.layer_number - 1
        lin_recipe = BF16_LINEAR if block in bf16 else recipe.linear
        for name, mod in layer.named_modules():
            if isinstance(mod, QUANTIZED_LINEAR_TYPES):
                check_weight_blocks(mod, lin_recipe, layer_key=f"{block}.{name}",
                                    recipe_name=recipe.name)
                mod.set_precision(LinearPrecision(recipe=lin_recipe, layer_key=f"{block}.{name}",
                                                  block=block, backend=backend))
                seen.add(id(mod))
                n_quant += 1
                device = next(mod.parameters()).device
                rows.extend(_rows_for(block, name, lin_recipe, device))
    stray = [n for c in chunks for n, m in c.named_modules()
             if isinstance(m, QUANTIZED_LINEAR_TYPES) and id(m) not in seen]
    if stray:
        raise ValueError(f"apply_precision: quantized linear(s) outside any transformer block: "
                         f"{stray}; block-level precision cannot be decided for them")
    if recipe.is_quantized and n_quant == 0:
        raise ValueError(f"recipe {recipe.name!r} quantizes GEMMs but the model has no quantized "
                         "linear layers; build it with nvfp4_megatron.mcore.spec_provider."
                         "quantized_gpt_layer_spec")
    rows = gather_rows(rows)
    used = sorted({r.backend for r in rows if r.quantized})
    # name what runs: e.g. "emulated:fp32_reference" on CPU, "native:fp8_scaled_mm" on H100;
    # "bf16" when no GEMM is quantized (the bf16 recipe: Megatron's own linears multiply)
    backend = ",".join(used) if used else "bf16"
    table = PrecisionTable(recipe=recipe.name, backend=backend, num_blocks=num_blocks,
                           bf16_blocks=tuple(sorted(bf16)), schedule=recipe.schedule.describe(),
                           rows=tuple(rows))
    if log and process_rank() == 0:
        _log.info("\n%s", table.format())
    return table


def process_rank() -> int:
    """This process's rank in the default group (0 when torch.distributed is not started)."""
    d = torch.distributed
    return d.get_rank() if d.is_available() and d.is_initialized() else 0


def gather_rows(rows: Iterable[PrecisionRow]) -> list[PrecisionRow]:
    """All ranks' rows, deduplicated (TP/DP replicas hold the same layers), sorted by block."""
    rows = list(rows)
    d = torch.distributed
    if d.is_available() and d.is_initialized() and d.get_world_size() > 1:
        everything: list[list[PrecisionRow] | None] = [None] * d.get_world_size()
        d.all_gather_object(everything, rows)
        rows = [r for part in everything for r in (part or [])]
    unique = {(r.block, r.layer, r.gemm): r for r in rows}  # keeps module order within a block
    return sorted(unique.values(), key=lambda r: r.block)
