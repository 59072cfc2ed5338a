"""Input validation shared by the quantizers (errors name the field, the value and the rule), and
the one rule for a tensor's global amax."""

from __future__ import annotations

import torch

from nvfp4_megatron.formats.constants import FP8_DTYPES, SUPPORTED_INPUT_DTYPES


def check_float_input(x: object, *, name: str = "x", min_ndim: int = 1) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_INPUT_DTYPES:
        raise ValueError(
            f"{name} has dtype {x.dtype}; the quantizers take one of "
            f"{[str(d) for d in SUPPORTED_INPUT_DTYPES]} (cast it first, e.g. x.float())"
        )
    if x.dim() < min_ndim:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}; need at least {min_ndim} dimension(s)"
        )
    return x


def check_last_dim_divisible(x: torch.Tensor, block: int, *, what: str) -> None:
    if x.shape[-1] % block != 0 or x.shape[-1] == 0:
        raise ValueError(
            f"{what}: last dimension of shape {tuple(x.shape)} is {x.shape[-1]}, which is not "
            f"a positive multiple of the block size {block}; pad the last dimension to a multiple of {block}"
        )


def check_rows_divisible(x: torch.Tensor, rows: int, tile_rows: int, *, what: str) -> None:
    if rows % tile_rows != 0:
        raise ValueError(
            f"{what}: shape {tuple(x.shape)} has {rows} rows (product of the leading "
            f"dimensions), which is not divisible by the tile height {tile_rows}; pad the rows or "
            f"use a 1-row tile"
        )


def check_tile(x: torch.Tensor, tile: object, allowed: tuple[tuple[int, int], ...], *,
               what: str) -> tuple[tuple[int, int], int, int]:
    """Validate a block/tile shape for quantizing ``x`` along its last dim; ``(tile, rows, K)``.

    ``tile[1]`` must divide the last dim; a 2D tile (``tile[0] > 1``) needs a tensor of at least 2
    dimensions whose rows (product of the leading dims) divide by ``tile[0]``.
    """
    tile = tuple(tile)  # type: ignore[arg-type]
    if tile not in allowed:
        choices = " or ".join(str(t) for t in allowed)
        raise ValueError(f"{what}: tile={tile!r} is not supported; use {choices}")
    check_last_dim_divisible(x, tile[1], what=what)
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if tile[0] != 1:
        if x.dim() < 2:
            raise ValueError(
                f"{what}: tile={tile} needs a tensor with at least 2 dimensions, got shape {tuple(x.shape)}"
            )
        check_rows_divisible(x, rows, tile[0], what=what)
    return tile, rows, k  # type: ignore[return-value]


def check_fp8_dtype(fp8_dtype: object) -> torch.dtype:
    if fp8_dtype not in FP8_DTYPES:
        raise ValueError(
            f"fp8_dtype={fp8_dtype!r} is not supported; use torch.float8_e4m3fn or torch.float8_e5m2"
        )
    return fp8_dtype  # type: ignore[return-value]


def amax_tensor(amax: object, *, device: torch.device) -> torch.Tensor:
    """A caller-supplied (e.g. TP-reduced) amax as an FP32 0-d tensor on ``device``."""
    if isinstance(amax, torch.Tensor):
        if amax.numel() != 1:
            raise ValueError(
                f"amax must be a scalar (one global amax), got a tensor of shape {tuple(amax.shape)}"
            )
        return amax.detach().reshape(()).to(device=device, dtype=torch.float32)
    if isinstance(amax, (int, float)):
        return torch.tensor(float(amax), dtype=torch.float32, device=device)
    raise TypeError(f"amax must be a float or a 0-d tensor, got {type(amax).__name__}")


def global_amax(x_fp32: torch.Tensor, amax: object = None) -> torch.Tensor:
    """The FP32 0-d global amax a quantizer scales ``x_fp32`` by.

    ``amax`` given (e.g. reduced over the TP group): that value (:func:`amax_tensor`). Otherwise
    ``max |x_fp32|``, and 0 for an empty tensor (``amax()`` of an empty tensor raises).
    """
    if amax is not None:
        return amax_tensor(amax, device=x_fp32.device)
    if x_fp32.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x_fp32.device)
    return x_fp32.abs().amax()
