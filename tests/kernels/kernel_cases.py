"""Kernel-vs-reference comparisons shared by the GPU tests and the CPU interpreter check.

Every comparison is exact: packed codes, scale bytes and the FP32 global scalars must be equal
bit for bit (``torch.equal`` on uint8 views). ``check_case`` raises ``AssertionError`` naming
the case, the field and the number of mismatches.

The reference runs on CPU (``x.cpu()``), so the test also shows that the result does not depend
on the device: the GPU kernel must reproduce the CPU oracle bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nvfp4_megatron import formats
from nvfp4_megatron.formats.rht import round_to_dtype
from nvfp4_megatron.formats.rounding import e4m3_rne_satfinite
from nvfp4_megatron.kernels import fp8 as k_fp8
from nvfp4_megatron.kernels import mx as k_mx
from nvfp4_megatron.kernels import nvfp4 as k_nvfp4
from nvfp4_megatron.kernels._common import round_to_input_dtype


def _u8(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype != torch.uint8 else t


def _same(name: str, field: str, got: torch.Tensor, want: torch.Tensor) -> None:
    got_c, want_c = got.detach().cpu(), want.detach().cpu()
    if got_c.shape != want_c.shape:
        raise AssertionError(f"{name}: {field} shape {tuple(got_c.shape)} != reference {tuple(want_c.shape)}")
    if got_c.dtype in (torch.float32,):
        # FP32 scalars: bit-equal, except that any NaN equals any NaN (the payload of a NaN made
        # on the GPU, e.g. by Inf - Inf in the RHT, is the canonical 0x7FFFFFFF, on CPU another)
        g, w = got_c.view(torch.int32).clone(), want_c.view(torch.int32).clone()
        both_nan = torch.isnan(got_c) & torch.isnan(want_c)
        g[both_nan] = 0
        w[both_nan] = 0
    else:
        g, w = _u8(got_c), _u8(want_c)
    if not torch.equal(g, w):
        n = int((g != w).sum())
        raise AssertionError(f"{name}: {field} differs from the reference in {n} of {g.numel()} entries")


def make_input(shape, dtype=torch.bfloat16, *, device="cpu", seed=0, heavy=False) -> torch.Tensor:
    """Random input: N(0, 1), or heavy-tailed (log-normal magnitudes over ~20 binades) with ``heavy``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if heavy:
        x = x * torch.exp(2.0 * torch.randn(shape, generator=g))
    return x.to(dtype).to(device)


def check_nvfp4(name: str, x: torch.Tensor, *, kernel_config: dict | None = None, **kw) -> None:
    got = k_nvfp4.quantize_nvfp4(x, config=kernel_config, **kw)
    kw_ref = dict(kw)
    if kw_ref.get("rand") is not None:
        kw_ref["rand"] = kw_ref["rand"].cpu()
    want = formats.quantize_nvfp4(x.cpu(), **kw_ref)
    _same(name, "data", got.data, want.data)
    _same(name, "scale", got.scale, want.scale)
    _same(name, "amax", got.amax, want.amax)
    _same(name, "scale_enc", got.scale_enc, want.scale_enc)
    _same(name, "scale_dec", got.scale_dec, want.scale_dec)
    assert got.scale.dtype == want.scale.dtype and got.data.dtype == want.data.dtype, name
    assert (got.shape, got.tile, got.rht, got.rht_signs) == (want.shape, want.tile, want.rht, want.rht_signs), name


def check_amax_configs(name: str, x2d: torch.Tensor) -> None:
    """The amax kernel under every swept tile (and small tiles with the 1-D column-fastest grid):
    ``max |x|`` and the post-RHT amax of ``x2d.t()`` equal the reference's bits, from two launches
    and from the one launch that gives both (``amax_2d_both``, and through
    ``dispatch.amax_and_transposed_rht`` as the quantized linear calls it)."""
    from nvfp4_megatron.formats.inputs import global_amax
    from nvfp4_megatron.kernels import amax as k_amax
    from nvfp4_megatron.kernels._common import rht_signs_on

    signs = rht_signs_on(x2d.device)
    want = global_amax(x2d.cpu().float())
    want_t = global_amax(formats.apply_rht(x2d.cpu().t()))
    small = [{"BLOCK_R": 16, "G": 1, "ITERS": 2, "COL_FASTEST": c} for c in (0, 1)]
    for cfg in k_amax.CONFIGS + small:
        _same(f"{name} {cfg}", "amax", k_amax.amax_2d(x2d, config=cfg), want)
        _same(f"{name} {cfg}", "post-RHT amax", k_amax.amax_2d(x2d.t(), signs_fp32=signs, config=cfg), want_t)
        both_t, both = k_amax.amax_2d_both(x2d.t(), signs_fp32=signs, config=cfg)
        _same(f"{name} {cfg}", "post-RHT amax (one launch for both)", both_t, want_t)
        _same(f"{name} {cfg}", "amax (one launch for both)", both, want)
    check_amax_pair(name, x2d)


def check_amax_pair(name: str, x2d: torch.Tensor) -> None:
    """``dispatch.amax_and_transposed_rht`` (the quantized linear's one read for a row-wise copy
    and an RHT'd column-wise copy) equals the two reference amaxes bit for bit."""
    from nvfp4_megatron.formats.inputs import global_amax
    from nvfp4_megatron.kernels import amax as k_amax
    from nvfp4_megatron.kernels import dispatch
    from nvfp4_megatron.kernels._common import rht_signs_on

    want, want_t = global_amax(x2d.cpu().float()), global_amax(formats.apply_rht(x2d.cpu().t()))
    row, col = dispatch.amax_and_transposed_rht(x2d)
    _same(name, "pair: row-wise amax", row, want)
    _same(name, "pair: post-RHT amax of the transpose", col, want_t)
    both_t, both = k_amax.amax_2d_both(x2d.t(), signs_fp32=rht_signs_on(x2d.device))  # the kernel itself
    _same(name, "both: post-RHT amax of the transpose", both_t, want_t)
    _same(name, "both: amax", both, want)


def check_mx(name: str, x: torch.Tensor, elem_dtype) -> None:
    got = k_mx.quantize_mx(x, elem_dtype)
    want = formats.quantize_mx(x.cpu(), elem_dtype)
    _same(name, "data", got.data, want.data)
    _same(name, "scale", got.scale, want.scale)
    assert got.data.dtype == want.data.dtype and got.scale.dtype == want.scale.dtype, name
    assert (got.shape, got.block, got.elem_dtype) == (want.shape, want.block, want.elem_dtype), name


def check_fp8(name: str, x: torch.Tensor, fp8_dtype, **kw) -> None:
    got = k_fp8.quantize_fp8_current(x, fp8_dtype, **kw)
    want = formats.quantize_fp8_current(x.cpu(), fp8_dtype, **kw)
    _same(name, "data", got.data, want.data)
    for field in ("scale", "scale_inv", "amax"):
        _same(name, field, getattr(got, field), getattr(want, field))
    assert got.data.dtype == want.data.dtype and got.shape == want.shape, name
    _check_gemm_scale(name, got, want)
    if x.dim() == 2:  # the cast-transpose kernel: same q, and the transposed bytes of the reference
        got_q, got_t = k_fp8.quantize_fp8_current_transposed(x, fp8_dtype, **kw)
        _same(name + " (cast-transpose)", "data", got_q.data, want.data)
        for field in ("scale", "scale_inv", "amax"):
            _same(name + " (cast-transpose)", field, getattr(got_q, field), getattr(want, field))
        _check_gemm_scale(name + " (cast-transpose)", got_q, want)
        want_t = formats.quantize_fp8_current(x.cpu().t(), fp8_dtype, **kw).data
        _same(name + " (cast-transpose)", "data_t", got_t, want_t)
        assert got_t.is_contiguous() and got_t.dtype == want.data.dtype, name


def _check_gemm_scale(name: str, got, want) -> None:
    """The kernel's GEMM scale: ``scale_inv`` bit for bit when the amax is finite, NaN when not
    (what makes every FP8 GEMM output NaN), at a 16-byte aligned address (cuBLASLt)."""
    g = got.gemm_scale_inv
    assert g is not None and g.dim() == 0 and g.dtype == torch.float32, name
    assert g.data_ptr() % 16 == 0, f"{name}: GEMM scale not 16-byte aligned"
    if torch.isfinite(want.amax).item():
        _same(name, "gemm_scale_inv", g, want.scale_inv)
    else:
        assert torch.isnan(g).item(), f"{name}: amax {want.amax.item()} but GEMM scale {g.item()}"


def run_all(shape, *, device, dtype=torch.bfloat16, heavy=False, seed=0, full=True) -> list[str]:
    """Every kernel variant on one input shape; returns the case names that passed."""
    x = make_input(shape, dtype, device=device, seed=seed, heavy=heavy)
    tag = f"{tuple(shape)} {dtype} {'heavy' if heavy else 'normal'}"
    done = []

    def case(name, fn, *args, **kw):
        fn(f"{name} {tag}", *args, **kw)
        done.append(name)

    cols_ok = x.dim() == 2 and x.shape[0] % 16 == 0  # columnwise blocks run along the rows (tokens)
    case("nvfp4 rowwise", check_nvfp4, x)
    if cols_ok:
        case("nvfp4 columnwise rht", check_nvfp4, x.t(), rht=True)
    if not full:
        return done
    case("nvfp4 rowwise rht", check_nvfp4, x, rht=True)
    case("nvfp4 rowwise rht custom signs", check_nvfp4, x, rht=True, rht_signs=[1, -1] * 8)
    if cols_ok:
        case("nvfp4 columnwise", check_nvfp4, x.t())
    case("nvfp4 amax given", check_nvfp4, x, amax=torch.tensor(1.5, device=device))
    if x.shape[0] % 16 == 0:
        case("nvfp4 2d 16x16", check_nvfp4, x, tile=(16, 16))
    rand = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    case("nvfp4 sr rand", check_nvfp4, x, stochastic_rounding=True, rand=rand)
    tile16 = {"HALF_LOADS": 0}  # the other load layout (one 16-wide load, a block in two threads)
    case("nvfp4 rowwise tile16", check_nvfp4, x, kernel_config=tile16)
    case("nvfp4 sr rand tile16", check_nvfp4, x, stochastic_rounding=True, rand=rand, kernel_config=tile16)
    if x.shape[0] % 16 == 0:
        case("nvfp4 2d 16x16 tile16", check_nvfp4, x, tile=(16, 16), kernel_config=dict(tile16, BLOCK_R=16))
    if cols_ok:
        case("amax configs", check_amax_configs, x)
    # several row tiles per program (the next one prefetched) and the 1-D column-fastest grid:
    # small tiles so that the shapes here take several programs and a partial last tile
    multi = {"BLOCK_R": 16, "G": 2, "ITERS": 2, "COL_FASTEST": 1}
    case("nvfp4 rowwise multi", check_nvfp4, x, kernel_config=multi)
    case("nvfp4 sr rand multi", check_nvfp4, x, stochastic_rounding=True, rand=rand, kernel_config=multi)
    case("nvfp4 rowwise tile16 multi", check_nvfp4, x, kernel_config=dict(multi, HALF_LOADS=0))
    if x.shape[0] % 16 == 0:
        case("nvfp4 2d 16x16 multi", check_nvfp4, x, tile=(16, 16), kernel_config=multi)
    if cols_ok:
        case("nvfp4 columnwise rht multi", check_nvfp4, x.t(), rht=True, kernel_config=multi)
        rand_t = torch.rand(x.t().shape, generator=torch.Generator().manual_seed(seed + 2)).to(device)
        case("nvfp4 columnwise rht sr rand", check_nvfp4, x.t(), rht=True, stochastic_rounding=True, rand=rand_t)
    if x.shape[-1] % 32 == 0:
        for ed in (torch.float8_e4m3fn, torch.float8_e5m2, "e2m1"):
            case(f"mx {ed}", check_mx, x, ed)
    for fd in (torch.float8_e4m3fn, torch.float8_e5m2):
        case(f"fp8cs {fd}", check_fp8, x, fd)
        case(f"fp8cs pow2 {fd}", check_fp8, x, fd, pow2_scale=True)
    if x.dim() == 2:
        case("fp8cs transposed", check_fp8, x.t(), torch.float8_e4m3fn)
    return done


def special_values_input(device) -> torch.Tensor:
    """64 x 128 FP32 input with zeros, -0.0, ±Inf, NaN, subnormals and huge values in separate blocks."""
    x = make_input((64, 128), torch.float32, device="cpu", seed=7)
    x[0, :32] = 0.0
    x[1, :32] = -0.0
    x[2, 3] = float("inf")
    x[3, 40] = float("-inf")
    x[4, 70] = float("nan")
    x[5, :16] = 1e-40  # FP32 subnormals
    x[6, :16] = 3e38
    x[7, :16] = torch.linspace(-6, 6, 16)
    x[16:32, 5] = -0.0  # a whole 16-token chunk of -0.0 (columnwise RHT)
    # signed zeros whose products with H's first column are all -0: the RHT sum must still be +0
    h0 = formats.hadamard_matrix()[:, 0]
    x[9, :16] = torch.where(h0 > 0, torch.tensor(-0.0), torch.tensor(0.0))
    return x.to(device)


def special_values_input_bf16(device, *, subnormals: bool = True) -> torch.Tensor:
    """``special_values_input`` in BF16, without its NaN, plus a column whose RHT hits a BF16 tie.

    A BF16 NaN is left out: torch's FP32 -> BF16 conversion on x86 makes every NaN 0xFFFF
    (negative), and the sign of a NaN after the GPU's RHT adds is the GPU's. Column 11, tokens
    32..47, holds [0.5, 23/512, 0, ...]: its transform 279 * 2^-11 rounds (tie, to even) to
    280 * 2^-11 (the worked example of docs/formats.md). ``subnormals=False`` zeroes row 5 (BF16
    subnormals): Triton 3.6's interpreter loads BF16 subnormals as wrong FP32 values (its
    BF16 -> FP32 conversion mishandles them; the GPU's is exact).
    """
    x = special_values_input("cpu")
    x[4, 70] = 0.0
    if not subnormals:
        x[5, :16] = 0.0
    x[32:48, 11] = 0.0
    x[32, 11], x[33, 11] = 0.5, 23 / 512
    return x.to(torch.bfloat16).to(device)


@triton.jit
def _round_kernel(x_ptr, like_ptr, out_ptr, N, BLOCK: tl.constexpr, HW: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    v = tl.load(x_ptr + offs, mask=m, other=0.0)
    # the dtype is read from a pointer, as load_tile_3d does with the quantizer's input
    tl.store(out_ptr + offs, round_to_input_dtype(v, like_ptr.dtype.element_ty, HW), mask=m)


@triton.jit
def _block_scale_kernel(v_ptr, code_ptr, val_ptr, N, ON_GPU: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    code, val = k_nvfp4._block_scale(tl.load(v_ptr + offs, mask=m, other=0.0), ON_GPU)
    tl.store(code_ptr + offs, code, mask=m)
    tl.store(val_ptr + offs, val, mask=m)


def block_scale_probe() -> torch.Tensor:
    """Non-negative FP32 inputs of the NVFP4 block-scale rounding: every E4M3 value, the midpoints
    between neighbours (RNE ties) and one FP32 ulp either side, random bit patterns over every
    exponent (FP32 subnormals included), values past 448, 0, +Inf and NaN."""
    e4m3 = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    mid = (e4m3[:-1] + e4m3[1:]) / 2  # exact in FP32
    bits = mid.view(torch.int32)
    g = torch.Generator().manual_seed(13)
    rand_bits = torch.randint(0, 0x7F800000, (8192,), generator=g, dtype=torch.int64).to(torch.int32)
    specials = torch.tensor([0.0, 448.0, 464.0, 464.00003, 480.0, 1e6, 3.4028234663852886e38,
                             float("inf"), float("nan"), 2.0**-10, 2.0**-10 + 2.0**-30, 2.0**-11])
    return torch.cat([e4m3, mid, (bits + 1).view(torch.float32), (bits - 1).view(torch.float32),
                      rand_bits.view(torch.float32), specials])


def check_block_scale(name: str, device) -> None:
    """``kernels.nvfp4._block_scale`` (hardware convert on the GPU, integer rounding under the
    interpreter) vs the reference's E4M3 rounding, byte and value, on ``block_scale_probe``."""
    v = block_scale_probe()
    want = e4m3_rne_satfinite(v)
    v_dev = v.to(device)
    code = torch.empty(v.numel(), dtype=torch.int32, device=device)
    val = torch.empty(v.numel(), dtype=torch.float32, device=device)
    _block_scale_kernel[(triton.cdiv(v.numel(), 1024),)](v_dev, code, val, v.numel(),
                                                          ON_GPU=v_dev.is_cuda, BLOCK=1024)
    _same(name, "byte", code.to(torch.uint8), want.view(torch.uint8))
    _same(name, "value", val, want.float())


def rounding_probe() -> torch.Tensor:
    """FP32 values for the RHT output rounding: random bit patterns (all exponents, subnormals,
    Inf/NaN), exact BF16 and FP16 ties of both parities, FP16 subnormals, overflow boundaries."""
    g = torch.Generator().manual_seed(11)
    rand_bits = torch.randint(-2**31, 2**31 - 1, (4096,), generator=g, dtype=torch.int64).to(torch.int32)
    bf16_ties = (rand_bits[:1024] & -65536) | 0x8000  # low half exactly 0x8000: halfway
    h = torch.randint(0x0400, 0x7C00, (1024,), generator=g, dtype=torch.int32).to(torch.int16)
    h = h | (torch.randint(0, 2, (1024,), generator=g, dtype=torch.int32) << 15).to(torch.int16)
    f16_ties = h.view(torch.float16).float().view(torch.int32) | 0x1000  # + half an FP16 ulp
    f16_sub = (torch.rand(1024, generator=g) * 2 - 1) * 2.0**-14
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"),
                             3.4028234663852886e38, -3.4028234663852886e38, 3.3895313892515355e38,
                             3.3961775292304611e38, 65504.0, 65519.99, 65520.0, -65520.0, 65536.0,
                             1e-45, -1e-45, 1.1754942e-38, 5.96e-8, 2.98e-8, 2.99e-8])
    return torch.cat([rand_bits.view(torch.float32), bf16_ties.view(torch.float32),
                      f16_ties.view(torch.float32), f16_sub, specials])


def check_round_to_dtype(name: str, device) -> None:
    """Kernel ``round_to_input_dtype`` vs ``formats.rht.round_to_dtype``, BF16 / FP16 / FP32."""
    x = rounding_probe()
    x_dev = x.to(device)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        out = torch.empty_like(x_dev)
        like = torch.empty(1, dtype=dtype, device=device)
        # on the GPU both: the hardware convert (the quantizer and the post-RHT amax there) and
        # the bit formula (the fused RoPE's); under the interpreter the bit formula
        for hw in ((False, True) if x_dev.is_cuda else (False,)):
            out.fill_(0.0)
            _round_kernel[(triton.cdiv(x.numel(), 1024),)](x_dev, like, out, x.numel(), BLOCK=1024, HW=hw)
            _same(f"{name} {dtype} hw={hw}", "value", out, round_to_dtype(x, dtype))


def check_scale_by_alpha(name: str, device) -> None:
    """``gemm_alpha.scale_by_alpha`` (the alpha pass of the cuBLAS path) vs torch's multiply by a
    0-d tensor and cast, the pass it replaces: the same values for BF16 / FP16 / FP32 outputs on
    ``rounding_probe`` (ties, subnormals, overflow, Inf, NaN; any NaN equals any NaN) times alphas
    that round, scale down into subnormals and overflow."""
    from nvfp4_megatron.kernels.gemm_alpha import scale_by_alpha

    x = rounding_probe()
    for a in (1.0, 0.3712345, 2.0**-20, 3.0):
        alpha = torch.tensor(a, dtype=torch.float32)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            want = (x * alpha).to(dtype)
            got = scale_by_alpha(x.to(device, copy=True), alpha.to(device), dtype)  # FP32: in place
            if dtype == torch.float32:  # the pass it replaces, on the device
                got_torch = x.to(device, copy=True).mul_(alpha.to(device))
            else:
                got_torch = torch.mul(x.to(device), alpha.to(device), out=torch.empty(x.shape, dtype=dtype, device=device))
            _same(f"{name} alpha={a} {dtype}", "value", got.float(), want.float())
            _same(f"{name} alpha={a} {dtype}", "value vs torch on the device", got.float(), got_torch.float())
