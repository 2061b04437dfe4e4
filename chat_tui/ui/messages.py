"""The typed messages the app's worker threads post to it."""

from __future__ import annotations

from textual.message import Message

from chat_tui.engine.types import Engine
from chat_tui.ui.state import GenJob


class ModelProgress(Message):
    """The loader reports progress (any thread)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class ModelLoaded(Message):
    def __init__(self, engine: Engine, source: str | None, load: int = 0) -> None:
        super().__init__()
        self.engine = engine
        self.source = source
        self.load = load  # which load_model call this answers (an older one has been superseded)


class StepsReady(Message):
    """New steps wait in `job` (posted at most once until the UI drains them)."""

    def __init__(self, job: GenJob) -> None:
        super().__init__()
        self.job = job


class GenerationDone(Message):
    """The stream ended normally (finished, stopped or cut at a limit)."""

    def __init__(self, job: GenJob) -> None:
        super().__init__()
        self.job = job


class KnockOutContinue(Message):
    """The inspector's knock-out view asks to generate the reply again from the cursor's token on
    with `heads` switched off: `cut_text` is the reply's text from that token on (dropped first),
    `cut_tokens` how many tokens it is."""

    def __init__(self, heads: frozenset[tuple[int, int]], cut_text: str, cut_tokens: int) -> None:
        super().__init__()
        self.heads = heads
        self.cut_text = cut_text
        self.cut_tokens = cut_tokens
