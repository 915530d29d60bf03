"""``python -m merging why VIEW``: the five "Why merges fail" views, each written as CSV and a self-contained HTML.

Every view is computed by the library (cached under the cache folder), exactly as the page computes it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from merging.cli.common import add_common
from merging.errors import ConfigError
from merging.io import atomic_write
from merging.progress import line_progress


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("why", help="why merges fail: geometry, lambda-plane, trajectory, layers or pairs (CSV + HTML)")
    views = p.add_subparsers(dest="view", required=True, metavar="VIEW")

    v = views.add_parser("geometry", help="task-vector cosines, norms, sign conflicts, tasks per weight, singular-value spectra")
    _common(v)
    v.add_argument("--merges", default="task_arithmetic,tsv_m,iso_c", help="data-free merges whose update spectra are shown (default: task_arithmetic,tsv_m,iso_c)")
    v.add_argument("--density", type=float, default=0.2, help="TIES trim density for tasks-per-weight (default: 0.2)")
    v.add_argument("--tall-lambda", type=float, default=0.4, help="λ of the TALL masks for tasks-per-weight (default: 0.4)")
    v.set_defaults(func=cmd_geometry)

    v = views.add_parser("lambda-plane", help="accuracy and weight-disentanglement error over a grid of (λi, λj) for a task pair")
    _common(v)
    v.add_argument("--tasks", required=True, help="the pair, e.g. mnist,digits")
    v.add_argument("--points", type=int, default=11, help="grid points per axis (default: 11)")
    v.add_argument("--max-lambda", type=float, default=1.5, help="upper end of each axis (default: 1.5)")
    v.add_argument("--n", type=int, default=200, help="test images per task, stratified (default: 200; 0 = all)")
    v.set_defaults(func=cmd_lambda_plane)

    v = views.add_parser("trajectory", help="a data-dependent run's objective, its parts, coefficients (and test accuracy with --analysis)")
    _common(v)
    v.add_argument("--method", required=True, help="adamerging, surgery, wemoe or tinting")
    v.add_argument("--preset", default=None, help="fast or paper (default: fast on CPU, paper on GPU)")
    v.add_argument("--analysis", action="store_true", help="ANALYSIS ONLY, reads test labels: also record test accuracy along the run")
    v.set_defaults(func=cmd_trajectory)

    v = views.add_parser("layers", help="per-layer CKA and cosine of merged and merged+Surgery vs the individual model, and layer x layer CKA")
    _common(v)
    v.add_argument("--base", default="task_arithmetic", help="the merge (default: task_arithmetic)")
    v.add_argument("--task", required=True, help="the task whose test images are compared")
    v.add_argument("--preset", default=None, help="Surgery's preset: fast or paper (default: fast on CPU, paper on GPU)")
    v.add_argument("--n", type=int, default=200, help="test images (default: 200)")
    v.set_defaults(func=cmd_layers)

    v = views.add_parser("pairs", help="pairwise metrics of every task pair vs the normalized accuracy of its task-arithmetic merge")
    _common(v)
    v.add_argument("--n", type=int, default=200, help="test images per task for the representation CKA (default: 200)")
    v.add_argument("--scaling", type=float, default=0.3, help="λ of the pairwise task-arithmetic merges (default: 0.3)")
    v.set_defaults(func=cmd_pairs)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", default="mini8")
    p.add_argument("--out", default="why", help="folder for the CSV and HTML files (default: why)")
    add_common(p)


def _suite(args: argparse.Namespace):
    from merging.suites import get_suite

    return get_suite(args.suite, cache_dir=args.cache_dir, progress=line_progress())


def _write(args: argparse.Namespace, name: str, tables: dict[str, pd.DataFrame], figures: list, title: str, suite, run: dict | None = None) -> None:
    """The view's CSVs (each with the suite's checkpoint family as columns: suite, layout, weights) and one HTML whose
    heading and every figure's subtitle name the family (and ``run``'s hyperparameters and data split, for a one-run view)."""
    from merging.provenance import add_subtitle, family_label, run_label, with_provenance
    from merging.why_figures import write_html

    out = Path(args.out)
    stem = f"{Path(args.suite).stem}_{name}"
    family = suite.checkpoint_family
    where = family_label(family) + (f" · {run_label(run)}" if run is not None else "")
    for fig in figures:
        add_subtitle(fig, where)
    title = f"{title} — {where}"
    for label, table in tables.items():
        path = out / f"{stem}{'_' + label if label else ''}.csv"
        exported = with_provenance(table, family)
        atomic_write(path, lambda tmp, t=exported: t.to_csv(tmp, index=False))
        print(f"wrote {path}")
    path = write_html(figures, out / f"{stem}.html", title)
    print(f"wrote {path}")


def cmd_geometry(args: argparse.Namespace) -> int:
    from merging import why_figures as F
    from merging.geometry import suite_geometry

    suite = _suite(args)
    merges = [m.strip() for m in args.merges.split(",") if m.strip()]
    g = suite_geometry(suite, merges, args.density, args.tall_lambda, args.cache_dir, line_progress())
    print("cosine of the task vectors:")
    print(g.cosine.round(3).to_string())
    keys = list(dict.fromkeys(g.spectrum["key"]))
    figures = [F.cosine_heatmap(g.cosine, "Cosine of the task vectors, whole model"), F.norms_figure(g), F.conflicts_figure(g),
               F.tasks_per_weight_figure(g), F.ranks_figure(g)] + [F.spectrum_figure(g, k) for k in keys[-4:]]
    _write(args, "geometry", {"cosine": g.cosine.reset_index(names="task"), "block_cosine": g.block_cosine, "norms": g.norms, "conflicts": g.conflicts,
                              "tasks_per_weight": g.tasks_per_weight, "spectra": g.spectrum, "effective_rank": g.ranks},
           figures, f"Task-vector geometry of {suite.name}", suite)
    return 0


def cmd_lambda_plane(args: argparse.Namespace) -> int:
    from merging.lambda_plane import lambda_grid, lambda_plane
    from merging.why_figures import plane_heatmaps

    pair = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if len(pair) != 2:
        raise ConfigError(f"--tasks {args.tasks!r}: give exactly two tasks, comma-separated, e.g. --tasks mnist,digits")
    suite = _suite(args)
    plane = lambda_plane(suite, pair[0], pair[1], lambda_grid(args.points, args.max_lambda), args.n or None, 0, args.cache_dir, args.device, line_progress())
    best = plane.best()
    print(f"highest mean accuracy at λ = {best}; TA (0.3, 0.3) is on the grid: {0.3 in plane.grid}")
    _write(args, f"lambda_plane_{pair[0]}_{pair[1]}", {"": plane.frame()}, plane_heatmaps(plane), f"The λ plane of {pair[0]} and {pair[1]} ({suite.name})", suite)
    return 0


def cmd_trajectory(args: argparse.Namespace) -> int:
    from merging import trajectory as T
    from merging import why_figures as F
    from merging.methods import METHODS, get_method
    from merging.runs import RunConfig, run

    if not get_method(args.method).data_dependent:
        adaptive = ", ".join(m for m, method in METHODS.items() if method.data_dependent)
        raise ConfigError(f"--method {args.method!r} is not trained on data, so it records no trajectory; use one of: {adaptive}")
    suite = _suite(args)
    overrides = {"analysis_test_accuracy": True} if args.analysis else {}
    result = run(RunConfig(args.suite, args.method, overrides, args.preset), suite, args.cache_dir, args.device, line_progress())
    objective = T.objective_frame(result)
    tables = {"objective": objective}
    figures = [F.objective_figure(objective, f"{result['title']}: objective and its parts")]
    accuracy = T.accuracy_frame(result)
    if accuracy is not None:
        tables["test_accuracy"] = accuracy
        figures.append(F.accuracy_trajectory_figure(accuracy, "Test accuracy along the run (analysis only: reads test labels)"))
    coefs = T.coefficients(result)
    if coefs is not None:
        steps, rows, tasks, values = coefs
        tables["coefficients"] = pd.DataFrame([(s, r, t, values[k, a, b]) for k, s in enumerate(steps) for a, r in enumerate(rows)
                                               for b, t in enumerate(tasks)], columns=["step", "tensor", "task", "coefficient"])
        figures += [F.coefficient_heatmap(rows, tasks, values[0], steps[0]), F.coefficient_heatmap(rows, tasks, values[-1], steps[-1])]
    last = objective[objective["series"] == "objective"].iloc[[0, -1]]["value"].tolist()
    print(f"{result['title']}: objective {last[0]:.4f} -> {last[1]:.4f}; final average accuracy {result['average']:.2f} %")
    _write(args, f"trajectory_{args.method}", tables, figures, f"{result['title']} on {suite.name}: the adaptation trajectory", suite, result)
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    from merging import why_figures as F
    from merging.device import default_preset
    from merging.layer_similarity import layer_view

    suite = _suite(args)
    profile, matrices = layer_view(suite, args.base, args.task, args.n, args.preset or default_preset(args.device), 0, args.cache_dir, args.device,
                                   line_progress())
    print(profile[profile["layer"] == "final"].round(3).to_string(index=False))
    figures = [F.profile_figure(profile, "cka", f"{args.task}: linear CKA with the individual model per layer (band: 25-75 % over bootstrap resamples)"),
               F.profile_figure(profile, "cosine", f"{args.task}: cosine with the individual model per layer (band: 25-75 % over samples)")]
    figures += [F.cka_matrix_heatmap(m, f"{label} x individual: layer x layer CKA") for label, m in matrices.items()]
    tables = {"profile": profile, **{label.replace(" + ", "_").replace(" ", "_"): m.reset_index(names="layer") for label, m in matrices.items()}}
    _write(args, f"layers_{args.base}_{args.task}", tables, figures, f"Layer by layer: {args.base} on {args.task} ({suite.name})", suite)
    return 0


def cmd_pairs(args: argparse.Namespace) -> int:
    from merging.pair_metrics import METRICS, correlations, pair_table
    from merging.why_figures import metric_scatter

    suite = _suite(args)
    table = pair_table(suite, args.n or None, 0, args.scaling, cache_dir=args.cache_dir, device=args.device, progress=line_progress())
    r = correlations(table)
    print(r.round(3).to_string(index=False))
    rr = r.set_index("metric")
    figures = [metric_scatter(table, m, rr.loc[m, "pearson_r"], rr.loc[m, "spearman_r"]) for m in METRICS]
    _write(args, "pairs", {"": table, "correlations": r}, figures, f"Does a metric predict the merge? ({suite.name}, {len(table)} pairs)", suite)
    return 0
