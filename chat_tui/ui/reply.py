"""Replies, from the prompt to the saved message, with no Textual: the app shows them, this runs them.

The app starts a reply (`ReplyController.begin`), gives it a model (`launch`), runs `stream` in a worker
thread and passes on what that thread reports (`steps_ready`, `done`, `fail`) and the ticks of its
flush timer (`flush`). The controller turns steps into text, saves the finished message and tells a
`ReplySink` (the app) what to show. Several replies can run at once, each in its own `GenJob`; all but
`stream` runs on one thread, the app's event loop.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from chat_tui.engine.params import DETAIL_NAMES, SUMMARISED, SamplingParams, settings_summary
from chat_tui.engine.types import Engine, Message, PromptInfo, Step
from chat_tui.store import Store, StoreError
from chat_tui.textsafe import clean_line
from chat_tui.ui.errors import describe
from chat_tui.ui.state import ChatItem, GenJob, ItemStatus

CHROME_INTERVAL = 0.2  # seconds between updates of the details, candidates and status while streaming

FINISH_LABEL = {
    "eos": "ended",  # the model ended its turn (short: the line fits a narrow pane)
    "stop": "hit a stop string",
    "length": "reached max tokens",
    "context": "context full",
    "cancelled": "stopped",
}
_SAVED_STATUSES = ("complete", "stopped", "error")


def prompt_messages(items: list[ChatItem], system_prompt: str, upto: ChatItem | None = None) -> list[Message]:
    """What the model is asked to answer: the system prompt and `items` up to and with `upto` (a reply
    being continued), else all of them; replies that produced nothing and ones still waiting are left out."""
    out: list[Message] = []
    if system_prompt.strip():
        out.append(Message("system", system_prompt))
    for item in items:
        message = item.as_message()
        if message is not None and item.status != "waiting":
            out.append(message)
        if item is upto:
            break
    return out


def fit_notice(conversation: list[Message], prompt: PromptInfo) -> str:
    """What the engine left out of `conversation` to fit the context, in words ("" if nothing)."""
    if not prompt.dropped_tokens:
        return ""
    parts = []
    dropped = prompt.dropped_messages
    if dropped:
        parts.append(f"{dropped} old turn{'s' if dropped != 1 else ''} left out to fit the context")
    # the newest message loses its start when it alone is too long: its kept tokens tell how much
    newest = len(conversation) - 1
    span = next((s for s in prompt.spans if s.message_index == newest), None)
    if span is not None:
        message = conversation[newest]
        cut = len(message.content) - sum(len(token) for token in prompt.tokens[span.start : span.end])
        if cut > 0:
            whose = "your message" if message.role == "user" else "the reply being continued"
            parts.append(f"the start of {whose} was cut to fit the context: about {cut:,} of its "
                         f"{len(message.content):,} characters")
    return "; ".join(parts) or f"prompt cut by {prompt.dropped_tokens:,} tokens to fit the context"


def changed_settings(values: dict[str, Any] | None, defaults: SamplingParams | None) -> str:
    """The sampling settings of a reply that differ from the model's defaults ("T 1.2 top-k 0"), or
    "defaults" (short: the line under a reply fits a narrow pane); without known defaults, those
    that differ from neutral."""
    if not values:
        return ""
    if defaults is None:
        return settings_summary(values)
    base = defaults.to_dict()
    parts = []
    for key in ("temperature", *SUMMARISED, "max_new_tokens"):
        value = values.get(key)
        if value is not None and value != base.get(key):
            name = {"temperature": "T", "max_new_tokens": "max"}.get(key, DETAIL_NAMES.get(key, key))
            parts.append(f"{name} {value:g}")
    if values.get("stop") and list(values["stop"]) != list(base.get("stop") or []):
        parts.append(f"{len(values['stop'])} stop")
    return " ".join(parts) or "defaults"


def details_line(item: ChatItem, live: GenJob | None = None, defaults: SamplingParams | None = None) -> str:
    """The one line under a reply: tokens · speed · the settings that differ from the model's
    `defaults` · how it ended (the full receipt is `receipt_text`, `i` on the message).

    `live`: the job still streaming into `item` (its counts are the ones to show), else None.
    """
    parts: list[str] = []
    tokens = item.tokens if live is None else (item.tokens or 0 if live.mode == "continue" else 0) + live.count
    if tokens is not None:
        parts.append(f"{tokens} tokens")
    rate = item.tokens_per_s if live is None else live.tokens_per_s
    if rate:
        parts.append(f"{rate:.1f} tok/s")
    summary = changed_settings(item.params, defaults)
    if summary:
        parts.append(summary)
    changes = item.meta.get("param_changes") if item.meta else None
    if changes:
        parts.append(f"settings changed {len(changes)}× mid-reply")
    if item.finish_reason in FINISH_LABEL and item.status != "stopped":
        parts.append(FINISH_LABEL[item.finish_reason])
    fork = item.meta.get("fork") if item.meta else None
    if isinstance(fork, dict) and isinstance(fork.get("at"), int):  # which token and why: the full receipt
        parts.append(f"forked at token {fork['at'] + 1}")
    knocked = live.knock_out if live is not None and live.knock_out else None
    names = [_head_name(h) for h in sorted(knocked)] if knocked else item.meta.get("knocked_out")
    if names:
        parts.append("heads off: " + ", ".join(clean_line(str(n)) for n in names))
    if item.status == "error" and item.meta.get("error"):
        parts.append(f"failed: {clean_line(str(item.meta['error']))[:80]}")
    return " · ".join(parts)


def receipt_text(item: ChatItem) -> str:
    """The full receipt of a reply: the model, its checkpoint hash, every setting and the seed."""
    lines = [f"model: {clean_line(item.model or 'unknown')}"]
    checkpoint = (item.meta or {}).get("checkpoint_hash")
    if checkpoint:
        lines.append(f"checkpoint: {clean_line(str(checkpoint))}")
    lines.append(f"seed: {item.seed if item.seed is not None else 'none'}")
    for key, value in (item.params or {}).items():
        if key == "seed":  # the seed actually used is the line above (the setting may say "random")
            continue
        lines.append(f"{key}: {clean_line(repr(value) if isinstance(value, (list, tuple, str)) else str(value))}")
    if item.tokens is not None:
        lines.append(f"tokens: {item.tokens}" + (f" at {item.tokens_per_s:.1f} tok/s" if item.tokens_per_s else ""))
    if item.finish_reason:
        lines.append(f"ended: {FINISH_LABEL.get(item.finish_reason, item.finish_reason)}")
    meta = item.meta or {}
    branch = meta.get("branch")
    if isinstance(branch, list):  # the context: the path of the conversation's tree the reply answered
        lines.append(f"context: the {len(branch)} message{'s' if len(branch) != 1 else ''} of its branch"
                     + (f" (ids {', '.join(str(i) for i in branch[-3:])}{' …' if len(branch) > 3 else ''})"
                        if branch else ""))
    fork = meta.get("fork")
    if isinstance(fork, dict) and fork.get("receipt"):
        lines.append(clean_line(str(fork["receipt"])))
    if meta.get("knocked_out"):
        lines.append("heads off: " + ", ".join(clean_line(str(n)) for n in meta["knocked_out"]))
    if meta.get("server_note"):
        lines.append(f"server: {clean_line(str(meta['server_note']))}")
    return "\n".join(lines)


@dataclass(frozen=True)
class FinishedReply:
    """What a finished reply's message holds, as the store saves it."""

    status: ItemStatus
    content: str
    finish_reason: str | None
    tokens: int
    params: dict[str, Any] | None
    seed: int | None
    tokens_per_s: float | None
    meta: dict[str, Any]


def finished_reply(job: GenJob, *, error: str | None, params: SamplingParams) -> FinishedReply:
    """The message `job` leaves (its item is not changed). `error`: why it failed, else None;
    `params`: the settings to record when no token said which it was sampled with."""
    item = job.item
    stopped = error is None and (job.finish_reason == "cancelled" or job.cancel.is_set())
    first = job.first_params or params
    seed = job.prompt.seed if job.prompt else None
    meta = dict(item.meta)
    if job.mode == "continue":  # the message keeps its first settings; each continuation adds its own
        tokens = (item.tokens or 0) + job.count
        saved_params, saved_seed = item.params, item.seed
        meta["continuations"] = [*meta.get("continuations", []), {
            "params": first.to_dict(), "seed": seed, "tokens": job.count, "param_changes": job.param_changes,
        }]
    else:
        tokens = job.count
        saved_params, saved_seed = first.to_dict(), seed
        if job.param_changes:
            meta["param_changes"] = job.param_changes
    engine = job.engine
    if engine is not None:
        meta["checkpoint_hash"] = engine.checkpoint_hash
        meta["backend"] = engine.backend
        if engine.backend == "openai":  # a model on a server: which one (the URL holds no credentials)
            meta["server"] = engine.device
    meta["system_prompt"] = job.system_prompt
    if job.branch is not None:  # which path of the conversation's tree the context was
        meta["branch"] = job.branch
        if job.mode == "continue" and item.db_id is not None:
            meta["continued_from"] = item.db_id
    # the probability colouring works on a reopened conversation too; a token without one (a server
    # without logprobs, a NaN logit) is kept as null: NaN is not JSON, and an export must stay valid
    meta["token_probs"] = [[text, round(prob, 5) if math.isfinite(prob) else None]
                           for text, prob in item.token_probs]
    if job.prompt is not None:
        meta["prompt_tokens"] = len(job.prompt.ids)
        meta["dropped_messages"] = job.prompt.dropped_messages
        if job.prompt.sent is not None:  # the receipt of a request to a server: exactly what was sent
            meta["sent"] = job.prompt.sent
        if job.prompt.note:
            meta["server_note"] = job.prompt.note
    if job.knock_out:  # the receipt says which heads were off
        meta["knocked_out"] = [_head_name(h) for h in sorted(job.knock_out)]
    if error is not None:
        meta["error"] = error
    return FinishedReply(
        status="error" if error is not None else ("stopped" if stopped else "complete"),
        content=job.base_text + job.text,
        finish_reason=job.finish_reason if error is None else "error",
        tokens=tokens, params=saved_params, seed=saved_seed, tokens_per_s=job.tokens_per_s, meta=meta,
    )


class ReplySink(Protocol):
    """What a view of replies is told (on the controller's thread)."""

    def reply_text(self, job: GenJob, text: str, probs: list[tuple[str, float]]) -> None:
        """`text` (untrusted, not yet cleaned) was added to `job.item.content`; `probs` are its tokens'."""

    def reply_step(self, job: GenJob, step: Step) -> None:
        """Each step as it is taken in (the inspector keeps every token's attention row)."""

    def reply_progress(self, job: GenJob, final: bool) -> None:
        """The details, the candidates, the status: a few times a second while streaming, once at the end."""

    def reply_notice(self, job: GenJob, notice: str) -> None:
        """The prompt was cut to fit the context (`notice` says how)."""

    def reply_finished(self, job: GenJob, error: BaseException | None) -> None:
        """The reply ended; `job.item` holds its final message, saved unless `store_failed` was told."""

    def store_failed(self, error: Exception) -> None:
        """Saving a reply failed (the chat goes on)."""


class ReplyController:
    """Runs replies for a view: streams, absorbs steps, finishes and saves each one.

    `store`: where finished replies go (None: nowhere); `params`: the sampling settings now (asked at
    every token, so an edit applies mid-reply).
    """

    def __init__(self, sink: ReplySink, params: Callable[[], SamplingParams], store: Store | None = None) -> None:
        self.sink = sink
        self.params = params
        self.store = store
        self.jobs: list[GenJob] = []  # begun and not finished, oldest first

    @property
    def current(self) -> GenJob | None:
        """The newest reply not finished yet, or None."""
        return self.jobs[-1] if self.jobs else None

    @property
    def streaming(self) -> bool:
        """Some reply has a model and is not finished."""
        return any(job.engine is not None for job in self.jobs)

    def waiting(self) -> list[GenJob]:
        """The replies begun while no model was ready."""
        return [job for job in self.jobs if job.engine is None]

    def begin(self, job: GenJob) -> None:
        """`job` counts as running from now on (its model may come later: `launch`)."""
        self.jobs.append(job)

    def launch(self, job: GenJob, engine: Engine, *, inspect: bool = False, lens: bool = False) -> None:
        """Give `job` its model; then run `stream(job, ...)` in a worker thread."""
        job.engine = engine
        job.inspect = inspect
        job.lens = lens
        job.item.status = "generating"
        job.item.model = engine.model_name

    def stream(self, job: GenJob, ready: Callable[[GenJob], None]) -> None:
        """Generate `job` (a worker thread: it blocks until the stream ends). `ready(job)` is called
        when steps wait and the controller's thread was not yet told (then call `steps_ready`)."""
        engine = job.engine
        assert engine is not None, "launch the job first"
        # knock_out only when some heads are off, prefix_ids only for a fork: an engine without the knock-out
        # view, or one that takes only text (a server), takes no such keyword
        extra: dict[str, Any] = {"knock_out": job.knock_out} if job.knock_out else {}
        if job.prefix_ids:
            extra["prefix_ids"] = job.prefix_ids
        if job.lens:
            extra["lens"] = True
        stream = engine.stream(job.conversation, self.params, inspect=job.inspect, cancel=job.cancel, **extra)
        # closed on every way out, even an error: a model in its own process serves one stream at a time
        with contextlib.closing(stream):
            for step in stream:
                if job.push(step):
                    ready(job)
                if step.finish_reason is not None:
                    break

    def steps_ready(self, job: GenJob) -> None:
        """Steps wait in `job`: the first token shows at once, later ones at the next `flush`."""
        if not job.done and job.shown_count == 0:
            self.absorb(job)
            self.render(job)

    def flush(self) -> None:
        """Hand each streaming reply's new text to the sink in one batch (the app's timer calls it)."""
        for job in self.jobs:
            if job.engine is not None:
                self.absorb(job)
                self.render(job)

    def done(self, job: GenJob) -> None:
        """`stream` returned: the reply ended (finished, stopped or cut at a limit)."""
        self.absorb(job)
        self.finish(job, None)

    def fail(self, job: GenJob, error: BaseException) -> None:
        """The reply cannot go on (its stream raised, or no model came): keep what arrived, marked failed."""
        if not job.done:
            self.absorb(job)
            self.finish(job, error)

    def cancel_on(self, engine: Engine) -> None:
        """Stop the replies `engine` is generating (it is being closed)."""
        for job in self.jobs:
            if job.engine is engine:
                job.cancel.set()

    def drop_waiting(self, job: GenJob) -> None:
        """Forget a reply that never got a model (nothing to save)."""
        job.cancel.set()
        job.done = True
        if job in self.jobs:
            self.jobs.remove(job)

    def stop_all(self) -> None:
        """Closing: stop every reply and keep what arrived, marked stopped."""
        for job in list(self.jobs):
            job.cancel.set()
            if job.engine is None:
                self.drop_waiting(job)
            else:
                self.absorb(job)
                self.finish(job, None)

    def absorb(self, job: GenJob) -> None:
        """Take in the steps the worker queued."""
        for step in job.drain():
            self.sink.reply_step(job, step)
            if step.prompt is not None:
                job.prompt = step.prompt
                # what the engine had to leave out: old turns for the context, settings a server rejects
                notice = "; ".join(filter(None, (fit_notice(job.conversation, step.prompt), step.prompt.note)))
                if notice:
                    self.sink.reply_notice(job, notice)
            params = step.params
            if params is not None:
                if job.first_params is None:
                    job.first_params = params
                elif params != job.last_params:
                    job.param_changes.append((step.index, params.to_dict()))
                job.last_params = params
            job.text += step.text
            job.count += 1
            job.item.token_probs.append((step.text, step.prob))
            job.last_step = step
            if step.finish_reason is not None:
                job.finish_reason = step.finish_reason

    def render(self, job: GenJob, *, final: bool = False) -> None:
        """Give the sink the text that arrived since the last call, in one batch."""
        if job.rendered == len(job.text) and job.shown_count == job.count and not final:
            return
        fragment = job.text[job.rendered :]
        new_probs = job.item.token_probs[len(job.item.token_probs) - (job.count - job.shown_count):]
        job.rendered = len(job.text)
        job.shown_count = job.count
        job.item.content = job.base_text + job.text
        self.sink.reply_text(job, fragment, new_probs)
        # the details, the candidates and the status bar change often but matter less: 5 times a second
        now = time.perf_counter()
        if final or now - job.chrome_at >= CHROME_INTERVAL:
            job.chrome_at = now
            self.sink.reply_progress(job, final)

    def finish(self, job: GenJob, error: BaseException | None) -> None:
        """The reply ended: its last text to the sink, its message final and saved."""
        if job.done:
            return
        self.render(job, final=True)
        job.done = True
        if job in self.jobs:
            self.jobs.remove(job)
        reply = finished_reply(job, error=describe(error) if error is not None else None, params=self.params())
        item = job.item
        item.status, item.content, item.finish_reason = reply.status, reply.content, reply.finish_reason
        item.tokens, item.params, item.seed = reply.tokens, reply.params, reply.seed
        item.tokens_per_s, item.meta = reply.tokens_per_s, reply.meta
        self.save(job)
        item.meta.pop("token_probs", None)  # saved; in memory the colours keep item.token_probs only
        self.sink.reply_finished(job, error)

    def save(self, job: GenJob) -> None:
        """Write the finished reply as a new message; a continued reply too, beside the stopped one
        it continues (which stays), so nothing is lost."""
        store, item = self.store, job.item
        if store is None or job.conversation_id is None:
            return
        status = item.status if item.status in _SAVED_STATUSES else "error"
        if not item.content and status == "error":
            return  # nothing to keep; the notification said what happened
        where = {} if job.branch is None else {"parent": job.branch[-1] if job.branch else None}
        try:
            engine = job.engine
            item.db_id = store.add_message(
                job.conversation_id, "assistant", item.content, status=status,
                model=engine.model_name if engine else None,
                backend=engine.backend if engine else None,
                checkpoint_hash=engine.checkpoint_hash if engine else None,
                params=item.params, seed=item.seed, finish_reason=item.finish_reason,
                tokens=item.tokens, tokens_per_s=item.tokens_per_s, meta=item.meta, **where,
            )
        except (sqlite3.Error, StoreError, OSError) as exc:
            self.sink.store_failed(exc)


def _head_name(head: tuple[int, int]) -> str:
    from chat_tui.engine.inside import head_name  # its dataclasses are not needed for the first frame

    return head_name(*head)
