"""Where a number comes from: the checkpoint family, the method's hyperparameters and the data it adapted on.

Every accuracy table, export and figure title says it (issue #22): ``family_label`` names the checkpoints
(suite, layout, a short digest of the weights), ``run_label`` a run's hyperparameters, preset and the split a
data-dependent method learned from, ``provenance_columns`` the same as CSV columns, and ``check_one_family``
refuses to put numbers of two checkpoint families in one table. A result written before runs recorded their
family (no ``"checkpoints"``) gets what can be derived and "weights unknown".
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pandas as pd

from merging.errors import ConfigError

UNKNOWN = "unknown"
LAMBDAS = {"scaling": "λ", "init_lambda": "λ₀", "tall_lambda": "TALL λ"}
"""Hyperparameters written with a Greek letter in labels: the merge's scaling coefficient and its relatives."""
KEY_PARAMS = ("scaling", "init_lambda", "tall_lambda", "init", "density", "rank", "k", "base", "layer")
"""A run label's hyperparameters when present (besides every one changed from the preset or default)."""
COLUMNS = ("suite", "layout", "weights", "method", "preset", "params", "adapted_on", "selection")
"""The provenance columns of every CSV export (``provenance_columns``), in this order."""


def family_of(result: Mapping[str, Any]) -> dict[str, str]:
    """The result's checkpoint family ``{"suite", "layout", "weights"}``; for a result made before runs recorded it,
    the suite's name, its layout when the suite is built in, and ``weights: "unknown"``."""
    family = result.get("checkpoints")
    if isinstance(family, Mapping) and family.get("weights"):
        return {"suite": str(family.get("suite", result.get("suite", UNKNOWN))), "layout": str(family.get("layout", UNKNOWN)),
                "weights": str(family["weights"])}
    from merging.suites import BUILTIN_SUITES

    suite = str(result.get("suite", UNKNOWN))
    return {"suite": suite, "layout": "built-in" if suite in BUILTIN_SUITES else UNKNOWN, "weights": UNKNOWN}


def family_label(checkpoints: Mapping[str, Any] | None) -> str:
    """One line naming a checkpoint family: ``"mini8 · built-in · weights 1a2b3c4d"`` (or ``"... · weights unknown"``)."""
    family = dict(checkpoints or {})
    weights = family.get("weights") or UNKNOWN
    return f"{family.get('suite') or UNKNOWN} · {family.get('layout') or UNKNOWN} · weights {weights}"


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k}={_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return str(v)


def _name(key: str) -> str:
    return LAMBDAS.get(key, key)


def selection_label(selection: Mapping[str, Any]) -> str:
    """``"chosen on val from 9-point grid (800 images)"``: how a hyperparameter was selected (``result["selection"]``)."""
    grid = selection.get("grid") or []
    images = selection.get("images")
    split = selection.get("split") or UNKNOWN
    count = f" ({images:,} images)" if isinstance(images, int) else ""
    return f"chosen on {split} from {len(grid)}-point grid{count}"


def data_label(result: Mapping[str, Any]) -> str:
    """Which split a data-dependent method learned from: ``"adapted on test (unlabeled, 4,000 images)"``,
    ``"calibrated on train (unlabeled, 2,048 images)"``; "" for a data-free method."""
    data = result.get("data")
    if not isinstance(data, Mapping):
        try:
            from merging.methods import get_method

            dependent = get_method(str(result.get("method"))).data_dependent
        except Exception:  # an unregistered method in an old result: say nothing we do not know
            dependent = False
        return "adapted on an unknown split" if dependent else ""
    split = data.get("split")
    if not split:
        return ""
    verb = "calibrated" if result.get("method") == "featcal" else "adapted"
    images = data.get("images")
    count = f", {int(images):,} images" if isinstance(images, int | float) else ""
    return f"{verb} on {split} (unlabeled{count})"


def has_presets(method: str) -> bool:
    """Whether the preset means anything for ``method`` (a result records a preset it was given even where it has none)."""
    try:
        from merging.methods import get_method

        return bool(get_method(method).presets)
    except Exception:  # an unregistered method in an old result: keep what it says
        return True


def run_label(result: Mapping[str, Any]) -> str:
    """A run's key hyperparameters, preset and data: ``"λ=0.3 · preset fast"``, ``"λ=0.4 (chosen on val from 9-point grid)"``,
    ``"base=task_arithmetic · rank=16 · preset fast · adapted on test (unlabeled, 4,000 images)"``; "no hyperparameters" for
    a method without any (Pretrained, Individual)."""
    params = dict(result.get("params") or {})
    overrides = dict(result.get("overrides") or {})
    selection = result.get("selection") if isinstance(result.get("selection"), Mapping) else None
    chosen = selection.get("hyperparameter") if selection else None
    shown = [k for k in KEY_PARAMS if k in params] + [k for k in overrides if k not in KEY_PARAMS and k in params]
    if not params.get("base_params"):  # nested ones, e.g. base.scaling (else said once, as the base's parameters)
        shown += [k for k in overrides if k not in params and k not in shown]
    if chosen and chosen not in shown:
        shown.insert(0, chosen)
    parts = []
    for k in shown:
        v = params.get(k, overrides.get(k))
        if k == "base_params" and not v:
            continue
        text = f"{_name(k)}={_value(v)}"
        if k == chosen and selection is not None:
            text += f" ({selection_label(selection)})"
        parts.append(text)
    base_params = params.get("base_params")
    if base_params:
        parts.append(f"base {_value(base_params)}")
    data = data_label(result)
    if data:
        parts.append(data)
    if result.get("preset") and has_presets(str(result.get("method"))):
        parts.append(f"preset {result['preset']}")
    if result.get("seed"):
        parts.append(f"seed {result['seed']}")
    return " · ".join(parts) or ("defaults" if params else "no hyperparameters")


def provenance_columns(result: Mapping[str, Any]) -> dict[str, str]:
    """The provenance of one result as CSV columns (``COLUMNS``): suite, layout, weights, method, preset, params
    (compact JSON), adapted_on (``"test (4000 images)"`` or "") and selection (how a hyperparameter was chosen, or "")."""
    family = family_of(result)
    data = result.get("data") if isinstance(result.get("data"), Mapping) else {}
    split = data.get("split")
    selection = result.get("selection") if isinstance(result.get("selection"), Mapping) else None
    return {
        **family,
        "method": str(result.get("method", "")),
        "preset": str(result.get("preset") or ""),
        "params": json.dumps(result.get("params") or {}, sort_keys=True, separators=(",", ":"), default=str),
        "adapted_on": f"{split} ({int(data.get('images') or 0)} images)" if split else "",
        "selection": f"{selection.get('hyperparameter')}={_value(selection.get('chosen'))} {selection_label(selection)}" if selection else "",
    }


def family_columns(checkpoints: Mapping[str, Any] | None) -> dict[str, str]:
    """The family's CSV columns alone (suite, layout, weights), for a table whose rows are not runs."""
    family = dict(checkpoints or {})
    return {k: str(family.get(k) or UNKNOWN) for k in ("suite", "layout", "weights")}


def with_provenance(table: pd.DataFrame, checkpoints: Mapping[str, Any] | None, runs: Mapping[Any, Mapping[str, Any]] | None = None,
                    key: Callable[[Any], Any] | None = None) -> pd.DataFrame:
    """``table`` with provenance columns appended, ready for a CSV: per row (``provenance_columns``) where ``runs`` maps the
    row's index (or ``key(index)``, e.g. one level of a MultiIndex) to its result, else the family's columns (suite, layout,
    weights). Rows of two families raise (``check_one_family``)."""
    out = table.copy()
    if runs:
        check_one_family(runs.values())
        blank = dict.fromkeys(COLUMNS, "") | family_columns(checkpoints)
        keys = [key(i) if key else i for i in out.index]
        rows = [provenance_columns(runs[k]) if k in runs else blank for k in keys]
        for col in COLUMNS:
            out[col] = [r[col] for r in rows]
        return out
    for col, value in family_columns(checkpoints).items():
        if col not in out.columns:  # a table whose rows carry their own (a sweep's) keeps them
            out[col] = value
    return out


def _same_family(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    fa, fb = family_of(a), family_of(b)
    if a.get("suite_fingerprint") and a.get("suite_fingerprint") == b.get("suite_fingerprint"):
        return True  # one suite (a task subset's weights digest covers its own tasks only)
    if fa["weights"] == UNKNOWN or fb["weights"] == UNKNOWN:
        return False
    return fa == fb and list(a.get("tasks") or []) == list(b.get("tasks") or [])


def check_one_family(results: Iterable[Mapping[str, Any]]) -> None:
    """Raise a one-line ConfigError naming both families when ``results`` come from two checkpoint families
    (different weights digest, or different suites): their numbers are never shown in one table."""
    results = list(results)
    for r in results[1:]:
        if not _same_family(results[0], r):
            a, b = family_label(family_of(results[0])), family_label(family_of(r))
            if a == b:
                b += f" (other suite fingerprint {str(r.get('suite_fingerprint', UNKNOWN))[:8]})"
                a += f" (suite fingerprint {str(results[0].get('suite_fingerprint', UNKNOWN))[:8]})"
            raise ConfigError(f"results of two checkpoint families in one table: {a} and {b}; show one family at a time")


def split_by_family(results: Iterable[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """``results`` grouped so that each group is one checkpoint family (``check_one_family`` passes on each), in first-seen order."""
    groups: list[list[Mapping[str, Any]]] = []
    for r in results:
        group = next((g for g in groups if _same_family(g[0], r)), None)
        if group is None:
            groups.append([r])
        else:
            group.append(r)
    return groups


def provenance_block(result: Mapping[str, Any]) -> dict[str, Any]:
    """The run's provenance for ``program_report.json``: family, method, preset, params, data split, selection."""
    data = result.get("data") if isinstance(result.get("data"), Mapping) else None
    block: dict[str, Any] = {
        "checkpoints": family_of(result),
        "family": family_label(family_of(result)),
        "suite_fingerprint": result.get("suite_fingerprint"),
        "method": result.get("method"),
        "preset": result.get("preset"),
        "params": result.get("params"),
        "seed": result.get("seed", 0),
        "data": dict(data) if data is not None else None,
        "label": run_label(result),
    }
    if isinstance(result.get("selection"), Mapping):
        block["selection"] = dict(result["selection"])
    return block


def program_report(result: dict) -> dict:
    """A run's result in FusionBench's ``program_report.json`` shape (anchors.md §1), plus a ``provenance`` block
    (FusionBench's readers look up the task keys, ``average`` and ``model_info`` only)."""
    report: dict[str, Any] = {t: {"accuracy": result["accuracy"][t] / 100.0, "loss": result["loss"][t]} for t in result["tasks"]}
    report["average"] = {"accuracy": result["average"] / 100.0, "loss": sum(result["loss"].values()) / len(result["loss"])}
    report["model_info"] = {"trainable_params": result["parameters"]["trainable"], "all_params": result["parameters"]["total"]}
    report["provenance"] = provenance_block(result)
    return report


def add_subtitle(fig: Any, text: str) -> Any:
    """Put ``text`` (a family label, a run label) under a plotly figure's title, once; a figure without a title gets it as
    its title. Makes room above the plot when a margin was set for a title alone. Returns ``fig``."""
    title = fig.layout.title
    if not title.text:
        fig.update_layout(title_text=text, title_font_size=13)
        return fig
    current = title.subtitle.text or ""
    if text in current:
        return fig
    fig.update_layout(title_subtitle_text=f"{current} · {text}" if current else text, title_subtitle_font_size=12)
    if fig.layout.margin.t is not None and fig.layout.margin.t < 90:
        fig.update_layout(margin_t=90)
    return fig
