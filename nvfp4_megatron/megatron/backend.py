"""Backend policy: Transformer Engine where it runs the recipe natively, else the emulation.

``auto`` picks TE when (1) ``transformer_engine`` imports, (2) the GPU's compute capability runs
the recipe's format natively (NVFP4 and MX formats: 10.x and newer, i.e. Blackwell; block FP8:
9.0+; FP8 current scaling: 8.9+, DESIGN.md "Hardware facts") and (3) the TE adapter can express
the recipe; otherwise the project's emulation, which computes the same numbers (DESIGN.md §1).
``te`` where any of that fails is an error naming the missing piece. ``emulated`` always emulates.
Either way the recipe's precision is what runs: nothing here ever falls back to BF16.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from nvfp4_megatron.megatron.te_adapter import TEUnsupported, describe_te_recipe
from nvfp4_megatron.quant.recipe import PrecisionRecipe

# Minimum compute capability for TE's native GEMMs per format.
NATIVE_MIN_CC = {"nvfp4": (10, 0), "mxfp8": (10, 0), "mxfp4": (10, 0), "fp8_block": (9, 0),
                 "fp8": (8, 9), "bf16": (0, 0)}


@dataclass(frozen=True, kw_only=True)
class DeviceCaps:
    te_available: bool
    te_error: str | None = None
    compute_capability: tuple[int, int] | None = None   # None: no CUDA GPU


@dataclass(frozen=True, kw_only=True)
class BackendChoice:
    backend: str          # "te" | "emulated"
    reason: str


def probe_device() -> DeviceCaps:
    """What this process can run. TE is imported only where a GPU exists (it breaks CPU hosts)."""
    cc = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    if cc is None:
        return DeviceCaps(te_available=False, te_error="no CUDA GPU")
    if importlib.util.find_spec("transformer_engine") is None:
        return DeviceCaps(te_available=False, te_error="transformer_engine is not installed",
                          compute_capability=cc)
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # TE raises more than ImportError when its CUDA libraries mismatch
        return DeviceCaps(te_available=False, te_error=f"transformer_engine failed to import: {e}",
                          compute_capability=cc)
    return DeviceCaps(te_available=True, compute_capability=cc)


def _required_cc(recipe: PrecisionRecipe) -> tuple[int, int]:
    return max(NATIVE_MIN_CC[t.format] for t in recipe.linear.operands().values())


def resolve_backend(recipe: PrecisionRecipe, *, num_layers: int,
                    caps: DeviceCaps | None = None) -> BackendChoice:
    """Decide ``te`` or ``emulated`` for ``recipe`` (``recipe.backend`` is auto|te|emulated)."""
    if recipe.backend == "emulated":
        return BackendChoice(backend="emulated", reason="backend='emulated' requested")
    caps = probe_device() if caps is None else caps
    problems = []
    if not caps.te_available:
        problems.append(f"Transformer Engine is unavailable ({caps.te_error})")
    need = _required_cc(recipe)
    if caps.compute_capability is None:
        problems.append("no CUDA GPU")
    elif caps.compute_capability < need:
        fmts = sorted({t.format for t in recipe.linear.operands().values() if t.is_quantized})
        problems.append(f"{'/'.join(fmts)} needs compute capability {need[0]}.{need[1]}+ for "
                        f"native GEMMs; this GPU is {caps.compute_capability[0]}."
                        f"{caps.compute_capability[1]}")
    try:
        describe_te_recipe(recipe, num_layers=num_layers)
    except TEUnsupported as e:
        problems.append(f"the TE adapter cannot express it: {e}")
    if not problems:
        return BackendChoice(backend="te", reason="Transformer Engine runs this recipe natively")
    if recipe.backend == "te":
        raise ValueError(f"precision.backend='te' for recipe {recipe.name!r} cannot run: "
                         + "; ".join(problems) + ". Use backend='auto' or 'emulated'.")
    return BackendChoice(backend="emulated", reason="; ".join(problems))


def gpt_layer_spec_for(choice: BackendChoice, config, *, qk_layernorm: bool = False,
                       pp_rank: int | None = None):
    """The decoder spec for the resolved backend: Megatron's TE spec, or our quantized block."""
    if choice.backend == "te":
        from nvfp4_megatron.megatron.te_adapter import te_gpt_layer_spec

        return te_gpt_layer_spec(config, qk_layernorm=qk_layernorm)
    from nvfp4_megatron.megatron.spec_provider import quantized_gpt_block_spec

    return quantized_gpt_block_spec(config, qk_layernorm=qk_layernorm, pp_rank=pp_rank)


def apply_backend_precision(model_chunks, recipe: PrecisionRecipe, choice: BackendChoice, *,
                            log: bool = True):
    """Configure the built model for the resolved backend; returns the precision table.

    ``te``: per-block TE autocast with our recipe (``te_adapter.apply_te_precision``);
    ``emulated``: our quantized linears (``policy.apply_precision``; a recipe whose ``backend``
    field says ``auto`` is passed through as ``emulated`` so the table names what runs).
    """
    import dataclasses

    if choice.backend == "te":
        from nvfp4_megatron.megatron.te_adapter import apply_te_precision

        return apply_te_precision(model_chunks, recipe, log=log)
    from nvfp4_megatron.megatron.policy import apply_precision

    return apply_precision(model_chunks, dataclasses.replace(recipe, backend="emulated"), log=log)
