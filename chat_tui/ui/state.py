"""The UI's plain data: the open conversation's messages and a reply being generated (no Textual:
`chat_tui.ui.reply` runs replies with it; the messages the worker threads post are in `chat_tui.ui.messages`)."""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from chat_tui.engine.params import SamplingParams
from chat_tui.engine.types import Engine, Message, PromptInfo, Step

ItemStatus = Literal["complete", "stopped", "error", "generating", "waiting"]


@dataclass
class ChatItem:
    """One message of the open conversation, as the UI keeps it."""

    role: str
    content: str
    status: ItemStatus = "complete"
    db_id: int | None = None
    model: str | None = None
    seed: int | None = None
    params: dict[str, Any] | None = None
    tokens: int | None = None
    tokens_per_s: float | None = None
    finish_reason: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # (released text, probability) per generated token: kept in memory for the colour view
    token_probs: list[tuple[str, float]] = field(default_factory=list)
    siblings: tuple[int, int] = (1, 1)  # (which, of how many) messages with the same parent, from 1

    def as_message(self) -> Message | None:
        """What the engine sees; None for replies that produced nothing."""
        if self.role == "assistant" and not self.content and self.status != "generating":
            return None
        return Message(self.role, self.content)  # type: ignore[arg-type]


_job_ids = itertools.count(1)


def stored_token_probs(meta: dict[str, Any] | None) -> list[tuple[str, float]]:
    """The (text, probability) of each generated token, as a finished reply keeps them in its meta.

    Anything malformed (an older database, a hand-edited export) gives no colours, never an error.
    """
    pairs = (meta or {}).get("token_probs")
    if not isinstance(pairs, list):
        return []
    out: list[tuple[str, float]] = []
    for pair in pairs:
        if isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) and pair[1] is None:
            out.append((pair[0], float("nan")))  # a token the backend gave no probability for
            continue
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
                and isinstance(pair[1], (int, float)) and 0.0 <= pair[1] <= 1.0):
            return []
        out.append((pair[0], float(pair[1])))
    return out


@dataclass
class GenJob:
    """One reply being generated. The worker thread only touches `push`; the rest is the UI's."""

    conversation: list[Message]
    item: ChatItem
    mode: Literal["new", "continue"] = "new"
    conversation_id: int | None = None  # the saved conversation the reply goes into (None: not saved)
    system_prompt: str = ""  # the one in `conversation`, recorded with the reply
    # the saved messages the reply answers, root first: its parent is the last (None: not known, the
    # store puts it after the end of the branch on screen)
    branch: list[int] | None = None
    id: int = field(default_factory=lambda: next(_job_ids))
    cancel: threading.Event = field(default_factory=threading.Event)
    engine: Engine | None = None  # None while the reply waits for a model
    inspect: bool = False  # attention is captured for the inspector
    knock_out: frozenset[tuple[int, int]] = frozenset()  # heads (layer, head) switched off (the knock-out view)
    # the reply's first tokens as ids, prefilled as they are after the prompt (a fork's kept and forced tokens)
    prefix_ids: tuple[int, ...] = ()
    lens: bool = False  # the lens gutter is on: the engine is asked for each token's commitment layer
    # thread hand-off
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _pending: list[Step] = field(default_factory=list)
    _notified: bool = False
    # UI-side progress
    base_text: str = ""  # a stopped reply being continued
    text: str = ""  # generated in this job
    rendered: int = 0  # how much of `text` the view has been given
    shown_count: int = 0  # how many tokens the view has been given
    count: int = 0
    prompt: PromptInfo | None = None
    first_params: SamplingParams | None = None
    last_params: SamplingParams | None = None
    param_changes: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    last_step: Step | None = None
    finish_reason: str | None = None
    done: bool = False
    created: float = field(default_factory=time.perf_counter)
    chrome_at: float = 0.0  # when the details, candidates and status were last updated

    def push(self, step: Step) -> bool:
        """Queue a step (worker thread). True when the UI must be told (no message is pending)."""
        with self._lock:
            self._pending.append(step)
            if self._notified:
                return False
            self._notified = True
            return True

    def drain(self) -> list[Step]:
        with self._lock:
            steps, self._pending = self._pending, []
            self._notified = False
            return steps

    @property
    def context_used(self) -> int | None:
        """How many tokens the model sees now: the prompt and the reply so far, or, once the window
        slid, its newest part (never more than the context holds). None before the prompt is known."""
        step = self.last_step
        if step is not None:
            return step.position + 1 - step.window_start
        return len(self.prompt.ids) if self.prompt is not None else None

    @property
    def window_slid(self) -> bool:
        """Whether the context filled and the model went on with only its newest tokens."""
        return self.last_step is not None and self.last_step.window_start > 0

    @property
    def tokens_per_s(self) -> float | None:
        step = self.last_step
        if step is None or self.count < 2:
            return None
        prefill = self.prompt.prefill_s if self.prompt is not None else 0.0
        span = step.elapsed_s - prefill
        return self.count / span if span > 0 else None
