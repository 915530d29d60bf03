"""Suites: the built-in offline ones (``mini8``, ``micro``) and, by config file, real checkpoints."""

from __future__ import annotations

from pathlib import Path

from merging.errors import ConfigError
from merging.progress import ProgressFn
from merging.suites.base import Suite, TaskData
from merging.suites.mini8 import RECIPES, list_suites

__all__ = ["Suite", "TaskData", "get_suite", "list_suites"]


def get_suite(name: str, seed: int = 0, cache_dir: str | Path = "cache", progress: ProgressFn | None = None) -> Suite:
    """A built-in suite by name (built on first use, then loaded from cache), or a real one by config file path."""
    if name in RECIPES:
        from merging.suites.mini8 import load_or_build

        return load_or_build(name, seed, cache_dir, progress)
    from merging.suites.config import is_config_path

    if is_config_path(name):
        from merging.suites.clip import load_clip_suite
        from merging.suites.config import load_config

        return load_clip_suite(load_config(name), cache_dir, progress)
    raise ConfigError(f"unknown suite {name!r}; built-in suites: {', '.join(list_suites())}, or a suite config file (.yaml, .toml)")
