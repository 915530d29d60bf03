"""The method registry: one module per method, one explicit dict, no import side effects (STYLE.md §1).

A new method is one new file under ``merging/methods/`` plus one line here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from merging.errors import ConfigError
from merging.methods.adamerging import AdaMerging
from merging.methods.base import (
    AUTO,
    BuildContext,
    HyperparameterSpec,
    MergeMethod,
    RunContext,
    RunInput,
    StaticMergeMethod,
    accepts_auto,
    build_params,
    hyperparameter_specs,
    is_auto,
    method_choices,
    params_dict,
)
from merging.methods.cart import Cart
from merging.methods.consensus import Consensus
from merging.methods.emr import EMR
from merging.methods.featcal import FeatCal
from merging.methods.individual import Individual
from merging.methods.iso_c import IsoC
from merging.methods.iso_cts import IsoCts
from merging.methods.pretrained import Pretrained
from merging.methods.surgery import Surgery
from merging.methods.tall_masks import TallMasks
from merging.methods.task_arithmetic import TaskArithmetic
from merging.methods.ties import Ties
from merging.methods.tinting import Tinting
from merging.methods.tsv_m import TsvM
from merging.methods.weight_averaging import WeightAveraging
from merging.methods.wemoe import WEMoE
from merging.methods.wudi import Wudi

METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in [
        Pretrained(),
        Individual(),
        WeightAveraging(),
        TaskArithmetic(),
        Ties(),
        TsvM(),
        IsoC(),
        IsoCts(),
        Cart(),
        Wudi(),
        Consensus(),
        TallMasks(),
        EMR(),
        AdaMerging(),
        Surgery(),
        WEMoE(),
        Tinting(),
        FeatCal(),
    ]
}

BASELINES = ["pretrained", "individual", "weight_averaging", "task_arithmetic", "ties"]


REFERENCES = ("pretrained", "individual")
STORAGE_LANE = ("tall_masks", "emr")
GROUPS = ("reference", "data-free, one model", "storage lane (task id)", "data-dependent")
"""How the pages group methods: the two reference rows; merges that need only the weights and give one plain
model; methods that keep a small part per task and need the task id at inference (compression more than
merging: compare them on accuracy against megabytes stored, never silently with single merged models);
methods that also learn from unlabeled images (and may add modules)."""


def method_group(name: str) -> str:
    """``name``'s group in ``GROUPS``."""
    if name in REFERENCES:
        return "reference"
    if name in STORAGE_LANE:
        return "storage lane (task id)"
    return "data-dependent" if get_method(name).data_dependent else "data-free, one model"


def list_methods() -> list[str]:
    return list(METHODS)


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]


def make_params(method: MergeMethod, overrides: Mapping[str, Any] | None = None, preset: str | None = None, allow_auto: bool = False) -> Any:
    """A method's typed parameters: defaults, then ``preset``, then ``overrides`` (CLI/UI strings are converted;
    ``base.KEY=VALUE`` sets a nested base method's own). Raises ``ConfigError``, one line naming the method,
    the hyperparameter, the value and what is allowed. ``allow_auto``: ``scaling`` may stay ``"auto"``, for a
    run to choose on the validation split (``merging.selection``)."""
    return build_params(method, overrides, preset, METHODS, allow_auto)


def specs(method: MergeMethod) -> list[HyperparameterSpec]:
    """The method's hyperparameters with their help, range and choices (fields naming a method get the registry's)."""
    out = []
    for h in hyperparameter_specs(method.Params):
        if h.method_choice:
            h = dataclasses.replace(h, choices=method_choices(method, h.name, METHODS))
        out.append(h)
    return out


__all__ = [
    "AUTO", "BASELINES", "GROUPS", "METHODS", "REFERENCES", "STORAGE_LANE", "BuildContext", "HyperparameterSpec", "MergeMethod", "RunContext", "RunInput", "StaticMergeMethod",
    "accepts_auto", "get_method", "is_auto", "list_methods", "make_params", "method_group", "params_dict", "specs",
]  # fmt: skip
