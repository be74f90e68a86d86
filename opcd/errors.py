"""User-facing error types for opcd.

Every error raised for a problem the user can fix (a bad config value, a
malformed dataset row, a missing context file, a model that cannot be loaded)
derives from `OpcdError`. Messages are a single line that names the file, row,
field or value at fault and what was expected; the CLI prints the message and
exits with status 2 instead of showing a traceback.
"""


class OpcdError(Exception):
    """Base class for user-facing errors with a one-line message."""


class ConfigError(OpcdError):
    """A configuration value is missing, of the wrong type, or out of range."""


def require(ok: bool, where: str, value, expected: str) -> None:
    """ConfigError `<where>=<value>: expected <expected>` unless `ok` (the config's and the worker
    specs' one check)."""
    if not ok:
        raise ConfigError(f"{where}={value!r}: expected {expected}")


class DataError(OpcdError):
    """A dataset cannot be found, read, or contains a malformed row."""


class ContextError(OpcdError):
    """A teacher context (system prompt or experience file) is unusable."""


class ModelError(OpcdError):
    """A model or tokenizer cannot be loaded or used as configured."""


class WorkerError(OpcdError):
    """A Ray worker died or failed; the message names the worker group, the rank and the cause."""


class TrainingError(OpcdError):
    """Training cannot go on (e.g. too many non-finite steps in a row)."""
