"""Backend policy: which implementation runs the recipe, and why (printed in the precision table).

``emulated``: the project's quantized layers (bit-faithful to DESIGN.md §1) -- always possible.
``te``: Megatron's Transformer Engine spec, configured through Megatron's own fields and recipe
hook (``te_adapter``). Requires that TE imports, that TE's own ``check_*_support()`` accepts the
recipe's TE class on this GPU, that the adapter can express the recipe and that the installed
TE's recipe dataclass has exactly the fields the adapter sets; otherwise ``precision.backend=te``
is an error naming what is missing.
``auto``: ``te`` only where that recipe's TE path has been **validated** on this GPU
architecture (:data:`VALIDATED_TE_PATHS`: a run on that architecture compared against the
emulation); everywhere else the emulation, with the reason printed. Nothing is validated yet (no
Blackwell has been available), so ``auto`` emulates everywhere today and ``backend=te`` is the
explicit opt-in. Either way the recipe's precision is what runs: nothing falls back to BF16.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from nvfp4_megatron.mcore.te_adapter import (TE_SUPPORT_CHECKS, TEAPIMismatch, TEUnsupported,
                                                build_te_recipe, describe_te_recipe)
from nvfp4_megatron.quant.recipe import PrecisionRecipe

_log = logging.getLogger(__name__)

# (recipe name, compute capability) -> where its TE path was validated against the emulation
# (which GPU, TE version, test). Empty: no TE path has run anywhere yet; docs/recipes.md says
# what a validation run is ("To try on the H200 / Blackwell").
VALIDATED_TE_PATHS: Mapping[tuple[str, tuple[int, int]], str] = {}


@dataclass(frozen=True, kw_only=True)
class DeviceCaps:
    te_available: bool
    te_error: str | None = None
    te_version: str | None = None
    compute_capability: tuple[int, int] | None = None   # None: no CUDA GPU
    # TE recipe class -> TE's own check_*_support() answer (ok, reason) on this GPU
    te_support: Mapping[str, tuple[bool, str]] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class BackendChoice:
    backend: str          # "te" | "emulated": what runs
    requested: str        # precision.backend: "auto" | "te" | "emulated"
    reason: str

    def describe(self) -> str:
        return f"{self.backend} (precision.backend={self.requested}): {self.reason}"


def _find_spec(name: str):
    try:
        return importlib.util.find_spec(name)
    except ValueError:  # in sys.modules without a __spec__ (a module made at run time)
        return sys.modules.get(name)


def probe_device() -> DeviceCaps:
    """What this process can run. TE is imported only where a GPU exists (it breaks CPU hosts);
    its support for each recipe class is asked from TE itself."""
    cc = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    if cc is None:
        return DeviceCaps(te_available=False, te_error="no CUDA GPU")
    cc = tuple(cc)
    if _find_spec("transformer_engine") is None:
        return DeviceCaps(te_available=False, te_error="transformer_engine is not installed",
                          compute_capability=cc)
    try:
        import transformer_engine.pytorch  # noqa: F401

        from nvfp4_megatron.mcore.te_adapter import te_support, te_version

        version = te_version()
    except Exception as e:  # TE raises more than ImportError when its CUDA libraries mismatch
        return DeviceCaps(te_available=False, te_error=f"transformer_engine failed to import: {e}",
                          compute_capability=cc)
    support = {}
    for te_class in TE_SUPPORT_CHECKS:
        try:
            support[te_class] = te_support(te_class)
        except TEAPIMismatch as e:
            support[te_class] = (False, str(e))
    return DeviceCaps(te_available=True, te_version=version, compute_capability=cc,
                      te_support=support)


def _cc_text(cc: tuple[int, int] | None) -> str:
    return "no GPU" if cc is None else f"compute capability {cc[0]}.{cc[1]}"


def resolve_backend(recipe: PrecisionRecipe, *, num_layers: int,
                    num_moe_experts: int | None = None,
                    moe_token_dispatcher_type: str | None = None,
                    caps: DeviceCaps | None = None,
                    validated: Mapping[tuple[str, tuple[int, int]], str] | None = None,
                    hybrid: bool = False) -> BackendChoice:
    """Decide ``te`` or ``emulated`` for ``recipe`` (``recipe.backend`` is auto|te|emulated);
    ``hybrid``: a Mamba hybrid model (its TE spec also needs ``mamba_ssm``)."""
    requested = recipe.backend
    if requested == "emulated":
        return BackendChoice(backend="emulated", requested=requested,
                             reason="precision.backend=emulated")
    caps = probe_device() if caps is None else caps
    validated = VALIDATED_TE_PATHS if validated is None else validated
    problems: list[str] = []
    desc: dict[str, Any] | None = None
    try:
        desc = describe_te_recipe(recipe, num_layers=num_layers, num_moe_experts=num_moe_experts,
                                  moe_token_dispatcher_type=moe_token_dispatcher_type)
    except TEUnsupported as e:
        problems.append(f"the TE adapter cannot express it: {e}")
    te_class = desc["te_class"] if desc is not None else None
    label = te_class or "unquantized TE modules"
    if not caps.te_available:
        problems.append(f"Transformer Engine is unavailable ({caps.te_error})")
    elif desc is not None and te_class is not None:
        ok, why = caps.te_support.get(te_class, (False, "TE's support check was not run"))
        if not ok:
            problems.append(f"Transformer Engine {caps.te_version} does not run {te_class} on "
                            f"this GPU ({_cc_text(caps.compute_capability)}): {why}")
    if hybrid and _find_spec("mamba_ssm") is None:
        problems.append("Megatron's TE hybrid spec needs mamba_ssm (its MambaMixer), which is not "
                        "installed")
    key = (recipe.name, caps.compute_capability)
    evidence = validated.get(key)
    if requested == "auto":
        if problems:
            return BackendChoice(backend="emulated", requested=requested,
                                 reason="; ".join(problems))
        if evidence is None:
            done = ", ".join(f"{n} on {c[0]}.{c[1]}" for n, c in validated) or "none"
            return BackendChoice(
                backend="emulated", requested=requested,
                reason=(f"the TE path of recipe {recipe.name!r} ({label}) has not been validated "
                        f"on {_cc_text(caps.compute_capability)} (validated TE paths: {done}; "
                        "docs/recipes.md); precision.backend=te opts in"))
    if not problems:
        try:
            build_te_recipe(desc)  # the installed TE's recipe API, every field explicit
        except (TEAPIMismatch, RuntimeError) as e:
            problems.append(str(e))
    if problems:
        if requested == "te":
            raise ValueError(f"precision.backend='te' for recipe {recipe.name!r} cannot run: "
                             + "; ".join(problems) + ". Use backend='auto' or 'emulated'.")
        return BackendChoice(backend="emulated", requested=requested, reason="; ".join(problems))
    how = (f"validated: {evidence}" if evidence is not None else
           f"NOT validated on {_cc_text(caps.compute_capability)} (explicit opt-in)")
    support = f", supported per TE's {TE_SUPPORT_CHECKS[te_class]}()" if te_class else ""
    return BackendChoice(backend="te", requested=requested,
                         reason=f"Transformer Engine {caps.te_version}, {label}{support}; {how}")


def backend_config_fields(choice: BackendChoice, recipe: PrecisionRecipe, *, num_layers: int,
                          num_moe_experts: int | None = None,
                          moe_token_dispatcher_type: str | None = None) -> dict[str, Any]:
    """The Megatron ``TransformerConfig`` fields the resolved backend needs, to pass when the
    config is built. ``te``: the quantization fields (fp8/fp4 + recipe, BF16 blocks, MoE padding),
    after installing the TE recipe object in Megatron's hook (``te_adapter.prepare_te``).
    ``emulated``: none (the quantized local layers read the recipe; Megatron's fp8/fp4 stay off)."""
    if choice.backend != "te":
        return {}
    from nvfp4_megatron.mcore.te_adapter import megatron_config_fields

    return megatron_config_fields(recipe, num_layers=num_layers, num_moe_experts=num_moe_experts,
                                  moe_token_dispatcher_type=moe_token_dispatcher_type)


def gpt_layer_spec_for(choice: BackendChoice, config, *, qk_layernorm: bool = False,
                       pp_rank: int | None = None):
    """The decoder spec for the resolved backend: Megatron's TE spec, or our quantized block."""
    if choice.backend == "te":
        from nvfp4_megatron.mcore.te_adapter import te_gpt_layer_spec

        return te_gpt_layer_spec(config, qk_layernorm=qk_layernorm)
    from nvfp4_megatron.mcore.spec_provider import quantized_gpt_block_spec

    return quantized_gpt_block_spec(config, qk_layernorm=qk_layernorm, pp_rank=pp_rank)


def apply_backend_precision(model_chunks, recipe: PrecisionRecipe, choice: BackendChoice, *,
                            log: bool = True):
    """Configure the built model for the resolved backend; returns the precision table, whose
    first line names the backend and how it was chosen.

    ``te``: ``te_adapter.apply_te_precision`` (checks the config fields, hooks the BF16 switch);
    ``emulated``: our quantized linears (``policy.apply_precision``; a recipe whose ``backend``
    field says ``auto`` is passed through as ``emulated`` so the table names what runs).
    """
    if choice.backend == "te":
        from nvfp4_megatron.mcore.te_adapter import apply_te_precision

        table = apply_te_precision(model_chunks, recipe, log=False)
    else:
        from nvfp4_megatron.mcore.policy import apply_precision

        table = apply_precision(model_chunks, dataclasses.replace(recipe, backend="emulated"),
                                log=False)
    table = dataclasses.replace(table, choice=choice.describe())
    if log:
        from nvfp4_megatron.mcore.policy import process_rank

        if process_rank() == 0:
            _log.info("\n%s", table.format())
    return table


def hybrid_stack_spec_for(choice: BackendChoice, *, d_conv: int = 4, expand: int = 2,
                          scan_impl: str = "eager"):
    """The hybrid (Mamba) stack spec for the resolved backend: Megatron's TE hybrid spec, or the
    project's local one with quantized linears (``mcore/hybrid_spec.py``)."""
    from nvfp4_megatron.mcore import hybrid_spec

    if choice.backend == "te":
        return hybrid_spec.te_hybrid_stack_spec()
    return hybrid_spec.quantized_hybrid_stack_spec(d_conv=d_conv, expand=expand,
                                                   scan_impl=scan_impl)
