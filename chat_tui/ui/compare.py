"""The compare screen: two to four columns answer the same conversation, each with its own settings (a
preset, or a settings line such as `temperature=0.7 top_p=0.9`) and optionally its own model.

Every column uses one seed, so every token step of every column draws the same uniform number (common
random numbers, `chat_tui.engine.compare`): columns with the same settings give the same reply token for
token, and where the settings differ the first token where the replies diverge is marked in each column,
with the probability each column gave the token another one chose there.

Each column's reply goes through its own `ReplyController` (store-less: nothing is saved until Keep). The
columns on one model share its engine (one model in memory) and stream at the same time, in one stream of
it that decodes a token of each column in turn, each with its own KV cache (`stream_columns`, in a worker
thread per engine). A column given another model gets a second engine, opened the way the app opens models,
so a Hugging Face model checks its memory estimate against what is free before it loads.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message as TextualMessage
from textual.screen import ModalScreen
from textual.widgets import Input, Static

from chat_tui.engine.compare import (
    MAX_COLUMNS,
    MIN_COLUMNS,
    SAME_DRAWS_LINE,
    Divergence,
    SettingsLineError,
    column_stats,
    find_divergence,
    parse_settings,
    settings_line,
    shared_seed,
    stream_columns,
)
from chat_tui.engine.params import InvalidParameter, SamplingParams
from chat_tui.engine.types import Engine, Message, Step
from chat_tui.textsafe import clean, clean_line
from chat_tui.ui import branches
from chat_tui.ui.compare_column import CompareColumn, params_summary
from chat_tui.ui.errors import describe
from chat_tui.ui.reply import ReplyController, prompt_messages
from chat_tui.ui.state import ChatItem, GenJob

if TYPE_CHECKING:
    from chat_tui.ui.app import ChatApp

LABELS = "ABCD"
FLUSH_S = 0.1  # how often the columns' new tokens are drawn while they stream
SECOND_PRESET = "creative"  # column B's settings when the screen opens (A has the chat's own)


@dataclass
class ColumnRun:
    """A column's state on the screen's side: its settings, its model and its reply in progress."""

    widget: CompareColumn
    params: SamplingParams
    settings_text: str
    engine: Engine
    source: str | None = None  # the model path when the column has its own model, else None (the app's)
    controller: ReplyController | None = None
    job: GenJob | None = None
    error: str | None = None
    steps: list[Step] = field(default_factory=list)


class _ColumnSink:
    """The ReplySink of one column's controller: steps go to the column, the end to the screen."""

    def __init__(self, screen: CompareScreen, run: ColumnRun) -> None:
        self.screen, self.run = screen, run

    def reply_text(self, job: GenJob, text: str, probs: list[tuple[str, float]]) -> None:
        """The column draws its reply from the steps (to mark the diverging one)."""

    def reply_step(self, job: GenJob, step: Step) -> None:
        if job is self.run.job:
            self.run.steps.append(step)

    def reply_progress(self, job: GenJob, final: bool) -> None:
        """The screen redraws every column at once, after each flush."""

    def reply_notice(self, job: GenJob, notice: str) -> None:
        if job is self.run.job:
            self.screen.notify(clean_line(notice), severity="warning", timeout=6, markup=False)

    def reply_finished(self, job: GenJob, error: BaseException | None) -> None:
        if job is self.run.job and error is not None:
            self.run.error = describe(error)

    def store_failed(self, error: Exception) -> None:  # pragma: no cover - the columns have no store
        """Nothing is saved before Keep."""


class ColumnStepsReady(TextualMessage):
    def __init__(self, run: ColumnRun, job: GenJob) -> None:
        super().__init__()
        self.run, self.job = run, job


class ColumnDone(TextualMessage):
    def __init__(self, run: ColumnRun, job: GenJob, error: BaseException | None) -> None:
        super().__init__()
        self.run, self.job, self.error = run, job, error


class CompareScreen(ModalScreen[None]):
    """Columns of settings racing on the same random numbers. Modal, so the chat's keys do not act behind it."""

    DEFAULT_CSS = """
    CompareScreen { background: $background; }
    CompareScreen #compare-title { height: auto; padding: 0 1; text-style: bold; }
    CompareScreen #compare-crn { height: auto; padding: 0 1; color: $text-muted; }
    CompareScreen #compare-columns { height: 1fr; }
    CompareScreen #compare-hint { height: 1; padding: 0 1; color: $text-muted; }
    """

    BINDINGS = [
        Binding("escape", "close", "Back to chat", id="compare_close"),
        Binding("r", "run", "Run again", id="compare_run"),
        Binding("a", "add_column", "Add a column", id="compare_add_column"),
        Binding("x", "remove_column", "Remove the column", id="compare_remove_column"),
        Binding("e", "edit_settings", "Edit the column's settings", id="compare_edit_settings"),
        Binding("p", "preset", "A preset for the column", id="compare_preset"),
        Binding("m", "model", "Another model for the column", id="compare_model"),
        Binding("k", "keep", "Keep the column's reply", id="compare_keep"),
        Binding("left", "move(-1)", "Previous column", id="compare_previous_column", show=False),
        Binding("right", "move(1)", "Next column", id="compare_next_column", show=False),
    ]

    def __init__(
        self,
        engine: Engine,
        conversation: list[Message],
        base: SamplingParams,
        *,
        second: SamplingParams | None = None,
        presets: list[str] | None = None,
        load_preset: Callable[[str], Any] | None = None,
        open_model: Callable[[str], Engine] | None = None,
        keep: Callable[[GenJob, str], Any] | None = None,
    ) -> None:
        """`conversation`: what every column answers; `base`: the chat's settings (column A's, and what every
        settings line changes); `second`: column B's settings (default: A's); `keep(job, label)`: copies a
        finished column's reply into the conversation."""
        super().__init__()
        self.engine = engine
        self.conversation = conversation
        self.seed = shared_seed(base.seed)
        self.base = base.with_(seed=self.seed)
        self.second = (second or base).with_(seed=self.seed)
        self.presets = presets or []
        self.load_preset = load_preset
        self.open_model = open_model
        self.keep_reply = keep
        self.runs: list[ColumnRun] = []
        self._opened: list[Engine] = []  # the columns' own models, closed with the screen
        self._flush_timer = None
        self._cancel: threading.Event | None = None  # the run under way
        self._divergence: Divergence | None = None  # where the run's columns first differ, once known

    # ------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        last = next((m.content for m in reversed(self.conversation) if m.role == "user"), "")
        yield Static(Text(f"Compare: {clean_line(last)[:100]}"), id="compare-title")
        yield Static(Text(f"{SAME_DRAWS_LINE} (seed {self.seed})"), id="compare-crn")
        yield Horizontal(id="compare-columns")
        yield Static(Text("r run · a add · x remove · e settings · p preset · m model · k keep · Esc back"),
                     id="compare-hint")

    async def on_mount(self) -> None:
        self._flush_timer = self.set_interval(FLUSH_S, self._flush, pause=True)
        for params in (self.base, self.second):
            await self._add_run(params)
        self.runs[0].widget.focus()
        self.action_run()

    async def _add_run(self, params: SamplingParams, engine: Engine | None = None, source: str | None = None) -> None:
        engine = engine or self.engine
        label = LABELS[len(self.runs)]
        text = settings_line(params, self.base)
        widget = CompareColumn(label, text, engine.model_name, id=f"compare-column-{label.lower()}")
        run = ColumnRun(widget, params, text, engine, source)
        self.runs.append(run)
        await self.query_one("#compare-columns", Horizontal).mount(widget)
        widget.restart(text, params_summary(params), engine.model_name)

    # ------------------------------------------------------------------ running

    def action_run(self) -> None:
        """Every column answers (again): same seed, same draws. Any change to a column runs them all again, the
        columns on one model in one stream of it, a token of each in turn (`stream_columns`)."""
        if self._cancel is not None:
            self._cancel.set()  # the last run's workers end within a token; their messages are ignored
        cancel = self._cancel = threading.Event()
        self._divergence: Divergence | None = None
        by_engine: dict[int, list[ColumnRun]] = {}
        for run in self.runs:
            self._begin(run)
            by_engine.setdefault(id(run.engine), []).append(run)
        for runs in by_engine.values():
            self._generate(runs, cancel)
        if self._flush_timer is not None:
            self._flush_timer.resume()

    def _begin(self, run: ColumnRun) -> None:
        run.steps = []
        run.error = None
        run.controller = ReplyController(_ColumnSink(self, run), lambda run=run: run.params)
        run.job = GenJob(conversation=list(self.conversation), item=ChatItem("assistant", "", status="waiting"))
        run.controller.begin(run.job)
        run.controller.launch(run.job, run.engine)
        run.widget.restart(run.settings_text, params_summary(run.params), run.engine.model_name)

    @work(thread=True, exit_on_error=False, group="compare")
    def _generate(self, runs: list[ColumnRun], cancel: threading.Event) -> None:
        """The columns on one engine, streamed together; each step goes to its column's job."""
        jobs = [run.job for run in runs]
        ended: set[int] = set()
        error: BaseException | None = None
        try:
            for column, step in stream_columns(runs[0].engine, self.conversation, [run.params for run in runs],
                                               cancel=cancel):
                job = jobs[column]
                assert job is not None
                if job.push(step):
                    self.post_message(ColumnStepsReady(runs[column], job))
                if step.finish_reason is not None:
                    ended.add(column)
                    self.post_message(ColumnDone(runs[column], job, None))
        except Exception as exc:  # noqa: BLE001 - shown in the columns, never a traceback
            error = exc
        for column, job in enumerate(jobs):
            if column not in ended and job is not None:
                self.post_message(ColumnDone(runs[column], job, error))

    def on_column_steps_ready(self, message: ColumnStepsReady) -> None:
        run = message.run
        if message.job is run.job and run.controller is not None:
            first = message.job.shown_count == 0
            run.controller.steps_ready(message.job)
            if first:  # the first token shows at once, the others at the next flush
                self._redraw()

    def on_column_done(self, message: ColumnDone) -> None:
        run = message.run
        if message.job is not run.job or run.controller is None:
            return
        if message.error is not None:
            run.controller.fail(message.job, message.error)
        else:
            run.controller.done(message.job)
        self._redraw()

    def _flush(self) -> None:
        streaming = [run for run in self.runs if run.job is not None and not run.job.done]
        if not streaming:
            if self._flush_timer is not None:
                self._flush_timer.pause()
            return
        for run in streaming:
            assert run.controller is not None
            run.controller.flush()
        self._redraw()

    def _redraw(self) -> None:
        """Each column's new tokens, figures and divergence mark. The divergence, once found, is final: the
        steps before it never change."""
        labels = list(LABELS[: len(self.runs)])
        if self._divergence is None:
            engines = {id(run.engine) for run in self.runs}
            texts = [run.engine.token_text for run in self.runs] if len(engines) > 1 else None
            self._divergence = find_divergence([run.steps for run in self.runs], texts)
            for column, run in enumerate(self.runs):
                if self._divergence is not None:
                    run.widget.mark_divergence(self._divergence.index, self._divergence.columns[column], labels)
        for run in self.runs:
            widget = run.widget
            widget.steps = run.steps
            widget.refresh_reply()
            widget.show_stats(column_stats(run.steps))
            if run.error:
                widget.show_error(f"failed: {run.error}")

    @property
    def streaming(self) -> bool:
        return any(run.job is not None and not run.job.done for run in self.runs)

    # ------------------------------------------------------------------ columns and their settings

    def _focused_run(self) -> ColumnRun | None:
        node = self.focused
        while node is not None:
            for run in self.runs:
                if node is run.widget:
                    return run
            node = node.parent
        return None

    def action_move(self, delta: int) -> None:
        run = self._focused_run()
        index = self.runs.index(run) if run is not None else 0
        self.runs[(index + delta) % len(self.runs)].widget.focus()

    async def action_add_column(self) -> None:
        if len(self.runs) >= MAX_COLUMNS:
            self.notify(f"At most {MAX_COLUMNS} columns.", severity="warning", timeout=3, markup=False)
            return
        model = self._focused_run() or self.runs[-1]
        await self._add_run(model.params, model.engine, model.source)
        self.runs[-1].settings_text = model.settings_text
        self.runs[-1].widget.focus()
        self.action_run()

    async def action_remove_column(self) -> None:
        if len(self.runs) <= MIN_COLUMNS:
            self.notify(f"At least {MIN_COLUMNS} columns.", severity="warning", timeout=3, markup=False)
            return
        run = self._focused_run() or self.runs[-1]
        self.runs.remove(run)
        await run.widget.remove()
        for index, other in enumerate(self.runs):  # the letters follow the order on screen
            other.widget.relabel(LABELS[index])
        self.runs[0].widget.focus()
        self.action_run()

    def action_edit_settings(self) -> None:
        run = self._focused_run() or self.runs[0]
        run.widget.query_one(".column-settings", Input).focus()

    @on(CompareColumn.SettingsSubmitted)
    def settings_submitted(self, event: CompareColumn.SettingsSubmitted) -> None:
        run = next(r for r in self.runs if r.widget is event.column)
        self.apply_settings(run, event.text)
        run.widget.focus()

    def apply_settings(self, run: ColumnRun, text: str) -> bool:
        """The column's settings from a settings line over the chat's; a bad line is shown in the column."""
        try:
            params = parse_settings(text, self.base)
        except (SettingsLineError, InvalidParameter) as exc:
            run.widget.show_error(str(exc))
            return False
        run.params, run.settings_text = params, settings_line(params, self.base)
        self.action_run()
        return True

    def action_preset(self) -> None:
        run = self._focused_run() or self.runs[0]
        if self.load_preset is None or not self.presets:
            self.notify("No presets.", severity="warning", timeout=3, markup=False)
            return
        from chat_tui.ui.screens import PickScreen

        def chosen(name: str | None) -> None:
            if name is None or self.load_preset is None:
                return
            try:
                params = self.load_preset(name).apply(self.base).with_(seed=self.seed)
            except Exception as exc:  # noqa: BLE001 - a broken preset file is one line in the column
                run.widget.show_error(f"preset {name}: {describe(exc)}")
                return
            run.params, run.settings_text = params, settings_line(params, self.base)
            self.action_run()

        self.app.push_screen(PickScreen(f"Preset for column {run.widget.label}", self.presets), chosen)

    def action_model(self) -> None:
        run = self._focused_run() or self.runs[0]
        if self.open_model is None:
            self.notify("This app cannot open another model.", severity="warning", timeout=3, markup=False)
            return
        from chat_tui.ui.screens import InputScreen

        def chosen(source: str | None) -> None:
            if source is None:
                return
            source = source.strip()
            if not source:  # back to the chat's model
                run.engine, run.source = self.engine, None
                self.action_run()
                return
            run.widget.show_error(f"loading {source}…")
            self._open_model(run, source)

        self.app.push_screen(InputScreen(f"Model for column {run.widget.label}", run.source or "",
                                         placeholder="a checkpoint folder or hub id; empty: the chat's model",
                                         hint="Enter loads (its memory is checked first) · Esc cancels"), chosen)

    @work(thread=True, exit_on_error=False, group="compare-model")
    def _open_model(self, run: ColumnRun, source: str) -> None:
        assert self.open_model is not None
        try:
            engine = next((r.engine for r in self.runs if r.source == source), None) or self.open_model(source)
        except Exception as exc:  # noqa: BLE001 - one line in the column
            self.app.call_from_thread(run.widget.show_error, f"{source}: {describe(exc)}")
            return
        self.app.call_from_thread(self._model_opened, run, source, engine)

    def _model_opened(self, run: ColumnRun, source: str, engine: Engine) -> None:
        if engine is not self.engine and engine not in self._opened:
            self._opened.append(engine)
        if run not in self.runs:
            return
        run.engine, run.source = engine, source
        self.action_run()

    # ------------------------------------------------------------------ keep, close

    async def action_keep(self) -> None:
        run = self._focused_run() or self.runs[0]
        job = run.job
        if job is None or not job.done or not job.item.content:
            self.notify("Keep takes a finished reply: wait for the column to end.", severity="warning",
                        timeout=3, markup=False)
            return
        if self.keep_reply is not None:
            await self.keep_reply(job, run.widget.label)
        self.dismiss()

    @on(CompareColumn.KeepPressed)
    async def keep_pressed(self, event: CompareColumn.KeepPressed) -> None:
        event.column.focus()
        await self.action_keep()

    def action_close(self) -> None:
        if isinstance(self.focused, Input):  # Esc leaves the settings line first
            run = self._focused_run()
            if run is not None:
                run.widget.focus()
                return
        self.dismiss()

    def on_unmount(self) -> None:
        if self._cancel is not None:
            self._cancel.set()
        for engine in self._opened:  # the columns' own models; the chat's stays
            with contextlib.suppress(Exception):
                engine.close(wait=False)


# ---------------------------------------------------------------------------------------------------- the app's side


def compare_prefix(app: ChatApp) -> tuple[list[Message], str]:
    """What the columns answer: the conversation on screen and the text in the input (if any), and that text."""
    typed = clean(app.prompt_input.text).strip("\n")
    conversation = prompt_messages(app.conversation.items, app.system_prompt)
    if typed.strip():
        conversation.append(Message("user", typed))
    return conversation, typed if typed.strip() else ""


def open_compare(app: ChatApp) -> None:
    """The palette's and the binding's "Compare": columns A (the chat's settings) and B (a preset)."""
    if isinstance(app.screen, CompareScreen):
        return
    if app.engine is None or app.loading:
        app.notify("Compare needs a model: wait for it to load.", severity="warning", timeout=4, markup=False)
        return
    if app.replies.streaming:
        app.notify("A reply is streaming: wait for it (or Esc) before comparing.", severity="warning", timeout=4,
                   markup=False)
        return
    conversation, typed = compare_prefix(app)
    if not conversation or conversation[-1].role != "user":
        app.notify("Type a message first: compare answers the conversation and what you typed.",
                   severity="warning", timeout=4, markup=False)
        return
    from chat_tui.config import list_presets, load_preset

    presets = list_presets(app.paths)
    second = None
    if SECOND_PRESET in presets:
        with contextlib.suppress(Exception):
            second = load_preset(SECOND_PRESET, app.paths).apply(app.params)

    async def keep(job: GenJob, label: str) -> None:
        await keep_in_conversation(app, job, typed, label)

    app.push_screen(CompareScreen(
        app.engine, conversation, app.params, second=second, presets=presets,
        load_preset=lambda name: load_preset(name, app.paths), open_model=lambda source: open_engine(app, source),
        keep=keep,
    ))


def open_engine(app: ChatApp, source: str) -> Engine:
    """Another model, opened as the app opens its own (a model process unless config.toml says no): a Hugging
    Face model checks its memory estimate against the free memory before it loads."""
    if app.engine_factory is not None:  # tests and benchmarks
        return app.engine_factory()
    if app.model_process:
        from chat_tui.engine.process import ProcessEngine

        return ProcessEngine.start(source, device=app.device, **app.load_options)
    from chat_tui.engine import load_engine

    return load_engine(source, device=app.device, **app.load_options)


async def keep_in_conversation(app: ChatApp, job: GenJob, typed: str, label: str) -> None:
    """Copy a compared reply, with its settings and seed, into the conversation as a new assistant message
    (after the typed prompt, when the comparison answered one). The one place compare writes the
    conversation: it is saved under the path on screen, a sibling of any reply already there."""
    if typed:
        app.prompt_input.clear_sent(app.prompt_input.text)
        app.prompt_input.remember(typed)
        await app._add_user(typed)
    source = job.item
    # the colours by probability come back with a reopened conversation, as a chat reply's do
    meta = {**source.meta, "compare_column": label,
            "token_probs": [[text, round(p, 5) if math.isfinite(p) else None] for text, p in source.token_probs]}
    item = ChatItem("assistant", source.content, status=source.status, model=source.model, seed=source.seed,
                    params=source.params, tokens=source.tokens, tokens_per_s=source.tokens_per_s,
                    finish_reason=source.finish_reason, meta=meta, token_probs=list(source.token_probs))
    # it goes under the path on screen (the branch the columns answered), beside any other reply there
    kept = GenJob(conversation=job.conversation, item=item, conversation_id=app.conversation_id,
                  system_prompt=app.system_prompt, engine=job.engine, branch=branches.path_ids(app.conversation.items))
    app.replies.save(kept)
    if app.store is not None:
        branches.place(app.store, item)
    item.meta.pop("token_probs", None)  # saved; in memory the colours keep item.token_probs
    await app.conversation.add(item)
    app.notify(f"Kept column {label}'s reply.", timeout=3, markup=False)
