"""Independent NumPy oracles of DESIGN.md §1 for the format tests.

Written apart from ``nvfp4_megatron.formats``: E2M1 rounding by nearest-grid search with explicit
even tie-breaking, E4M3 rounding by exponent/quantum arithmetic in float64 (``np.round`` is
half-to-even), and the NVFP4 formulas step by step in float32 NumPy (IEEE-rounded like torch).
"""

from __future__ import annotations

import numpy as np

GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
FLT_MAX = np.float32(np.finfo(np.float32).max)


def e2m1_rne_codes(y) -> np.ndarray:
    """Codes (uint8) of float values, nearest grid point, ties to the even code; NaN -> ±6."""
    y = np.asarray(y, dtype=np.float64)
    a = np.abs(y)
    a_safe = np.where(np.isnan(a), 6.0, np.minimum(a, 6.0))
    dist = np.abs(a_safe[..., None] - GRID)
    best = dist.min(axis=-1, keepdims=True)
    is_best = dist == best
    even_bonus = np.where(np.arange(8) % 2 == 0, 2, 1)
    mag = np.argmax(is_best * even_bonus, axis=-1).astype(np.uint8)
    return mag | (np.signbit(y).astype(np.uint8) << 3)


def e2m1_decode(codes) -> np.ndarray:
    codes = np.asarray(codes).astype(np.int64)
    v = GRID[codes & 7]
    return np.where(codes & 8, -v, v)


def e4m3_rne_satfinite(v) -> np.ndarray:
    """float32 -> E4M3 value (as float64): clamp to ±448, round to nearest even on the E4M3 grid."""
    v = np.asarray(v, dtype=np.float64)
    out = np.full(v.shape, np.nan)
    ok = ~np.isnan(v)
    a = np.minimum(np.abs(v[ok]), 448.0)
    _, e = np.frexp(np.where(a > 0, a, 1.0))
    e = np.maximum(e - 1, -6)  # binade exponent; below 2^-6 the subnormal quantum 2^-9 applies
    quantum = np.ldexp(1.0, e - 3)
    r = np.round(a / quantum) * quantum
    out[ok] = np.copysign(np.minimum(r, 448.0), v[ok])
    return out


def nvfp4_reference(x_fp32: np.ndarray, tile_rows: int, amax=None):
    """(codes [R,K] uint8, block scales [R,K/16] float64, S_enc, S_dec, dequant [R,K] float32)."""
    x = np.asarray(x_fp32, dtype=np.float32)
    rows, k = x.shape
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        amax = np.float32(np.max(np.abs(x)) if amax is None else amax)
        if np.isfinite(amax) and amax > 0:
            s_enc = np.float32(2688.0) / amax
            s_enc = np.float32(min(s_enc, FLT_MAX))
        else:
            s_enc = np.float32(1.0)
        s_dec = np.float32(1.0) / s_enc
        blocks = np.abs(x).reshape(rows // tile_rows, tile_rows, k // 16, 16)
        amax_b = blocks.max(axis=(1, 3))
        amax_b = np.repeat(amax_b, tile_rows, axis=0)
        t = np.float32(s_enc * np.float32(1.0 / 6.0))
        s_b = e4m3_rne_satfinite(np.float32(amax_b * t))
        enc_b = np.float32(1.0) / (s_b.astype(np.float32) * s_dec)
        enc_b = np.minimum(enc_b, FLT_MAX).astype(np.float32)
        y = x.reshape(rows, k // 16, 16) * enc_b[..., None]
        y = np.clip(y, np.float32(-6), np.float32(6)).reshape(rows, k)
        codes = e2m1_rne_codes(y)
        deq = (e2m1_decode(codes).astype(np.float32).reshape(rows, k // 16, 16)
               * s_b.astype(np.float32)[..., None]) * s_dec
    return codes, s_b, s_enc, s_dec, deq.reshape(rows, k).astype(np.float32)


def e8m0_round_up_exp(r) -> np.ndarray:
    """Smallest integer e with 2^e >= r (r > 0), found from float log2 and corrected, clamped ±127."""
    r = np.asarray(r, dtype=np.float64)
    e = np.ceil(np.log2(np.where(r > 0, r, 1.0))).astype(np.int64)
    e = np.where(np.ldexp(1.0, e - 1) >= r, e - 1, e)
    e = np.where(np.ldexp(1.0, e) < r, e + 1, e)
    e = np.where(r > 0, e, -127)
    return np.clip(e, -127, 127)
