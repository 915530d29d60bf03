"""``python -m merging whatif``: the Tour page's live what-if from a terminal (issue #20).

Re-merges task arithmetic at a scaling coefficient λ (or TIES at λ and a density), scores every task on a fixed
stratified subsample of test images and prints the per-task accuracy and representation bias (mean L1 to the
individual model's final features); where the cache holds the same merge's run, its full-test accuracy too.
"""

from __future__ import annotations

import argparse

import pandas as pd

from merging.cli.common import add_common
from merging.device import default_device
from merging.errors import ConfigError
from merging.io import atomic_write
from merging.provenance import family_label, with_provenance
from merging.suites import get_suite
from merging.whatif import DEFAULT_N, WHATIF_METHODS, WhatIf, full_test_result


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("whatif", help="re-merge task arithmetic / TIES at given λ and density and score every task on a subsample in < 1 s")
    p.add_argument("--suite", default="mini8")
    p.add_argument("--method", default="task_arithmetic", choices=WHATIF_METHODS)
    p.add_argument("--scaling", default="0.3", help="scaling coefficient λ, or several comma-separated (default: 0.3)")
    p.add_argument("--density", default="0.2", help="TIES: fraction of each task vector kept, or several comma-separated (default: 0.2)")
    p.add_argument("--n", type=int, default=DEFAULT_N, help=f"test images per task in the stratified subsample (default: {DEFAULT_N})")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of the subsample")
    p.add_argument("--task", default=None, help="also write this task's projected points (PCA basis of individual + pretrained) with --points")
    p.add_argument("--points", default=None, help="CSV of --task's projected points for the last setting")
    p.add_argument("--csv", default=None, help="write the accuracy table here")
    add_common(p)
    p.set_defaults(func=cmd_whatif)


def _floats(text: str, name: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--{name} {text!r}: expected numbers separated by commas, e.g. 0.3,0.5") from None
    if not values:
        raise ConfigError(f"--{name}: give at least one value")
    return values


def cmd_whatif(args: argparse.Namespace) -> int:
    scalings = _floats(args.scaling, "scaling")
    densities = _floats(args.density, "density") if args.method == "ties" else [None]
    for d in densities:
        if d is not None and not 0.0 <= d <= 1.0:
            raise ConfigError(f"--density {d:g} is out of range; allowed: 0 <= density <= 1")
    device = args.device or default_device()
    suite = get_suite(args.suite, cache_dir=args.cache_dir)
    if args.task is not None:
        suite.check_tasks([args.task])
    engine = WhatIf(suite, n=args.n, seed=args.sample_seed, device=device)
    rows, index, full = [], [], []
    point = None
    for d in densities:
        for s in scalings:
            point = engine.score(args.method, s, d if d is not None else 0.2)
            label = f"λ={s:g}" + (f" density={d:g}" if d is not None else "")
            rows.append({**point.accuracy, "avg": point.average, "L1 bias (avg)": sum(point.l1.values()) / len(point.l1), "seconds": point.seconds})
            index.append(label)
            cached = full_test_result(suite, args.suite, args.method, s, d, args.cache_dir, device)
            if cached is not None:
                full.append(f"{label}: full test set (cached run {cached['key']}): avg {cached['average']:.1f} %")
    for name, ref in engine.reference_accuracy.items():
        rows.append({**ref, "avg": sum(ref.values()) / len(ref)})
        index.append(name)
    table = pd.DataFrame(rows, index=index)
    print(f"{args.method} on {args.suite}: accuracy (%) on {args.n} stratified test images per task (subsample, not the full test set)")
    print(f"checkpoints: {family_label(suite.checkpoint_family)}")
    print(table.to_string(float_format=lambda v: f"{v:.2f}", na_rep=""))
    for line in full:
        print(line)
    if args.csv:
        exported = with_provenance(table, suite.checkpoint_family).assign(method=args.method, subsample=args.n)
        atomic_write(args.csv, lambda tmp: exported.to_csv(tmp, float_format="%.4f"))
        print(f"wrote {args.csv}")
    if args.points:
        if args.task is None:
            raise ConfigError("--points needs --task: the projected points are per task")
        frame = with_provenance(engine.frame(point, args.task), suite.checkpoint_family)
        atomic_write(args.points, lambda tmp: frame.to_csv(tmp, index=False))
        print(f"wrote {args.points} ({len(frame)} points; x, y: the PCA basis of the individual and pretrained features)")
    return 0
