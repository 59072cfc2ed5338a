"""Compose the run config with Hydra's compose API and turn composition errors into actionable ones.

``compose_config(overrides)`` = ``configs/config.yaml`` + the groups' typed schemas
(:mod:`nvfp4_megatron.cli.schema`) + ``+recipe=NAME`` (``configs/recipe`` links to ``recipes/``)
+ the command-line overrides, in that order. The result is read-only.

Why the compose API instead of ``@hydra.main``: under ``torchrun`` every rank runs the entry point,
and ``@hydra.main`` would make each rank create (and write) its own timestamped output directory.
Here nothing is written at composition; the training code picks one run directory on rank 0,
broadcasts it, and only rank 0 writes the resolved config into it.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from nvfp4_megatron.cli import schema
from nvfp4_megatron.training.config import to_plain

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
RECIPE_DIR = Path(__file__).resolve().parents[2] / "recipes"


class ConfigError(ValueError):
    """A config that cannot be composed; the message says what is valid."""


def known_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def _schema_at(path: Sequence[str]):
    """The dataclass type reached by following ``path`` from the root schema (or None)."""
    node = schema.Config
    for part in path:
        if not dataclasses.is_dataclass(node):
            return None
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            return None
        hints = typing.get_type_hints(node)
        node = hints[part]
    return node


def _describe_valid(full_key: str) -> str | None:
    parts = full_key.split(".")
    parent = _schema_at(parts[:-1])
    if parent is None or not dataclasses.is_dataclass(parent):
        return None
    hints = typing.get_type_hints(parent)
    if parts[-1] in hints:
        t = hints[parts[-1]]
        if isinstance(t, type) and issubclass(t, enum.Enum):
            return f"valid values for {full_key}: {[m.name for m in t]}"
        return None
    where = ".".join(parts[:-1]) or "the top level"
    names = [f.name for f in dataclasses.fields(parent)]
    return f"unknown key {parts[-1]!r} in {where}; valid keys: {names}"


def _full_key(exc: BaseException) -> str | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        key = getattr(exc, "full_key", None)
        if key:
            return str(key)
        exc = exc.__cause__ or exc.__context__
    return None


def _check_recipe(overrides: Sequence[str]) -> None:
    for ov in overrides:
        key, _, value = ov.partition("=")
        if key.lstrip("+~") == "recipe":
            if value not in known_recipes():
                raise ConfigError(
                    f"unknown recipe {value!r}; known recipes (recipes/*.yaml): {known_recipes()}"
                )


def _override_key(ov: str) -> tuple[str, str]:
    """``("+", "train.lrr")`` for ``+train.lrr=1``: the prefix (``+``/``++``/``~``/"") and key."""
    key = ov.partition("=")[0].strip()
    stripped = key.lstrip("+~")
    return key[: len(key) - len(stripped)], stripped


def _check_hydra_overrides(overrides: Sequence[str]) -> None:
    """Refuse ``hydra.*`` / ``hydra/...`` overrides: without ``@hydra.main`` they would do nothing.

    ``hydra.run.dir`` is refused rather than mapped to ``run_dir``: its usual value is an
    interpolation such as ``outputs/${now:%Y-%m-%d_%H-%M-%S}`` that every rank under torchrun would
    resolve on its own (ranks could disagree by a second), while ``run_dir`` is chosen once on
    rank 0 and broadcast; and Hydra would also chdir and write ``.hydra/`` there, which this entry
    point does not do. One name for one setting, with the semantics it really has.
    """
    for ov in overrides:
        _, key = _override_key(ov)
        if key in ("hydra.run.dir", "hydra.sweep.dir"):
            value = ov.partition("=")[2]
            raise ConfigError(
                f"{key} is not used here: pretrain.py composes with Hydra's compose API (no "
                f"@hydra.main, so no Hydra output directory); set run_dir={value or 'DIR'} "
                f"instead (default: runs/<UTC timestamp>)")
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            raise ConfigError(
                f"{ov!r}: Hydra's own settings (hydra.*, hydra/...) have no effect here "
                f"(pretrain.py uses Hydra's compose API, not @hydra.main); the run directory is "
                f"run_dir=DIR; see pretrain.py --help")


def _unknown_keys(cfg: DictConfig, node: type = schema.Config, prefix: str = "") -> list[str]:
    """Dotted keys in ``cfg`` that the schema does not declare (``+key=`` adds them unchecked)."""
    names = {f.name for f in dataclasses.fields(node)}
    hints = typing.get_type_hints(node)
    out = []
    for key in cfg.keys():
        full = f"{prefix}{key}"
        if key not in names:
            out.append(full)
        elif dataclasses.is_dataclass(hints[key]) and isinstance(cfg[key], DictConfig):
            out += _unknown_keys(cfg[key], hints[key], full + ".")
    return out


def _refuse_unknown_keys(cfg: DictConfig, overrides: Sequence[str]) -> None:
    unknown = _unknown_keys(cfg)
    if not unknown:
        return
    lines = []
    for key in unknown:
        added = [ov for ov in overrides if _override_key(ov)[1] == key
                 or _override_key(ov)[1].startswith(key + ".")]
        how = (f" (added by {added[0]!r}: '+' adds a key, it does not make one valid)"
               if added else "")
        lines.append(f"invalid config: key {key!r} is not in the schema{how}\n"
                     f"{_describe_valid(key)}")
    raise ConfigError("\n".join(lines))


def validate_config(cfg: DictConfig) -> None:
    """Ranges of every numeric field and the non-layout cross-field rules, all problems at once."""
    problems = schema.validate(to_plain(cfg))
    if problems:
        raise ConfigError(
            f"{len(problems)} invalid config value(s) (nothing was written):\n  "
            + "\n  ".join(problems))


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose and validate; raises ConfigError naming the bad key/value and what is valid.

    Checks, in order: recipe names, ``hydra.*`` overrides (refused), composition (types, enum
    values, unknown keys without ``+``), unknown keys added with ``+``, then every numeric range
    and cross-field rule (:func:`nvfp4_megatron.cli.schema.validate`). Nothing is written.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = list(overrides)
    _check_recipe(overrides)
    _check_hydra_overrides(overrides)
    schema.register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
    except Exception as exc:  # Hydra/OmegaConf raise many types; all mean "bad config"
        key = _full_key(exc)
        hint = _describe_valid(key) if key else None
        msg = f"invalid config: {exc}"
        if exc.__cause__ is not None and str(exc.__cause__) not in msg:
            msg += f"\n{exc.__cause__}"
        if hint:
            msg += f"\n{hint}"
        raise ConfigError(msg) from exc
    finally:
        GlobalHydra.instance().clear()
    _refuse_unknown_keys(cfg, overrides)
    validate_config(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def group_options() -> dict[str, list[str]]:
    """``{group: [option, ...]}`` from ``configs/<group>/*.yaml`` (``recipe`` excluded)."""
    return {d.name: sorted(p.stem for p in d.glob("*.yaml"))
            for d in sorted(CONFIG_DIR.iterdir()) if d.is_dir() and d.name != "recipe"}


def composition_info(overrides: Sequence[str] = ()) -> dict:
    """What ``--info`` prints: Hydra's config search path, the group choices and the defaults list.

    Call :func:`compose_config` first (it validates the overrides); this composes once more with
    Hydra's config for its runtime fields. Hydra's own ``hydra/*`` defaults are left out: they are
    composed but unused here (no ``@hydra.main``).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    overrides = list(overrides)
    schema.register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            hcfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
            defaults = GlobalHydra.instance().config_loader().compute_defaults_list(
                config_name="config", overrides=overrides, run_mode=RunMode.RUN)
    finally:
        GlobalHydra.instance().clear()
    return {
        "searchpath": [(sp.provider, f"{sp.schema}://{sp.path}")
                       for sp in hcfg.hydra.runtime.config_sources if sp.provider != "hydra"],
        "choices": {k: v for k, v in hcfg.hydra.runtime.choices.items()
                    if not k.startswith("hydra/")},
        "defaults": [(d.config_path, d.package or "", d.parent or "")
                     for d in defaults.defaults
                     if not (d.config_path or "").startswith("hydra/")],
    }
