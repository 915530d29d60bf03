"""Background jobs: long work runs in a separate worker process that writes its status to ``cache/jobs``.

The app never computes in a Streamlit thread (anchors.md §5): a page starts a job, then polls its
``status.json``. A job's id is the hash of its spec, so two sessions (or a reload) asking for the same
work get the same job; a finished job's result is ordinary cached output (a run's ``result.json``).
Everything a job does is also a CLI command, and the worker is itself ``python -m merging job``.
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
from pathlib import Path
from typing import Any

from merging.errors import ConfigError, MergeLensError
from merging.io import load_json, save_json

ACTIVE = ("queued", "running")
ROOT = Path(__file__).resolve().parents[1]


def job_id(spec: dict) -> str:
    blob = json.dumps(spec, sort_keys=True, default=str)
    return f"{spec.get('kind', 'job')}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def job_dir(cache_dir: str | Path, jid: str) -> Path:
    return Path(cache_dir) / "jobs" / jid


def read_status(cache_dir: str | Path, jid: str) -> dict | None:
    path = job_dir(cache_dir, jid) / "status.json"
    try:
        status = load_json(path)
    except (OSError, ValueError):
        return None
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


def start(spec: dict, cache_dir: str | Path = "cache", restart_failed: bool = True, restart_done: bool = False) -> str:
    """Start the job for ``spec`` unless the same job is already queued, running or done; returns its id.

    ``restart_done``: the caller found the job's outputs missing, so a ``done`` record is stale (the suite was
    rebuilt from a new recipe, or part of ``cache/`` was deleted) and the job runs again instead of being
    reported done forever. Its cached parts are read back, so a re-run only computes what is missing.
    """
    validate_spec(spec)
    jid = job_id(spec)
    folder = job_dir(cache_dir, jid)
    status = read_status(cache_dir, jid)
    if status and (status["state"] in ACTIVE or (status["state"] == "done" and not restart_done)):
        return jid
    if status and status["state"] in ("error", "cancelled") and not restart_failed:
        return jid
    folder.mkdir(parents=True, exist_ok=True)
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


def cancel(cache_dir: str | Path, jid: str) -> None:
    status = read_status(cache_dir, jid)
    if not status or status["state"] not in ACTIVE:
        return
    pid = status.get("pid")
    if pid and _alive(pid):
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    _write(job_dir(cache_dir, jid), {**status, "state": "cancelled", "message": "cancelled"})


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
KINDS = ("suite", "run", "runs", "sweep")


def validate_spec(spec: dict) -> None:
    if spec.get("kind") not in KINDS:
        raise ConfigError(f"unknown job kind {spec.get('kind')!r}; known: {', '.join(KINDS)}")


def execute(spec: dict, cache_dir: str | Path, progress) -> Any:
    """Do the work of a job in this process; returns a JSON-able result."""
    from merging.runs import RunConfig, run
    from merging.suites import get_suite

    kind = spec["kind"]
    project = (spec.get("features") or {}).get("project")
    if project and project.get("method", "umap") == "umap":
        # numba compiles UMAP (~25 s) on a thread from the start; measured against starting it at the first
        # training step or compiling after the job's runs, this gave the shortest first visit (BENCHMARKS.md)
        from merging.projection import warm_up_in_background

        warm_up_in_background()
    suite = get_suite(spec["suite"], seed=spec.get("suite_seed", 0), cache_dir=cache_dir, progress=progress)
    if kind == "suite":
        return {"suite": suite.name, "fingerprint": suite.fingerprint}
    if kind == "sweep":
        from merging.sweeps import SweepConfig, run_sweep

        done = run_sweep(SweepConfig.from_dict(spec["sweep"]), suite, cache_dir, spec.get("device"), spec.get("executor", "local"),
                         spec.get("workers", 1), spec.get("address"), progress)
        return {"sweep": done.id, "computed": done.computed, "cached": done.cached}
    configs = [spec["run"]] if kind == "run" else spec["runs"]
    features = spec.get("features")  # {"n": samples per task, "layers": bool}: also extract each run's features
    share = 0.7 if features else 1.0
    results = []
    for i, c in enumerate(configs):
        config = RunConfig(spec["suite"], c["method"], c.get("params", {}), c.get("preset"), c.get("seed", 0), tuple(c["tasks"]) if c.get("tasks") else None)

        def sub(fraction: float, message: str, i: int = i, name: str = c["method"]) -> None:
            progress(share * (i + fraction) / len(configs), f"{name} ({i + 1}/{len(configs)}): {message}")

        results.append(run(config, suite, cache_dir=cache_dir, device=spec.get("device"), progress=sub))
    if features:
        from merging.representations import run_features

        sets = []
        for i, r in enumerate(results):

            def feat(fraction: float, message: str, i: int = i, name: str = r["method"]) -> None:
                progress(share + (1 - share) * (i + fraction) / len(results), f"features of {name}: {message}")

            sets.append(run_features(r, suite, n=features.get("n"), layers=features.get("layers", False), cache_dir=cache_dir, device=spec.get("device"), progress=feat))
        if project:  # {"task": name or None (the first), "method": "umap"}: the page's first view
            from merging.projection import joint_projection

            task = project.get("task") or suite.tasks[0]
            progress(0.99, f"{project.get('method', 'umap')} projection of {task}")
            joint_projection({r["key"]: fs[task] for r, fs in zip(results, sets, strict=True)}, method=project.get("method", "umap"), cache_dir=cache_dir)
    return {"keys": [r["key"] for r in results]}


def work(jid: str, cache_dir: str | Path = "cache") -> int:
    """The worker's main: run the job, keep ``status.json`` current, never leave it 'running' on exit."""
    folder = job_dir(cache_dir, jid)
    spec = load_json(folder / "spec.json")
    status = {"state": "running", "progress": 0.0, "message": "starting", "spec": spec, "pid": os.getpid(), "started": time.time()}
    _write(folder, status)
    last = [0.0]

    def progress(fraction: float, message: str) -> None:
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
