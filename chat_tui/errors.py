"""The error types that cross layers, and how any error becomes one line for a person.

No heavy imports here (no torch, no Textual, no transformers): reporting an error, from the CLI or
the app, must never import a model library. Each layer raises its own subclass; the CLI and the app
catch the base classes below.
"""

from __future__ import annotations

# The longest first line shown for an error from a library (a traceback's message can be a page).
FIRST_LINE_LIMIT = 240


class CLIError(Exception):
    """A command line that cannot run as given (a missing argument, an empty prompt): exit code 2."""


class EngineError(Exception):
    """A problem the user can fix, with a one-line message fit to show as it is."""


class CheckpointError(EngineError):
    """A checkpoint that is missing, truncated, mismatched or in a refused format."""


class DeviceError(EngineError):
    """A device that does not exist here (no GPU, a CUDA index out of range, an unknown name)."""


class TrainingError(RuntimeError):
    """The run cannot go on (a NaN loss, a failed save, a resume that does not match): one line."""


def first_line(error: BaseException | str, limit: int = FIRST_LINE_LIMIT) -> str:
    """The first non-empty line of an error's message, cut to `limit` characters (the class name when empty)."""
    text = error if isinstance(error, str) else str(error)
    for line in text.splitlines():
        if line.strip():
            line = line.strip()
            return line if len(line) <= limit else line[: limit - 1] + "…"
    return "" if isinstance(error, str) else type(error).__name__
