"""GEMM backends for the quantized linear: how ``A · Bᵀ`` runs on two quantized operand copies.

The numeric contract (DESIGN.md §1; NVFP4 paper arXiv 2509.25149 §2 and App. B) is that of the
hardware block-scaled GEMM: the block-scaled operand values ``q * s_b`` are multiplied exactly,
accumulated in FP32, and the per-tensor decode scales ``S_dec(A) * S_dec(B)`` (NVFP4 global
scales, FP8 ``scale_inv``) multiply the FP32 accumulator once ("alpha") before the output is
rounded to its dtype. Three backends implement it; they differ only in FP32 accumulation order:

``fp8_scaled_mm``
    FP8 per-tensor current scaling on a CUDA device of compute capability >= 8.9 (Ada, Hopper,
    Blackwell): a real FP8 tensor-core GEMM, ``torch._scaled_mm`` with the two ``scale_inv`` as
    its per-tensor scales (applied to the FP32 accumulator in the GEMM epilogue),
    ``use_fast_accum=False`` (full FP32 accumulation). It needs A row-major and B column-major
    (given: A ``[M, K]`` contiguous, B ``[N, K]`` contiguous and transposed) and every dimension
    a multiple of 16: the operands are zero-padded (exact; padded rows/columns are sliced off)
    when they are not. cuBLASLt has no E5M2 x E5M2 FP8 GEMM: such a pair (no built-in recipe
    uses it) runs on ``bf16_dequant`` instead, logged once.
``bf16_dequant``
    Every other quantized format on CUDA (NVFP4, MXFP8, MXFP4; FP8 below compute capability 8.9):
    a Triton kernel (``kernels/dequant.py``) turns codes + block scales into the exact BF16 values
    ``q * s_b`` in one pass, and ``torch.mm(..., out_dtype=float32)`` multiplies them on the BF16
    tensor cores with FP32 accumulation; alpha multiplies the FP32 output in the pass that casts
    it to the output dtype. Without a per-tensor scale (MX) the GEMM writes the output dtype
    directly (FP32 accumulation, one rounding: the same as rounding the FP32 result). The alpha
    pass is a Triton kernel (``kernels/gemm_alpha.scale_by_alpha``; torch's ``mul`` by a 0-d CUDA
    tensor into a BF16 ``out=`` ran at half the copy bandwidth), with torch's bits. Hopper has
    no FP4 and no block-scaled MX GEMM, so this is emulation, and is labelled so. With
    ``set_emulated_mm("triton")`` (``precision.emulated_gemm=triton``) the multiplication is one
    Triton kernel with alpha in its epilogue (``kernels/gemm_alpha.py``): no FP32 output pass; the
    same contract, another FP32 accumulation order than cuBLAS's.
``fp32_reference``
    CPU tensors, FP8 block scaling (whose FP32 block ``scale_inv`` is not exact in BF16) and
    ``e2m1_vector`` (the Microsoft FP4 recipes: ``q / scale`` with an FP32 per-row scale is not
    exact in BF16; also its FP8-gradient x FP4 backward GEMMs): the
    FP32 values of :meth:`QuantizedOperand.values` multiplied in FP32 (torch.matmul), then alpha.
    This is the oracle the CPU tests compare bit for bit.

Non-finite inputs: when either high-precision operand had an Inf/NaN, every output element is
NaN (``fp8_scaled_mm``: the scale passed to the GEMM is NaN; ``bf16_dequant``: the dequantized
operand is all NaN; ``fp32_reference``: ``torch.where``). No host synchronisation on the GPU.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BACKENDS = ("fp8_scaled_mm", "bf16_dequant", "fp32_reference")
_SCALED_MM_MULTIPLE = 16  # torch._scaled_mm: every matrix dimension a multiple of 16


@functools.cache
def device_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _cc(device: torch.device) -> tuple[int, int]:
    return device_capability(device.index if device.index is not None
                             else torch.cuda.current_device())


def select_gemm_kernel(fmt_a: str, fmt_b: str, device: torch.device, *,
                   fp8_dtypes: tuple[str, str] = ("e4m3", "e4m3"),
                   capability: tuple[int, int] | None = None) -> str:
    """Which backend multiplies two operands of formats ``fmt_a``/``fmt_b`` on ``device``.

    ``capability`` overrides the device's compute capability (tests).
    """
    if "e2m1_vector" in (fmt_a, fmt_b) and {fmt_a, fmt_b} <= {"e2m1_vector", "fp8"}:
        return "fp32_reference"  # FP32 per-row scales inside the operand values (see above)
    if fmt_a != fmt_b and {fmt_a, fmt_b} != {"mxfp8", "mxfp4"}:
        raise ValueError(f"select_gemm_kernel: operand formats {fmt_a!r} and {fmt_b!r} cannot meet "
                         "in one GEMM (LinearRecipe validates this)")
    if device.type != "cuda":
        return "fp32_reference"
    if fmt_a == "fp8_block":
        return "fp32_reference"
    if fmt_a == "fp8":
        cc = capability if capability is not None else _cc(device)
        if cc >= (8, 9) and fp8_dtypes != ("e5m2", "e5m2"):
            return "fp8_scaled_mm"
        if cc >= (8, 9):
            _log_once("FP8 E5M2 x E5M2 has no cuBLASLt GEMM; emulating it (bf16_dequant)")
        return "bf16_dequant"
    return "bf16_dequant"


@functools.cache
def _log_once(msg: str) -> None:
    logger.warning("quant.gemm: %s", msg)


def describe_backends(device: torch.device | str | None = None) -> dict[str, str]:
    """Format family -> backend on ``device`` (default: the current CUDA device, else CPU).

    For logs and the precision table: a run states whether its GEMMs are real FP8 or emulated.
    """
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    fams = {"fp8 (per-tensor)": ("fp8", ("e4m3", "e5m2")), "fp8_block": ("fp8_block", None),
            "nvfp4": ("nvfp4", None), "mxfp8/mxfp4": ("mxfp8", None)}
    out = {}
    for name, (fmt, dt) in fams.items():
        kw = {"fp8_dtypes": dt} if dt else {}
        b = select_gemm_kernel(fmt, fmt, device, **kw)
        label = {"fp8_scaled_mm": "real FP8 GEMM (torch._scaled_mm)",
                 "bf16_dequant": "emulated: exact BF16 operands, BF16 tensor cores, FP32 accum",
                 "fp32_reference": "emulated: FP32 reference matmul"}[b]
        out[name] = f"{b} ({label})"
    return out


# ---------------------------------------------------------------------------------------------
# fp8_scaled_mm

def _pad_fp8(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad a 2-D FP8 tensor to ``rows x cols`` (through uint8: 0x00 is +0.0 in E4M3/E5M2)."""
    pr, pc = rows - x.shape[0], cols - x.shape[1]
    if pr == 0 and pc == 0:
        return x
    return F.pad(x.view(torch.uint8), (0, pc, 0, pr)).view(x.dtype)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _aligned_scale(s: torch.Tensor) -> torch.Tensor:
    """0-d FP32 scale whose address is 16-byte aligned (cuBLASLt returns NOT_SUPPORTED otherwise;
    a view into a quantizer's scale buffer, e.g. ``scales[1]``, is not)."""
    s = s.reshape(()).float()
    return s if s.data_ptr() % 16 == 0 else s.clone()


def scaled_mm_fp8(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """``(A · Bᵀ) * scale_a * scale_b``, A ``[M, K]`` and B ``[N, K]`` FP8, in ``out_dtype``.

    Pads every dimension to a multiple of 16 with zeros (which add nothing to any dot product)
    and slices the result back to ``[M, N]``.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"scaled_mm_fp8: need A [M, K] and B [N, K], got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    m, k = a.shape
    n = b.shape[0]
    mp, kp, np_ = (_round_up(d, _SCALED_MM_MULTIPLE) for d in (m, k, n))
    a = _pad_fp8(a, mp, kp).contiguous()
    b = _pad_fp8(b, np_, kp).contiguous()
    scale_a, scale_b = (_aligned_scale(s) for s in (scale_a, scale_b))
    out = torch._scaled_mm(a, b.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype,
                           use_fast_accum=False)
    if mp != m or np_ != n:
        out = out[:m, :n]
    return out


# ---------------------------------------------------------------------------------------------
# bf16_dequant

def _fp8_code(dtype: torch.dtype) -> int:
    from nvfp4_megatron.kernels import dequant as k
    if dtype == torch.float8_e4m3fn:
        return k.ELEM_E4M3
    if dtype == torch.float8_e5m2:
        return k.ELEM_E5M2
    raise ValueError(f"dequant_bf16: unsupported FP8 element dtype {dtype}")


_DEQUANT_TILE = (16, 256)  # (rows, columns) per program; columns a multiple of every block size


def dequant_bf16(q, fmt: str, finite: torch.Tensor) -> torch.Tensor:
    """Exact BF16 ``q * s_b`` (2-D ``[rows, K]``) of a formats result, NaN everywhere if not finite.

    NVFP4 (E2M1 + E4M3 block scale), MXFP8 / MXFP4 (E4M3/E5M2/E2M1 + E8M0), FP8 per-tensor (the
    element values; ``scale_inv`` stays outside as alpha). CUDA tensors only (Triton kernel).
    """
    from nvfp4_megatron.kernels import dequant as k

    k_dim = q.shape[-1]
    flag = finite.reshape(1).to(torch.int32)
    if fmt == "nvfp4":
        codes, scale, elem, scode, block = q.data, q.scale, k.ELEM_E2M1, k.SCALE_E4M3, 16
    elif fmt in ("mxfp8", "mxfp4"):
        elem = k.ELEM_E2M1 if q.elem_dtype == "e2m1" else _fp8_code(q.elem_dtype)
        codes, scale, scode, block = q.data, q.scale, k.SCALE_E8M0, q.block
    elif fmt == "fp8":
        # per-tensor FP8: element values only (scale_inv stays outside, as alpha): one unit
        # E8M0 scale (127 = 2^0) read with zero strides for every block of 32
        codes, elem, scode, block = q.data, _fp8_code(q.data.dtype), k.SCALE_E8M0, 32
        scale = torch.full((1, 1), 127, dtype=torch.uint8, device=q.data.device)
    else:
        raise ValueError(f"dequant_bf16: format {fmt!r} has no exact BF16 form here")
    codes2 = codes.reshape(-1, codes.shape[-1]).view(torch.uint8)
    scale2 = scale.reshape(-1, scale.shape[-1]).view(torch.uint8)
    if codes2.stride(-1) != 1:
        codes2 = codes2.contiguous()
    if scale2.stride(-1) != 1:
        scale2 = scale2.contiguous()
    rows = codes2.shape[0]
    per_tensor = fmt == "fp8"
    out = torch.empty((rows, k_dim), dtype=torch.bfloat16, device=codes2.device)
    br, bk = _DEQUANT_TILE
    grid = (triton_cdiv(rows, br), triton_cdiv(k_dim, bk))
    k._dequant_kernel[grid](codes2, scale2, flag, out, rows, k_dim, codes2.stride(0),
                            0 if per_tensor else scale2.stride(0), 0 if per_tensor else 1,
                            ELEM=elem, SCALE=scode, BLOCK=block, BLOCK_R=br, BLOCK_K=bk,
                            num_warps=4)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


EMULATED_MM = ("cublas", "triton")
_emulated_mm = "cublas"


def set_emulated_mm(impl: str) -> str:
    """Which GEMM multiplies the BF16-dequant operands on CUDA (see the module docstring); returns
    the previous one."""
    global _emulated_mm
    impl = getattr(impl, "value", impl)
    if impl not in EMULATED_MM:
        raise ValueError(f"set_emulated_mm({impl!r}): use one of {EMULATED_MM}")
    prev, _emulated_mm = _emulated_mm, impl
    return prev


def bf16_mm(a: torch.Tensor, b_t: torch.Tensor, alpha: torch.Tensor | None,
            out_dtype: torch.dtype) -> torch.Tensor:
    """``a @ b_t`` on BF16 tensor cores with FP32 accumulation; alpha on the FP32 output."""
    if _emulated_mm == "triton" and a.is_cuda:
        from nvfp4_megatron.kernels.gemm_alpha import mm_alpha

        return mm_alpha(a, b_t, alpha, out_dtype)
    if alpha is None:
        if out_dtype == torch.bfloat16:
            return torch.mm(a, b_t)
        return torch.mm(a, b_t, out_dtype=torch.float32).to(out_dtype)
    out = torch.mm(a, b_t, out_dtype=torch.float32)
    if out.is_cuda:  # one vectorised pass (kernels/gemm_alpha.scale_by_alpha), torch's bits
        from nvfp4_megatron.kernels.gemm_alpha import scale_by_alpha

        return scale_by_alpha(out, alpha, out_dtype)
    if out_dtype == torch.float32:
        return out.mul_(alpha)
    res = torch.empty(out.shape, dtype=out_dtype, device=out.device)
    return torch.mul(out, alpha, out=res)
