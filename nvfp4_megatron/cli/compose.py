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


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose and validate; raises ConfigError naming the bad key/value and what is valid."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = list(overrides)
    _check_recipe(overrides)
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
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_plain(cfg: DictConfig) -> dict:
    """The config as plain Python (enums as their names) for code that should not see OmegaConf."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
