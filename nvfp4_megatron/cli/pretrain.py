"""``pretrain.py``: compose the config, then plan (``dry_run=true``) or train.

Usage: ``torchrun --nproc_per_node=N pretrain.py [+recipe=NAME] [group.key=value ...]``; with one
process plain ``python pretrain.py ...`` works too. Exit codes: 0 done (or stopped cleanly by
SIGTERM/SIGUSR1 after saving), 2 bad config or input, 3 the loss diverged (NaN/Inf),
17 the test knob train.exit_after_step stopped the run.

Hydra's inspection flags work as with ``@hydra.main`` and exit 0 without training or writing
anything: ``--help`` (usage: groups, recipes, examples), ``--cfg job`` (the composed, validated
config as YAML; ``--package KEY`` for a part, ``--resolve``), ``--info [all|config|defaults|
searchpath]`` (config search path, group choices, defaults list, config). Any other flag exits 2.
"""

from __future__ import annotations

import sys
from typing import Sequence

from nvfp4_megatron.cli.compose import (ConfigError, compose_config, composition_info,
                                        group_options, known_recipes)

INFO_CHOICES = ("all", "config", "defaults", "searchpath")
CFG_CHOICES = ("job", "all", "hydra")
SUPPORTED_FLAGS = "--help/-h, --cfg/-c job|all, --package/-p KEY, --resolve, --info/-i [" + \
    "|".join(INFO_CHOICES) + "], --multirun/-m [--nproc N]"


class UsageError(ValueError):
    """A command-line flag that is unknown or misused (exit 2)."""


def usage() -> str:
    groups = "\n".join(f"  {g:<10} {', '.join(opts)}" for g, opts in group_options().items())
    recipes = "\n".join(f"  {r}" for r in known_recipes())
    return f"""usage: pretrain.py [FLAG] [+recipe=NAME] [group=option] [group.key=value ...]
       torchrun --standalone --nproc_per_node=N pretrain.py [+recipe=NAME] [key=value ...]

Composes configs/config.yaml + the typed schemas (nvfp4_megatron/cli/schema.py) + the recipe +
the overrides, checks every key and value (exit 2 naming each problem, before anything is
written), then trains, or with dry_run=true world_size=N plans without launching anything.

Config groups (configs/<group>/*.yaml; select with group=option):
{groups}
  planner    (no files) planner.gpu_type, planner.assumed_mfu

Recipes (recipes/*.yaml; select with +recipe=NAME):
{recipes}

Top-level keys: dry_run=true|false, world_size=N, run_dir=DIR (default runs/<UTC timestamp>;
Hydra's hydra.run.dir is not used and is refused).
'+' adds nothing new here: an unknown key is refused with or without it.

Flags (exit 0 without training):
  --help, -h                  this text
  --cfg job, -c job           print the composed, validated config as YAML ('all' is the same;
                              there is no Hydra config: no @hydra.main)
    --package KEY, -p KEY     only that part of it (e.g. --package train)
    --resolve                 resolve interpolations
  --info [all|config|defaults|searchpath], -i
                              config search path, group choices, defaults list, config

Sweeps (Hydra multirun; one job per combination, one after another, each in RUN_DIR/<swept
overrides>; run the same command again to skip finished jobs and resume the others):
  --multirun, -m              expand a,b / choice(a,b) / range(a,b) values into jobs
    --nproc N                 each job under torchrun --standalone --nproc_per_node=N (default 1)
  run_dir=DIR                 the sweep directory (default multirun/<UTC date>/<UTC time>)

Examples:
  python pretrain.py +recipe=nvfp4_tiny
  torchrun --standalone --nproc_per_node=2 pretrain.py +recipe=nvfp4_tiny train.train_iters=50
  python pretrain.py +recipe=nvfp4_12b dry_run=true world_size=1024
  python pretrain.py model=small precision=nvfp4 train.lr=3e-4 run_dir=runs/try1
  python pretrain.py +recipe=nvfp4_tiny --cfg job --package train
  python pretrain.py -m +recipe=nvfp4_tiny precision.recipe=bf16,nvfp4 train.seed=1,2 run_dir=runs/sw

Exit codes: 0 done, 2 bad config or input, 3 loss diverged, 17 train.exit_after_step.
"""


def parse_flags(argv: Sequence[str]) -> tuple[dict, list[str]]:
    """Split Hydra-style flags from overrides: ``({"help"|"cfg"|"info"|"package"|"resolve": ...},
    overrides)``. Raises :class:`UsageError` for an unknown or incomplete flag."""
    flags: dict = {}
    overrides: list[str] = []
    args = list(argv)
    i = 0

    def value_of(flag: str, inline: str | None, choices=None, default=None) -> str:
        nonlocal i
        if inline is not None:
            val = inline
        elif i + 1 < len(args) and (args[i + 1] in (choices or ()) or not args[i + 1].startswith(
                "-") and (default is None and choices is None or "=" not in args[i + 1])):
            # the next word is this flag's value unless it is an override (key=value) that an
            # optional value (--info) should leave alone
            i += 1
            val = args[i]
        elif default is not None:
            return default
        else:
            raise UsageError(f"{flag} needs a value"
                             + (f": one of {list(choices)}" if choices else ""))
        if choices is not None and val not in choices:
            raise UsageError(f"{flag} {val!r}: choose one of {list(choices)}")
        return val

    while i < len(args):
        arg = args[i]
        if not arg.startswith("-"):
            overrides.append(arg)
            i += 1
            continue
        name, eq, inline = arg.partition("=")
        inline = inline if eq else None
        if name in ("-h", "--help"):
            flags["help"] = True
        elif name in ("-c", "--cfg"):
            flags["cfg"] = value_of(name, inline, CFG_CHOICES)
        elif name in ("-p", "--package"):
            flags["package"] = value_of(name, inline)
        elif name == "--resolve":
            flags["resolve"] = True
        elif name in ("-i", "--info"):
            flags["info"] = value_of(name, inline, INFO_CHOICES, default="all")
        elif name in ("-m", "--multirun"):
            if inline is not None:
                raise UsageError(f"{arg}: -m/--multirun takes no value")
            flags["multirun"] = True
        elif name == "--nproc":
            val = value_of(name, inline)
            if not val.isdigit() or int(val) < 1:
                raise UsageError(f"--nproc {val!r}: a number of processes per job >= 1")
            flags["nproc"] = int(val)
        elif name in ("-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir"):
            raise UsageError(f"{arg}: the config is always configs/config.yaml; pick a recipe with "
                             f"+recipe=NAME (see --help)")
        else:
            raise UsageError(f"unknown flag {arg!r}; supported flags: {SUPPORTED_FLAGS}")
        i += 1
    if ("package" in flags or "resolve" in flags) and "cfg" not in flags:
        raise UsageError("--package and --resolve go with --cfg job")
    if "nproc" in flags and "multirun" not in flags:
        raise UsageError("--nproc goes with -m/--multirun (a single run is started by torchrun "
                         "--nproc_per_node=N)")
    if "multirun" in flags and {"cfg", "info"} & set(flags):
        raise UsageError("-m/--multirun cannot be combined with --cfg or --info")
    return flags, overrides


def _print_cfg(cfg, flags: dict) -> int:
    from omegaconf import Container, OmegaConf

    if flags["cfg"] == "hydra":
        print("error: --cfg hydra: there is no Hydra config here (pretrain.py uses Hydra's compose "
              "API, not @hydra.main); use --cfg job", file=sys.stderr, flush=True)
        return 2
    node = cfg
    pkg = flags.get("package")
    if pkg not in (None, "_global_"):
        node = OmegaConf.select(cfg, pkg)
        if node is None:
            print(f"error: --package {pkg!r} not found in the config", file=sys.stderr, flush=True)
            return 2
    if isinstance(node, Container):
        print(OmegaConf.to_yaml(node, resolve=bool(flags.get("resolve"))), end="")
    else:
        print(node)
    return 0


def _print_info(cfg, overrides: list[str], what: str) -> int:
    from omegaconf import OmegaConf

    info = composition_info(overrides)
    out = []
    if what in ("all", "config", "searchpath"):
        out.append("Config search path\n------------------")
        out += [f"  {prov:<8} {path}" for prov, path in info["searchpath"]]
        out.append("")
    if what in ("all", "config", "defaults"):
        out.append("Group choices\n-------------")
        out += [f"  {g}: {opt}" for g, opt in info["choices"].items()]
        out.append("\nDefaults list (in merge order; later wins, then the overrides)\n"
                   "--------------------------------------------------------------")
        out += [f"  {path or '(schema)':<28} package={pkg or '_global_':<10} parent={parent}"
                for path, pkg, parent in info["defaults"]]
        out.append(f"\nOverrides: {overrides}\n")
    if what in ("all", "config"):
        out.append("Config\n------")
        out.append(OmegaConf.to_yaml(cfg))
    print("\n".join(out), end="" if out[-1].endswith("\n") else "\n")
    return 0


def _multirun(overrides: list[str], nproc: int) -> int:
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print("error: -m/--multirun starts its own processes; run it with plain python "
              "(--nproc N runs each job under torchrun with N processes)", file=sys.stderr,
              flush=True)
        return 2
    from nvfp4_megatron.cli.sweep import run_sweep

    try:
        return run_sweep(overrides, nproc=nproc)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # before megatron.core is imported (training.loop): its import-time warnings, once, on rank 0
    from nvfp4_megatron.runtime.warnings_filter import install_warning_filters

    install_warning_filters(argv)
    try:
        flags, overrides = parse_flags(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    if flags.get("help"):
        print(usage(), end="")
        return 0
    if flags.get("multirun"):
        return _multirun(overrides, flags.get("nproc", 1))
    try:
        cfg = compose_config(overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    if "cfg" in flags:
        return _print_cfg(cfg, flags)
    if "info" in flags:
        return _print_info(cfg, overrides, flags["info"])
    if cfg.dry_run:
        from nvfp4_megatron.parallel.planner import run_dry_run

        run_dry_run(cfg)  # launches nothing
        return 0
    from nvfp4_megatron.training.checkpoint import CheckpointSaveError
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
    except CheckpointSaveError as err:  # names the directory, the cause, the intact checkpoint
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 4
    except RuntimeError as err:
        if "does not have a deterministic implementation" not in str(err):
            raise
        from nvfp4_megatron.runtime.distributed import DETERMINISM_HINT

        print(f"error: {err}\n{DETERMINISM_HINT}", file=sys.stderr, flush=True)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
