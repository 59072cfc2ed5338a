"""``pretrain.py``: compose the config, then plan (``dry_run=true``) or train.

Usage: ``torchrun --nproc_per_node=N pretrain.py [+recipe=NAME] [group.key=value ...]``; with one
process plain ``python pretrain.py ...`` works too. Exit codes: 0 done (or stopped cleanly by
SIGTERM/SIGUSR1 after saving), 2 bad config or input, 3 the loss diverged (NaN/Inf),
17 the test knob train.exit_after_step stopped the run.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Sequence

from nvfp4_megatron.cli.compose import ConfigError, compose_config


def _dry_run(cfg) -> None:
    if importlib.util.find_spec("nvfp4_megatron.parallel.planner") is None:
        raise NotImplementedError(
            "dry_run=true needs nvfp4_megatron.parallel.planner.run_dry_run, which is not present"
        )
    from nvfp4_megatron.parallel import planner

    if not hasattr(planner, "run_dry_run"):
        raise NotImplementedError("nvfp4_megatron.parallel.planner has no run_dry_run(cfg) yet")
    planner.run_dry_run(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = compose_config(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    if cfg.dry_run:
        _dry_run(cfg)  # launches nothing
        return 0
    from nvfp4_megatron.training.loop import SimulatedCrash, TrainingDiverged, run

    try:
        run(cfg)
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 3
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        # Bad input found after composition (layout, data path, checkpoint shape, ...).
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return 2
    except SimulatedCrash as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 17
    except RuntimeError as err:
        if "does not have a deterministic implementation" not in str(err):
            raise
        from nvfp4_megatron.platform.distributed import DETERMINISM_HINT

        print(f"error: {err}\n{DETERMINISM_HINT}", file=sys.stderr, flush=True)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
