"""One NVFP4 1x16 quantize of the 12B FFN activation (8192 x 20480 BF16, amax given), for `ncu`.

    ncu --clock-control none -k regex:_nvfp4 -c 1 python3 scripts/probe_quantize.py [--rht] [--config JSON]

``--config '{"COL_FASTEST": 1}'``: a kernel tile setting (``kernels.nvfp4.DEFAULT_CONFIG`` keys).

Needs only torch + Triton. Runs the kernel three times (the first compiles it).
"""
import json
import sys

import torch

from nvfp4_megatron.kernels import nvfp4 as k

x = torch.randn(8192, 20480, device="cuda", dtype=torch.bfloat16)
rht = "--rht" in sys.argv
cfg = json.loads(sys.argv[sys.argv.index("--config") + 1]) if "--config" in sys.argv else None
src = x.t() if rht else x
amax = src.abs().amax().float()
for _ in range(3):
    k.quantize_nvfp4(src, rht=rht, amax=amax, config=cfg)
torch.cuda.synchronize()
print("ok", rht, cfg)
