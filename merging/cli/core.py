"""Core commands: list methods, build suites, merge raw checkpoints, run a method, print the table."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pandas as pd

from merging import jobs
from merging.cli.common import add_common, parse_method, parse_sets
from merging.errors import ConfigError
from merging.evaluation import accuracy_table, normalized_table
from merging.io import atomic_write, load_yaml_mapping, save_json, save_state_dict
from merging.merge_files import merge_files
from merging.methods import BASELINES, METHODS, specs
from merging.methods_doc import methods_markdown
from merging.model import plain_state
from merging.progress import line_progress
from merging.provenance import check_one_family, family_label, family_of, program_report, run_label, with_provenance
from merging.runs import RunConfig, list_results, load_model, run
from merging.suites import BUILTIN_SUITES, Suite, get_suite


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list-methods", help="the registered methods, their hyperparameters (with help text) and presets")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_list_methods)

    p = sub.add_parser("docs", help="write docs/methods.md from the methods' hyperparameter metadata")
    p.add_argument("--out", default="docs/methods.md")
    p.add_argument("--check", action="store_true", help="exit 1 if the file is not current, write nothing")
    p.set_defaults(func=cmd_docs)

    p = sub.add_parser("suite", help="build or inspect a suite")
    ss = p.add_subparsers(dest="suite_command", required=True, metavar="SUITE_COMMAND")
    b = ss.add_parser("build", help="build (or load) a built-in suite, e.g. mini8 or micro")
    b.add_argument("name")
    b.add_argument("--seed", type=int, default=0)
    add_common(b)
    b.set_defaults(func=cmd_suite_build)
    ls = ss.add_parser("list", help="the built-in suites")
    ls.set_defaults(func=cmd_suite_list)

    p = sub.add_parser(
        "merge",
        help="merge your own checkpoints (state dicts or Hugging Face CLIP folders) into one",
        description="Merge plain state dicts (safetensors, or .pt loaded with weights_only=True) key by key, or Hugging Face "
        "CLIP checkpoints (FusionBench's experts: CLIPModel/CLIPVisionModel folders or safetensors files with HF keys), "
        "whose vision towers are merged and written as a CLIPVisionModel.",
    )
    p.add_argument("--method", required=True, help="weight_averaging, task_arithmetic or ties")
    p.add_argument("--pretrained", required=True, help="the pretrained checkpoint: a state dict, or an HF CLIPModel/CLIPVisionModel folder or file")
    p.add_argument("--finetuned", nargs="*", default=[], metavar="NAME=PATH", help="fine-tuned checkpoints, one per task (HF CLIPVisionModel folders or files too)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a hyperparameter, e.g. scaling=0.3 (repeat the flag)")
    p.add_argument("--out", required=True, help="output: a .safetensors/.pt file (a state dict), or, for HF inputs, a folder "
                   "(any other name) written as an HF CLIPVisionModel (config.json + model.safetensors)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("run", help="run one method on a suite (cached by its key) and print per-task accuracy")
    p.add_argument("--config", default=None, help="a YAML with suite, method, params, preset, seed, tasks (flags given too override it)")
    p.add_argument("--suite", default=None, help="default: mini8")
    p.add_argument("--method", default=None, help="required unless --config gives it")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a hyperparameter (repeat the flag); a nested base method's as base.KEY=VALUE")
    p.add_argument("--preset", default=None, help="fast or paper (default: fast on CPU, paper on GPU)")
    p.add_argument("--seed", type=int, default=None, help="default: 0")
    p.add_argument("--tasks", default=None, help="comma-separated subset of the suite's tasks")
    p.add_argument("--force", action="store_true", help="recompute even if cached")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    p.add_argument("--report", default=None, help="also write FusionBench's program_report.json shape to this path")
    p.add_argument("--save-model", default=None, metavar="PATH.safetensors",
                   help="also write the encoder as a plain state dict (methods that give one plain model: merges, adamerging, featcal)")
    add_common(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("table", help="per-task accuracy of the baselines (and any other cached runs) on a suite")
    p.add_argument("--suite", default="mini8")
    p.add_argument("--methods", default=None, help="comma-separated methods (default: the baselines); NAME:KEY=VALUE;KEY=VALUE sets hyperparameters, e.g. surgery:base=ties")
    p.add_argument("--preset", default=None, help="preset of data-dependent methods: fast or paper (default: fast on CPU, paper on GPU)")
    p.add_argument("--ta-grid", default=None, help="also run task arithmetic at these scalings, e.g. 0.1,0.2,...,1.0")
    p.add_argument("--normalized", action="store_true", help="also print accuracy normalized by Individual")
    p.add_argument("--cost", action="store_true", help="also give each row's cost: extra storage (MB), unlabeled images used and adaptation seconds")
    p.add_argument("--csv", default=None, help="write the table to this CSV file")
    add_common(p)
    p.set_defaults(func=cmd_table)
    register_jobs(sub)


def register_jobs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("job", help="(internal) the background worker: run one queued job by id")
    p.add_argument("job_id")
    p.add_argument("--cache-dir", default="cache")
    p.set_defaults(func=lambda a: jobs.work(a.job_id, a.cache_dir))
    p = sub.add_parser("jobs", help="list background jobs and their status")
    p.add_argument("--cache-dir", default="cache")
    p.add_argument("--cancel", default=None, metavar="JOB_ID", help="cancel a running job")
    p.set_defaults(func=cmd_jobs)


def cmd_jobs(args: argparse.Namespace) -> int:
    if args.cancel:
        jobs.cancel(args.cache_dir, args.cancel)
    for j in jobs.list_jobs(args.cache_dir):
        print(f"{j['id']:<28} {j['state']:<10} {100 * j.get('progress', 0):5.1f}%  {j.get('message', '')}")
    return 0


def cmd_list_methods(args: argparse.Namespace) -> int:
    if args.json:
        described = [{**m.describe(), "hyperparameters": [dataclasses.asdict(h) for h in specs(m)]} for m in METHODS.values()]
        print(json.dumps(described, indent=2, default=str))
        return 0
    for m in METHODS.values():
        presets = f"  (presets: {', '.join(m.presets)})" if m.presets else ""
        print(f"{m.name}: {m.title}{presets}  {m.paper_url}")
        for h in specs(m):
            default = "{}" if h.params_of else h.default
            unit = f" [{h.unit}]" if h.unit else ""
            print(f"    {h.name} = {default}{unit}  {h.help} Allowed: {h.allowed()}.")
    return 0


def cmd_docs(args: argparse.Namespace) -> int:
    text = methods_markdown()
    path = Path(args.out)
    if args.check:
        current = path.is_file() and path.read_text(encoding="utf-8") == text
        print(f"{path} is {'current' if current else 'stale: run python -m merging docs'}")
        return 0 if current else 1
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    print(f"wrote {path}")
    return 0


def cmd_suite_build(args: argparse.Namespace) -> int:
    suite = get_suite(args.name, seed=args.seed, cache_dir=args.cache_dir, progress=line_progress())
    secs = suite.info.get("build_seconds", {})
    print(f"suite {suite.name}: {len(suite.tasks)} tasks ({', '.join(suite.tasks)}); fingerprint {suite.fingerprint}")
    if secs:
        print("build seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in secs.items()))
    return 0


def cmd_suite_list(args: argparse.Namespace) -> int:
    for name, r in BUILTIN_SUITES.items():
        print(f"{name:<8} {len(r.tasks)} tasks: {', '.join(r.tasks)}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    finetuned: dict[str, str] = {}
    for item in args.finetuned:
        name, path = item.split("=", 1) if "=" in item else (Path(item).stem, item)
        if name in finetuned:
            raise ConfigError(f"--finetuned: the name {name!r} is given twice")
        finetuned[name] = path
    out = merge_files(args.method, args.pretrained, finetuned, parse_sets(args.set), args.out)
    print(f"wrote {out} ({args.method}, {len(finetuned)} fine-tuned models)")
    return 0


def _print_result(result: dict) -> None:
    acc = result["accuracy"]
    width = max(len(t) for t in acc)
    preset = f", preset {result['preset']}" if result.get("preset") else ""
    print(f"{result['title']} on {result['suite']}{preset} ({result['key']})")
    print(f"  checkpoints: {family_label(family_of(result))}")
    print(f"  {run_label(result)}")
    for t, a in acc.items():
        print(f"  {t:<{width}}  {a:6.2f}")
    print(f"  {'average':<{width}}  {result['average']:6.2f}")


def run_config(args: argparse.Namespace):
    """The run described by ``--config`` (a YAML mapping), with any flag given on the command line on top."""
    raw: dict = {}
    if args.config:

        raw = load_yaml_mapping(args.config, "run config")
    where = f"--config {args.config}" if args.config else "run"
    flags = {"suite": args.suite, "method": args.method, "preset": args.preset, "seed": args.seed, "tasks": args.tasks}
    raw.update({k: v for k, v in flags.items() if v is not None})
    params = raw.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: 'params' must be a mapping of hyperparameter: value, got {params!r}")
    raw["params"] = {**params, **parse_sets(args.set)}
    if not raw.get("method"):
        raise ConfigError(f"{where}: no method; give --method NAME or 'method:' in the YAML")
    return RunConfig.from_dict(raw, where)


def cmd_run(args: argparse.Namespace) -> int:
    config = run_config(args)
    suite = get_suite(config.suite, cache_dir=args.cache_dir)
    if config.tasks:
        suite.check_tasks(list(config.tasks))
    result = run(config, suite, cache_dir=args.cache_dir, device=args.device, force=args.force)
    if args.report:
        save_json(program_report(result), args.report)  # with its provenance block (family, params, preset, data split)
    if args.save_model:
        state = plain_state(load_model(result, suite, args.cache_dir, args.device))
        if state is None:
            raise ConfigError(f"--save-model: {result['method']!r} is not one plain model (it keeps per-task parts or added modules); "
                              "save a merge, adamerging or featcal")
        save_state_dict(state, args.save_model)
        print(f"wrote {args.save_model}")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_result(result)
    return 0


COST_COLUMNS = ("extra_mb", "images", "split", "adapt_s")


def baseline_table(suite_name: str, methods: list[str], ta_grid: list[float], cache_dir: str, device: str | None, preset: str | None = None,
                   cost: bool = False) -> pd.DataFrame:
    """Run (or load) each method spec and return the accuracy table, row labels like ``task_arithmetic(scaling=0.3)``;
    with ``cost``, also the columns extra_mb (storage beyond one merged model), images (unlabeled images learned from,
    with their split) and adapt_s."""
    return table_runs(suite_name, methods, ta_grid, cache_dir, device, preset, cost)[0]


def table_runs(suite_name: str, methods: list[str], ta_grid: list[float], cache_dir: str, device: str | None, preset: str | None = None,
               cost: bool = False) -> tuple[pd.DataFrame, dict[str, dict], Suite]:
    """``baseline_table``'s table, the result behind each row (its provenance) and the suite (its checkpoint family)."""
    suite = get_suite(suite_name, cache_dir=cache_dir)
    rows, costs, results = {}, {}, {}
    for spec in methods:
        name, overrides = parse_method(spec)
        result = run(RunConfig(suite_name, name, overrides, preset), suite, cache_dir=cache_dir, device=device)
        label = name + (f"({';'.join(f'{k}={v}' for k, v in overrides.items())})" if overrides else "")
        rows[label], results[label] = result["accuracy"], result
        costs[label] = {"extra_mb": result["storage"]["extra_mb"], "images": result["data"]["images"], "split": result["data"]["split"] or "",
                        "adapt_s": result["seconds"]["adapt"]}
        print(f"{label}: {result['average']:.1f} (adapt {result['seconds']['adapt']:.1f} s)", flush=True)
    for lam in ta_grid:
        r = run(RunConfig(suite_name, "task_arithmetic", {"scaling": lam}), suite, cache_dir=cache_dir, device=device)
        rows[f"task_arithmetic(scaling={lam:g})"], results[f"task_arithmetic(scaling={lam:g})"] = r["accuracy"], r
        costs[f"task_arithmetic(scaling={lam:g})"] = {"extra_mb": 0.0, "images": 0, "split": "", "adapt_s": r["seconds"]["adapt"]}
    table = accuracy_table(rows, suite.tasks)
    return (table.join(pd.DataFrame.from_dict(costs, orient="index")) if cost else table), results, suite


def other_families(suite: Suite, cache_dir: str) -> list[dict]:
    """Cached results of a suite of this name made on other checkpoints or other data (another suite fingerprint):
    a table of the current suite leaves them out, and says so."""
    return [r for r in list_results(cache_dir, suite=suite.name) if r.get("suite_fingerprint") != suite.fingerprint]


def left_out_line(suite: Suite, others: list[dict]) -> str:
    """One line: how many cached results of other checkpoint families (or data) of this suite's name a table leaves out."""
    digests = sorted({family_of(r)["weights"] for r in others})
    return (f"left out: {len(others)} cached result(s) of {suite.name} made on other checkpoints or data "
            f"(weights {', '.join(digests)}); this table is {family_label(suite.checkpoint_family)} only")


def cmd_table(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else list(BASELINES)
    grid = [float(x) for x in args.ta_grid.split(",")] if args.ta_grid else []
    table, results, suite = table_runs(args.suite, methods, grid, args.cache_dir, args.device, args.preset, args.cost)
    check_one_family(results.values())
    print(f"\ncheckpoints: {family_label(suite.checkpoint_family)}")
    with pd.option_context("display.width", 200, "display.max_columns", 50, "display.float_format", "{:.1f}".format):
        print(table)
        if args.normalized and "individual" in table.index:
            print("\nnormalized accuracy (% of individual):")
            print(normalized_table(table[[c for c in table.columns if c not in COST_COLUMNS]]))
    width = max(len(label) for label in results)
    print("\nhyperparameters, preset and data of each row:")
    for label, r in results.items():
        print(f"  {label:<{width}}  {run_label(r)}")
    others = other_families(suite, args.cache_dir)
    if others:
        print(left_out_line(suite, others))
    if args.csv:
        exported = with_provenance(table, suite.checkpoint_family, results)
        atomic_write(args.csv, lambda tmp: exported.to_csv(tmp, float_format="%.2f"))
        print(f"wrote {args.csv}")
    return 0
