"""What every command module shares: ``--set KEY=VALUE`` and ``NAME:KEY=VALUE;...`` parsing, common flags."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from merging.errors import MergeLensError


def parse_sets(items: Sequence[str] | None) -> dict[str, str]:
    """``--set KEY=VALUE`` pairs (the flag repeats, one setting each)."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise MergeLensError(f"--set {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def parse_method(spec: str) -> tuple[str, dict[str, str]]:
    """``name`` or ``name:key=value;key=value`` -> (name, overrides)."""
    name, _, rest = spec.strip().partition(":")
    if not name:
        raise MergeLensError(f"method spec {spec!r}: expected NAME or NAME:KEY=VALUE;KEY=VALUE")
    return name.strip(), parse_sets([s for s in rest.split(";") if s.strip()])


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", default="cache", help="where suites, runs and features are cached (default: cache)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
