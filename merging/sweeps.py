"""Sweeps: a base run (suite, method, fixed params, preset) crossed with a grid of values and seeds.

Every point is an ordinary run (``merging.runs.run``) cached by its key, so a repeated or extended
sweep computes only new points and an interrupted one resumes: the driver checks ``cached_result``
before dispatching. Points run in-process, in a small process pool, or on Ray (a local instance or
an existing cluster whose nodes see the same cache path). The result is a tidy table, one row per
point x task, saved as ``cache/sweeps/<sweep-id>/results.csv`` beside ``manifest.json``.

Two grid keys are not hyperparameters: ``num_tasks`` (n -> the suite's first n tasks) and ``tasks``
(an explicit subset, ``"a+b"`` or a list), because how many tasks are merged is an ablation axis too.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from merging.device import default_device
from merging.errors import ConfigError
from merging.io import atomic_write, load_json, read_cached, save_json
from merging.progress import ProgressFn, scaled
from merging.runs import RunConfig, cached_result, run
from merging.suites import Suite, get_suite

ROOT = Path(__file__).resolve().parents[1]
ABLATIONS_DIR = ROOT / "ablations"
TASK_AXES = ("num_tasks", "tasks")
EXECUTORS = ("local", "ray")
THREAD_BUDGET = int(os.environ.get("MERGELENS_THREADS", "2"))
"""Cores one machine gives a sweep; each of ``workers`` processes gets ``max(1, budget // workers)`` torch threads."""
_FIELDS = ("suite", "method", "params", "preset", "grid", "points", "seeds", "name", "title")


@dataclass(frozen=True)
class SweepConfig:
    """A base run plus the values to sweep: ``grid`` (a product) or ``points`` (an explicit list), times ``seeds``."""

    suite: str
    method: str
    grid: dict[str, list] = field(default_factory=dict)
    points: tuple[dict, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None
    seeds: tuple[int, ...] = (0,)
    name: str = ""
    title: str = ""

    @property
    def axes(self) -> list[str]:
        keys = list(self.grid)
        for p in self.points:
            keys += [k for k in p if k not in keys]
        return keys

    def to_dict(self) -> dict:
        d = asdict(self)
        d["points"], d["seeds"] = list(self.points), list(self.seeds)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SweepConfig:
        unknown = set(d) - set(_FIELDS)
        if unknown:
            raise ConfigError(f"unknown sweep field(s) {', '.join(sorted(unknown))}; allowed: {', '.join(_FIELDS)}")
        for key in ("suite", "method"):
            if not d.get(key):
                raise ConfigError(f"a sweep needs '{key}'")
        grid = {str(k): list(v) if isinstance(v, list | tuple) else [v] for k, v in (d.get("grid") or {}).items()}
        points = tuple(dict(p) for p in d.get("points") or ())
        if not grid and not points:
            raise ConfigError("a sweep needs a 'grid' (key: [values]) or a list of 'points'")
        if any(len(v) == 0 for v in grid.values()):
            raise ConfigError("every grid key needs at least one value")
        seeds = d.get("seeds", [0])
        seeds = tuple(int(s) for s in (seeds if isinstance(seeds, list | tuple) else [seeds]))
        return cls(str(d["suite"]), str(d["method"]), grid, points, dict(d.get("params") or {}), d.get("preset"), seeds or (0,),
                   str(d.get("name") or ""), str(d.get("title") or ""))


@dataclass(frozen=True)
class Point:
    """One point of a sweep: its swept values (as shown in tables), its seed, and the run it is."""

    values: dict[str, Any]
    seed: int
    config: RunConfig


@dataclass
class SweepResult:
    id: str
    folder: Path
    frame: pd.DataFrame
    computed: int
    cached: int


def sweep_id(config: SweepConfig) -> str:
    """``<name>-<hash>``: the same sweep asked twice (CLI, page, job) lands in the same folder."""
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:10]
    slug = re.sub(r"[^a-z0-9_]+", "_", (config.name or config.method).lower()).strip("_") or "sweep"
    return f"{slug}-{digest}"


def sweep_dir(cache_dir: str | Path, sid: str) -> Path:
    return Path(cache_dir) / "sweeps" / sid


def parse_values(text: str) -> list:
    """``"0.1,0.3, last2"`` -> ``[0.1, 0.3, "last2"]`` (each item typed as YAML reads it)."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ConfigError(f"expected comma-separated values, got {text!r}")
    return [yaml.safe_load(t) for t in items]


def parse_grid(items: Iterable[str]) -> dict[str, list]:
    """``KEY=V1,V2`` strings (CLI ``--grid``) -> a grid; task subsets are written ``tasks=a+b,a+b+c``."""
    grid: dict[str, list] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2,...")
        key, text = (s.strip() for s in item.split("=", 1))
        grid[key] = [str(v) for v in parse_values(text)] if key == "tasks" else parse_values(text)
    return grid


def load_config(path: str | Path) -> SweepConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} not found; built-in ones: {', '.join(p.name for p in sorted(ABLATIONS_DIR.glob('*.yaml')))}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with suite, method and grid")
    data.setdefault("name", path.stem)
    return SweepConfig.from_dict(data)


def builtin_sweeps() -> dict[str, SweepConfig]:
    """The ablation set shipped in ``ablations/*.yaml``, by file stem."""
    return {p.stem: load_config(p) for p in sorted(ABLATIONS_DIR.glob("*.yaml"))}


def _task_subset(key: str, value: Any, suite: Suite) -> tuple[str, ...]:
    if key == "num_tasks":
        n = int(value)
        if not 1 <= n <= len(suite.tasks):
            raise ConfigError(f"num_tasks={value}: the suite {suite.name} has {len(suite.tasks)} tasks")
        return tuple(suite.tasks[:n])
    names = [t.strip() for t in re.split(r"[+,]", value)] if isinstance(value, str) else [str(t) for t in value]
    return tuple(suite.check_tasks(names))


def expand(config: SweepConfig, suite: Suite) -> list[Point]:
    """Every (values, seed) of the sweep as a run config, grid order, seeds innermost."""
    combos = [dict(zip(config.grid, vs, strict=True)) for vs in itertools.product(*config.grid.values())] if config.grid else []
    combos += [dict(p) for p in config.points]
    out = []
    for values in combos:
        params, tasks = dict(config.params), None
        shown = {}
        for k, v in values.items():
            if k in TASK_AXES:
                tasks = _task_subset(k, v, suite)
                shown[k] = v if k == "num_tasks" else "+".join(tasks)
            else:
                params[k] = v
                shown[k] = v
        for seed in config.seeds:
            out.append(Point(shown, seed, RunConfig(config.suite, config.method, params, config.preset, seed, tasks)))
    return out


# ------------------------------------------------------------------------------------- executors
_SUITES: dict[tuple[str, str], Suite] = {}


def _work(config: RunConfig, cache_dir: str, device: str | None, threads: int) -> dict:
    """One point in a worker process (pool or Ray): the suite comes from the shared cache, once per process."""
    import torch

    torch.set_num_threads(threads)
    key = (config.suite, cache_dir)
    if key not in _SUITES:
        _SUITES[key] = get_suite(config.suite, cache_dir=cache_dir)
    return run(config, _SUITES[key], cache_dir=cache_dir, device=device)


def threads_per_worker(workers: int) -> int:
    return max(1, THREAD_BUDGET // max(1, workers))


def _run_local(configs: Sequence[RunConfig], suite: Suite, cache_dir: str, device: str | None, workers: int, done,
               within: Callable[[int], ProgressFn | None] | None = None) -> None:
    """``within(i)``: the progress of point ``i`` while it runs in this process, so the bar moves inside a point."""
    if workers <= 1:
        for i, c in enumerate(configs):
            done(i, run(c, suite, cache_dir=cache_dir, device=device, progress=within(i) if within else None))
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {pool.submit(_work, c, cache_dir, device, threads_per_worker(workers)): i for i, c in enumerate(configs)}
        for f in as_completed(futures):
            done(futures[f], f.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("the Ray executor needs ray: .venv/bin/pip install -c requirements-dev.lock -r requirements-ray.txt") from None
    return ray


def _run_ray(configs: Sequence[RunConfig], cache_dir: str, device: str | None, workers: int, address: str | None, done) -> None:
    """Dispatch to Ray: ``address`` joins a running cluster (whose nodes must see ``cache_dir`` and this
    checkout at the same path), else a local instance with ``workers`` CPUs is started and stopped."""
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}}
        local = {} if address else {"num_cpus": workers, "object_store_memory": 100 * 1024**2}
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, runtime_env=env, **local)
        except (ConnectionError, RuntimeError) as e:
            raise ConfigError(f"could not start or reach Ray{f' at {address}' if address else ''}: {e}") from None
    try:
        gpus = 1 if device == "cuda" else 0
        remote = ray.remote(num_cpus=1, num_gpus=gpus)(_work)
        refs = {remote.remote(c, cache_dir, device, threads_per_worker(workers)): i for i, c in enumerate(configs)}
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                done(refs[ready[0]], ray.get(ready[0]))
        except BaseException:
            for r in pending:
                ray.cancel(r, force=True)
            raise
    finally:
        if started:
            ray.shutdown()


def run_points(points: Sequence[Point], suite: Suite, cache_dir: str | Path = "cache", device: str | None = None, executor: str = "local",
               workers: int = 1, address: str | None = None, progress: ProgressFn | None = None) -> tuple[list[dict], int]:
    """Results of every point (cached ones read, the rest dispatched); returns them and how many were computed."""
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}; use one of: {', '.join(EXECUTORS)}")
    device = device or default_device()
    cache_dir = str(Path(cache_dir).resolve())
    results: list[dict | None] = [cached_result(p.config, suite, cache_dir, device) for p in points]
    todo = [i for i, r in enumerate(results) if r is None]
    finished = [len(points) - len(todo)]

    def done(j: int, result: dict) -> None:
        results[todo[j]] = result
        finished[0] += 1
        if progress is not None:
            progress(finished[0] / len(points), f"{finished[0]}/{len(points)} points")

    if progress is not None:
        progress(finished[0] / max(1, len(points)), f"{finished[0]}/{len(points)} points cached; running {len(todo)}")
    configs = [points[i].config for i in todo]

    def within(j: int) -> ProgressFn | None:
        start = finished[0] / len(points)
        return scaled(progress, start, start + 1 / len(points), f"point {finished[0] + 1}/{len(points)}: ")

    if configs and executor == "local":
        _run_local(configs, suite, cache_dir, device, workers, done, within)
    elif configs:
        _run_ray(configs, cache_dir, device, workers, address, done)
    return [r for r in results if r is not None], len(todo)


# ------------------------------------------------------------------------------------- results
def _l1(info: dict) -> dict[str, float] | None:
    """Per-task mean L1 distance to the experts (algorithms.md §3) after the method, when its info records it."""
    for key in ("l1_after", "l1"):
        value = info.get(key) if isinstance(info, dict) else None
        if isinstance(value, dict) and value:
            return {str(t): float(v) for t, v in value.items()}
    return None


def tidy(points: Sequence[Point], results: Sequence[dict | None], axes: Sequence[str]) -> pd.DataFrame:
    """One row per point x task: swept values, seed, task, accuracy, average, l1, l1_average, key, then the run's
    provenance (``merging.provenance.COLUMNS``: suite, layout, weights, method, preset, params, adapted_on, selection)."""
    from merging.provenance import COLUMNS, provenance_columns

    rows = []
    for p, r in zip(points, results, strict=True):
        if r is None:
            continue
        l1 = _l1(r.get("info", {}))
        l1_avg = sum(l1.values()) / len(l1) if l1 else float("nan")
        where = provenance_columns(r)
        for task in r["tasks"]:
            acc = r["accuracy"][task]
            rows.append({**{a: p.values.get(a) for a in axes}, "seed": p.seed, "task": task, "accuracy": acc, "average": r["average"],
                         "l1": l1.get(task, float("nan")) if l1 else float("nan"), "l1_average": l1_avg, "key": r["key"], **where})
    columns = [*axes, "seed", "task", "accuracy", "average", "l1", "l1_average", "key", *(c for c in COLUMNS if c not in axes)]
    return pd.DataFrame(rows, columns=columns)


def cached_frame(config: SweepConfig, suite: Suite, cache_dir: str | Path = "cache", device: str | None = None) -> tuple[pd.DataFrame, int, int]:
    """The table of the points already in the cache (computes nothing); returns it, points done, points in all."""
    points = expand(config, suite)
    results = [cached_result(p.config, suite, cache_dir, device or default_device()) for p in points]
    return tidy(points, results, config.axes), sum(r is not None for r in results), len(points)


def run_sweep(config: SweepConfig, suite: Suite | None = None, cache_dir: str | Path = "cache", device: str | None = None, executor: str = "local",
              workers: int = 1, address: str | None = None, progress: ProgressFn | None = None) -> SweepResult:
    """Run (or finish) a sweep and save its table and manifest under ``cache/sweeps/<id>/``."""
    suite = suite or get_suite(config.suite, cache_dir=cache_dir)
    points = expand(config, suite)
    t0 = time.perf_counter()
    results, computed = run_points(points, suite, cache_dir, device, executor, workers, address, progress)
    frame = tidy(points, results, config.axes)
    sid = sweep_id(config)
    folder = sweep_dir(cache_dir, sid)
    atomic_write(folder / "results.csv", lambda tmp: frame.to_csv(tmp, index=False))
    manifest = {
        "id": sid,
        "config": config.to_dict(),
        "axes": config.axes,
        "suite_fingerprint": suite.fingerprint,
        "checkpoints": suite.checkpoint_family,
        "points": [{"values": p.values, "seed": p.seed, "key": r["key"]} for p, r in zip(points, results, strict=True)],
        "computed": computed,
        "cached": len(points) - computed,
        "executor": executor,
        "workers": workers,
        "seconds": time.perf_counter() - t0,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    save_json(manifest, folder / "manifest.json")
    return SweepResult(sid, folder, frame, computed, len(points) - computed)


def list_sweeps(cache_dir: str | Path = "cache") -> list[dict]:
    """Manifests of the finished sweeps in the cache, newest first."""
    out = []
    for path in (Path(cache_dir) / "sweeps").glob("*/manifest.json"):
        try:
            out.append(load_json(path))
        except (OSError, ValueError):
            continue
    return sorted(out, key=lambda m: m.get("created", ""), reverse=True)


def manifest_config(manifest: dict) -> SweepConfig:
    """A finished sweep's config with its axes in their original order (the manifest's JSON sorts keys)."""
    config = SweepConfig.from_dict(manifest["config"])
    order = {a: i for i, a in enumerate(manifest.get("axes", []))}
    return replace(config, grid=dict(sorted(config.grid.items(), key=lambda kv: order.get(kv[0], len(order)))))


def load_frame(cache_dir: str | Path, sid: str) -> pd.DataFrame:
    frame = read_cached(sweep_dir(cache_dir, sid) / "results.csv", _read_frame, "sweep table")
    if frame is None:
        raise ConfigError(f"no finished sweep {sid!r} in {Path(cache_dir) / 'sweeps'}; run the sweep (again) to make its table")
    return frame


def _read_frame(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path)
    if frame.empty or not {"key", "task", "accuracy", "average"} <= set(frame.columns):
        raise ValueError("not a sweep table (key, task, accuracy, average)")
    return frame


def curves(frame: pd.DataFrame, x: str, by: str = "task", metric: str = "accuracy") -> pd.DataFrame:
    """Mean, std and count over seeds (and any axis other than ``x`` and ``by``) of ``metric`` against ``x``.

    ``by="task"`` gives one curve per task plus ``average``; ``by=<another axis>`` one curve of the
    per-point average per value of that axis. ``metric`` is ``accuracy`` or ``l1``.
    """
    avg = "average" if metric == "accuracy" else f"{metric}_average"
    per_point = frame.drop_duplicates("key").assign(task="average")
    per_point[metric] = per_point[avg]
    long = pd.concat([frame, per_point], ignore_index=True) if by == "task" else per_point
    long = long.dropna(subset=[metric])
    order = list(dict.fromkeys(frame[x]))
    out = long.groupby([x, by], sort=False)[metric].agg(["mean", "std", "count"]).reset_index()
    out["std"] = out["std"].fillna(0.0)
    out["_order"] = out[x].map({v: i for i, v in enumerate(order)})
    return out.sort_values([by, "_order"]).drop(columns="_order").reset_index(drop=True)


def grid_table(frame: pd.DataFrame, rows: str, cols: str, metric: str = "average") -> pd.DataFrame:
    """``metric`` (a per-point column) averaged over seeds, ``rows`` x ``cols``, for a two-axis heatmap."""
    per_point = frame.drop_duplicates("key")
    return per_point.pivot_table(index=rows, columns=cols, values=metric, aggfunc="mean", sort=False)
