"""A ProcessEngine setup that imports nothing heavy (a test module that imports torch cannot be
unpickled in the model's process without loading torch there)."""

import sys

from chat_tui.engine.types import EngineError


def report_torch(engine) -> None:
    """Runs in the model's process: a reply fails if torch has been imported by its end."""
    stream = engine.stream

    def reporting(*args, **kwargs):
        yield from stream(*args, **kwargs)
        if "torch" in sys.modules:
            raise EngineError("torch was imported in the model's process")

    engine.stream = reporting
