"""The composed run config as plain Python, for code that should not see OmegaConf."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf


def to_plain(cfg: DictConfig) -> dict:
    """The config as plain Python (enums as their names)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
