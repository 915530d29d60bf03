"""The method registry: one module per method, one explicit dict, no import side effects (STYLE.md §1).

A new method is one new file under ``merging/methods/`` plus one line here.
"""

from __future__ import annotations

from merging.errors import ConfigError
from merging.methods.adamerging import AdaMerging
from merging.methods.base import MergeMethod, RunContext, StaticMergeMethod, make_params, params_dict
from merging.methods.individual import Individual
from merging.methods.pretrained import Pretrained
from merging.methods.surgery import Surgery
from merging.methods.task_arithmetic import TaskArithmetic
from merging.methods.ties import Ties
from merging.methods.tinting import Tinting
from merging.methods.weight_averaging import WeightAveraging
from merging.methods.wemoe import WEMoE

METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in [
        Pretrained(),
        Individual(),
        WeightAveraging(),
        TaskArithmetic(),
        Ties(),
        AdaMerging(),
        Surgery(),
        WEMoE(),
        Tinting(),
    ]
}

BASELINES = ["pretrained", "individual", "weight_averaging", "task_arithmetic", "ties"]


def list_methods() -> list[str]:
    return list(METHODS)


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "BASELINES", "MergeMethod", "RunContext", "StaticMergeMethod", "get_method", "list_methods", "make_params", "params_dict"]
