"""Real CLIP checkpoints: ``convert`` (the one trusted unpickling step) and ``suite check CONFIG``."""

from __future__ import annotations

import argparse

from merging.suites.clip.convert import convert_task_vectors
from merging.suites.clip.suite import check


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert task_vectors' pickled checkpoints to safetensors (unpickles: needs --trust)",
        description="Turn <root>/<model>/zeroshot.pt, <Task>/finetuned.pt and head_<Task>.pt (whole pickled modules) into "
        "safetensors state dicts, head tensors and a manifest. This unpickles the files, which can run arbitrary code: "
        "do it once, on files you trust, and pass --trust.",
    )
    p.add_argument("--layout", default="task_vectors", choices=["task_vectors"], help="the checkpoint layout (only task_vectors is pickled)")
    p.add_argument("--root", required=True, help="the folder holding <model>/zeroshot.pt")
    p.add_argument("--model", required=True, help="the open_clip architecture and sub-folder name, e.g. ViT-B-32")
    p.add_argument("--out", required=True, help="the output folder (point a suite config's 'root' at it)")
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default: every <Task>/finetuned.pt)")
    p.add_argument("--trust", action="store_true", help="I trust these files: unpickle them (torch.load weights_only=False)")
    p.set_defaults(func=cmd_convert)

    suite = sub.choices.get("suite")
    group = _subcommands(suite) if suite is not None else None
    c = group.add_parser("check", help="validate a suite config file") if group is not None else sub.add_parser("check-suite", help="validate a suite config file")
    c.add_argument("config", help="a suite config (.yaml or .toml)")
    c.set_defaults(func=cmd_check)


def cmd_convert(args: argparse.Namespace) -> int:
    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else None
    convert_task_vectors(args.root, args.model, args.out, trust=args.trust, tasks=tasks)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    report = check(args.config)
    for ok, message in report:
        print(f"{'ok  ' if ok else 'FAIL'}  {message}")
    problems = sum(not ok for ok, _ in report)
    print(f"{args.config}: {'OK' if not problems else f'{problems} problem(s)'}")
    return 0 if not problems else 2
