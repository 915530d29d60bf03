"""The method interface: one small class per method, typed parameters, named presets (STYLE.md, mergekit).

A method ``build``s a ``MultiTaskModel`` at its initial state (deterministic from the suite, the
parameters and the seed) and, if it is data-dependent, ``adapt``s it on unlabeled test images. What
``adapt`` trains is the model's trainable state, which a run saves and reloads. A method that builds on
another run (Surgery on a base merge) declares it in ``inputs``; ``merging.runs`` runs or loads it with
the same suite, device, seed and cache and hands the built model in: a method never touches the cache.

Each hyperparameter is a dataclass field made by ``hyperparameter`` (or ``method_name`` /
``nested_params``): its help text, unit, range and choices travel in the field's metadata, which one
place (``hyperparameter_specs``) reads for the app's widgets, ``list-methods`` and ``docs/methods.md``.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

import torch

from merging.errors import ConfigError
from merging.model import MultiTaskModel, StaticModel
from merging.progress import ProgressFn
from merging.suites.base import Suite

StateDict = dict[str, torch.Tensor]


def hyperparameter(
    default: Any,
    help: str,
    *,
    unit: str = "",
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    choices: tuple[Any, ...] | None = None,
) -> Any:
    """A ``Params`` field with its words: ``help`` (one sentence, the source in brackets), ``unit``, the
    allowed range ``low``..``high`` (open ends with ``low_open``/``high_open``) and ``choices`` (a
    ``Literal`` annotation gives them too)."""
    meta = {"help": help, "unit": unit, "low": low, "high": high, "low_open": low_open, "high_open": high_open, "choices": choices}
    return field(default=default, metadata=meta)


def method_name(default: str, help: str, exclude: tuple[str, ...] = ()) -> Any:
    """A field naming another registered method (Surgery's ``base``); the registry fills its choices."""
    return field(default=default, metadata={"help": help, "method": True, "exclude": exclude})


def nested_params(of: str, help: str) -> Any:
    """The typed hyperparameters of the method named by field ``of``; spelled ``<of>.KEY=VALUE`` on the CLI."""
    return field(default_factory=dict, metadata={"help": help, "params_of": of})


AUTO = "auto"
"""``scaling=auto``: the scaling coefficient is chosen on the suite's validation split by a run (``merging.selection``)."""


def is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == AUTO


def accepts_auto(method: MergeMethod) -> bool:
    """Whether ``scaling=auto`` applies: a data-free method whose ``Params`` has a float field named ``scaling``."""
    hints = typing.get_type_hints(method.Params)
    return not method.data_dependent and hints.get("scaling") is float


FLOAT32_MAX = 3.4028234663852886e38
"""The largest float32: weights are float32, so a float hyperparameter beyond it can only give Inf."""


@dataclass(frozen=True)
class HyperparameterSpec:
    """What a user may set: read from a ``Params`` field; the app, ``list-methods`` and docs show it."""

    name: str
    type: str
    default: Any
    help: str
    unit: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[Any, ...] | None = None
    method_choice: bool = False
    params_of: str | None = None

    def allowed(self) -> str:
        """The allowed values in words, e.g. ``0 <= density <= 1`` or ``one of: layer, task``."""
        if self.params_of:
            return f"the {self.params_of} method's own hyperparameters, each as {self.params_of}.KEY=VALUE"
        if self.choices:
            return "one of: " + ", ".join(str(c) for c in self.choices)
        parts = []
        if self.low is not None:
            parts.append(f"{self.low:g} {'<' if self.low_open else '<='} ")
        parts.append(self.name)
        if self.high is not None:
            parts.append(f" {'<' if self.high_open else '<='} {self.high:g}")
        return "".join(parts) if len(parts) > 1 else f"any {self.type}"

    def check(self, value: Any, method: str) -> None:
        """Raise one line naming the method, the hyperparameter, the value and what is allowed."""
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"method {method!r}: hyperparameter {self.name!r} = {value!r} is not a finite number; allowed: {self.allowed()}")
        if isinstance(value, float) and abs(value) > FLOAT32_MAX:
            raise ConfigError(f"method {method!r}: hyperparameter {self.name!r} = {value!r} overflows the float32 weights (|value| <= {FLOAT32_MAX:.3g}); "
                              f"allowed: {self.allowed()}")
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"method {method!r}: hyperparameter {self.name!r} = {value!r} is not allowed; allowed: {self.allowed()}")
        if isinstance(value, int | float) and not isinstance(value, bool):
            too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
            too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
            if too_low or too_high:
                raise ConfigError(f"method {method!r}: hyperparameter {self.name!r} = {value!r} is out of range; allowed: {self.allowed()}")


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return type(typing.get_args(annotation)[0]).__name__
    if typing.get_origin(annotation) in (dict, Mapping):
        return "params"
    return getattr(annotation, "__name__", str(annotation))


def hyperparameter_specs(params_type: type) -> list[HyperparameterSpec]:
    """Every hyperparameter of a ``Params`` dataclass with its help text, range and choices."""
    hints = typing.get_type_hints(params_type)
    specs = []
    for f in fields(params_type):
        meta, annotation = dict(f.metadata), hints[f.name]
        choices = meta.get("choices")
        if choices is None and typing.get_origin(annotation) is Literal:
            choices = typing.get_args(annotation)
        specs.append(HyperparameterSpec(
            name=f.name, type=_type_name(annotation), default=_default_of(f), help=meta.get("help", ""), unit=meta.get("unit", ""),
            low=meta.get("low"), high=meta.get("high"), low_open=meta.get("low_open", False), high_open=meta.get("high_open", False),
            choices=tuple(choices) if choices is not None else None, method_choice=bool(meta.get("method")), params_of=meta.get("params_of"),
        ))  # fmt: skip
    return specs


@dataclass(frozen=True)
class NoParams:
    """A method without hyperparameters."""


@dataclass(frozen=True)
class RunInput:
    """Another run a method builds on (Surgery's base merge): a method, its overrides and preset."""

    method: str
    params: Mapping[str, Any] = field(default_factory=dict)
    preset: str | None = None


@dataclass(frozen=True)
class BuildContext:
    """What ``build`` gets besides the suite and the parameters: the run's seed and the built ``inputs``."""

    seed: int = 0
    inputs: Mapping[str, MultiTaskModel] = field(default_factory=dict)

    def input(self, name: str, method: str) -> MultiTaskModel:
        if name not in self.inputs:
            raise ConfigError(f"method {method!r} needs its {name!r} model: build it with merging.runs.build_model, which resolves a method's inputs")
        return self.inputs[name]


@dataclass
class RunContext:
    """What a method's test-time adaptation may use besides the suite and its parameters."""

    device: str = "cpu"
    seed: int = 0
    progress: ProgressFn | None = None


class MergeMethod:
    """Base class. Subclasses set the metadata and implement ``build`` (and ``adapt`` if data-dependent)."""

    name: ClassVar[str]
    title: ClassVar[str]
    paper_url: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    @property
    def data_dependent(self) -> bool:
        return type(self).adapt is not MergeMethod.adapt

    def inputs(self, params: Any) -> dict[str, RunInput]:
        """The other runs this method builds on, by name; ``merging.runs`` builds them and passes them to ``build``."""
        return {}

    def build(self, suite: Suite, params: Any, ctx: BuildContext = BuildContext()) -> MultiTaskModel:
        raise NotImplementedError

    def adapt(self, model: MultiTaskModel, suite: Suite, params: Any, ctx: RunContext) -> dict:
        """Test-time training without labels; returns JSON-able internals for the run's result."""
        return {}

    def data_used(self, params: Any, suite: Suite) -> dict[str, Any]:
        """Which images the method learns from, without labels: ``{"split", "images"}`` (split None when data-free).
        Test-time adaptation reads every task's unlabeled test images; a method that reads others says so here."""
        if not self.data_dependent:
            return {"split": None, "images": 0}
        return {"split": "test", "images": sum(len(suite.data[t].test_images) for t in suite.tasks)}

    def describe(self) -> dict:
        return {
            "name": self.name,
            "title": self.title,
            "paper_url": self.paper_url,
            "data_dependent": self.data_dependent,
            "params": {f.name: _default_of(f) for f in fields(self.Params)},
            "presets": self.presets,
        }


class StaticMergeMethod(MergeMethod):
    """A merge that is one state dict: the same code merges a suite and a user's raw checkpoints."""

    def merge_state_dicts(self, pretrained: Mapping[str, torch.Tensor], finetuned: Mapping[str, Mapping[str, torch.Tensor]], params: Any) -> StateDict:
        raise NotImplementedError

    def build(self, suite: Suite, params: Any, ctx: BuildContext = BuildContext()) -> MultiTaskModel:
        state = self.merge_state_dicts(suite.pretrained, suite.finetuned, params)
        return StaticModel(suite.build_encoder(), state, suite.tasks, suite.make_heads())


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """Turn a CLI/UI string into the field's declared type; error names the field."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _convert(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        return next((a for a in args if value == a or (isinstance(value, str) and value.strip() == str(a))), value)
    if origin in (tuple, list):
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
        elem = args[0] if args else str
        return tuple(_convert(v, elem, key) for v in items)
    try:
        if annotation is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if annotation is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if annotation is float:
            return float(value)
        if annotation is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"hyperparameter {key!r} must be {getattr(annotation, '__name__', annotation)}, got {value!r}") from None
    return value


def build_params(method: MergeMethod, overrides: Mapping[str, Any] | None, preset: str | None, registry: Mapping[str, MergeMethod],
                 allow_auto: bool = False) -> Any:
    """Defaults, then the named preset, then ``overrides`` (strings are converted to the declared types),
    each value checked against its declared range and choices. ``registry`` resolves fields that name
    another method and their nested parameters (``base.scaling=0.3`` or ``base_params={"scaling": 0.3}``).
    With ``allow_auto`` (a run, which can choose it on the validation split), ``scaling`` may be ``"auto"``
    (``AUTO``) for a method that ``accepts_auto``, here or in a nested base method's parameters."""
    hints = typing.get_type_hints(method.Params)
    specs = {h.name: h for h in hyperparameter_specs(method.Params)}
    nested_of = {h.params_of: h.name for h in specs.values() if h.params_of}
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in method.presets:
            if method.presets:
                raise ConfigError(f"method {method.name!r} has no preset {preset!r}; presets: {', '.join(method.presets)}")
        else:
            values.update(method.presets[preset])
    nested: dict[str, dict[str, Any]] = {}
    for k, v in (overrides or {}).items():
        prefix, dot, inner = k.partition(".")
        if dot and prefix in nested_of:
            nested.setdefault(nested_of[prefix], {})[inner] = v
            continue
        if k == "scaling" and is_auto(v):
            values[k] = _auto(method, registry, allow_auto)
            continue
        if k not in specs:
            allowed = ", ".join(sorted(specs)) or "none"
            raise ConfigError(f"unknown hyperparameter {k!r} for method {method.name!r}; allowed: {allowed}")
        if specs[k].params_of:
            if not isinstance(v, Mapping):
                raise ConfigError(f"method {method.name!r}: hyperparameter {k!r} takes the {specs[k].params_of} method's own hyperparameters; "
                                  f"write each as {specs[k].params_of}.KEY=VALUE (e.g. {specs[k].params_of}.scaling=0.3), got {v!r}")
            nested.setdefault(k, {}).update(v)
            continue
        values[k] = _convert(v, hints[k], k)
    for name, spec in specs.items():
        if name in values:
            spec.check(values[name], method.name)
        if spec.method_choice:
            chosen, allowed = values.get(name, spec.default), method_choices(method, name, registry)
            if chosen in registry and chosen not in allowed:
                raise ConfigError(f"method {method.name!r}: hyperparameter {name!r} must be a merge, not {chosen!r}; allowed: {', '.join(allowed)}")
            if chosen not in registry:
                raise ConfigError(f"method {method.name!r}: hyperparameter {name!r} = {chosen!r} is an unknown method; allowed: {', '.join(allowed)}")
    for name, given in nested.items():
        of = specs[name].params_of
        base = registry[values.get(of, specs[of].default)]
        typed = params_dict(build_params(base, given, None, registry, allow_auto))
        values[name] = {k: typed[k] for k in given}
    try:
        params = method.Params(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad hyperparameters for {method.name!r}: {e}") from None
    validate = getattr(params, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as e:
            raise ConfigError(str(e) if str(e).startswith("method ") else f"method {method.name!r}: {e}") from None
    return params


def _auto(method: MergeMethod, registry: Mapping[str, MergeMethod], allow_auto: bool) -> str:
    """``AUTO`` for ``scaling`` where it applies, else one line saying where it does."""
    if not accepts_auto(method):
        able = ", ".join(n for n, m in registry.items() if accepts_auto(m))
        why = "learns from data itself" if method.data_dependent else "has no scaling coefficient"
        raise ConfigError(f"method {method.name!r}: scaling=auto picks the scaling coefficient on the validation split, but {method.name!r} {why}; "
                          f"methods that accept it: {able}")
    if not allow_auto:
        raise ConfigError(f"method {method.name!r}: scaling=auto is chosen by a run on a suite's validation split "
                          "(python -m merging run, merging.runs.run); here give a number")
    return AUTO


def method_choices(method: MergeMethod, name: str, registry: Mapping[str, MergeMethod]) -> tuple[str, ...]:
    """The registered methods field ``name`` of ``method`` may name: all but the method itself and its exclusions."""
    excluded = set(next(f for f in fields(method.Params) if f.name == name).metadata.get("exclude", ())) | {method.name}
    return tuple(m for m in registry if m not in excluded)


def params_dict(params: Any) -> dict[str, Any]:
    return {f.name: getattr(params, f.name) for f in fields(params)}
