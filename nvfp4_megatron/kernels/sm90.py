"""Compile a Triton kernel for sm_90 (Hopper) on a machine without a GPU, and read its SASS.

Used by the compile tests (``tests/kernels/test_compile_sm90.py``) and by
``scripts/kernel_sass.py``, which reports what the quantizer's launches compile to (instruction
counts, memory instructions, shared memory, barriers) so a kernel change can be checked on the CPU
before any device time is spent on it.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

TARGET = GPUTarget("cuda", 90, 32)
# memory and synchronisation instructions counted by sass_summary
_MEM_OPS = re.compile(r"\b((?:STG|LDG)\.E[\.\w]*|STS[\.\w]*|LDS[\.\w]*|BAR\.SYNC[\.\w]*|SHFL[\.\w]*)")
_INSTR = re.compile(r"^\s+/\*[0-9a-f]{4}\*/\s+(.*?)\s*;")


def compile_sm90(fn, types: dict, constexprs: dict, num_warps: int = 4, divisible_by_16=()):
    """``fn`` compiled for sm_90. ``types``: pointer/scalar types by argument name (others i32);
    ``constexprs`` (may hold the launch's ``num_warps``); ``divisible_by_16``: arguments the launch
    specialises as multiples of 16 (as Triton does at run time for aligned pointers and sizes),
    which is what lets it vectorise loads and stores."""
    constexprs = dict(constexprs)
    num_warps = constexprs.pop("num_warps", num_warps)
    sig = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible_by_16}
    src = triton.compiler.ASTSource(fn, sig, constexprs, attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": num_warps})


_NVFP4_TYPES = {"x_ptr": "*bf16", "h_ptr": "*fp32", "amax_ptr": "*fp32", "rand_ptr": "*fp32",
                "seed_ptr": "*i32", "data_ptr": "*u8", "scale_ptr": "*u8", "gscale_ptr": "*fp32"}


def compile_nvfp4_launch(*, tile: tuple[int, int], rht: bool, sr: bool, unit_stride: bool,
                         config: dict | None = None, rand_tensor: bool = False):
    """(setting label, kernel): ``_nvfp4_kernel`` for BF16 input with the tile setting the launch
    would use (``kernel_config``; ``config`` over the base as in ``quantize_nvfp4``), aligned as
    at run time: unit-stride input (``stride_c = 1``) or a transposed view (``stride_r = 1``)."""
    from nvfp4_megatron.kernels import nvfp4 as k

    cfg = k.kernel_config(tile=tile, rht=rht, sr=sr, unit_stride=unit_stride, config=config)
    half = bool(cfg["HALF_LOADS"]) and not rht and unit_stride
    cx = dict(cfg, HALF_LOADS=half, COL_FASTEST=bool(cfg["COL_FASTEST"]), TILE_R=tile[0], RHT=rht,
              SR=sr, RAND_TENSOR=rand_tensor, ON_GPU=True)
    cx["stride_c" if unit_stride else "stride_r"] = 1
    div = [*_NVFP4_TYPES, "R", "C", "stride_r" if unit_stride else "stride_c"]
    label = (f"[{cfg['BLOCK_R']}x{cfg['G'] * 16} w{cfg['num_warps']} x{cfg['ITERS']}"
             f"{' half-loads' if half else ''}{' col-fastest' if cfg['COL_FASTEST'] else ''}]")
    return label, compile_sm90(k._nvfp4_kernel, _NVFP4_TYPES, cx, divisible_by_16=div)


def cuobjdump() -> Path:
    """The ``cuobjdump`` that ships with Triton's NVIDIA backend."""
    import triton.backends.nvidia as nv

    path = Path(nv.__file__).parent / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: this Triton wheel ships no cuobjdump")
    return path


def _cuobjdump(kernel, flag: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        return subprocess.run([str(cuobjdump()), flag, str(cubin)], capture_output=True, text=True,
                              check=True).stdout


def sass_lines(kernel) -> list[str]:
    """The kernel's SASS instructions, one string each (addresses and encodings dropped)."""
    return [m.group(1) for line in _cuobjdump(kernel, "-sass").splitlines() if (m := _INSTR.match(line))]


def sass_summary(kernel) -> dict:
    """Instruction count, registers per thread, local-memory (spill) bytes, shared memory bytes,
    and the count of each memory/barrier/shuffle instruction."""
    lines = sass_lines(kernel)
    ops = Counter(m.group(1) for line in lines for m in [_MEM_OPS.search(line)] if m)
    usage = dict(re.findall(r"(REG|LOCAL):(\d+)", _cuobjdump(kernel, "-res-usage")))
    return {"instructions": len(lines), "registers": int(usage["REG"]), "local_bytes": int(usage["LOCAL"]),
            "shared_bytes": kernel.metadata.shared, "ops": dict(sorted(ops.items()))}
