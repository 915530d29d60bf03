"""Suites: the built-in offline ones (``mini8``, ``micro``) and, by config file, real checkpoints.

The registry of built-in suites lives here, so that the CLI, the app and the runs ask one place what
exists and whether it is built; ``mini8`` builds them and imports nothing of this package's own names.
"""

from __future__ import annotations

import os
from pathlib import Path

from merging.errors import ConfigError
from merging.hashing import Digest
from merging.progress import ProgressFn
from merging.suites.base import Suite, TaskData
from merging.suites.config import is_config_path, load_config
from merging.suites.mini8 import RECIPES, Recipe, load_or_build, suite_dir

__all__ = ["BUILTIN_SUITES", "Suite", "TaskData", "get_suite", "input_stamp", "is_built", "list_suites"]

BUILTIN_SUITES: dict[str, Recipe] = RECIPES
"""The built-in suites by name, each a ``mini8`` recipe built once (deterministically by seed) into the cache;
one dict, shared with ``mini8``'s own lookups, so a new built-in suite is one new ``Recipe`` line there."""


FILE_DIGESTS = "file_digests.json"
"""Digests of the image files of config-file suites, by path, size and mtime (``hashing.FileDigests``)."""


def list_suites() -> list[str]:
    """The names of the built-in suites (config-file suites are named by their path)."""
    return list(BUILTIN_SUITES)


def is_built(name: str, seed: int = 0, cache_dir: str | Path = "cache") -> bool:
    """Whether ``get_suite(name, seed, cache_dir)`` will load rather than build.

    Built-in suites are built once into the cache; a config-file suite reads its files directly, so it is always "built".
    """
    if name not in BUILTIN_SUITES:
        return True
    return (suite_dir(name, seed, cache_dir) / "manifest.json").is_file()


def input_stamp(name: str, seed: int = 0, cache_dir: str | Path = "cache") -> str:
    """A cheap stamp (path, size, mtime) of every file suite ``name`` is read from.

    It changes whenever a file is added, removed or rewritten, so a process that keeps a loaded suite (the
    app) knows to load it again; the fingerprint of the reloaded suite then says which runs changed.
    Config-file suites: the config and every file under the paths it names (data root included);
    built-in suites: their cached manifest.
    """
    if name in BUILTIN_SUITES:
        roots = [suite_dir(name, seed, cache_dir) / "manifest.json"]
    elif is_config_path(name):
        c = load_config(name)
        named = [c.path, c.root, c.pretrained, c.text_weights, c.model_config, c.data_root]
        roots = [*named, *c.finetuned.values(), *c.head_files.values(), *c.data_folders.values(), *c.classnames.values()]
    else:
        raise ConfigError(f"unknown suite {name!r}; built-in suites: {', '.join(list_suites())}, or a suite config file (.yaml, .toml)")
    d = Digest()
    for root in dict.fromkeys(r for r in roots if r is not None):
        for path in _walk(Path(root)):
            try:
                st = path.stat()
            except OSError:
                continue
            d.update(f"{path}:{st.st_size}:{st.st_mtime_ns}")
    return d.hexdigest()


def _walk(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(Path(folder) / f for folder, _, files in os.walk(root) for f in files) if root.is_dir() else []


def get_suite(name: str, seed: int = 0, cache_dir: str | Path = "cache", progress: ProgressFn | None = None) -> Suite:
    """A built-in suite by name (built on first use, then loaded from cache), or a real one by config file path."""
    if name in BUILTIN_SUITES:
        return load_or_build(name, seed, cache_dir, progress)
    if is_config_path(name):
        from merging.suites.clip.suite import load_clip_suite  # only config suites need the real-checkpoint loader

        suite = load_clip_suite(load_config(name), cache_dir, progress)
        suite.file_memo = Path(cache_dir) / "suites" / FILE_DIGESTS
        return suite
    raise ConfigError(f"unknown suite {name!r}; built-in suites: {', '.join(list_suites())}, or a suite config file (.yaml, .toml)")
