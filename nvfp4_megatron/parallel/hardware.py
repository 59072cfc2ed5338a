"""GPU peak rates and what a recipe's formats mean for compute, for the planner's estimates.

Peak numbers are **dense** tensor-core rates per GPU in TFLOP/s (vendor datasheets quote the
2:4-sparse rate for Hopper/Blackwell; dense = sparse / 2). Sources:

* H100 SXM5: NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100):
  BF16 1,979 TFLOPS and FP8 3,958 TFLOPS *with sparsity* -> 989.5 / 1,979 dense. No FP4.
* H200 SXM: NVIDIA H200 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h200): the same
  tensor cores as H100 SXM (BF16 1,979 / FP8 3,958 with sparsity) -> 989.5 / 1,979 dense. No FP4.
* B200 (HGX B200, 1,000 W): NVIDIA's GB200 NVL72 / HGX B200 technical specifications (nvidia.com
  HGX and GB200 NVL72 pages), "individual Blackwell GPU": FP4 18 PFLOPS, FP8 9 PFLOPS, BF16
  4.5 PFLOPS *with sparsity* (8 GPUs: 144 / 72 / 36) -> dense 9,000 / 4,500 / 2,250; 180 GB.
* GB200 (NVL72, 1,200 W): the same table: FP4 20, FP8 10, BF16 5 PFLOPS per GPU *with sparsity*
  (72 GPUs: 1,440 / 720 / 360) -> dense 10,000 / 5,000 / 2,500; 186 GB.

Time model (stated assumption): every GEMM class (BF16 / FP8 / FP4) runs at
``assumed_mfu`` x its dense peak; non-GEMM work and communication are folded into that
factor. Default 0.40, of the order of the 35-49 % BF16 MFU the MoE Parallel Folding paper
(arXiv 2504.14960; numbers in DESIGN.md §4) measured for Mixtral-8x22B / Qwen2-57B-A14B on H100. Formats a GPU
has no tensor cores for (FP4 or MXFP8 on Hopper) run the project's emulation: their GEMMs are
counted at the BF16 peak, which is an optimistic bound, and the planner says so.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DEFAULT_ASSUMED_MFU",
    "DEFAULT_GPU",
    "GPU_PEAKS",
    "GpuPeak",
    "RecipeCompute",
    "get_gpu",
    "recipe_compute",
    "runs_native",
]

@dataclass(frozen=True, kw_only=True)
class GpuPeak:
    """One GPU's dense tensor-core peaks (TFLOP/s), its memory, and the datasheet they are from."""

    name: str
    bf16_tflops: float
    fp8_tflops: float
    fp4_tflops: float | None = None  # None: no FP4 tensor cores
    mxfp8_native: bool = False  # block-scaled (E8M0) MX GEMMs in hardware
    memory_gib: float
    source: str

    def peak(self, gemm_class: str) -> float:
        """Dense TFLOP/s for ``bf16|fp8|fp4``; a class the GPU lacks falls to BF16 (emulation)."""
        if gemm_class == "bf16":
            return self.bf16_tflops
        if gemm_class == "fp8":
            return self.fp8_tflops
        if gemm_class == "fp4":
            return self.fp4_tflops if self.fp4_tflops is not None else self.bf16_tflops
        raise ValueError(f"gemm class {gemm_class!r}: expected bf16, fp8 or fp4")


GPU_PEAKS: dict[str, GpuPeak] = {
    g.name: g
    for g in (
        GpuPeak(name="H100", bf16_tflops=989.5, fp8_tflops=1979.0, fp4_tflops=None,
                mxfp8_native=False, memory_gib=80,
                source="NVIDIA H100 datasheet (SXM5): 1,979/3,958 TFLOPS BF16/FP8 with sparsity"),
        GpuPeak(name="H200", bf16_tflops=989.5, fp8_tflops=1979.0, fp4_tflops=None,
                mxfp8_native=False, memory_gib=141,
                source="NVIDIA H200 datasheet (SXM): 1,979/3,958 TFLOPS BF16/FP8 with sparsity"),
        GpuPeak(name="B200", bf16_tflops=2250.0, fp8_tflops=4500.0, fp4_tflops=9000.0,
                mxfp8_native=True, memory_gib=180,
                source="NVIDIA HGX B200 specs: per GPU 4.5/9/18 PFLOPS BF16/FP8/FP4 "
                       "with sparsity"),
        GpuPeak(name="GB200", bf16_tflops=2500.0, fp8_tflops=5000.0, fp4_tflops=10000.0,
                mxfp8_native=True, memory_gib=186,
                source="NVIDIA GB200 NVL72 specs: per GPU 5/10/20 PFLOPS BF16/FP8/FP4 "
                       "with sparsity"),
    )
}


DEFAULT_GPU = "B200"
DEFAULT_ASSUMED_MFU = 0.40


def get_gpu(name: str) -> GpuPeak:
    key = str(name).upper()
    if key not in GPU_PEAKS:
        raise ValueError(f"planner.gpu_type={name!r} unknown; known: {sorted(GPU_PEAKS)}")
    return GPU_PEAKS[key]


@dataclass(frozen=True, kw_only=True)
class RecipeCompute:
    """What a precision recipe means for compute and activation storage."""

    gemm_class: str  # bf16 | fp8 | fp4: which tensor-core rate its quantized GEMMs use
    act_bytes: float  # bytes per element of an activation saved for Wgrad (data + block scales)
    weight_bytes: float  # bytes per element of one quantized weight copy (0 for bf16)
    mx: bool  # block-scaled MX (E8M0) format: native only where GpuPeak.mxfp8_native


# Bytes per element of one quantized copy: the element, plus its block scale spread over the
# block. NVFP4: 4-bit code + one E4M3 scale per 16 (a 16x16 tile's scale is stored per 1x16 row);
# MXFP4 / MXFP8: 4 / 8 bit + one E8M0 per 32; FP8 per tensor: 1 B; FP8 block: 1 B + one FP32
# scale per 1x128 or 128x128 tile; e2m1_vector (Microsoft FP4): 4 bit + one FP32 per row of the
# whole reduction dimension, counted as 0.5 B.
_ELEMENT_BYTES = {"nvfp4": 0.5, "mxfp4": 0.5, "e2m1_vector": 0.5, "mxfp8": 1.0, "fp8": 1.0,
                  "fp8_block": 1.0}
_SCALE_BYTES = {"nvfp4": 1, "mxfp4": 1, "mxfp8": 1, "fp8_block": 4}
_GEMM_CLASS = {"nvfp4": "fp4", "mxfp4": "fp4", "e2m1_vector": "fp4", "mxfp8": "fp8", "fp8": "fp8",
               "fp8_block": "fp8"}
# Microsoft FP4 OCC with compensation keeps the clamped outliers (about 2 % of the elements) as
# a sparse residual for the Wgrad: a BF16 value + an int32 index, about 0.12 B per element.
OCC_RESIDUAL_BYTES = 0.12


def _copy_bytes(t) -> float:
    """Bytes per element of one copy quantized as ``t`` (a ``quant.recipe.TensorQuant``)."""
    if not t.is_quantized:
        return 2.0
    if t.format not in _SCALE_BYTES or t.tile is None:
        return _ELEMENT_BYTES[t.format]
    block = t.tile[0] * t.tile[1] if t.format == "fp8_block" else t.tile[1]
    return _ELEMENT_BYTES[t.format] + _SCALE_BYTES[t.format] / block


def recipe_compute(recipe) -> RecipeCompute:
    """What ``recipe`` (a ``quant.recipe.PrecisionRecipe``) means for compute and storage, read
    from its properties (not its name): the class of its Fprop GEMM, the bytes of the activation
    copy saved for Wgrad (plus OCC's residual) and of the Fprop weight copy.

    Microsoft FP4 (``e2m1_vector``): class ``fp4`` from its Fprop; the backward multiplies FP8
    gradients by the FP4 copies, which Blackwell's mixed FP8 x FP4 MMA runs at the FP8 rate, so
    the planner's one class overstates the backward's speed by up to 2x.
    """
    lin = recipe.linear
    if not lin.is_quantized:
        return RecipeCompute(gemm_class="bf16", act_bytes=2.0, weight_bytes=0.0, mx=False)
    # the class of the first quantized GEMM (Fprop, else Dgrad: nvfp4_bwd_only); one class per
    # recipe overstates the speed of a recipe whose other GEMMs run in BF16 (nvfp4_fwd_only /
    # _bwd_only)
    first = next(t for t in (lin.fprop.input, lin.dgrad.grad_output, lin.wgrad.grad_output)
                 if t.is_quantized)
    # the copy of X saved for Wgrad: its Wgrad quantization, or BF16 for a BF16 Wgrad
    act = _copy_bytes(lin.wgrad.input)
    if lin.msfp4 is not None and lin.msfp4.occ and lin.msfp4.occ_compensate:
        act += OCC_RESIDUAL_BYTES
    # one quantized weight copy: Fprop's, else Dgrad's (nvfp4_bwd_only), none when both are BF16
    weight = next((w for w in (lin.fprop.weight, lin.dgrad.weight) if w.is_quantized), None)
    return RecipeCompute(gemm_class=_GEMM_CLASS[first.format], act_bytes=act,
                         weight_bytes=0.0 if weight is None else _copy_bytes(weight),
                         mx=first.format in ("mxfp8", "mxfp4"))


def runs_native(gpu: GpuPeak, rc: RecipeCompute) -> bool:
    """Whether the recipe's quantized GEMMs have tensor cores on ``gpu`` (DESIGN.md hardware facts)."""
    if rc.gemm_class == "fp4":
        return gpu.fp4_tflops is not None
    if rc.mx:
        return gpu.mxfp8_native
    return True
