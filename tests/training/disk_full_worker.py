"""Worker for test_checkpoint_safety: saves that hit a full disk (simulated) fail with a message
naming the directory, the cause and the intact checkpoint, and leave that checkpoint as it was.

Run as ``python disk_full_worker.py RUN_DIR OUT.json`` (one process, gloo).
"""

import errno
import json
import os
import sys
from unittest import mock

import torch

from _train_launch import tree_hash  # this directory is sys.path[0] when run as a script




def main() -> None:
    run_dir, out = sys.argv[1], sys.argv[2]
    from nvfp4_megatron.cli.compose import compose_config, to_plain
    from nvfp4_megatron.runtime.distributed import init_distributed, initialize_model_parallel
    from nvfp4_megatron.training import checkpoint as C
    from nvfp4_megatron.training.model import build_gpt, model_shape, wrap_model
    from nvfp4_megatron.training.optim import build_optimizer

    c = to_plain(compose_config(["+recipe=bf16_tiny"]))
    init_distributed()
    initialize_model_parallel()
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from nvfp4_megatron.quant.registry import build_recipe

    tensor_parallel.model_parallel_cuda_manual_seed(1)
    model, conf, _ = build_gpt(c, build_recipe("bf16"), log=lambda s: None)
    ddp = wrap_model(model, conf, bf16=True)
    opt = build_optimizer(ddp, c["train"], bf16=True)
    tok = torch.randint(0, 512, (2, 65), generator=torch.Generator().manual_seed(0))
    ddp.zero_grad_buffer()
    ddp(tok[:, :-1], torch.arange(64)[None].expand(2, -1), None,
        labels=tok[:, 1:]).float().mean().backward()
    opt.step()  # Megatron's optimizer has state to save only after a step
    meta = {"model": model_shape(c), "world_size": 1, "parallel": {}}
    kw = dict(run_dir=run_dir, ddp_model=ddp, optimizer=opt, train_state={"iteration": 0},
              meta=meta, keep_last=2)
    C.save_checkpoint(step=1, **kw)
    root = C.checkpoint_root(run_dir)
    before = tree_hash(root / "step_0000001")

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    errors = {}
    # 1. Megatron's shard writer hits ENOSPC on a file system with 0 bytes left: Megatron turns
    #    the OSError into "Worker failure ... <class 'OSError'>" (errno lost), so the free space
    #    is what identifies a full disk (as on a real full tmpfs: see test_real_full_disk)
    with mock.patch.object(filesystem_async, "_write_item", enospc), \
            mock.patch.object(C, "_free_bytes", lambda path: 0):
        try:
            C.save_checkpoint(step=2, **kw)
        except C.CheckpointSaveError as err:
            errors["writer"] = str(err)
    # 2. our own write (the manifest) hits ENOSPC: the errno itself says so, whatever is free
    with mock.patch.object(C, "_write_manifest", enospc):
        try:
            C.save_checkpoint(step=3, **kw)
        except C.CheckpointSaveError as err:
            errors["manifest"] = str(err)
    with open(out, "w") as f:
        json.dump({"errors": errors, "unchanged": tree_hash(root / "step_0000001") == before,
                   "intact": C.verify_checkpoint(root / "step_0000001") is None,
                   "checkpoints": [p.name for p in C.list_checkpoints(root)],
                   "tmp": sorted(p.name for p in root.glob(".tmp-*")),
                   "root": str(root)}, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
