"""Background jobs: long work runs in a separate worker process that writes its status to ``cache/jobs``.

The app never computes in a Streamlit thread (anchors.md §5): a page builds a typed job (``SuiteJob``,
``RunsJob``, ``SweepJob``), starts it, then polls its ``status.json`` while it is queued or running. A
job's id is the hash of its ``to_dict()``, so two sessions (or a reload) asking for the same work get
the same job; a finished job's result is ordinary cached output (a run's ``result.json``). Everything
a job does is also a CLI command, and the worker is itself ``python -m merging job``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from merging.artifacts import cached_cross_task_matrix, run_features
from merging.errors import ConfigError, MergeLensError
from merging.io import load_json, save_json
from merging.progress import ProgressFn
from merging.runs import RunConfig, run
from merging.suites import Suite, get_suite
from merging.sweeps import SweepConfig, run_sweep

ACTIVE = ("queued", "running")
VIEW_HINTS = ("projection", "project_task")
"""``FeaturesRequest`` fields that pick the first view a job prepares, not what it computes (left out of ``job_id``)."""
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class SuiteJob:
    """Build (or load) a suite."""

    kind: ClassVar[str] = "suite"
    suite: str
    seed: int = 0
    device: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "suite": self.suite, "seed": self.seed, "device": self.device}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SuiteJob:
        return cls(d["suite"], int(d.get("seed", 0)), d.get("device"))


@dataclass(frozen=True)
class FeaturesRequest:
    """Also extract each run's features (``n`` test images per task, per-block means if ``layers``) and fit the
    first joint projection a page shows (``project_task``, ``None`` = the suite's first task, with ``projection``)."""

    n: int | None = None
    layers: bool = False
    projection: str | None = None
    project_task: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "layers": self.layers, "projection": self.projection, "project_task": self.project_task}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeaturesRequest:
        return cls(d.get("n"), bool(d.get("layers", False)), d.get("projection"), d.get("project_task"))


@dataclass(frozen=True)
class RunsJob:
    """Run (or load) each run in order on one suite, optionally with their features."""

    kind: ClassVar[str] = "runs"
    suite: str
    runs: tuple[RunConfig, ...]
    device: str | None = None
    features: FeaturesRequest | None = None
    cross_task: bool = False
    """Also compute each run's cross-task matrix (kept next to the run), so the page that shows it only reads it."""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "suite": self.suite, "device": self.device, "runs": [r.to_dict() for r in self.runs],
                "features": self.features.to_dict() if self.features else None, "cross_task": self.cross_task}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunsJob:
        runs = tuple(RunConfig.from_dict({"suite": d["suite"], **r}, f"job run {i + 1}") for i, r in enumerate(d["runs"]))
        features = FeaturesRequest.from_dict(d["features"]) if d.get("features") else None
        return cls(d["suite"], runs, d.get("device"), features, bool(d.get("cross_task", False)))


@dataclass(frozen=True)
class SweepJob:
    """Every point of a sweep (``merging.sweeps``), locally or on Ray."""

    kind: ClassVar[str] = "sweep"
    sweep: SweepConfig
    device: str | None = None
    executor: str = "local"
    workers: int = 1
    address: str | None = None

    @property
    def suite(self) -> str:
        return self.sweep.suite

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "suite": self.suite, "sweep": self.sweep.to_dict(), "device": self.device, "executor": self.executor,
                "workers": self.workers, "address": self.address}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SweepJob:
        return cls(SweepConfig.from_dict(d["sweep"]), d.get("device"), d.get("executor", "local"), int(d.get("workers", 1)), d.get("address"))


@dataclass(frozen=True)
class ViewJob:
    """One of the "Why merges fail" views that is computed, not read off runs: the task-vector geometry, the λ plane
    of a task pair (``tasks``), or every pair's merge and metrics. Its output is the view's own cache entry."""

    kind: ClassVar[str] = "view"
    suite: str
    view: str
    tasks: tuple[str, ...] = ()
    device: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "suite": self.suite, "view": self.view, "tasks": list(self.tasks), "device": self.device}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ViewJob:
        if d.get("view") not in VIEWS:
            raise ConfigError(f"unknown view {d.get('view')!r}; known: {', '.join(VIEWS)}")
        return cls(d["suite"], d["view"], tuple(d.get("tasks") or ()), d.get("device"))


def _view_geometry(job: ViewJob, suite: Suite, cache_dir: str | Path, progress: ProgressFn) -> Any:
    from merging.geometry import suite_geometry

    return suite_geometry(suite, cache_dir=cache_dir, progress=progress)


def _view_lambda_plane(job: ViewJob, suite: Suite, cache_dir: str | Path, progress: ProgressFn) -> Any:
    from merging.lambda_plane import lambda_plane

    return lambda_plane(suite, *job.tasks, cache_dir=cache_dir, device=job.device, progress=progress)


def _view_pairs(job: ViewJob, suite: Suite, cache_dir: str | Path, progress: ProgressFn) -> Any:
    from merging.pair_metrics import pair_table

    return pair_table(suite, cache_dir=cache_dir, device=job.device, progress=progress)


VIEWS = {"geometry": _view_geometry, "lambda_plane": _view_lambda_plane, "pairs": _view_pairs}


Job = SuiteJob | RunsJob | SweepJob | ViewJob
JOB_TYPES: dict[str, type] = {t.kind: t for t in (SuiteJob, RunsJob, SweepJob, ViewJob)}


def job_from_dict(d: Mapping[str, Any]) -> Job:
    kind = d.get("kind") if isinstance(d, Mapping) else None
    if kind not in JOB_TYPES:
        raise ConfigError(f"unknown job kind {kind!r}; known: {', '.join(JOB_TYPES)}")
    try:
        return JOB_TYPES[kind].from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"bad {kind} job: {type(e).__name__} {e}") from None


def job_id(job: Job) -> str:
    """The id of the *work* a job does: two requests that compute the same runs and features are one job.

    A ``FeaturesRequest``'s projection and task only say which view to fit first (a hint, not part of the
    work), so a page switching UMAP to t-SNE, or a second tab on another task, attaches to the running job.
    """
    spec = job.to_dict()
    if spec.get("features"):
        spec = {**spec, "features": {k: v for k, v in spec["features"].items() if k not in VIEW_HINTS}}
    blob = json.dumps(spec, sort_keys=True, default=str)
    return f"{job.kind}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def is_active(status: dict | None) -> bool:
    return bool(status) and status["state"] in ACTIVE


def job_dir(cache_dir: str | Path, jid: str) -> Path:
    return Path(cache_dir) / "jobs" / jid


def read_status(cache_dir: str | Path, jid: str) -> dict | None:
    path = job_dir(cache_dir, jid) / "status.json"
    try:
        status = load_json(path)
    except (OSError, ValueError):
        return None
    if not isinstance(status, dict) or "state" not in status:
        return None
    if status["state"] in ACTIVE and (path.parent / CANCEL_MARK).is_file():
        status = {**status, "state": "cancelled", "message": "cancelled"}
    if status.get("state") in ACTIVE and not _alive(status.get("pid")):
        if time.time() - status.get("updated", 0) > 5:  # the worker died without saying so
            status = {**status, "state": "error", "message": "the worker process ended unexpectedly"}
    return status


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # a zombie child of this process counts as finished
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def start(job: Job | Mapping[str, Any], cache_dir: str | Path = "cache", restart_failed: bool = True, restart_done: bool = False) -> str:
    """Start ``job`` (or its ``to_dict()``) unless the same job is already queued, running or done; returns its id.

    ``restart_done``: the caller found the job's outputs missing, so a ``done`` record is stale (the suite was
    rebuilt from a new recipe, or part of ``cache/`` was deleted) and the job runs again instead of being
    reported done forever. Its cached parts are read back, so a re-run only computes what is missing.
    """
    if not isinstance(job, SuiteJob | RunsJob | SweepJob | ViewJob):
        job = job_from_dict(job)
    spec = job.to_dict()
    jid = job_id(job)
    folder = job_dir(cache_dir, jid)
    status = read_status(cache_dir, jid)
    if status and (status["state"] in ACTIVE or (status["state"] == "done" and not restart_done)):
        return jid
    if status and status["state"] in ("error", "cancelled") and not restart_failed:
        return jid
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CANCEL_MARK).unlink(missing_ok=True)
    lock = folder / "start.lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        if time.time() - lock.stat().st_mtime < 10:
            return jid  # another session is starting it right now
        lock.unlink(missing_ok=True)
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    try:
        save_json(spec, folder / "spec.json")
        _write(folder, {"state": "queued", "progress": 0.0, "message": "starting", "spec": spec, "pid": None})
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.setdefault("NUMBA_CACHE_DIR", str(Path(cache_dir).resolve() / "numba"))
        with open(folder / "log.txt", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "merging", "job", "--cache-dir", str(cache_dir), jid],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
            )
        _write(folder, {"state": "queued", "progress": 0.0, "message": "starting", "spec": spec, "pid": proc.pid})
    finally:
        os.close(fd)
        lock.unlink(missing_ok=True)
    return jid


CANCEL_MARK = "cancel"
"""A file in a job's folder: the job was cancelled. Read before any status, so a worker that writes one more
progress line before its signal arrives is never shown as running again."""


def cancel(cache_dir: str | Path, jid: str, grace: float = 3.0) -> None:
    """Stop a queued or running job for good: mark it cancelled, SIGTERM its process group, SIGKILL after ``grace`` s."""
    status = read_status(cache_dir, jid)
    if not status or status["state"] not in ACTIVE:
        return
    folder = job_dir(cache_dir, jid)
    (folder / CANCEL_MARK).touch()
    _write(folder, {**status, "state": "cancelled", "message": "cancelled"})
    pid = status.get("pid")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not pid or not _alive(pid):
            return
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                return
        deadline = time.time() + grace
        while time.time() < deadline and _alive(pid):
            time.sleep(0.05)


def list_jobs(cache_dir: str | Path = "cache", active_only: bool = False) -> list[dict]:
    out = []
    for path in sorted((Path(cache_dir) / "jobs").glob("*/status.json")):
        status = read_status(cache_dir, path.parent.name)
        if status and (not active_only or status["state"] in ACTIVE):
            out.append({"id": path.parent.name, **status})
    return sorted(out, key=lambda s: s.get("started", 0))


def _write(folder: Path, status: dict) -> None:
    save_json({**status, "updated": time.time(), "started": status.get("started", time.time())}, folder / "status.json")


# ------------------------------------------------------------------------------------- the worker
def execute(job: Job | Mapping[str, Any], cache_dir: str | Path, progress: ProgressFn) -> Any:
    """Do the work of a job in this process; returns a JSON-able result."""
    if not isinstance(job, SuiteJob | RunsJob | SweepJob | ViewJob):
        job = job_from_dict(job)
    features = job.features if isinstance(job, RunsJob) else None
    if features and features.projection == "umap":
        # numba compiles UMAP (~25 s) on a thread from the start; measured against starting it at the first
        # training step or compiling after the job's runs, this gave the shortest first visit (BENCHMARKS.md)
        from merging.projection import warm_up_in_background

        warm_up_in_background()
    suite = get_suite(job.suite, seed=job.seed if isinstance(job, SuiteJob) else 0, cache_dir=cache_dir, progress=progress)
    if isinstance(job, SuiteJob):
        return {"suite": suite.name, "fingerprint": suite.fingerprint}
    if isinstance(job, SweepJob):
        done = run_sweep(job.sweep, suite, cache_dir, job.device, job.executor, job.workers, job.address, progress)
        return {"sweep": done.id, "computed": done.computed, "cached": done.cached}
    if isinstance(job, ViewJob):
        VIEWS[job.view](job, suite, cache_dir, progress)
        return {"view": job.view, "tasks": list(job.tasks)}
    return execute_runs(job, suite, cache_dir, progress)


def execute_runs(job: RunsJob, suite: Suite, cache_dir: str | Path, progress: ProgressFn) -> dict:
    share = 0.7 if job.features else 1.0
    results = []
    for i, config in enumerate(job.runs):

        def sub(fraction: float, message: str, i: int = i, name: str = config.method) -> None:
            progress(share * (i + fraction) / len(job.runs), f"{name} ({i + 1}/{len(job.runs)}): {message}")

        results.append(run(config, suite, cache_dir=cache_dir, device=job.device, progress=sub))
    if job.features:
        request, sets = job.features, []
        for i, r in enumerate(results):

            def feat(fraction: float, message: str, i: int = i, name: str = r["method"]) -> None:
                progress(share + (1 - share) * (i + fraction) / len(results), f"features of {name}: {message}")

            sets.append(run_features(r, suite, n=request.n, layers=request.layers, cache_dir=cache_dir, device=job.device, progress=feat))
        if request.projection:  # the page's first view
            from merging.projection import joint_projection

            task = request.project_task or suite.tasks[0]
            progress(0.99, f"{request.projection} projection of {task}")
            joint_projection({r["key"]: fs[task] for r, fs in zip(results, sets, strict=True)}, method=request.projection, cache_dir=cache_dir)
    if job.cross_task:
        for i, r in enumerate(results):
            progress(0.99 * (i + 1) / len(results), f"cross-task matrix of {r['method']} ({i + 1}/{len(results)})")
            cached_cross_task_matrix(r, suite, cache_dir, device=job.device)
    return {"keys": [r["key"] for r in results]}


def work(jid: str, cache_dir: str | Path = "cache") -> int:
    """The worker's main: run the job, keep ``status.json`` current, never leave it 'running' on exit."""
    folder = job_dir(cache_dir, jid)
    spec = load_json(folder / "spec.json")
    status = {"state": "running", "progress": 0.0, "message": "starting", "spec": spec, "pid": os.getpid(), "started": time.time()}
    _write(folder, status)
    last = [0.0]

    def progress(fraction: float, message: str) -> None:
        if (folder / CANCEL_MARK).is_file():  # cancelled while this process was busy in a long call
            raise KeyboardInterrupt
        now = time.time()
        if now - last[0] > 0.3 or fraction >= 1.0:
            last[0] = now
            status.update(progress=float(min(max(fraction, 0.0), 1.0)), message=message)
            _write(folder, status)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        result = execute(spec, cache_dir, progress)
        status.update(state="done", progress=1.0, message="done", result=result)
        code = 0
    except KeyboardInterrupt:
        status.update(state="cancelled", message="cancelled")
        code = 130
    except MergeLensError as e:
        status.update(state="error", message=str(e))
        code = 2
    except Exception as e:  # the page shows the message; the log keeps the traceback
        traceback.print_exc()
        status.update(state="error", message=f"{type(e).__name__}: {e}")
        code = 1
    status["finished"] = time.time()
    _write(folder, status)
    return code
