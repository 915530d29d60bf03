"""Typed errors: each says what was given, what is allowed, and what to do (STYLE.md §11)."""


class MergeLensError(Exception):
    """Base class: the CLI prints these as one line and exits 2; pages show them with st.error."""


class CheckpointError(MergeLensError):
    """A weights file is missing, corrupt, pickled, mismatched or holds non-finite values."""


class ConfigError(MergeLensError):
    """An unknown method, suite, task or hyperparameter, or a value of the wrong type."""


class DataError(MergeLensError):
    """A dataset is empty or does not match its head."""


def first_line(e: BaseException) -> str:
    """An exception's message as one line (its first), or its type's name when it has none: for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
