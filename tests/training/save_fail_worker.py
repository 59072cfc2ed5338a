"""Worker for test_checkpoint_atomic: a save that fails half-way leaves the previous one loadable.

Run as ``python save_fail_worker.py RUN_DIR OUT.json`` (one process, gloo).
"""

import json
import sys

import torch


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
    from nvfp4_megatron.quant.registry import build_recipe

    tensor_parallel.model_parallel_cuda_manual_seed(1)

    def make():
        model, conf, _ = build_gpt(c, build_recipe("bf16"), log=lambda s: None)
        ddp = wrap_model(model, conf, bf16=True)
        return ddp, build_optimizer(ddp, c["train"], bf16=True)

    ddp, opt = make()
    tok = torch.randint(0, 512, (2, 65), generator=torch.Generator().manual_seed(0))

    def step():
        ddp.zero_grad_buffer()
        opt.zero_grad()
        loss = ddp(tok[:, :-1], torch.arange(64)[None].expand(2, -1), None,
                   labels=tok[:, 1:]).float().mean()
        loss.backward()
        opt.step()

    meta = {"model": model_shape(c), "world_size": 1, "parallel": {}}
    kw = dict(run_dir=run_dir, ddp_model=ddp, optimizer=opt, train_state={"iteration": 0},
              meta=meta, keep_last=2)
    step()
    C.save_checkpoint(step=1, **kw)
    weights_at_1 = [p.detach().clone() for p in ddp.parameters()]
    step()
    failed = False
    try:
        C.save_checkpoint(step=2, fail_after_shards=True, **kw)
    except RuntimeError:
        failed = True
    root = C.checkpoint_root(run_dir)
    latest = C.latest_checkpoint(root).name
    tmp_left = sorted(p.name for p in root.glob(".tmp-*"))
    ddp2, opt2 = make()
    C.load_checkpoint(root / latest, ddp_model=ddp2, optimizer=opt2, meta=meta)
    reloaded_equal = all(torch.equal(a, b.detach()) for a, b in zip(weights_at_1, ddp2.parameters()))
    C.save_checkpoint(step=3, **kw)
    tmp_after = sorted(p.name for p in root.glob(".tmp-*"))
    bad_meta = {**meta, "model": {**meta["model"], "hidden_size": 32}}
    try:
        C.load_checkpoint(root / "step_0000003", ddp_model=ddp2, optimizer=opt2, meta=bad_meta)
        shape_error = ""
    except ValueError as err:
        shape_error = str(err)
    with open(out, "w") as f:
        json.dump({"failed": failed, "latest": latest, "tmp_left": tmp_left,
                   "reloaded_equal": reloaded_equal, "tmp_after": tmp_after,
                   "final": [p.name for p in C.list_checkpoints(root)],
                   "shape_error": shape_error}, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
