"""Errors go to a log file with their traceback; the user sees one line and where the log is."""

from __future__ import annotations

import time
import traceback
from pathlib import Path

from chat_tui.config import Paths
from chat_tui.errors import EngineError, first_line
from chat_tui.ui.text import clean_line


def describe(error: BaseException, limit: int = 240) -> str:
    """One line for a notification: the message of an EngineError, else the type and message."""
    text = str(error).strip()
    if not isinstance(error, EngineError) and not isinstance(error, OSError):
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return clean_line(first_line(text or type(error).__name__, limit))


def log_error(paths: Paths, error: BaseException, context: str) -> Path | None:
    """Append `error` with its traceback to the log file; None if even that fails."""
    try:
        Paths.ensure(paths.log)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        with open(paths.log_file, "a", encoding="utf-8") as log:
            log.write(f"--- {stamp} {context}\n{trace}\n")
        return paths.log_file
    except OSError:
        return None
