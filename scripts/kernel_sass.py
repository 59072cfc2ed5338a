"""What the NVFP4 quantizer's launch modes compile to on sm_90, without a GPU.

For each mode (1x16 RNE, 16x16, SR, columnwise+RHT, columnwise+RHT+SR, columnwise without RHT) the
launch's own tile setting (``kernels.nvfp4.kernel_config``, or ``--config`` over the base) is
compiled with the operand alignment Triton specialises on at run time, and the SASS instruction
count (total and per element of a thread), registers, local (spill) and shared memory, and the
global/shared memory, barrier and shuffle instructions are printed (``--json`` writes them). A
kernel change can be compared before/after on the CPU.

    .venv/bin/python scripts/kernel_sass.py [--config '{"BLOCK_R": 4, "G": 32, "ITERS": 16}'] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nvfp4_megatron.kernels import nvfp4 as k  # noqa: E402
from nvfp4_megatron.kernels.sm90 import compile_nvfp4_launch, sass_summary  # noqa: E402

# name: (tile, rht, sr, unit-stride input)
MODES = {
    "1x16": ((1, 16), False, False, True),
    "16x16": ((16, 16), False, False, True),
    "sr": ((1, 16), False, True, True),
    "col+rht": ((1, 16), True, False, False),
    "col+rht+sr": ((1, 16), True, True, False),
    "col": ((1, 16), False, False, False),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="tile setting over the base DEFAULT_CONFIG (JSON), for every mode")
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    ap.add_argument("--json", type=Path, help="write the summaries here")
    args = ap.parse_args(argv)
    config = json.loads(args.config) if args.config else None
    out = {}
    for name in args.modes:
        tile, rht, sr, unit = MODES[name]
        if config is not None and tile[0] != 1 and dict(k.DEFAULT_CONFIG, **config)["BLOCK_R"] != tile[0]:
            print(f"{name:11s} skipped: 16x16 tiles need BLOCK_R = {tile[0]}")
            continue
        label, kernel = compile_nvfp4_launch(tile=tile, rht=rht, sr=sr, unit_stride=unit, config=config)
        s = sass_summary(kernel)
        cfg = k.kernel_config(tile=tile, rht=rht, sr=sr, unit_stride=unit, config=config)
        per_thread = cfg["BLOCK_R"] * cfg["G"] * 16 * cfg["ITERS"] // (32 * cfg["num_warps"])
        s["instructions_per_element"] = round(s["instructions"] / per_thread, 2)
        out[name] = dict(s, setting=label)
        print(f"{name:11s} {label:38s} instr={s['instructions']:5d} ({s['instructions_per_element']:5.2f}/elem) "
              f"regs={s['registers']:3d} local={s['local_bytes']} smem={s['shared_bytes']:5d} {s['ops']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
