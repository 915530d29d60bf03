"""Representation commands: extract features, project them jointly (HTML/CSV), and print bias metrics.

Methods are ``name`` or ``name:key=value;key=value``; each becomes a cached run (``merging.runs.run``),
so the commands work from a bare cache: the suite is built and the runs are computed on first use.
"""

from __future__ import annotations

import argparse
import time

import pandas as pd

from merging.artifacts import run_features
from merging.cli.common import add_common, parse_method, parse_sets
from merging.errors import ConfigError
from merging.io import atomic_write
from merging.metrics import bias_table, wide
from merging.projection import joint_projection, write_html
from merging.provenance import COLUMNS, family_label, provenance_columns
from merging.runs import RunConfig, run
from merging.suites import get_suite


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("features", help="extract (and cache) one method's features on each task's test images")
    _add_inputs(p)
    p.add_argument("--method", required=True, help="a method, optionally with overrides: task_arithmetic:scaling=0.3")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a hyperparameter of --method (repeat the flag)")
    p.add_argument("--layers", action="store_true", help="also the token-mean of every block's output (per-layer bias)")
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("project", help="one joint UMAP/t-SNE/PCA fit over several methods' features; write HTML and/or CSV")
    _add_inputs(p)
    p.add_argument("--methods", required=True, help="comma-separated, e.g. individual,task_arithmetic:scaling=0.3")
    p.add_argument("--projection", default="umap", help="umap, tsne or pca (default: umap)")
    p.add_argument("--dim", type=int, default=2, choices=(2, 3))
    p.add_argument("--layer", default="final", help="final (default) or a block index")
    p.add_argument("--color", default="model", help="colour points by: model (default), classname or correct")
    p.add_argument("--html", default=None, help="write a self-contained interactive scatter here")
    p.add_argument("--csv", default=None, help="write the projected points here")
    p.set_defaults(func=cmd_project)

    p = sub.add_parser("metrics", help="representation-bias metrics of several methods against a reference, per task")
    _add_inputs(p)
    p.add_argument("--methods", required=True, help="comma-separated, e.g. task_arithmetic,ties")
    p.add_argument("--reference", default="individual", help="the method the others are compared with (default: individual)")
    p.add_argument("--layers", action="store_true", help="also every block's token-mean features")
    p.add_argument("--k", type=int, default=10, help="neighbours for kNN overlap (default: 10)")
    p.add_argument("--projection", default="pca", help="projection whose trustworthiness is reported: pca (default), umap, tsne or none")
    p.add_argument("--csv", default=None, help="write the tidy metrics table here")
    p.set_defaults(func=cmd_metrics)


def _add_inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", default="mini8")
    p.add_argument("--task", default="all", help="a task of the suite, or all (default)")
    p.add_argument("--n", type=int, default=500, help="test images per task, stratified by class (default: 500; 0 = all)")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of the stratified sample")
    p.add_argument("--seed", type=int, default=0, help="seed of the runs")
    p.add_argument("--amp", action="store_true", help="extract features under bf16 autocast on CUDA (cached apart from fp32)")
    add_common(p)


def _method_list(text: str) -> list[str]:
    specs = [s.strip() for s in text.split(",") if s.strip()]
    if not specs:
        raise ConfigError("--methods: give at least one method")
    return list(dict.fromkeys(specs))


def _features(args: argparse.Namespace, specs: list[str], layers: bool = False, results: dict | None = None) -> tuple[list[str], dict[str, dict]]:
    """Run (or load) each method spec and return the tasks and ``{task: {spec: Features}}``; ``results`` (when given)
    receives each spec's run result (its provenance)."""
    suite = get_suite(args.suite, cache_dir=args.cache_dir)
    tasks = suite.tasks if args.task == "all" else suite.check_tasks([t.strip() for t in args.task.split(",")])
    out: dict[str, dict] = {t: {} for t in tasks}
    for spec in specs:
        name, overrides = parse_method(spec)
        result = run(RunConfig(args.suite, name, overrides, seed=args.seed), suite, cache_dir=args.cache_dir, device=args.device)
        if results is not None:
            results[spec] = result
        feats = run_features(result, suite, tasks, args.n or None, args.sample_seed, layers, args.cache_dir, device=args.device, amp=args.amp)
        for t, fs in feats.items():
            out[t][spec] = fs
    return tasks, out


def with_run_columns(frame: pd.DataFrame, results: dict[str, dict]) -> pd.DataFrame:
    """``frame`` (a ``model`` column naming each row's method spec) with that run's provenance columns; rows of two checkpoint families refuse."""
    from merging.provenance import check_one_family

    check_one_family(results.values())
    where = {spec: provenance_columns(r) for spec, r in results.items()}
    first = next(iter(where.values()))
    out = frame.copy()
    for col in COLUMNS:
        out[col] = [where.get(m, first)[col] if col in ("suite", "layout", "weights") else where.get(m, {}).get(col, "") for m in out["model"]]
    return out


def cmd_features(args: argparse.Namespace) -> int:
    sets = {f"{k}={v}" for k, v in parse_sets(args.set).items()}
    spec = args.method if not sets else f"{args.method}{';' if ':' in args.method else ':'}{';'.join(sorted(sets))}"
    t0 = time.perf_counter()
    tasks, feats = _features(args, [spec], args.layers)
    print(f"{spec} on {args.suite} ({time.perf_counter() - t0:.1f} s)")
    print(f"  {'task':<16} {'n':>5} {'dim':>5} {'blocks':>6} {'acc':>6}  key")
    for t in tasks:
        fs = feats[t][spec]
        print(f"  {t:<16} {len(fs.indices):>5} {fs.embedding.shape[1]:>5} {len(fs.blocks or []):>6} {fs.accuracy:6.1f}  {fs.key}")
    return 0


def cmd_project(args: argparse.Namespace) -> int:
    if not (args.html or args.csv):
        raise ConfigError("project: give --html and/or --csv to say where the points go")
    specs = _method_list(args.methods)
    layers = args.layer != "final"
    results: dict[str, dict] = {}
    tasks, feats = _features(args, specs, layers, results)
    frames = []
    for t in tasks:
        t0 = time.perf_counter()
        frames.append(joint_projection(feats[t], args.projection, args.layer, args.dim, args.sample_seed, cache_dir=args.cache_dir))
        print(f"{t}: {args.projection} of {len(frames[-1])} points in {time.perf_counter() - t0:.1f} s")
    df = pd.concat(frames, ignore_index=True)
    family = family_label(provenance_columns(next(iter(results.values()))))
    if args.csv:
        exported = with_run_columns(df, results)
        atomic_write(args.csv, lambda tmp: exported.to_csv(tmp, index=False, float_format="%.5g"))
        print(f"wrote {args.csv} ({len(df)} rows)")
    if args.html:
        title = f"{args.projection.upper()} of {args.layer} features on {args.suite}: {', '.join(specs)}<br><sub>{family}</sub>"
        write_html(df, args.html, color=args.color, title=title)
        print(f"wrote {args.html}")
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    specs = _method_list(args.methods)
    specs = [args.reference, *[s for s in specs if s != args.reference]]
    results: dict[str, dict] = {}
    tasks, feats = _features(args, specs, args.layers, results)
    tables = []
    for t in tasks:
        sets = feats[t]
        layers = sets[args.reference].layers if args.layers else ["final"]
        proj = None
        if args.projection != "none":
            proj = joint_projection(sets, args.projection, seed=args.sample_seed, cache_dir=args.cache_dir)
        tables.append(bias_table(sets, args.reference, layers, proj, args.k))
    table = pd.concat(tables, ignore_index=True)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_rows", 500, "display.float_format", "{:.4f}".format):
        print(f"representation bias against {args.reference} on {args.suite} (checkpoints: {family_label(provenance_columns(results[args.reference]))})")
        print(wide(table))
    if args.csv:
        exported = with_run_columns(table, results)
        atomic_write(args.csv, lambda tmp: exported.to_csv(tmp, index=False, float_format="%.6g"))
        print(f"wrote {args.csv}")
    return 0
