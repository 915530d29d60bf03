"""Safe loading and atomic saving of weights and results.

Never unpickles: ``.safetensors`` via safetensors, ``.pt``/``.pth``/``.bin`` only through
``torch.load(weights_only=True)``. Every write goes to a temporary file in the same folder and is
renamed into place, so a killed process never leaves a file that is later read as valid.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from merging.errors import CheckpointError, ConfigError, first_line

StateDict = dict[str, torch.Tensor]
T = TypeVar("T")
WRAPPER_KEYS = ("state_dict", "model", "module")
"""Keys under which checkpoints of training scripts keep the state dict (Lightning, DeiT/timm, DDP scripts)."""
log = logging.getLogger("merging")
STALE_TEMP_SECONDS = 3600
"""A temporary file of ``atomic_write`` that names no process and is older than this was left by a killed write."""
_TEMP_PID = re.compile(r"\.(\d+)\.[A-Za-z0-9_]+\.tmp$")


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


@contextmanager
def exclusive(lock_path: str | Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (``fcntl.flock``; released when the process ends, however it ends).

    Two processes that need the same cached artifact compute it once: the second waits here (``on_wait`` is
    called once if it has to), then finds the first one's result in the cache.
    """
    import fcntl

    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_cached(path: str | Path, read: Callable[[Path], T], what: str = "cache entry") -> T | None:
    """``read(path)`` if the cached file is there and readable, else None (the caller recomputes).

    A damaged entry (truncated, empty, not what ``read`` expects: any exception ``read`` raises) is never
    read as valid: one warning line names it, it is deleted, and None is returned.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return read(path)
    except Exception as e:  # noqa: BLE001 - whatever a damaged file makes the reader raise
        log.warning("warning: %s: damaged %s (%s); recomputing it", path, what, first_line(e)[:200])
        path.unlink(missing_ok=True)
        return None


def remove_stale_temps(folder: str | Path) -> int:
    """Delete the temporary files (``.<name>.<pid>.<random>.tmp``) that killed ``atomic_write`` calls left under ``folder``.

    A file whose writer process is still alive is a write in progress and stays; one that names no
    process (an older format) goes once it is ``STALE_TEMP_SECONDS`` old. Returns how many were deleted.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for tmp in folder.rglob(".*.tmp"):
        match = _TEMP_PID.search(tmp.name)
        try:
            if match is not None and _alive(int(match.group(1))):
                continue
            if match is None and time.time() - tmp.stat().st_mtime < STALE_TEMP_SECONDS:
                continue
            tmp.unlink()
            removed += 1
        except OSError:
            continue
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        return True
    return True


def load_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping (``what`` names it in the one-line error: missing, unparsable, not a mapping)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: expected a mapping of field: value, got {type(data).__name__}")
    return data


def save_json(obj: Any, path: str | Path) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)

    return atomic_write(path, write)


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def load_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_state_dict(path: str | Path, check_finite: bool = True) -> StateDict:
    """Load a weights file safely; one-line errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            state = load_file(str(path))
        elif suffix in (".pt", ".pth", ".bin", ".ckpt"):
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise CheckpointError(f"{path}: unknown weights format {suffix!r} (use .safetensors or a .pt state dict)")
    except CheckpointError:
        raise
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None
    except Exception as e:  # torch.load raises UnpicklingError / RuntimeError / EOFError for bad files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path}: holds pickled Python objects, not a plain state dict; refusing to unpickle it "
                "(convert it to safetensors in an environment you trust)"
            ) from None
        raise CheckpointError(f"{path}: could not be read as a state dict ({msg})") from None
    for wrapper in WRAPPER_KEYS:  # training scripts save {"state_dict": {...}} or {"model": {...}} (with optimizer state beside it)
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: is not a flat state dict of tensors")
    if not state:
        raise CheckpointError(f"{path}: holds no tensors")
    if check_finite:
        check_finite_state(state, str(path))
    return state


def check_finite_state(state: Mapping[str, torch.Tensor], where: str) -> None:
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"{where}: tensor {k!r} holds NaN or Inf values")


def check_compatible(reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], ref_name: str, name: str) -> None:
    """Same keys and shapes, or a one-line error naming the first difference."""
    missing = sorted(set(reference) - set(other))
    extra = sorted(set(other) - set(reference))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s), e.g. {missing[0]!r}")
        if extra:
            parts.append(f"{len(extra)} unexpected key(s), e.g. {extra[0]!r}")
        raise CheckpointError(f"{name}: keys do not match {ref_name}: " + "; ".join(parts))
    for k, v in reference.items():
        if other[k].shape != v.shape:
            raise CheckpointError(
                f"{name}: tensor {k!r} has shape {tuple(other[k].shape)} but {ref_name} has {tuple(v.shape)}"
            )
