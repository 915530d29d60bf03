"""``python -m merging sweep``: a grid of hyperparameter values and seeds, each point a cached run."""

from __future__ import annotations

import argparse

import pandas as pd

from merging.cli.common import add_common, parse_sets
from merging.errors import ConfigError
from merging.io import atomic_write
from merging.provenance import family_label
from merging.sweeps import SweepConfig, load_config, parse_grid, run_sweep


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="sweep hyperparameters, seeds and task subsets (each point a cached run); writes a tidy CSV",
        description="Either --config FILE (see ablations/*.yaml) or --method with one --grid per swept key. "
        "Finished points are cached, so a repeated, extended or interrupted sweep computes only what is missing.",
    )
    p.add_argument("--config", default=None, help="a sweep YAML file, e.g. ablations/ta_lambda.yaml")
    p.add_argument("--suite", default=None, help="the suite (default: the config's, else mini8)")
    p.add_argument("--method", default=None)
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="swept values, e.g. scaling=0.1,0.3,0.5; num_tasks=2,3; tasks=colors+digits,colors+gratings (repeat the flag)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a fixed hyperparameter (repeat the flag)")
    p.add_argument("--preset", default=None, help="fast or paper (default: fast on CPU, paper on GPU)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the config's, else 0)")
    p.add_argument("--name", default=None, help="a name for the sweep's folder under cache/sweeps")
    p.add_argument("--executor", choices=("local", "ray"), default="local", help="local (default) or ray")
    p.add_argument("--workers", type=int, default=1, help="worker processes (local pool or local Ray CPUs; default 1: in-process)")
    p.add_argument("--address", default=None, help="address of a running Ray cluster (default: start a local instance)")
    p.add_argument("--csv", default=None, help="also copy the tidy table to this CSV file")
    add_common(p)
    p.set_defaults(func=cmd_sweep)


def sweep_from_args(args: argparse.Namespace):
    base = load_config(args.config).to_dict() if args.config else {"suite": "mini8", "params": {}}
    if not args.config and not args.method:
        raise ConfigError("give --config FILE or --method NAME with at least one --grid KEY=V1,V2")
    if args.suite:
        base["suite"] = args.suite
    if args.method:
        base["method"] = args.method
    if args.grid:
        base["grid"], base["points"] = parse_grid(args.grid), []
    if args.set:
        base["params"] = {**base.get("params", {}), **parse_sets(args.set)}
    if args.preset:
        base["preset"] = args.preset
    if args.seeds:
        base["seeds"] = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.name:
        base["name"] = args.name
    return SweepConfig.from_dict(base)


def cmd_sweep(args: argparse.Namespace) -> int:
    config = sweep_from_args(args)
    result = run_sweep(config, cache_dir=args.cache_dir, device=args.device, executor=args.executor, workers=args.workers,
                       address=args.address, progress=lambda f, m: print(f"  {100 * f:5.1f}%  {m}", flush=True))
    frame = result.frame
    per_point = frame.drop_duplicates("key")
    summary = per_point.groupby(config.axes, sort=False)["average"].agg(["mean", "std", "count"])
    if not frame.empty:  # each row of results.csv carries its run's provenance columns (suite, layout, weights, params, ...)
        print(f"checkpoints: {family_label(frame.iloc[0].to_dict())}")
    with pd.option_context("display.width", 200, "display.float_format", "{:.2f}".format):
        print(summary)
    print(f"{result.computed} points computed, {result.cached} cached; wrote {result.folder / 'results.csv'}")
    if args.csv:
        atomic_write(args.csv, lambda tmp: frame.to_csv(tmp, index=False))
        print(f"wrote {args.csv}")
    return 0
