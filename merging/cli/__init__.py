"""``python -m merging``: every command the app can run, from a terminal (DESIGN.md, CLI).

Each module in ``COMMAND_MODULES`` has ``register(subparsers)``; a new command group is one new module
plus one line here. Library errors print as one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from merging.errors import MergeLensError

COMMAND_MODULES = [
    "merging.cli.core",
    "merging.cli.clip",
    "merging.cli.representations",
    "merging.cli.sweep",
]


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m merging", description="MergeLens: merge models, measure representation bias, compare methods.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MergeLensError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing partial was saved", file=sys.stderr)
        return 130
