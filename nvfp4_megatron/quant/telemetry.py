"""Quantization telemetry: what quantization does to each operand of each quantized GEMM.

Every ``logging.quant_stats_interval`` steps (off by default) the training loop turns the collector
on for one step (:func:`begin_step` / :func:`end_step`). While it is on, every quantizer call of a
quantized linear (``quant/linear.py``) adds, for its (layer, role), the sums below between the
high-precision tensor ``x`` and what the GEMM multiplies, ``x̂`` (the dequantized copy, with its
per-tensor scale; for an OCC input the clamped copy plus the compensation residual when it is on,
i.e. what the Fprop GEMM effectively sees)::

    dot = Σ x·x̂   ref = Σ x²   hat = Σ x̂²   err = Σ (x - x̂)²   n = #elements
    underflow  = #(x ≠ 0 and the quantized element is 0)                (flushed to zero)
    saturated  = #(on the format's top code and |x| > |x̂|·(1 + 1e-5))    (clamped at the top)
    occ        = #(elements OCC clamped)                                 (OCC inputs only)

Sums add up over micro-batches, TP shards, pipeline stages and data-parallel replicas (replicated
copies count once per replica, which leaves every ratio unchanged), so the step's numbers are the
ratios of the summed sums: cosine similarity ``dot / sqrt(ref·hat)``, MSE ``err / n``, SNR
``10 log10(ref / err)`` dB (the paper's Table 1 definitions, arXiv 2501.17116), and the three
fractions over ``n``. Copies that reuse another copy's numbers (the Dgrad copy of a 2D-tiled or
``e2m1_vector`` weight, a transposed per-tensor FP8 copy, the ``e2m1_vector`` Wgrad copy of X) are
reported under their own role with the numbers of the copy they reuse.

Random-Hadamard-transformed copies are compared in the transformed basis (the transform is
orthonormal, so MSE, SNR and cosine are those of the original basis). ``x`` is the tensor the
quantizer received: token padding rows of the columnwise copies count as exact zeros.

Cost: one pass over every quantized tensor in FP64 per recorded step and one ``all_gather_object``
of the per-layer sums (docs/PERFORMANCE.md "Quantization telemetry"); nothing when off.

``table1_sums`` is the Microsoft FP4 paper's Table 1 measurement (absmax E2M1 of an activation,
one scale per tensor and one per token, with no clamp, clamp at 99.9 % without compensation,
clamp + compensation at 99.9 / 99 / 97 %), used by ``training/occ_report.py`` and, with
``logging.quant_stats_occ_table``, at every telemetry step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from nvfp4_megatron.formats.constants import F4_E2M1_MAX
from nvfp4_megatron.formats.e2m1 import decode_e2m1
from nvfp4_megatron.formats.msfp4 import outlier_clamp, quantize_absmax_e2m1

FIELDS = ("dot", "ref", "hat", "err", "n", "underflow", "saturated", "occ")
_SAT_REL_TOL = 1e-5  # FP32 rounding of the scale arithmetic stays far below this
_FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}

# Microsoft FP4 paper, Table 1: (id, label, quantile or None, compensate)
TABLE1_SETTINGS = (("none", "no clamp", None, False),
                   ("clamp99.9", "clamp 99.9, no comp", 0.999, False),
                   ("comp99.9", "clamp+comp 99.9", 0.999, True),
                   ("comp99", "clamp+comp 99", 0.99, True),
                   ("comp97", "clamp+comp 97", 0.97, True))
# absmax scaling granularity of the Table-1 measurement: one scale for the whole tensor (the
# paper's quantization function, §3: γ = 6 / max|X|) or one per token (what msfp4 trains with)
TABLE1_GRANULARITIES = ("tensor", "token")


class _Collector:
    def __init__(self) -> None:
        self.active = False
        self.table1 = False
        self.sums: dict[tuple[str, str], torch.Tensor] = {}
        self.last: dict[tuple[str, str], torch.Tensor] = {}
        self.describe: dict[tuple[str, str], str] = {}
        self.t1: dict[tuple[str, str], torch.Tensor] = {}

    def add(self, key: tuple[str, str], sums: torch.Tensor, desc: str | None = None) -> None:
        self.last[key] = sums
        self.sums[key] = self.sums[key] + sums if key in self.sums else sums
        if desc is not None:
            self.describe[key] = desc


_c = _Collector()


def is_active() -> bool:
    return _c.active


def table1_active() -> bool:
    return _c.active and _c.table1


def begin_step(active: bool, *, table1: bool = False) -> None:
    """Collect during this step (``active``); ``table1`` adds the Table-1 settings per input."""
    global _c
    _c = _Collector()
    _c.active, _c.table1 = bool(active), bool(active and table1)


def _sums(x_ref: torch.Tensor, x_hat: torch.Tensor, *, q_zero: torch.Tensor | None = None,
          top: torch.Tensor | None = None, occ: torch.Tensor | None = None) -> torch.Tensor:
    """:data:`FIELDS` of ``x_ref`` against ``x_hat``; ``q_zero``: the quantized element is 0;
    ``top``: it is on the top code (then ``x_ref`` must be the tensor that was quantized)."""
    r, h = x_ref.detach().double(), x_hat.detach().double()
    out = torch.zeros(len(FIELDS), dtype=torch.float64, device=r.device)
    out[0] = (r * h).sum()
    out[1] = (r * r).sum()
    out[2] = (h * h).sum()
    out[3] = ((r - h) ** 2).sum()
    out[4] = r.numel()
    if q_zero is not None:
        out[5] = ((r != 0) & q_zero).sum()
    if top is not None:
        out[6] = (top & (r.abs() > h.abs() * (1 + _SAT_REL_TOL))).sum()
    if occ is not None:
        out[7] = occ.sum()
    return out


def _elements_and_top(q, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(element values before any scale, True where an element is on the format's top code)."""
    if fmt == "nvfp4":
        v = q.dequantize_unscaled()  # q * s_b, exact FP32
        k = v.shape[-1]
        s = q.scale.float().reshape(-1, k // 16).repeat_interleave(16, dim=-1).reshape(v.shape)
        return v, (s > 0) & (v.abs() == F4_E2M1_MAX * s)
    if fmt in ("mxfp8", "mxfp4"):
        e = q.elements_fp32()
        top = F4_E2M1_MAX if q.elem_dtype == "e2m1" else _FP8_MAX[q.elem_dtype]
        return e, e.abs() == top
    if fmt in ("fp8", "fp8_block"):
        e = q.data.float()
        return e, e.abs() == _FP8_MAX[q.data.dtype]
    if fmt == "e2m1_vector":
        e = decode_e2m1(q.codes)
        return e, e.abs() == F4_E2M1_MAX
    raise ValueError(f"telemetry: unknown format {fmt!r}")


def operand_sums(x_in: torch.Tensor, q, fmt: str, *, rht: bool = False,
                 occ_ref: torch.Tensor | None = None, occ_residual: torch.Tensor | None = None,
                 occ_compensate: bool = True) -> torch.Tensor:
    """The :data:`FIELDS` sums of one quantizer call.

    ``x_in``: the 2-D high-precision tensor the quantizer received; ``q``: its result. With OCC,
    ``x_in`` is the clamped tensor, ``occ_ref`` the unclamped one and ``occ_residual`` their
    difference: cosine/MSE/SNR then compare ``occ_ref`` with ``x̂ (+ residual)``.
    """
    x_in = x_in.detach()
    if rht:
        from nvfp4_megatron.formats import apply_rht

        x_in = apply_rht(x_in)
    elems, top = _elements_and_top(q, fmt)
    x_hat = q.dequantize(torch.float32).reshape(x_in.shape)
    sat = _sums(x_in, x_hat, q_zero=(elems == 0).reshape(x_in.shape), top=top.reshape(x_in.shape))
    if occ_ref is None:
        return sat
    eff = x_hat + occ_residual.reshape(x_hat.shape) if occ_compensate else x_hat
    out = _sums(occ_ref.reshape(x_hat.shape), eff, occ=(occ_residual != 0))
    out[5], out[6] = sat[5], sat[6]
    return out


def record(layer_key: str, role: str, sums: torch.Tensor, desc: str | None = None) -> None:
    if _c.active:
        _c.add((layer_key, role), sums, desc)


def record_alias(layer_key: str, src_role: str, dst_role: str, desc: str | None = None) -> None:
    """``dst_role`` reuses ``src_role``'s copy (same numbers): report them under both."""
    if _c.active and (layer_key, src_role) in _c.last:
        _c.add((layer_key, dst_role), _c.last[(layer_key, src_role)],
               desc if desc is not None else _c.describe.get((layer_key, src_role)))


def table1_sums(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{granularity: [len(TABLE1_SETTINGS), len(FIELDS)] sums}`` for one activation
    ``[..., hidden]``: absmax E2M1 (``formats.quantize_absmax_e2m1``, one scale per tensor or per
    token) of ``x`` clamped to its [1-α, α] quantiles (``formats.outlier_clamp``), plus the
    residual when compensated, against ``x``."""
    x2d = x.detach().reshape(-1, x.shape[-1]).float()
    out = {}
    for gran in TABLE1_GRANULARITIES:
        rows = []
        for _, _, alpha, comp in TABLE1_SETTINGS:
            xc, res = (x2d, None) if alpha is None else outlier_clamp(x2d, alpha)
            src = xc.reshape(1, -1) if gran == "tensor" else xc
            q = quantize_absmax_e2m1(src, dim=-1)
            x_hat = q.dequantize(torch.float32).reshape(x2d.shape)
            if comp:
                x_hat = x_hat + res
            row = _sums(x2d, x_hat, occ=None if res is None else (res != 0))
            row[5] = ((src != 0) & ((q.codes & 0x7) == 0)).sum()  # flushed to zero
            rows.append(row)
        out[gran] = torch.stack(rows)
    return out


def record_table1(layer_key: str, x: torch.Tensor) -> None:
    if table1_active():
        for gran, s in table1_sums(x).items():
            key = (layer_key, gran)
            _c.t1[key] = _c.t1[key] + s if key in _c.t1 else s


# ---- end of step: reduce over ranks, turn sums into metrics ---------------------------------

def metrics(s: Iterable[float]) -> dict[str, float]:
    """Cosine similarity, MSE, SNR (dB) and the fractions from one row of :data:`FIELDS` sums."""
    dot, ref, hat, err, n, under, sat, occ = (float(v) for v in s)
    cos = dot / math.sqrt(ref * hat) if ref > 0 and hat > 0 else (1.0 if ref == hat == 0 else 0.0)
    snr = 10 * math.log10(ref / err) if err > 0 and ref > 0 else (math.inf if ref > 0 else 0.0)
    return {"cos": cos, "mse": err / n if n else 0.0, "snr_db": snr,
            "underflow": under / n if n else 0.0, "saturation": sat / n if n else 0.0,
            "occ_clamped": occ / n if n else 0.0}


def _gather(obj) -> list:
    d = torch.distributed
    if not (d.is_available() and d.is_initialized()) or d.get_world_size() == 1:
        return [obj]
    out = [None] * d.get_world_size()
    d.all_gather_object(out, obj)
    return out


def end_step() -> tuple[list[dict], list[dict]]:
    """Stop collecting; on every rank (a collective when the step was recorded) return
    ``(operand rows, table-1 rows)``, each row a dict with ``layer``, ``role``/``setting``, the
    metrics and ``format``. Empty lists when the step was not recorded."""
    global _c
    c, _c = _c, _Collector()
    if not c.active:
        return [], []
    local = {"ops": {k: (v.cpu().tolist(), c.describe.get(k, "")) for k, v in c.sums.items()},
             "t1": {k: v.cpu().tolist() for k, v in c.t1.items()}}
    merged_ops: dict[tuple[str, str], list] = {}
    merged_t1: dict[tuple[str, str], list] = {}
    for part in _gather(local):
        for k, (v, desc) in part["ops"].items():
            cur = merged_ops.setdefault(k, [[0.0] * len(FIELDS), desc])
            cur[0] = [a + b for a, b in zip(cur[0], v)]
        for k, v in part["t1"].items():
            cur = merged_t1.setdefault(k, [[0.0] * len(FIELDS) for _ in TABLE1_SETTINGS])
            merged_t1[k] = [[a + b for a, b in zip(r0, r1)] for r0, r1 in zip(cur, v)]
    rows = []
    for (layer, role), (v, desc) in sorted(merged_ops.items(), key=_order):
        m = metrics(v)
        if v[FIELDS.index("occ")] == 0 and "OCC" not in desc:
            m.pop("occ_clamped")
        gemm, operand = role.split(".", 1)
        rows.append({"layer": layer, "role": role, "gemm": gemm, "operand": operand,
                     "format": desc, **m})
    t1_rows = []
    for (layer, gran), per_setting in sorted(merged_t1.items(), key=_order):
        for (sid, label, alpha, comp), v in zip(TABLE1_SETTINGS, per_setting):
            m = metrics(v)
            t1_rows.append({"layer": layer, "granularity": gran, "setting": sid, "label": label,
                            "quantile": alpha,
                            "compensate": comp, "cos": m["cos"], "mse": m["mse"],
                            "snr_db": m["snr_db"], "underflow": m["underflow"],
                            "occ_clamped": m["occ_clamped"]})
    return rows, t1_rows


_ROLE_ORDER = {r: i for i, r in enumerate(("fprop.input", "fprop.weight", "dgrad.grad_output",
                                           "dgrad.weight", "wgrad.grad_output", "wgrad.input",
                                           *TABLE1_GRANULARITIES))}


def _order(item) -> tuple:
    (layer, role), _ = item
    block, _, rest = layer.partition(".")
    return (int(block) if block.isdigit() else 10**9, rest, _ROLE_ORDER.get(role, 99))
