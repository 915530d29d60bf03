"""The method interface: one small class per method, typed parameters, named presets (STYLE.md, mergekit).

A method ``build``s a ``MultiTaskModel`` at its initial state (deterministic from the suite and the
parameters) and, if it is data-dependent, ``adapt``s it on unlabeled test images. What ``adapt``
trains is the model's trainable state, which a run saves and reloads.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from merging.errors import ConfigError
from merging.model import MultiTaskModel, StaticModel
from merging.progress import ProgressFn
from merging.suites.base import Suite

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class NoParams:
    """A method without hyperparameters."""


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

    def build(self, suite: Suite, params: Any) -> MultiTaskModel:
        raise NotImplementedError

    def adapt(self, model: MultiTaskModel, suite: Suite, params: Any, ctx: RunContext) -> dict:
        """Test-time training without labels; returns JSON-able internals for the run's result."""
        return {}

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

    def build(self, suite: Suite, params: Any) -> MultiTaskModel:
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


def make_params(method: MergeMethod, overrides: Mapping[str, Any] | None = None, preset: str | None = None) -> Any:
    """Defaults, then the named preset, then ``overrides`` (strings are converted to the declared types)."""
    hints = typing.get_type_hints(method.Params)
    known = {f.name for f in fields(method.Params)}
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in method.presets:
            if method.presets:
                raise ConfigError(f"method {method.name!r} has no preset {preset!r}; presets: {', '.join(method.presets)}")
        else:
            values.update(method.presets[preset])
    for k, v in (overrides or {}).items():
        if k not in known:
            allowed = ", ".join(sorted(known)) or "none"
            raise ConfigError(f"unknown hyperparameter {k!r} for method {method.name!r}; allowed: {allowed}")
        values[k] = _convert(v, hints[k], k)
    try:
        params = method.Params(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad hyperparameters for {method.name!r}: {e}") from None
    validate = getattr(params, "validate", None)
    if validate is not None:
        validate()
    return params


def params_dict(params: Any) -> dict[str, Any]:
    return {f.name: getattr(params, f.name) for f in fields(params)}
