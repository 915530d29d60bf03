"""A suite of real CLIP checkpoints described by a small YAML (or TOML) file that the CLI and the app both read.

Example (task_vectors checkpoints converted once with ``python -m merging convert``)::

    name: vitb32-ta8
    layout: task_vectors          # task_vectors | hf | open_clip
    model: ViT-B-32               # an open_clip architecture name
    root: converted/ViT-B-32      # the folder `convert` wrote
    data_root: data               # <data_root>/<task>/test/<class>/*.png|jpg
    data_format: folders          # folders | hf_disk (save_to_disk) | parquet; image_column/label_column: image/label
    tasks: [SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD]
    val_fraction: 0.1             # optional: a validation split carved from train where no val/ folder lies beside test/

Relative paths resolve against the config file's folder. ``python -m merging suite check CONFIG``
validates a config and says what is missing or mismatched (``merging.suites.clip.suite.check``, which
reads the files with the loader's own code; this module only parses, and imports nothing of the loader).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merging.errors import ConfigError, first_line

LAYOUTS = ("task_vectors", "hf", "open_clip")
HEAD_MODES = ("auto", "files", "zeroshot")
DATA_FORMATS = ("folders", "hf_disk", "parquet")
VAL_SPLITS = ("val", "validation")
"""The names a validation split's folder (or table split) may have beside the test split."""
CONFIG_SUFFIXES = (".yaml", ".yml", ".toml")


@dataclass(frozen=True)
class SuiteConfig:
    """A parsed suite config; every path is absolute."""

    path: Path
    name: str
    layout: str
    model: str
    data_root: Path
    tasks: tuple[str, ...] = ()
    root: Path | None = None
    """task_vectors: the folder ``convert`` wrote (manifest.json, zeroshot.safetensors, finetuned/, heads/)."""
    pretrained: Path | None = None
    """hf: the pretrained ``CLIPModel`` (folder or file); open_clip: the pretrained checkpoint."""
    finetuned: dict[str, Path] = field(default_factory=dict)
    heads: str = "auto"
    """auto: head files where present, else zero-shot heads; files: head files required; zeroshot: always zero-shot."""
    head_files: dict[str, Path] = field(default_factory=dict)
    text_weights: Path | None = None
    """A whole CLIP (open_clip or HF ``CLIPModel``) whose text tower builds zero-shot heads when the checkpoints lack one."""
    model_config: Path | None = None
    """An open_clip model-config JSON for an architecture open_clip does not ship; registered under ``model``."""
    quick_gelu: bool | None = None
    """open_clip layout: QuickGELU activations (OpenAI-initialized weights need True); hf: read from config.json."""
    split: str = "test"
    data_folders: dict[str, Path] = field(default_factory=dict)
    classnames: dict[str, Path] = field(default_factory=dict)
    templates: dict[str, tuple[str, ...]] = field(default_factory=dict)
    limit: int | None = None
    """Use at most this many test images per task (evenly spaced), for quick looks."""
    data_format: str = "folders"
    """folders: ``<data_root>/<task>/<split>/<class>/*``; hf_disk: a dataset saved with ``save_to_disk``
    (``<task>/<split>/`` or ``<task>/``); parquet: ``<task>/<split>/*.parquet``, ``<task>/<split>.parquet`` or ``<task>/data/<split>-*.parquet``."""
    image_column: str = "image"
    """hf_disk/parquet: the column of encoded images (HF's ``Image`` feature, or raw bytes)."""
    label_column: str = "label"
    """hf_disk/parquet: the column of integer class indices (its ``ClassLabel`` names become the class names)."""
    val_fraction: float | None = None
    """A validation split (for ``scaling=auto``) of this fraction of each task's train split, carved with a fixed seed
    (``base.carve_indices``), for tasks without a ``val`` (or ``validation``) split beside the test split; that one wins."""


_KEYS = {f for f in SuiteConfig.__dataclass_fields__ if f != "path"}


def is_config_path(name: str | Path) -> bool:
    return str(name).lower().endswith(CONFIG_SUFFIXES)


def _read(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: no such suite config file")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".toml":
            raw = tomllib.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError, TOMLDecodeError, UnicodeDecodeError
        raise ConfigError(f"{path}: not a valid {path.suffix[1:].upper()} file ({first_line(e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return raw


def _path(base: Path, value: Any, key: str, where: Path) -> Path:
    if not isinstance(value, str | Path) or not str(value):
        raise ConfigError(f"{where}: {key!r} must be a path, got {value!r}")
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def _per_task(base: Path, value: Any, key: str, tasks: tuple[str, ...], where: Path) -> dict[str, Path]:
    """A mapping task -> path, or one pattern with ``{task}`` expanded for every task."""
    if value is None:
        return {}
    if isinstance(value, str):
        if "{task}" not in value:
            raise ConfigError(f"{where}: {key!r} must be a mapping task -> path or a pattern containing {{task}}, got {value!r}")
        if not tasks:
            raise ConfigError(f"{where}: {key!r} is a pattern, so 'tasks' must list the tasks")
        return {t: _path(base, value.replace("{task}", t), key, where) for t in tasks}
    if isinstance(value, dict):
        return {str(t): _path(base, p, f"{key}.{t}", where) for t, p in value.items()}
    raise ConfigError(f"{where}: {key!r} must be a mapping task -> path or a pattern with {{task}}, got {type(value).__name__}")


def load_config(path: str | Path) -> SuiteConfig:
    """Parse and type-check a suite config; errors name the file and the setting."""
    path = Path(path).expanduser().resolve()
    raw = _read(path)
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {unknown}; allowed: {', '.join(sorted(_KEYS))}")
    for key in ("layout", "model", "data_root"):
        if key not in raw:
            raise ConfigError(f"{path}: missing required setting {key!r}")
    layout = raw["layout"]
    if layout not in LAYOUTS:
        raise ConfigError(f"{path}: layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    heads = raw.get("heads", "auto")
    if heads not in HEAD_MODES:
        raise ConfigError(f"{path}: heads {heads!r} is not one of {', '.join(HEAD_MODES)}")
    tasks_raw = raw.get("tasks") or []
    if not isinstance(tasks_raw, list) or not all(isinstance(t, str) for t in tasks_raw):
        raise ConfigError(f"{path}: 'tasks' must be a list of task names")
    tasks = tuple(tasks_raw)
    base = path.parent
    templates = raw.get("templates") or {}
    if not isinstance(templates, dict) or not all(isinstance(v, list) and all("{c}" in s for s in v) for v in templates.values()):
        raise ConfigError(f"{path}: 'templates' must map a task to a list of strings, each containing {{c}}")
    limit = raw.get("limit")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"{path}: 'limit' must be a positive integer, got {limit!r}")
    data_format = raw.get("data_format", "folders")
    if data_format not in DATA_FORMATS:
        raise ConfigError(f"{path}: data_format {data_format!r} is not one of {', '.join(DATA_FORMATS)}")
    for key in ("image_column", "label_column"):
        if key in raw and (not isinstance(raw[key], str) or not raw[key]):
            raise ConfigError(f"{path}: {key!r} must be a column name, got {raw[key]!r}")
    val_fraction = raw.get("val_fraction")
    if val_fraction is not None and (isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float) or not 0 < val_fraction < 1):
        raise ConfigError(f"{path}: 'val_fraction' must be a number strictly between 0 and 1 (e.g. 0.1), got {val_fraction!r}")
    quick_gelu = raw.get("quick_gelu")
    if quick_gelu is not None and not isinstance(quick_gelu, bool):
        raise ConfigError(f"{path}: 'quick_gelu' must be true or false, got {quick_gelu!r}")
    finetuned = _per_task(base, raw.get("finetuned"), "finetuned", tasks, path)
    if layout != "task_vectors" and not tasks:
        tasks = tuple(finetuned)
    if layout == "task_vectors" and "root" not in raw:
        raise ConfigError(f"{path}: layout task_vectors needs 'root', the folder `python -m merging convert` wrote")
    if layout in ("hf", "open_clip"):
        if "pretrained" not in raw:
            raise ConfigError(f"{path}: layout {layout} needs 'pretrained', the pretrained checkpoint")
        if not tasks:
            raise ConfigError(f"{path}: layout {layout} needs 'finetuned', one checkpoint per task")
        missing = [t for t in tasks if t not in finetuned]
        if missing:
            raise ConfigError(f"{path}: no 'finetuned' checkpoint for task(s) {missing}")

    def opt(key: str) -> Path | None:
        return _path(base, raw[key], key, path) if raw.get(key) is not None else None

    return SuiteConfig(
        path=path,
        name=str(raw.get("name") or path.stem),
        layout=layout,
        model=str(raw["model"]),
        data_root=_path(base, raw["data_root"], "data_root", path),
        tasks=tasks,
        root=opt("root"),
        pretrained=opt("pretrained"),
        finetuned=finetuned,
        heads=heads,
        head_files=_per_task(base, raw.get("head_files"), "head_files", tasks, path),
        text_weights=opt("text_weights"),
        model_config=opt("model_config"),
        quick_gelu=quick_gelu,
        split=str(raw.get("split", "test")),
        data_folders=_per_task(base, raw.get("data_folders"), "data_folders", tasks, path),
        classnames=_per_task(base, raw.get("classnames"), "classnames", tasks, path),
        templates={t: tuple(v) for t, v in templates.items()},
        limit=limit,
        data_format=data_format,
        image_column=raw.get("image_column", "image"),
        label_column=raw.get("label_column", "label"),
        val_fraction=float(val_fraction) if val_fraction is not None else None,
    )
