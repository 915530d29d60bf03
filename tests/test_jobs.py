"""Background jobs: one job per spec across sessions, progress in status.json, cancel, and a crashed worker is reported."""

import time

import pytest

from merging import jobs
from merging.errors import ConfigError
from merging.jobs import FeaturesRequest, RunsJob, SuiteJob, SweepJob
from merging.runs import RunConfig, cached_result
from merging.sweeps import SweepConfig


def _wait(cache, jid, states, timeout=180):
    for _ in range(timeout * 4):
        status = jobs.read_status(cache, jid)
        if status and status["state"] in states:
            return status
        time.sleep(0.25)
    raise AssertionError(f"job {jid} never reached {states}: {jobs.read_status(cache, jid)}")


def test_same_spec_is_one_job_and_its_result_is_a_cached_run(micro_suite, micro_cache):
    spec = RunsJob("micro", (RunConfig("micro", "ties", {"density": 0.35}),), "cpu")
    first = jobs.start(spec, micro_cache)
    second = jobs.start(spec, micro_cache)  # another tab / session asking for the same work
    assert first == second
    assert len([j for j in jobs.list_jobs(micro_cache) if j["id"] == first]) == 1
    status = _wait(micro_cache, first, ("done", "error"))
    assert status["state"] == "done", status
    result = cached_result(RunConfig("micro", "ties", {"density": 0.35}), micro_suite, micro_cache, "cpu")
    assert result is not None and status["result"]["keys"] == [result["key"]]
    assert jobs.start(spec, micro_cache) == first and jobs.read_status(micro_cache, first)["state"] == "done"


def test_a_done_job_whose_outputs_are_gone_reruns_when_the_caller_says_so(micro_suite, micro_cache):
    """A page that finds a finished job's outputs missing (suite rebuilt from a new recipe, cache partly deleted)
    must get them recomputed, not a 'done' it would wait on forever."""
    import shutil

    config = RunConfig("micro", "ties", {"density": 0.45})
    spec = RunsJob("micro", (config,), "cpu")
    jid = jobs.start(spec, micro_cache)
    first = _wait(micro_cache, jid, ("done", "error"))
    assert first["state"] == "done", first
    key = cached_result(config, micro_suite, micro_cache, "cpu")["key"]
    shutil.rmtree(micro_cache / "runs" / key)
    assert cached_result(config, micro_suite, micro_cache, "cpu") is None
    assert jobs.start(spec, micro_cache) == jid and jobs.read_status(micro_cache, jid)["pid"] == first["pid"]  # still "done"
    assert jobs.start(spec, micro_cache, restart_done=True) == jid
    second = _wait(micro_cache, jid, ("done", "error"))
    assert second["state"] == "done" and second["pid"] != first["pid"], second
    assert cached_result(config, micro_suite, micro_cache, "cpu")["key"] == key


def test_cancel_stops_the_worker_and_leaves_no_result(micro_suite, micro_cache):
    spec = RunsJob("micro", (RunConfig("micro", "surgery", {"iterations": 100000}, "fast"),), "cpu")
    jid = jobs.start(spec, micro_cache)
    status = _wait(micro_cache, jid, ("running",))
    time.sleep(3)
    jobs.cancel(micro_cache, jid)
    assert jobs.read_status(micro_cache, jid)["state"] == "cancelled"
    for _ in range(40):
        if not jobs._alive(status["pid"]):  # reaps the zombie of this test's child
            break
        time.sleep(0.25)
    else:
        pytest.fail("the worker is still alive after cancel")
    assert cached_result(RunConfig("micro", "surgery", {"iterations": 100000}, "fast"), micro_suite, micro_cache, "cpu") is None


def test_a_dead_worker_is_reported_as_an_error(micro_cache):
    jid = "runs-deadbeef0000"
    folder = jobs.job_dir(micro_cache, jid)
    folder.mkdir(parents=True)
    jobs._write(folder, {"state": "running", "progress": 0.3, "message": "working", "pid": 2**22 + 12345})
    status = jobs.read_status(micro_cache, jid)
    assert status["state"] in ("running", "error")  # grace period for a worker that has just started
    time.sleep(5.5)
    assert jobs.read_status(micro_cache, jid)["state"] == "error"


def test_unknown_job_kind_is_refused(micro_cache):
    with pytest.raises(Exception, match="unknown job kind"):
        jobs.start({"kind": "mine-bitcoin", "suite": "micro"}, micro_cache)


def test_a_runs_job_fits_the_first_projection_the_bias_page_reads(micro_suite, micro_cache):
    from pathlib import Path

    from merging.artifacts import run_features
    from merging.projection import joint_projection, projection_key, resolved_params

    runs = (RunConfig("micro", "individual"), RunConfig("micro", "task_arithmetic", {"scaling": 0.35}))
    spec = RunsJob("micro", runs, "cpu", FeaturesRequest(n=24, layers=False, projection="pca", project_task="gratings"))
    out = jobs.execute(spec, micro_cache, lambda fraction, message: None)
    results = [cached_result(r, micro_suite, micro_cache, "cpu") for r in runs]
    assert out["keys"] == [r["key"] for r in results]
    sets = {label: run_features(r, micro_suite, tasks=["gratings"], n=24, cache_dir=micro_cache)["gratings"] for label, r in zip(("a", "b"), results, strict=True)}
    key = projection_key(sets, "final", "pca", 2, 0, resolved_params("pca"))
    path = Path(micro_cache) / "projections" / f"{key}.safetensors"
    assert path.is_file()  # the page's first view is a cache hit
    frame = joint_projection(sets, method="pca", cache_dir=micro_cache)
    assert len(frame) == 48 and set(frame["model"]) == {"a", "b"}


@pytest.mark.parametrize("job", [
    SuiteJob("micro", seed=3, device="cpu"),
    RunsJob("micro", (RunConfig("micro", "surgery", {"base": "ties", "base.density": 0.3}, "fast", 1, ("colors",)),), "cpu",
            FeaturesRequest(n=50, layers=True, projection="umap")),
    SweepJob(SweepConfig("micro", "task_arithmetic", {"scaling": [0.1, 0.3]}, seeds=(0, 1)), "cpu", "local", 2),
])  # fmt: skip
def test_typed_jobs_round_trip_through_their_dict_and_keep_their_id(job):
    """The worker rebuilds the job from ``spec.json``: the same job, so the same id across sessions."""
    import json

    back = jobs.job_from_dict(json.loads(json.dumps(job.to_dict())))
    assert back == job and jobs.job_id(back) == jobs.job_id(job)
    assert jobs.job_id(job).startswith(job.kind + "-")


def test_a_cancelled_job_stays_cancelled_when_the_page_asks_again(micro_suite, micro_cache):
    """Issue #23.4: after Cancel the page reruns and asks for the same work (automatic start): nothing restarts, and a
    worker that wrote one more progress line before its signal arrived is not shown as running again."""
    spec = RunsJob("micro", (RunConfig("micro", "surgery", {"iterations": 100001}, "fast"),), "cpu")
    jid = jobs.start(spec, micro_cache)
    pid = _wait(micro_cache, jid, ("running",))["pid"]
    jobs.cancel(micro_cache, jid)
    assert not jobs._alive(pid)
    assert jobs.start(spec, micro_cache, restart_failed=False, restart_done=True) == jid  # the page's automatic start
    status = jobs.read_status(micro_cache, jid)
    assert status["state"] == "cancelled" and status["pid"] == pid
    late = {**status, "state": "running", "message": "adapting: step 3"}  # the worker's last write, after the mark
    jobs._write(jobs.job_dir(micro_cache, jid), late)
    assert jobs.read_status(micro_cache, jid)["state"] == "cancelled"
    jobs.start(spec, micro_cache)  # Retry: runs again
    assert jobs.read_status(micro_cache, jid)["state"] in jobs.ACTIVE
    jobs.cancel(micro_cache, jid)


def test_a_views_projection_and_task_do_not_make_another_job():
    """Issue #23.5: switching UMAP to t-SNE, or a second tab on another task, is the same work."""
    runs = (RunConfig("micro", "individual"), RunConfig("micro", "task_arithmetic"))
    ids = {jobs.job_id(RunsJob("micro", runs, "cpu", FeaturesRequest(300, True, proj, task)))
           for proj in ("umap", "tsne", "pca") for task in (None, "colors", "digits")}
    assert len(ids) == 1
    assert jobs.job_id(RunsJob("micro", runs, "cpu", FeaturesRequest(240, True, "umap"))) not in ids  # other features: other work


def test_two_processes_needing_the_same_run_compute_it_once(tmp_path, monkeypatch):
    """Issue #23.5: a per-run lock; the second caller waits and reads the first one's result."""
    import threading

    from conftest import random_suite

    import merging.runs as runs

    computed, real = [], runs._compute

    def slow_compute(*args, **kwargs):
        computed.append(1)
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(runs, "_compute", slow_compute)
    suite, config, out = random_suite(), RunConfig("random", "task_arithmetic", {"scaling": 0.45}), []
    waited = []
    threads = [threading.Thread(target=lambda: out.append(runs.run(config, suite, tmp_path, "cpu", progress=lambda f, m: waited.append(m))))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert computed == [1] and out[0] == out[1]
    assert "waiting for another process computing this run" in waited


def test_view_job_computes_a_why_view_into_its_cache(micro_suite, micro_cache):
    """The "Why merges fail" page's computed views run as ordinary jobs; the job leaves exactly the entry the page reads."""
    from merging.geometry import DEFAULT_MERGES, geometry_path, suite_geometry

    job = jobs.ViewJob("micro", "geometry")
    assert jobs.job_from_dict(job.to_dict()) == job and jobs.job_id(job) != jobs.job_id(jobs.ViewJob("micro", "pairs"))
    with pytest.raises(ConfigError, match="unknown view 'nope'"):
        jobs.job_from_dict({**job.to_dict(), "view": "nope"})
    target = geometry_path(micro_suite, DEFAULT_MERGES, 0.2, 0.4, micro_cache)
    target.unlink(missing_ok=True)
    assert jobs.execute(job, micro_cache, lambda f, m: None) == {"view": "geometry", "tasks": []}
    assert target.is_file()
    cosine = suite_geometry(micro_suite, cache_dir=micro_cache).cosine
    assert cosine.shape == (3, 3) and all(abs(cosine.iloc[i, i] - 1) < 1e-6 for i in range(3))
