"""A run = (suite, method, hyperparameters, seed, tasks) -> a cache key -> results written atomically.

``cache/runs/<key>/state.safetensors`` holds the trainable state a data-dependent method learned and
``result.json`` (written last, atomically) the accuracies and internals. A run is complete exactly
when ``result.json`` exists; a killed run leaves at most temporary files that nothing reads.

A run with ``scaling=auto`` first chooses λ on the suite's validation split (``merging.selection``): its key
keeps ``"auto"`` (so it is cached apart from every fixed λ, and computed again when the validation data change),
its result's ``params`` hold the chosen λ and ``selection`` the grid, the validation accuracies and the choice.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from merging.device import default_device, default_preset
from merging.errors import CheckpointError, ConfigError
from merging.evaluation import evaluate
from merging.io import exclusive, load_json, load_state_dict, read_cached, remove_stale_temps, save_json, save_state_dict
from merging.methods import BuildContext, MergeMethod, RunContext, RunInput, get_method, is_auto, make_params, params_dict
from merging.model import MultiTaskModel
from merging.progress import ProgressFn, scaled
from merging.selection import grid_for, select_scaling
from merging.storage import storage_report
from merging.suites import Suite, get_suite

CODE_VERSION = "1"
_SHARED_SOURCES = ("model.py", "task_vectors.py", "evaluation.py", "methods/base.py", "svd.py", "masks.py", "modifiers.py", "storage.py",
                   "selection.py")


@dataclass(frozen=True)
class RunConfig:
    """What determines a run. ``params`` are overrides on top of the preset (or the defaults)."""

    suite: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None
    seed: int = 0
    tasks: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"suite": self.suite, "method": self.method, "params": dict(self.params), "preset": self.preset, "seed": self.seed,
                "tasks": list(self.tasks) if self.tasks else None}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "run config") -> RunConfig:
        """From a job spec or a ``run --config`` YAML (suite, method, params, preset, seed, tasks)."""
        unknown = set(raw) - {"suite", "method", "params", "preset", "seed", "tasks"}
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; known: suite, method, params, preset, seed, tasks")
        if not raw.get("method"):
            raise ConfigError(f"{where}: 'method' is missing")
        params = raw.get("params") or {}
        if not isinstance(params, Mapping):
            raise ConfigError(f"{where}: 'params' must be a mapping of hyperparameter: value, got {params!r}")
        tasks = raw.get("tasks")
        if isinstance(tasks, str):
            tasks = [t.strip() for t in tasks.split(",") if t.strip()]
        if tasks is not None and not (isinstance(tasks, list | tuple) and all(isinstance(t, str) for t in tasks)):
            raise ConfigError(f"{where}: 'tasks' must be task names (a list, or a comma-separated string), got {tasks!r}")
        try:
            seed = int(raw.get("seed", 0) or 0)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: 'seed' must be an integer, got {raw.get('seed')!r}") from None
        return cls(str(raw.get("suite", "mini8")), str(raw["method"]), dict(params), raw.get("preset"), seed, tuple(tasks) if tasks else None)

    def resolve(self, device: str | None = None) -> tuple[MergeMethod, Any, str | None]:
        """The method, its typed parameters, and the preset actually used (``fast`` on CPU, ``paper`` on GPU).
        ``scaling`` stays ``"auto"`` when asked for (``auto_scaling``): ``run`` chooses it on the validation split."""
        method = get_method(self.method)
        preset = (self.preset or default_preset(device)) if method.presets else None  # a method without presets records none
        return method, make_params(method, self.params, preset, allow_auto=True), preset

    def with_scaling(self, value: float) -> RunConfig:
        """The same run at a fixed scaling coefficient (a grid point, or the λ an auto run chose)."""
        return replace(self, params={**self.params, "scaling": value})


def auto_scaling(params: Any) -> bool:
    """Whether typed parameters ask for ``scaling=auto`` (chosen on the validation split by ``run``)."""
    return is_auto(getattr(params, "scaling", None))


@functools.cache
def code_version(method: MergeMethod) -> str:
    """Computed once per process (pages recompute run keys on every rerun). The code version in a run key: the method's source, the methods it may build on (Surgery on
    AdaMerging) and the shared machinery. Changing any of them recomputes the run."""
    root = Path(__file__).parent
    h = hashlib.sha256(CODE_VERSION.encode())
    h.update(Path(inspect.getfile(type(method))).read_bytes())
    sources = [root / rel for rel in _SHARED_SOURCES]
    if method.data_dependent:
        sources += sorted((root / "methods").glob("*.py")) + [root / "functional.py", root / "adaptation.py", root / "feature_cache.py"]
    for path in sources:
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


def run_key(config: RunConfig, suite: Suite, method: MergeMethod, params: Any) -> str:
    """The run's cache key: the fingerprint of the suite restricted to the run's tasks (every byte its
    numbers depend on, the validation split included), the method, its typed parameters, the seed and the
    code version; with ``scaling=auto``, the grid λ is chosen from too."""
    tasks = list(config.tasks) if config.tasks and list(config.tasks) != list(suite.tasks) else None
    blob = {
        "suite": (suite.subset(tasks) if tasks else suite).fingerprint,
        "method": method.name,
        "params": params_dict(params),
        "seed": config.seed,
        "tasks": tasks,
        "code": code_version(method),
    }
    if auto_scaling(params):
        blob["grid"] = list(grid_for(method.name))
    digest = hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{method.name}-{digest}"


def run_dir(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / "runs" / key


def read_result(folder: Path) -> dict | None:
    """A run folder's finished result, or None when it is missing or damaged (then warned about and deleted)."""

    def read(path: Path) -> dict:
        result = load_json(path)
        if not isinstance(result, dict) or not {"key", "tasks", "accuracy", "params", "method"} <= set(result):
            raise ValueError("not a run result")
        return result

    return read_cached(folder / "result.json", read, "run result")


def check_finite_model(model: MultiTaskModel, config: RunConfig) -> None:
    """Refuse a model with NaN or Inf weights before it is evaluated or cached (e.g. a huge scaling coefficient λ)."""
    tensors = [*model.state_dict().items(), *model.held_tensors().items()]
    for name, value in tensors:
        if value.is_floating_point() and not torch.isfinite(value).all():
            given = ", ".join(f"{k}={v}" for k, v in config.params.items()) or "the defaults"
            raise CheckpointError(
                f"method {config.method!r} ({given}) gave a model whose tensor {name!r} holds NaN or Inf values; "
                "nothing was evaluated or cached: use smaller hyperparameters (e.g. the scaling coefficient)"
            )


def count_parameters(model: MultiTaskModel) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    total += sum(v.numel() for v in model.held_tensors().values())
    return {"trainable": trainable, "total": total}


def input_model(spec: RunInput, config: RunConfig, suite: Suite, cache_dir: str | Path, device: str, progress: ProgressFn | None = None) -> MultiTaskModel:
    """A model another method builds on, with the outer run's suite, tasks, seed, device and cache: a
    data-dependent input is run (or loaded from its cached run), a static one is built."""
    sub = RunConfig(config.suite, spec.method, dict(spec.params), spec.preset, config.seed, config.tasks)
    if get_method(spec.method).data_dependent:
        return load_model(run(sub, suite, cache_dir, device, progress), suite, cache_dir, device)
    return build_model(sub, suite, cache_dir, device)[0]


def build_model(
    config: RunConfig, suite: Suite, cache_dir: str | Path = "cache", device: str | None = None, progress: ProgressFn | None = None
) -> tuple[MultiTaskModel, MergeMethod, Any, str | None]:
    """The run's model at its initial state (before ``adapt``), its method, typed parameters and preset.
    ``suite`` is the whole suite; ``config.tasks`` selects a subset. With ``scaling=auto`` the model at the λ
    chosen on the validation split (its auto run is run, or loaded from the cache, first)."""
    device = device or default_device()
    method, params, preset = config.resolve(device)
    if auto_scaling(params):
        chosen = run(config, suite, cache_dir, device, progress)["params"]["scaling"]
        return build_model(config.with_scaling(chosen), suite, cache_dir, device, progress)
    target = suite.subset(list(config.tasks)) if config.tasks else suite
    inputs = {name: input_model(spec, config, suite, cache_dir, device, progress) for name, spec in method.inputs(params).items()}
    torch.manual_seed(config.seed)
    return method.build(target, params, BuildContext(seed=config.seed, inputs=inputs)), method, params, preset


def cached_result(config: RunConfig, suite: Suite, cache_dir: str | Path = "cache", device: str | None = None) -> dict | None:
    """The finished result of ``config`` if the cache has it, else None (computes nothing)."""
    method, params, _ = config.resolve(device or default_device())
    return read_result(run_dir(cache_dir, run_key(config, suite, method, params)))


def run(
    config: RunConfig,
    suite: Suite | None = None,
    cache_dir: str | Path = "cache",
    device: str | None = None,
    progress: ProgressFn | None = None,
    force: bool = False,
) -> dict:
    """Run (or load the cached result of) one method on one suite; returns the result dict."""
    device = device or default_device()
    suite = suite or get_suite(config.suite, cache_dir=cache_dir, progress=scaled(progress, 0.0, 0.2, "suite: "))
    method, params, preset = config.resolve(device)
    key = run_key(config, suite, method, params)
    folder = run_dir(cache_dir, key)
    cached = None if force else _finished(folder, method)
    if cached is not None:
        return cached
    with exclusive(folder.parent / f".{key}.lock", lambda: progress and progress(0.0, "waiting for another process computing this run")):
        cached = None if force else _finished(folder, method)  # computed by the process we waited for
        if cached is not None:
            return cached
        remove_stale_temps(folder)
        return _compute(config, suite, method, params, preset, key, cache_dir, device, progress)


def _compute(config: RunConfig, suite: Suite, method: MergeMethod, params: Any, preset: str | None, key: str,
             cache_dir: str | Path, device: str, progress: ProgressFn | None) -> dict:
    """Choose λ on the validation split (``scaling=auto``); build, adapt (data-dependent methods), check and
    evaluate the run's model; write its state and result."""
    folder = run_dir(cache_dir, key)
    target = suite.subset(list(config.tasks)) if config.tasks else suite
    overrides = dict(config.params)
    selection, t_select = None, 0.0
    if auto_scaling(params):
        t0 = time.perf_counter()

        def at(value: float) -> MultiTaskModel:
            model = build_model(config.with_scaling(value), suite, cache_dir, device)[0]
            check_finite_model(model, config.with_scaling(value))
            return model

        selection = select_scaling(at, target, grid_for(method.name), device, scaled(progress, 0.1, 0.8, "choosing λ: "))
        config = config.with_scaling(selection["chosen"])
        params = config.resolve(device)[1]
        t_select = time.perf_counter() - t0
    start = 0.8 if selection else 0.1
    model = build_model(config, suite, cache_dir, device, scaled(progress, start, start + 0.1, "inputs: "))[0].to(device)
    check_finite_model(model, config)
    t0 = time.perf_counter()
    info: dict = {}
    if method.data_dependent:
        ctx = RunContext(device=device, seed=config.seed, progress=scaled(progress, 0.2, 0.9, "adapting: "))
        model.train()
        info = method.adapt(model, target, params, ctx)
        model.eval()
        check_finite_model(model, config)
        save_state_dict(model.trainable_state(), folder / "state.safetensors")
    t_adapt = time.perf_counter() - t0
    t1 = time.perf_counter()
    scores = evaluate(model, target, device=device, progress=scaled(progress, 0.9, 1.0, "evaluating: "))
    t_eval = time.perf_counter() - t1
    accuracy = {t: s["accuracy"] for t, s in scores.items()}
    result = {
        "key": key,
        "suite": config.suite,
        "suite_fingerprint": suite.fingerprint,
        "checkpoints": target.checkpoint_family,
        "method": method.name,
        "title": method.title,
        "preset": preset,
        "params": params_dict(params),
        "overrides": overrides,
        "seed": config.seed,
        "tasks": list(target.tasks),
        "device": device,
        "accuracy": accuracy,
        "loss": {t: s["loss"] for t, s in scores.items()},
        "average": sum(accuracy.values()) / len(accuracy),
        "parameters": count_parameters(model),
        "storage": storage_report(model, target.pretrained, target.heads),
        "data": method.data_used(params, target),
        "seconds": {"adapt": t_adapt, "evaluate": t_eval, **({"select": t_select} if selection else {})},
        "info": info,
        **({"selection": selection} if selection else {}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    save_json(result, folder / "result.json")
    return result


def _finished(folder: Path, method: MergeMethod) -> dict | None:
    """The run's result if it is complete: its result readable and, for a data-dependent method, its learned state too."""
    result = read_result(folder)
    return result if result is not None and (not method.data_dependent or _state_readable(folder)) else None


def _state_readable(folder: Path) -> bool:
    """Whether a data-dependent run's learned state is there and readable (else the run is computed again)."""
    state = read_cached(folder / "state.safetensors", lambda p: load_state_dict(p, check_finite=False), "run state")
    if state is None:
        (folder / "result.json").unlink(missing_ok=True)
    return state is not None


def load_model(result: dict, suite: Suite, cache_dir: str | Path = "cache", device: str | None = None) -> MultiTaskModel:
    """Rebuild a finished run's model: the method's deterministic init (its inputs loaded from their cached
    runs) plus its saved trainable state. ``suite`` is the whole suite the run was made on (the run's
    ``tasks`` select its subset; every task is keyed as no subset, so a base run is found again)."""
    tasks = tuple(result["tasks"]) if list(result["tasks"]) != list(suite.tasks) else None
    config = RunConfig(result["suite"], result["method"], result["params"], None, result.get("seed", 0), tasks)
    model = build_model(config, suite, cache_dir, device)[0]
    folder = run_dir(cache_dir, result["key"])
    if get_method(result["method"]).data_dependent:
        if not _state_readable(folder):  # damaged since the result was read: compute the run again
            result = run(config, suite, cache_dir, device)
        model.load_trainable_state(load_state_dict(folder / "state.safetensors", check_finite=False))
    return model.eval()


def list_results(cache_dir: str | Path = "cache", suite: str | None = None) -> list[dict]:
    """Every finished run in the cache (optionally of one suite), oldest first."""
    results = []
    for path in sorted((Path(cache_dir) / "runs").glob("*/result.json")):
        r = read_result(path.parent)
        if r is not None and (suite is None or r.get("suite") == suite):
            results.append(r)
    return sorted(results, key=lambda r: r.get("created", ""))
