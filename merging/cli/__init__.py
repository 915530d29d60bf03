"""``python -m merging``: every command the app can run, from a terminal (DESIGN.md, CLI).

Each module in ``COMMAND_MODULES`` has ``register(subparsers)``; a new command group is one new module
plus one line here. Library errors print as one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from merging.cli import clip, core, representations, sweep, whatif, why
from merging.errors import MergeLensError

COMMAND_MODULES = [core, clip, representations, sweep, whatif, why]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m merging", description="MergeLens: merge models, measure representation bias, compare methods.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
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
