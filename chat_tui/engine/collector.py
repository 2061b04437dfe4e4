"""The garbage collector's settings for the long-running processes: the app and the model's process.

Why: both hold hundreds of thousands to millions of long-lived objects (what start-up made, torch
and the model, a long conversation's widgets) and make many short-lived ones with few cycles for
each token (segments, strips, tensors). CPython's full collections walk every tracked object: a
pause of tens of milliseconds that stalls a streaming reply and the keyboard alike, and finds
next to nothing. So the long-lived objects are frozen out of the collector's reach, and the young
generation is collected less often, the old ones rarely.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

THRESHOLDS = (10_000, 20, 50)  # CPython's default is (700, 10, 10)


@contextmanager
def collection_paused() -> Iterator[None]:
    """No collection inside (start-up makes a few hundred thousand objects and frees almost none);
    collection comes back after if it was on before, or earlier through `tune_collection`."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def tune_collection() -> None:
    """For a long-running process, once its start-up is done: freeze what exists now, collect
    rarely from now on, and collect (again)."""
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
    gc.enable()


def freeze_long_lived(*, collect_first: bool = False) -> None:
    """Keep the collector's full passes off every object alive now (a model just loaded, a
    conversation just shown). `collect_first`: one full collection before, for what is garbage now
    (the last conversation's widgets)."""
    if collect_first:
        gc.unfreeze()
        gc.collect()
    gc.freeze()
