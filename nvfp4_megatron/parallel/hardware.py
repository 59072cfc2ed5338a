"""GPU peak rates and the precision class of each recipe, for the planner's time estimates.

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
]

DEFAULT_GPU = "B200"
DEFAULT_ASSUMED_MFU = 0.40


@dataclass(frozen=True, kw_only=True)
class GpuPeak:
    name: str
    bf16_tflops: float
    fp8_tflops: float
    fp4_tflops: float | None  # None: no FP4 tensor cores
    mxfp8_native: bool  # block-scaled (E8M0) MX GEMMs in hardware
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


# Storage per element: NVFP4 = 4-bit code + one E4M3 scale per 16; MXFP4 = 4 bit + E8M0 per 32;
# MXFP8 = 8 bit + E8M0 per 32; FP8 block = 8 bit + FP32 scale per 128 (1x128 activation tiles).
_NVFP4 = RecipeCompute(gemm_class="fp4", act_bytes=0.5 + 1 / 16, weight_bytes=0.5 + 1 / 16, mx=False)
_RECIPES: dict[str, RecipeCompute] = {
    "bf16": RecipeCompute(gemm_class="bf16", act_bytes=2.0, weight_bytes=0.0, mx=False),
    "fp8_cs": RecipeCompute(gemm_class="fp8", act_bytes=1.0, weight_bytes=1.0, mx=False),
    "fp8_block": RecipeCompute(gemm_class="fp8", act_bytes=1.0 + 4 / 128, weight_bytes=1.0 + 4 / 16384,
                               mx=False),
    "mxfp8": RecipeCompute(gemm_class="fp8", act_bytes=1.0 + 1 / 32, weight_bytes=1.0 + 1 / 32, mx=True),
    "mxfp4": RecipeCompute(gemm_class="fp4", act_bytes=0.5 + 1 / 32, weight_bytes=0.5 + 1 / 32, mx=True),
    "nvfp4": _NVFP4,
    "nvfp4_no_rht": _NVFP4,
    "nvfp4_no_sr": _NVFP4,
    "nvfp4_no_2d": _NVFP4,
    "nvfp4_all_layers": _NVFP4,
    # One GEMM class per recipe: "fp4" overstates the speed of these two (one of the three GEMMs /
    # two of the three run in BF16). fwd_only saves X in BF16 for its BF16 Wgrad and keeps one
    # NVFP4 weight copy (Fprop); bwd_only saves X's NVFP4 Wgrad copy and the Dgrad weight copy.
    "nvfp4_fwd_only": RecipeCompute(gemm_class="fp4", act_bytes=2.0, weight_bytes=0.5 + 1 / 16,
                                    mx=False),
    "nvfp4_bwd_only": _NVFP4,
    # Microsoft FP4 (msfp4*, fp4_direct): E2M1 with one FP32 scale per token / channel (≈ 0.5 B),
    # the saved Wgrad activation is the Fprop copy plus, with OCC, its ≈ 2 % sparse residual
    # (BF16 value + int32 index ≈ 0.12 B per element). Class "fp4": its Fprop; the backward
    # multiplies FP8 gradients by the FP4 copies, which Blackwell's mixed FP8 x FP4 MMA runs at
    # the FP8 rate, so the planner's one class overstates the backward's speed by up to 2x.
    "msfp4": RecipeCompute(gemm_class="fp4", act_bytes=0.5 + 0.12, weight_bytes=0.5, mx=False),
    "msfp4_no_dge": RecipeCompute(gemm_class="fp4", act_bytes=0.5 + 0.12, weight_bytes=0.5,
                                  mx=False),
    "msfp4_no_occ": RecipeCompute(gemm_class="fp4", act_bytes=0.5, weight_bytes=0.5, mx=False),
    "fp4_direct": RecipeCompute(gemm_class="fp4", act_bytes=0.5, weight_bytes=0.5, mx=False),
}


def recipe_compute(name: str) -> RecipeCompute:
    if name not in _RECIPES:
        raise ValueError(
            f"precision.recipe={name!r} has no compute class in the planner; known: "
            f"{sorted(_RECIPES)} (add it to nvfp4_megatron/parallel/hardware.py)"
        )
    return _RECIPES[name]


def runs_native(gpu: GpuPeak, rc: RecipeCompute) -> bool:
    """Whether the recipe's quantized GEMMs have tensor cores on ``gpu`` (DESIGN.md hardware facts)."""
    if rc.gemm_class == "fp4":
        return gpu.fp4_tflops is not None
    if rc.mx:
        return gpu.mxfp8_native
    return True
