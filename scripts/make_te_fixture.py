"""Make tests/formats/data/te_reference_fixture.npz: Transformer Engine's reference quantizers on
fixed inputs, for the CPU test that checks bit-equality with TE (tests/formats/test_te_equality.py).

TE's pure-PyTorch references (``reference_nvfp4.py``, ``reference_current_scaling.py``) are loaded
from a TE source tree with small stand-ins for the TE modules they import
(``tests/formats/te_reference.py`` lists them); TE itself is not installed and nothing of it is
copied here. The fixture holds, for 4 shapes x 6 kinds (normal, one outlier, wide dynamic range,
tiny, underflow, all-zero), the FP32 input and, for the FP32 and the BF16 version of it, TE's
packed E2M1 codes, E4M3 block-scale bytes, global amax and S_enc for rowwise 1x16, 2D 16x16 and
columnwise 1x16 + RHT, and TE's FP8 current-scaling data, scale and scale_inv (E4M3 and E5M2).

oneDNN is switched off while TE's reference runs: on CPUs with AVX512-BF16 its BF16 GEMM (TE's
``x @ H`` for BF16 inputs) flushes subnormal inputs and outputs to zero, a property of that CPU
library, not of TE's reference arithmetic (IEEE BF16 matmul). With it on, only the BF16
"underflow" columnwise+RHT tensors change (every transformed value flushed to 0).

The command that made the committed fixture (TE commit d0067d0da6cb01811b8072a7d304f0e00344ce2b,
2.20.0.dev0; ``git archive`` of the two folders below is enough)::

    git clone https://github.com/NVIDIA/TransformerEngine /tmp/te_src
    git -C /tmp/te_src checkout d0067d0da6cb01811b8072a7d304f0e00344ce2b
    .venv/bin/python scripts/make_te_fixture.py --te-src /tmp/te_src

It prints the per-operand agreement with ``nvfp4_megatron.formats`` (the numbers in
docs/formats.md "Equality with Transformer Engine").
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "formats"))

import te_reference as tr  # noqa: E402

COMMAND = "python scripts/make_te_fixture.py --te-src TE_SOURCE_TREE"


def _te_version(te_src: pathlib.Path) -> tuple[str, str]:
    version_file = te_src / "build_tools" / "VERSION.txt"
    version = version_file.read_text().strip() if version_file.is_file() else "unknown"
    try:
        commit = subprocess.run(["git", "-C", str(te_src), "rev-parse", "HEAD"], check=True,
                                capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return version, commit


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--te-src", required=True, type=pathlib.Path,
                   help="Transformer Engine source tree (the directory holding transformer_engine/)")
    p.add_argument("--te-commit", default=None,
                   help="TE commit to record when --te-src is not a git checkout (e.g. a git archive)")
    p.add_argument("--out", type=pathlib.Path, default=tr.FIXTURE)
    args = p.parse_args(argv)

    te = tr.load_te_reference(args.te_src)
    version, commit = _te_version(args.te_src)
    commit = args.te_commit or commit
    arrays: dict[str, np.ndarray] = {}
    agree: dict[str, list[int]] = {}
    with torch.backends.mkldnn.flags(enabled=False):
        for cid, x_fp32 in tr.fixture_inputs().items():
            arrays[f"{cid}__x"] = x_fp32.numpy()
            for dname, dtype in tr.DTYPES.items():
                x = x_fp32.to(dtype)
                te_out = tr.run_te(te, x)
                ours = tr.run_project(x)
                for field, value in te_out.items():
                    arrays[f"{cid}__{dname}__{field}"] = value
                for op in (*tr.OPERANDS, "fp8_e4m3", "fp8_e5m2"):
                    same = not tr.differing_fields(te_out, ours, f"{op}_")
                    a = agree.setdefault(f"{dname} {op}", [0, 0])
                    a[0] += same
                    a[1] += 1
    meta = {
        "te_version": version,
        "te_commit": commit,
        "command": COMMAND,
        "torch": torch.__version__,
        "onednn": "disabled while TE's reference ran",
        "shapes": [list(s) for s in tr.SHAPES],
        "kinds": list(tr.KINDS),
        "dtypes": list(tr.DTYPES),
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes), TE {version} {commit}")
    print("all fields bit-identical with nvfp4_megatron.formats (tensors):")
    for key, (n_same, n) in agree.items():
        print(f"  {key:16s} {n_same}/{n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
