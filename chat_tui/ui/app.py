"""The chat-tui application: conversation, prompt, sampling pane, inspector slot, status bar.

Threads: the model loads in one thread worker (after the first frame is painted, so torch is
imported only then) and each reply is generated in one thread worker that runs
`ReplyController.stream` (chat_tui.ui.reply, which runs replies from the prompt to the saved message;
the app shows them): it passes a cancel event and a params callable to `Engine.stream`, so a setting
changed in the pane applies at the next token. `chat-tui` (run_app) loads the model in a child process (`ProcessEngine`): the worker then
reads finished tokens from a pipe, and painting never takes the interpreter lock from the model.
Workers post typed messages; one `Worker.StateChanged` handler turns any failure into a
notification that says where the log with the traceback is.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from rich.text import Text
from textual import events, work
from textual.actions import SkipAction
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.reactive import var
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import Footer, Static
from textual.worker import Worker, WorkerState

from chat_tui.config import (
    PANE_WIDTH_RANGE,
    PANE_WIDTHS,
    SHIPPED_PRESETS,
    Config,
    Paths,
    PresetError,
    delete_preset,
    get_paths,
    list_presets,
    load_config,
    load_preset,
    save_preset,
    save_setting,
)
from chat_tui.engine.collector import freeze_long_lived, tune_collection
from chat_tui.engine.params import InvalidParameter, SamplingParams
from chat_tui.engine.source import is_server_url, source_problem
from chat_tui.engine.types import Engine, Message, Step
from chat_tui.errors import first_line
from chat_tui.store import Store, StoreError
from chat_tui.ui import branches
from chat_tui.ui.bindings import with_ids
from chat_tui.ui.budget import UIBudget
from chat_tui.ui.conversation import ConversationView, MessageView
from chat_tui.ui.errors import describe, log_error
from chat_tui.ui.messages import GenerationDone, KnockOutContinue, ModelLoaded, ModelProgress, StepsReady
from chat_tui.ui.prompt import PromptInput
from chat_tui.ui.reply import ReplyController, changed_settings, details_line, prompt_messages, receipt_text
from chat_tui.ui.sampling import SamplingPane, SamplingTable
from chat_tui.ui.settings import Settings
from chat_tui.ui.state import ChatItem, GenJob
from chat_tui.ui.text import clean, clean_line

if TYPE_CHECKING:
    from textual.widgets import Markdown  # loaded with the first reply

    from chat_tui.ui.attention import InspectorPane  # mounted after the first frame (numpy)
    from chat_tui.ui.screens import ConversationDeleted, ConversationRenamed
    from chat_tui.ui.training import TrainingSession  # the training screen loads on first use

EngineFactory = Callable[[], Engine]

CHAT_MIN_WIDTH = 40
NARROW_WIDTH = CHAT_MIN_WIDTH + PANE_WIDTHS["sampling"]  # below this the panes stack
FULL_SAMPLING_WIDTH = 38  # the sampling pane with the focus: every setting, its range and its help
PANE_STEP = 4  # columns a grow_pane / shrink_pane key moves a pane's edge
PANE_MIN_WIDTH = 36  # a side pane shown narrower than its width when the terminal has no more room
MIN_SIZE = (20, 6)  # below this only a "terminal too small" line shows (the panes cannot draw in less)
FLUSH_INTERVAL = 0.05  # seconds between Markdown updates while a reply streams
MAX_FLUSH_GAP = 0.25  # ... but never less often than this
# The share of one core the UI thread aims to stay under while streaming. A Python-side engine
# needs the GIL for every token, and each UI batch (Markdown, layout, paint) holds it for tens of
# milliseconds. Less UI time means fewer, larger batches: below 0.3 each batch's layout grows long
# enough to delay a key press past 100 ms in a long conversation (benchmarks/bench_tui.py).
# Batches still come at least every MAX_FLUSH_GAP.
UI_CPU_SHARE = 0.3

STATE_STYLE = {
    "loading": "bold yellow",
    "idle": "bold green",
    "generating": "bold cyan",
    "stopping": "bold magenta",
    "stopped": "bold magenta",
    "waiting": "bold yellow",
    "error": "bold red",
    "no model": "bold red",
}


def details_text(item: ChatItem, live: GenJob | None = None, defaults: SamplingParams | None = None) -> Text:
    """The one dim line under a reply, as the conversation shows it (see `details_line`)."""
    return Text(details_line(item, live, defaults), style="dim", no_wrap=True, overflow="ellipsis", end="")


def tune_runtime() -> None:
    """Process-wide settings for the real app (run_app), not for tests that start many apps.

    A shorter GIL switch interval (0.2 ms instead of 5) lets the generation thread take each
    token as soon as it is ready while the UI thread paints; what start-up allocated is frozen out
    of the garbage collector's reach (see chat_tui.engine.collector), and collection, off while
    run_app started, comes back on.
    """
    sys.setswitchinterval(0.0002)
    tune_collection()


def _close_quietly(engine: Engine) -> None:
    """Let a model go without waiting for it (a model in its own process takes a moment to stop)."""
    threading.Thread(target=engine.close, name="close-model", daemon=True).start()


def screens() -> ModuleType:
    """The dialogs (`chat_tui.ui.screens`), imported when the first one opens, not before the first frame."""
    from chat_tui.ui import screens as dialogs

    return dialogs


# what the inspector says after another branch is shown: it keeps only the reply streamed last
BRANCH_NOT_INSPECTED = ("This branch's replies were not streamed with the inspector open just now, so their "
                        "attention is not kept: Ctrl+R answers again and shows it.")


class UnexpectedError(Exception):
    """An error no handler caught, as the one line the app exits with (the log has its traceback)."""

    def __init__(self, error: Exception, log_path: Path | None) -> None:
        super().__init__(describe(error))
        self.__cause__ = error
        self.error = error
        self.log_path = log_path

    def __rich__(self) -> Text:
        where = f" Details in {self.log_path}." if self.log_path else ""
        return Text(f"chat-tui stopped after an unexpected error: {describe(self.error)}.{where}")


class MainScreen(Screen, inherit_bindings=False):
    """The default screen, with its focus and copy keys given ids."""

    BINDINGS = with_ids(Screen.BINDINGS, "screen")
    # a maximised pane keeps the prompt and the status line under it; Esc still stops a reply
    # (the maximize key, or the palette's "Restore panes", brings the panes back)
    ALLOW_IN_MAXIMIZED_VIEW = "#prompt, #status, Footer"
    ESCAPE_TO_MINIMIZE = False

    def on_resize(self) -> None:
        app = self.app
        if isinstance(app, ChatApp):
            app.update_layout()

    def watch_maximized(self) -> None:
        self.on_resize()


class ChatApp(App[int], inherit_bindings=False):
    """Chat with a model. `engine_factory` replaces loading a model (tests, benchmarks)."""

    CSS_PATH = Path(__file__).with_name("app.tcss")  # absolute, so subclasses elsewhere find it
    TITLE = "chat-tui"
    ENABLE_COMMAND_PALETTE = True

    BINDINGS = [
        Binding("f1", "help", "Keys", id="help"),  # first, so that the footer shows it at 80 columns
        Binding("ctrl+q", "quit", "Quit", id="quit", priority=True),
        Binding("ctrl+p", "command_palette", "Commands", id="command_palette", priority=True, show=False),
        Binding("escape", "stop", "Stop", id="stop"),
        Binding("ctrl+r", "regenerate", "Regenerate", id="regenerate"),
        Binding("ctrl+g", "continue_reply", "Continue", id="continue"),
        Binding("ctrl+l", "edit_last", "Edit last", id="edit_last", show=False),
        Binding("ctrl+n", "new_conversation", "New chat", id="new_conversation", show=False),
        Binding("ctrl+o", "open_conversations", "Chats", id="open_conversations"),
        Binding("f2", "toggle_pane('sampling')", "Sampling", id="toggle_sampling", show=False),
        Binding("f3", "toggle_pane('inspector')", "Inspector", id="toggle_inspector", show=False),
        Binding("f4", "toggle_probs", "Token colours", id="toggle_probs", show=False),
        Binding("f10", "toggle_lens_gutter", "Lens gutter", id="lens_gutter", show=False),
        Binding("f5", "focus_sampling", "Edit sampling", id="focus_sampling", show=False),
        Binding("f6", "maximize", "Maximize/restore the pane", id="maximize", show=False),
        Binding("f7", "resize_pane(-1)", "Shrink the pane", id="shrink_pane", show=False),
        Binding("f8", "resize_pane(1)", "Grow the pane", id="grow_pane", show=False),
        Binding("ctrl+t", "train", "Train", id="train", show=False),
        Binding("f9", "compare", "Compare", id="compare", show=False),
        Binding("ctrl+up", "focus_message(-1)", "Previous message", id="focus_previous_message", show=False),
        Binding("ctrl+down", "focus_message(1)", "Next message", id="focus_next_message", show=False),
    ]

    # the sampling settings, preset, system prompt and the reset to undo: one value, replaced whole
    # (the reply's worker thread reads it at each token); watch_settings tells the panes
    settings: var[Settings] = var(Settings, init=False)

    def __init__(
        self,
        model: str | None = None,
        *,
        engine_factory: EngineFactory | None = None,
        new: bool = False,
        conversation_id: int | None = None,
        device: str | None = None,
        paths: Paths | None = None,
        config: Config | None = None,
        store: Store | None = None,
        load_options: dict[str, Any] | None = None,
        model_process: bool = False,
    ) -> None:
        super().__init__()
        self.load_options = dict(load_options or {})  # passed on to load_engine (dtype, Hugging Face options)
        self.paths = paths or get_paths()
        self.config = config if config is not None else load_config(self.paths)
        self.model_source = model if model is not None else self.config.model
        self.device = device if device is not None else self.config.device
        self.engine_factory = engine_factory
        self._loads = 0  # load_model calls so far: a model that arrives after a later call is dropped
        self.loading = False  # a load_model call is under way (the model in use, if any, stays until it ends)
        self.loading_source: str | None = None  # what that call loads
        self.engine_source: str | None = None  # what the model in use was loaded from (a restart loads it again)
        self._touched_before_load = False  # settings.touched before open_checkpoint cleared it: a failed load gives it back
        # the model in a child process (ProcessEngine): run_app asks for it, config.toml may say no;
        # it passes pipes to the child by descriptor, which needs POSIX
        self.model_process = model_process and self.config.model_process and os.name == "posix"
        self.start_new = new
        self.start_conversation = conversation_id
        self.store: Store | None = store
        self.engine: Engine | None = None
        self.state = "loading"
        self.load_note = "starting"
        self.keymap: dict[str, str] = {}  # binding id -> keys, as given to set_keymap
        self.conversation_id: int | None = None
        self.replies = ReplyController(self, self._params_now)  # it saves to the store once that is open
        self.last_job: GenJob | None = None  # the reply the status bar reports on (None: nothing to say)
        self.inspect_attention = False  # the attention inspector sets this
        self.show_probs = False
        self.notice = ""
        self.want = {"sampling": self.config.show_sampling, "inspector": self.config.show_inspector}
        self.narrow_open = {"sampling": False, "inspector": False}
        self.pane_priority = ["sampling", "inspector"]
        self.model_defaults: SamplingParams | None = None  # the model's own settings (generation_config)
        self.pane_widths = dict(self.config.pane_widths)  # the side panes' widths (the sampling pane's compact one)
        self.editing: ChatItem | None = None
        self.first_frame_at: float | None = None
        self._store_warned = False
        self._reply_workers: dict[Worker, GenJob] = {}  # the worker streaming each reply (its failure ends it)
        self._flush_budget = UIBudget(UI_CPU_SHARE, MAX_FLUSH_GAP)
        self.tune_runtime = False  # run_app turns this on (see tune_runtime)
        self.training: TrainingSession | None = None  # the run started from the training screen

    # ------------------------------------------------------------------ settings

    @property
    def params(self) -> SamplingParams:
        """The sampling settings in force (the reply's worker reads them at each token)."""
        return self.settings.params

    @params.setter
    def params(self, params: SamplingParams) -> None:  # tests and benchmarks set them directly
        self.settings = dataclasses.replace(self.settings, params=params)

    @property
    def params_touched(self) -> bool:
        return self.settings.touched

    @params_touched.setter
    def params_touched(self, touched: bool) -> None:
        self.settings = dataclasses.replace(self.settings, touched=touched)

    @property
    def preset_name(self) -> str | None:
        return self.settings.preset

    @property
    def system_prompt(self) -> str:
        return self.settings.system_prompt

    @system_prompt.setter
    def system_prompt(self, text: str) -> None:
        self.settings = dataclasses.replace(self.settings, system_prompt=text)

    def watch_settings(self, old: Settings, new: Settings) -> None:
        """Attributes down: the sampling pane and the inspector get the settings now in force."""
        if (new.params, new.system_prompt, new.label) != (old.params, old.system_prompt, old.label):
            self._show_settings(new)
        if new.params != old.params:
            self._tell_inspector(new.params)

    def _show_settings(self, settings: Settings) -> None:
        try:
            pane = self.sampling
        except NoMatches:  # closing
            return
        pane.show(settings.params, settings.system_prompt, preset=settings.label, defaults=self.model_defaults)

    def _tell_inspector(self, params: SamplingParams) -> None:
        """The candidates view replays the chain with the settings in force."""
        try:
            slot = self.query_one("#inspector")
        except NoMatches:  # closing
            return
        if slot.has_class("-placeholder"):  # _mount_inspector hands the settings over after the first frame
            return  # (and asking for the inspector now would import it, and numpy, before that frame)
        pane = self._inspector_pane()
        if pane is not None:
            pane.params_changed(params)

    # ------------------------------------------------------------------ layout

    def get_default_screen(self) -> Screen:
        return MainScreen()

    def compose(self) -> ComposeResult:
        with Horizontal(id="body"):
            yield SamplingPane(id="sampling")
            yield ConversationView(id="conversation")
            # the attention inspector (and numpy) arrive just after the first frame: see _mount_inspector
            with Vertical(id="inspector", classes="-placeholder"):
                yield Static(Text("Inspector", style="bold"), classes="pane-title")
        yield PromptInput(id="prompt")
        yield Static("", id="status")
        yield Static(id="too-small")
        # the footer (a widget per key) is mounted just after the first frame too: see _start_after_first_frame

    def _view_for(self, item: ChatItem) -> MessageView | None:
        """The view of `item`, or None (not mounted, or the app is shutting down)."""
        try:
            return self.query_one(ConversationView).view_for(item)
        except NoMatches:
            return None

    @property
    def conversation(self) -> ConversationView:
        return self.query_one(ConversationView)

    @property
    def prompt_input(self) -> PromptInput:
        return self.query_one(PromptInput)

    @property
    def sampling(self) -> SamplingPane:
        return self.query_one(SamplingPane)

    @property
    def inspector(self) -> InspectorPane:
        """The attention inspector (NoMatches before it is mounted, just after the first frame)."""
        from chat_tui.ui.attention import InspectorPane

        return self.query_one(InspectorPane)

    def _inspector_pane(self) -> InspectorPane | None:
        """The inspector, or None before it is mounted (just after the first frame) or while closing."""
        try:
            return self.inspector
        except NoMatches:
            return None

    def _clear_inspector(self, why: str | None = None) -> None:
        """Another conversation or branch: the old reply's attention must not linger (`why`: what the
        inspector says instead)."""
        pane = self._inspector_pane()
        if pane is not None:
            pane.clear(why)

    async def _mount_inspector(self) -> None:
        from chat_tui.ui.attention import InspectorPane

        placeholder = self.query_one("#inspector")
        pane = InspectorPane(id="inspector", export_dir=self.paths.exports)
        pane.display = placeholder.display
        await placeholder.remove()
        await self.query_one("#body").mount(pane, after=self.query_one(ConversationView))
        self._tell_inspector(self.settings.params)
        self.update_layout()  # its width

    def update_layout(self) -> None:
        """Show the side panes that fit; below NARROW_WIDTH they stack over the conversation."""
        try:
            body = self.query_one("#body")
        except NoMatches:
            return
        width = self.size.width
        too_small = width < MIN_SIZE[0] or self.size.height < MIN_SIZE[1]
        body.screen.set_class(too_small, "-too-small")
        if too_small:
            self.query_one("#too-small", Static).update(
                f"Terminal too small ({width}×{self.size.height}): chat-tui needs {MIN_SIZE[0]}×{MIN_SIZE[1]}."
            )
        narrow = width < NARROW_WIDTH
        body.set_class(narrow, "-narrow")
        show: dict[str, bool] = {}
        fitted: dict[str, int] = {}
        if narrow:
            show = dict(self.narrow_open)
        else:
            budget = width - CHAT_MIN_WIDTH
            for name in self.pane_priority:
                # a pane narrower than it was sized for, rather than none, down to PANE_MIN_WIDTH
                fitted[name] = min(self.pane_width(name), budget)
                fits = self.want[name] and fitted[name] >= min(PANE_MIN_WIDTH, self.pane_width(name))
                show[name] = fits
                if fits:
                    budget -= fitted[name]
        for name, visible in show.items():
            pane = self.query_one(f"#{name}")
            visible = visible or pane.has_class("-maximized")  # it has the whole screen, whatever the widths
            # a maximised pane takes its width from the stylesheet (the whole screen)
            pane.styles.width = None if narrow or pane.has_class("-maximized") else fitted[name]
            if pane.display != visible:
                pane.display = visible
                inspector = self._inspector_pane() if visible and name == "inspector" else None
                if inspector is not None:  # not the placeholder shown until the first frame
                    inspector.show_step(inspector.last_step)
        focused = self.focused
        if focused is not None and not focused.display or (
            focused is not None and any(not a.display for a in focused.ancestors if isinstance(a, Widget))
        ):
            self.prompt_input.focus()

    def action_toggle_pane(self, name: str) -> None:
        pane = self.query_one(f"#{name}")
        visible = bool(pane.display)
        if self.size.width < NARROW_WIDTH:
            self.narrow_open[name] = not visible
        else:
            self.want[name] = not visible
            if not visible:
                self.pane_priority.remove(name)
                self.pane_priority.insert(0, name)
        self.update_layout()
        if not visible and name == "sampling" and self.query_one("#sampling").display:
            self.sampling.table.focus()

    def action_focus_sampling(self) -> None:
        if not self.query_one("#sampling").display:
            self.action_toggle_pane("sampling")
        self.sampling.table.focus()

    def pane_width(self, name: str) -> int:
        """The columns a side pane takes now: the sampling pane widens while it has the focus (its full table)."""
        width = self.pane_widths[name]
        if name == "sampling" and self.sampling.expanded:
            width = max(width, FULL_SAMPLING_WIDTH)
        return width

    def on_sampling_pane_expanded(self, _event: SamplingPane.Expanded) -> None:
        self.update_layout()

    def _pane_with_focus(self) -> str | None:
        """"sampling" or "inspector" when the focus is inside that pane, else None (the conversation)."""
        focused = self.focused
        for name in ("sampling", "inspector"):
            pane = self.query_one(f"#{name}")
            if focused is not None and (focused is pane or pane in focused.ancestors):
                return name
        return None

    def action_resize_pane(self, delta: int) -> None:
        """Move the edge of the pane with the focus by PANE_STEP columns (from the conversation, its
        neighbour's edge: the conversation grows when the inspector or the sampling pane shrinks)."""
        name = self._pane_with_focus()
        if name is None:  # the conversation or the prompt: its visible neighbour gives or takes
            delta = -delta
            name = "inspector" if self.query_one("#inspector").display else "sampling"
            if not self.query_one(f"#{name}").display:
                self.bell()
                return
        low, high = PANE_WIDTH_RANGE
        room = self.size.width - CHAT_MIN_WIDTH - sum(
            self.pane_width(other) for other in PANE_WIDTHS if other != name and self.query_one(f"#{other}").display)
        new = min(max(self.pane_widths[name] + delta * PANE_STEP, low), high, max(low, room))
        if new == self.pane_widths[name]:
            self.bell()
            return
        self.pane_widths[name] = new
        self.update_layout()
        try:
            save_setting(f"{name}_width", new, self.paths)
        except (OSError, ValueError) as exc:
            self.notify(f"The pane's width was not saved: {first_line(exc)}", severity="warning", markup=False)

    def action_maximize(self, name: str | None = None) -> None:
        """Fill the screen with one pane (`name`, else the one with the focus, else the conversation);
        with a pane maximised already, bring the others back."""
        screen = self.screen
        if not isinstance(screen, MainScreen):
            return
        if screen.maximized is not None and name is None:
            screen.minimize()
            return
        name = name or self._pane_with_focus() or "conversation"
        pane = self.query_one(f"#{name}")
        if not pane.display:
            self.action_toggle_pane(name)
        screen.maximized = pane  # not Screen.maximize: the conversation's scroll view takes no focus of its own
        if name == "inspector":
            pane.focus()

    def action_receipt(self) -> None:
        """`i` on a picked message: its full receipt (model, checkpoint hash, every setting, seed)."""
        focused = self.focused
        item = getattr(focused, "item", None)
        if not isinstance(item, ChatItem) or item.role != "assistant":
            self.notify("Pick a reply first (Ctrl+↑), then i shows its receipt.", markup=False)
            return
        self.notify(receipt_text(item), title="Receipt", timeout=20, markup=False)

    def action_restore_panes(self) -> None:
        screen = self.screen
        if isinstance(screen, MainScreen):
            screen.minimize()

    # ------------------------------------------------------------------ start-up

    def on_mount(self) -> None:
        self.conversation.meta_for = lambda item, live=None: details_text(item, live, self.model_defaults)
        self._apply_config()
        self._open_store()
        self.replies.store = self.store
        self._show_settings(self.settings)
        self.update_layout()
        self.prompt_input.focus()
        self._flush_timer = self.set_interval(FLUSH_INTERVAL, self._flush_stream, pause=True)
        self._refresh_status()
        self.call_after_refresh(self._after_first_frame)
        self.run_worker(self._open_initial_conversation(), group="startup", exit_on_error=False)

    def _after_first_frame(self) -> None:
        """The first frame is on screen: only now mount the inspector and load the model (and torch)."""
        self.first_frame_at = time.perf_counter()
        if self.tune_runtime:
            tune_runtime()
        self.run_worker(self._start_after_first_frame(), group="startup", exit_on_error=False)

    async def _start_after_first_frame(self) -> None:
        try:
            await self.mount(Footer())
            self.screen.refresh_bindings()  # a footer fills in on the next bindings update: ask for one now
            await self._mount_inspector()
            self._check_keymap()
        finally:
            self.load_model(self.model_source)

    def _apply_config(self) -> None:
        for warning in self.config.warnings:
            self.notify(warning, severity="warning", timeout=8, markup=False)
        if self.config.keymap:
            self.keymap = dict(self.config.keymap)
            self.set_keymap(self.keymap)
        if self.config.theme:
            if self.config.theme in self.available_themes:
                self.theme = self.config.theme
            else:
                self.notify(f"config.toml: unknown theme {self.config.theme!r}", severity="warning", markup=False)
        self.conversation.markdown = self.config.markdown
        if self.config.preset:
            self._apply_preset(self.config.preset, failed="config.toml preset: ")

    def watch_theme(self, theme: str) -> None:
        """A theme picked from the palette is remembered in config.toml for the next start."""
        if not self.is_running or theme == self.config.theme:
            return  # start-up (the config's own theme being applied), or nothing new
        self.config.theme = theme
        try:
            path = save_setting("theme", theme, self.paths)
        except (OSError, ValueError) as exc:
            self.notify(f"Theme {theme} is used now but not saved: {describe(exc)}", severity="warning",
                        timeout=8, markup=False)
            return
        self.notify(f"Theme {theme}, saved in {path}", timeout=4, markup=False)

    def _check_keymap(self) -> None:
        """Warn about [keymap] ids that name no binding (once every pane is mounted)."""
        if not self.config.keymap:
            return
        known = {binding_id for _, _, _, binding_id in self.binding_rows()}
        unknown = sorted(set(self.config.keymap) - known)
        if unknown:
            self.notify(
                f"config.toml [keymap]: unknown binding ids {', '.join(unknown)} (F1 lists them)",
                severity="warning", timeout=8, markup=False,
            )

    def _open_store(self) -> None:
        if self.store is not None:
            return
        try:
            self.store = Store(self.paths.database)
        except (StoreError, OSError, sqlite3.Error) as exc:
            path = log_error(self.paths, exc, "opening the conversation database")
            self.store = Store(":memory:")
            self._notify_error("Conversations will not be saved", exc, path)
            return
        if self.store.recovered is not None:
            moved, why = self.store.recovered
            log_error(self.paths, RuntimeError(f"corrupt database moved to {moved}: {why}"), "database recovery")
            self.notify(
                f"The conversation database was damaged ({clean_line(why)}). It was moved to {moved} "
                "and a fresh one was started.",
                severity="warning", timeout=15, markup=False,
            )

    async def _open_initial_conversation(self) -> None:
        store = self.store
        if store is None:
            return
        if self.start_conversation is not None:
            if not await self.open_conversation(self.start_conversation):
                self.notify(f"No conversation #{self.start_conversation}: starting a new one", markup=False)
        elif not self.start_new:
            latest = self._db(store.latest_conversation_id)
            if latest is not None:
                await self.open_conversation(latest)

    # ------------------------------------------------------------------ model loading

    def load_model(self, source: str | None, *, note: str = "loading the model") -> None:
        """Load `source` in the background. The model in use stays until the new one is ready, so a
        load that fails leaves it working; prompts sent meanwhile wait for the new one."""
        self.loading = True
        self.loading_source = source
        self.state = "loading"
        self.load_note = note
        self._refresh_status()
        self._loads += 1
        self._load_engine(source, self.device, self._loads)

    def _restart_if_stopped(self) -> bool:
        """The model's own process has gone (killed, out of memory): start it again, same model and
        device. True when a restart began (the caller's prompt then waits for it)."""
        engine = self.engine
        if engine is None or self.loading or engine.alive:
            return False
        pane = self._inspector_pane()
        if pane is not None:
            pane.set_engine(None)  # replays and explanations must not ask a dead process
        self.load_model(self.engine_source, note="restarting the model's process")
        return True

    @work(thread=True, exclusive=True, exit_on_error=False, group="engine", name="load-model")
    def _load_engine(self, source: str | None, device: str | None, load: int = 0) -> None:
        def progress(text: str) -> None:
            self.post_message(ModelProgress(text))

        if self.engine_factory is not None:
            engine = self.engine_factory()
        elif self.model_process:
            from chat_tui.engine.process import ProcessEngine

            engine = ProcessEngine.start(source, device=device, progress=progress, **self.load_options)
        else:
            from chat_tui.engine import load_engine

            engine = load_engine(source, device=device, progress=progress, **self.load_options)
        if not self.post_message(ModelLoaded(engine, source, load)):
            _close_quietly(engine)  # the app closed while the model loaded

    def _close_engine(self) -> None:
        """Let go of the current model; one in a child process is stopped (a reply there is cancelled)."""
        engine, self.engine = self.engine, None
        if engine is not None:
            self.replies.cancel_on(engine)  # not those waiting for the next model
            self.run_worker(engine.close, thread=True, group="close-model", exit_on_error=False)

    def on_model_progress(self, message: ModelProgress) -> None:
        self.load_note = clean_line(message.text)[:60]
        self._refresh_status()

    def on_model_loaded(self, message: ModelLoaded) -> None:
        if message.load != self._loads:  # a later load_model superseded this one while it loaded
            _close_quietly(message.engine)
            return
        if message.engine is not self.engine:
            self._close_engine()  # only now: until the new model was ready, the old one stayed usable
        self.engine = message.engine
        self.engine_source = self.model_source = message.source
        self.loading = False
        self._touched_before_load = False
        # the status bar's parts about the last reply (context used, speed, old turns left out) were
        # about the previous model's context
        self.notice = ""
        self.last_job = None
        if self.tune_runtime:
            freeze_long_lived()  # torch and the model are a million long-lived objects
        try:
            self.inspector.set_engine(message.engine)
            self.sampling.mark_unsupported(frozenset())  # what a server rejected was about that server
        except NoMatches:  # the app is closing: the model arrived too late to matter
            return
        defaults = None
        try:
            defaults = message.engine.default_params()
        except Exception as exc:  # a backend's defaults should never stop the app
            log_error(self.paths, exc, "reading the model's default settings")
        self.model_defaults = defaults
        if not self.settings.touched:
            self.settings = self.settings.model_defaults(defaults or self.settings.params)
        else:
            self._show_settings(self.settings)  # what differs from this model's defaults
        self.state = "idle"
        for job in self.replies.waiting():
            self._launch(job)
        self._refresh_status()

    # ------------------------------------------------------------------ errors

    def _notify_error(self, what: str, error: BaseException, log_path: Path | None, *, outcome: str = "") -> None:
        """`outcome`: what the app does about it ("; still using X"), said right after the error."""
        where = f"\nDetails in {log_path}" if log_path else "\n(the log file could not be written)"
        self.notify(f"{what}: {describe(error)}{outcome}{where}", severity="error", timeout=15, markup=False)

    def _db(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a store operation; a failure is logged and shown, and the chat goes on."""
        try:
            return fn(*args, **kwargs)
        except (sqlite3.Error, StoreError, OSError) as exc:
            self.store_failed(exc)
            return None

    def store_failed(self, error: Exception) -> None:
        """Saving to the store failed (the controller also tells this): logged each time, said once."""
        path = log_error(self.paths, error, "saving the conversation")
        if not self._store_warned:
            self._store_warned = True
            self._notify_error("Could not save the conversation", error, path)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """The one place background failures land: log, notify, and keep the app running."""
        if event.state != WorkerState.ERROR:
            if event.state in (WorkerState.SUCCESS, WorkerState.CANCELLED):
                self._reply_workers.pop(event.worker, None)
            return
        worker = event.worker
        error = worker.error or RuntimeError("unknown error")
        what = {
            "generate": "Generation failed",
            "engine": "Loading the model failed",
            "markdown": "Rendering a reply failed",
            "connect": "Connecting to the server failed",
        }.get(worker.group, "A background task failed")
        path = log_error(self.paths, error, what)
        if worker.group == "engine":
            self._load_failed(error, path)
            return
        job, engine = self._reply_workers.pop(worker, None), self.engine
        # a model whose process died mid-reply is started again at once (the partial reply is kept)
        restart = job is not None and engine is not None and job.engine is engine and not engine.alive
        self._notify_error(what, error, path, outcome="; restarting it" if restart else "")
        if job is not None:
            self.replies.fail(job, error)
        if restart:
            self._restart_if_stopped()

    def _load_failed(self, error: BaseException, log_path: Path | None) -> None:
        """A load_model call failed: the model in use, if it still runs, stays (and answers a waiting prompt)."""
        self.loading = False
        engine = self.engine
        waiting = self.replies.waiting()
        if engine is not None and engine.alive:
            self.model_source = self.engine_source
            # the settings typed for this model stay its own (a later restart of its process keeps them)
            if self._touched_before_load:
                self.settings = self.settings.as_chosen()
            source = self.loading_source
            if source is None:
                what = "Loading the bundled model"
            else:  # the error names the source already, as a rule: name it once
                what = "Loading" if str(source) in str(error) else f"Loading {source}"
            self._notify_error(f"{clean_line(what)} failed", error, log_path,
                               outcome=f"; still using {clean_line(engine.model_name)}")
            self.state = "idle"
            for job in waiting:
                self._launch(job)
        else:
            if engine is not None:  # its process has gone, and starting it again failed
                self._close_engine()
            self._notify_error("Loading the model failed", error, log_path)
            self.state = "no model"
            self.load_note = "load failed"
            for job in waiting:
                self.replies.fail(job, error)
        self._refresh_status()

    def _handle_exception(self, error: Exception) -> None:
        """An unexpected error in the UI itself: log the traceback, exit with one line, no traceback.

        Textual 8 has no public hook for an error no handler caught, so this one override of its
        private handler stays. It leaves Textual's handling in place (exit status 1, the error kept
        for a test's pilot to raise), only handing it an error that shows as one line: Textual
        prints an error with `__rich__` instead of a traceback.
        """
        try:
            shown: Exception = UnexpectedError(error, log_error(self.paths, error, "unexpected error"))
        except Exception:
            shown = error
        super()._handle_exception(shown)

    # ------------------------------------------------------------------ status bar

    def _refresh_status(self) -> None:
        try:
            status = self.query_one("#status", Static)
        except NoMatches:
            return
        text = Text(no_wrap=True, overflow="ellipsis", end="")
        engine = self.engine
        if engine is not None:
            text.append(clean_line(engine.model_name), style="bold")
            text.append(f" ({clean_line(engine.backend)}) · {clean_line(engine.device)}")
        else:
            text.append("model: ", style="dim")
            text.append(self.load_note if self.state in ("loading", "waiting") else "none loaded")
        job = self.job if self.job is not None else self.last_job
        if engine is not None:
            used = job.context_used if job is not None else None
            # a server may not say its context length (0): then only what is used
            size = f"/{engine.context_length}" if engine.context_length else ""
            text.append(f" │ ctx {'–' if used is None else used}{size}")
            if job is not None and job.window_slid:  # what ctx counts is then the window the model sees
                text.append(" │ ")
                text.append(f"context full: the model now sees only the last {used} tokens", style="yellow")
        state = self.state
        # with a model in use its name leads the line, so what is being loaded (another model, a
        # restart of its process) is said here
        if state == "waiting":
            shown = "waiting for the model" if engine is None else f"waiting ({self.load_note})"
        elif state == "loading":
            shown = "loading" if engine is None else self.load_note
        else:
            shown = state
        text.append(" │ ")
        text.append(shown, style=STATE_STYLE.get(state, "bold"))
        if job is not None and job.tokens_per_s:
            text.append(f" │ {job.tokens_per_s:.1f} tok/s")
        if engine is not None and engine.decode_note:  # why the speed is what it is
            text.append(f" │ {clean_line(engine.decode_note)}", style="dim")
        if self.notice:
            text.append(" │ ")
            text.append(self.notice, style="bold yellow")
        status.update(text, layout=False)  # one line, always

    # ------------------------------------------------------------------ conversations

    @property
    def job(self) -> GenJob | None:
        """The newest reply still running (streaming, or waiting for a model), or None."""
        return self.replies.current

    def _busy(self, what: str = "") -> bool:
        if self.job is not None:
            self.notify(f"A reply is still streaming: press Esc to stop it{what}.", severity="warning",
                        timeout=4, markup=False)
            return True
        return False

    async def open_conversation(self, conversation_id: int) -> bool:
        store = self.store
        if store is None or self._busy(" first"):
            return False
        info = self._db(store.get_conversation, conversation_id)
        if info is None:
            return False
        items = self._db(branches.load_branch, store, conversation_id) or []
        self.conversation_id = conversation_id
        self.settings = self.settings.for_conversation(info.system_prompt)
        self.editing = None
        self.last_job = None
        self.notice = ""
        self._clear_inspector()
        await self.conversation.show(items)
        if self.tune_runtime:
            # a long conversation is tens of thousands of long-lived objects; the last one's are garbage now
            freeze_long_lived(collect_first=True)
        self.prompt_input.prompt_history = [i.content for i in items if i.role == "user"][-200:]
        self.sub_title = clean_line(info.title)
        self._refresh_status()
        return True

    async def action_new_conversation(self) -> None:
        if self._busy(" first"):
            return
        self.conversation_id = None
        self.editing = None
        self.last_job = None
        self.notice = ""
        self._clear_inspector()
        await self.conversation.show([])
        self.sub_title = ""
        self.prompt_input.focus()
        self._refresh_status()

    def action_open_conversations(self) -> None:
        if self.store is None:
            return

        async def done(result: tuple[str, int | None] | None) -> None:
            if result is None:
                return
            action, cid = result
            if action == "open" and cid is not None:
                await self.open_conversation(cid)
            elif action == "new":
                await self.action_new_conversation()

        self.push_screen(screens().ConversationListScreen(self.store, self.conversation_id), done)

    async def on_conversation_deleted(self, message: ConversationDeleted) -> None:
        if message.conversation_id == self.conversation_id and self.job is None:
            await self.action_new_conversation()

    def on_conversation_renamed(self, message: ConversationRenamed) -> None:
        if message.conversation_id == self.conversation_id:
            self.sub_title = clean_line(message.title)

    def action_rename_conversation(self) -> None:
        if self.conversation_id is None or self.store is None:
            self.notify("Nothing to rename yet: send a message first.", markup=False)
            return
        info = self._db(self.store.get_conversation, self.conversation_id)
        cid = self.conversation_id

        def done(title: str | None) -> None:
            if title and title.strip() and self.store is not None:
                self._db(self.store.rename_conversation, cid, title)
                if cid == self.conversation_id:
                    self.sub_title = clean_line(title)

        self.push_screen(screens().InputScreen("Rename conversation", info.title if info else ""), done)

    def action_delete_conversation(self) -> None:
        if self.conversation_id is None or self.store is None:
            self.notify("No saved conversation is open.", markup=False)
            return
        cid = self.conversation_id

        async def done(yes: bool | None) -> None:
            if yes and self.store is not None:
                self._db(self.store.delete_conversation, cid)
                self.notify(f"Deleted conversation #{cid}", markup=False)
                if cid == self.conversation_id:
                    await self.action_new_conversation()

        self.push_screen(screens().ConfirmScreen("Delete this conversation?", "Its messages will be lost.", yes="Delete"), done)

    def action_export(self, fmt: str) -> None:
        if self.conversation_id is None or self.store is None:
            self.notify("Nothing to export yet: send a message first.", markup=False)
            return
        cid = self.conversation_id
        ext = "md" if fmt == "markdown" else "json"
        default = Path.cwd() / f"chat-tui-conversation-{cid}.{ext}"

        def done(path_text: str | None) -> None:
            if not path_text or self.store is None:
                return
            target = Path(path_text.strip()).expanduser()
            try:
                content = self.store.export_markdown(cid) if fmt == "markdown" else self.store.export_json(cid)
                if target.is_dir():
                    target = target / default.name
                stem, n = target, 1
                while target.exists():
                    n += 1
                    target = stem.with_name(f"{stem.stem}-{n}{stem.suffix}")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(content, encoding="utf-8")
            except (OSError, sqlite3.Error, StoreError) as exc:
                self._notify_error("Export failed", exc, log_error(self.paths, exc, "export"))
                return
            self.notify(f"Exported conversation #{cid} to {target}", markup=False)

        label = "Markdown" if fmt == "markdown" else "JSON"
        self.push_screen(screens().InputScreen(f"Export as {label} to", str(default)), done)

    def action_load_model_dialog(self) -> None:
        if self._busy(" first"):
            return

        def done(source: str | None) -> None:
            if source is None:  # Esc
                return
            if is_server_url(source.strip().split(" ", 1)[0]):
                self.connect_to_server(source)
                return
            # a mistyped path is refused at once; anything else the load itself judges, as for --model
            problem = source_problem(source.strip()) if source.strip() else None
            if problem is not None:
                self.notify(clean_line(problem), title="Load model", severity="warning", markup=False)
                return
            self.open_checkpoint(source.strip() or None)

        self.push_screen(
            screens().InputScreen("Load a model", "", placeholder="empty: the bundled mini-GPT",
                        hint="a model folder (mini-GPT or Hugging Face), a hub id such as owner/name, or a "
                             "server's URL · Enter loads · Esc cancels"),
            done,
        )

    def action_connect_dialog(self) -> None:
        """Connect to an OpenAI-compatible server: its URL, and a model name when it serves several."""
        if self._busy(" first"):
            return

        def done(text: str | None) -> None:
            if text is not None and text.strip():
                self.connect_to_server(text)

        self.push_screen(
            screens().InputScreen("Connect to a server", self.load_options.get("base_url", "") or "",
                        placeholder="http://127.0.0.1:8000/v1",
                        hint="an OpenAI-compatible server (vLLM, llama.cpp, Ollama, transformers serve, chat-tui "
                             "serve), then a space and a model name if you know it · the key comes from "
                             "OPENAI_API_KEY · Enter connects · Esc cancels"),
            done,
        )

    def connect_to_server(self, text: str) -> None:
        """`URL [model]`: without a model, the server's models are listed and, if it has several, one is picked."""
        url, _, model = text.strip().partition(" ")
        if not is_server_url(url):
            self.notify(f"{clean_line(url)}: a server's URL starts with http:// or https://", title="Connect",
                        severity="warning", markup=False)
            return
        if model.strip():
            self._load_from_server(url, model.strip())
        else:
            self._list_server_models(url)

    @work(thread=True, exclusive=True, exit_on_error=False, group="connect", name="list-models")
    def _list_server_models(self, url: str) -> None:
        from chat_tui.engine.remote import server_models

        names = server_models(url, self.load_options.get("api_key_env"), self.load_options.get("api_key_file"))
        self.call_from_thread(self._pick_server_model, url, names)

    def _pick_server_model(self, url: str, names: list[str]) -> None:
        if len(names) == 1:
            self._load_from_server(url, names[0])
            return
        if not names:
            self.notify(f"{clean_line(url)} serves no models", title="Connect", severity="warning", markup=False)
            return

        def done(name: str | None) -> None:
            if name:
                self._load_from_server(url, name)

        self.push_screen(screens().PickScreen(f"Models on {url}", names, hint="Enter connects · Esc cancels"), done)

    def _load_from_server(self, url: str, model: str) -> None:
        self.open_checkpoint(model, server=url)

    def open_checkpoint(self, path: str | Path | None, *, server: str | None = None) -> bool:
        """Load a model for the chat: a folder or a hub id, None for the bundled one (the Load model dialog,
        the training screen)."""
        if self._busy(" first"):
            return False
        # a model here, or (`server`) a model on that server: the options of the other kind go
        self.load_options = {k: v for k, v in self.load_options.items() if k != "base_url"}
        if server is not None:
            self.load_options["base_url"] = server
        self.model_source = None if path is None else str(path)
        self._touched_before_load = self.settings.touched
        self.settings = self.settings.for_next_model()
        self.load_model(self.model_source)
        return True

    def action_train(self) -> None:
        """The training screen (torch loads only when a run starts)."""
        from chat_tui.ui.training import TrainingScreen

        if isinstance(self.screen, TrainingScreen):
            return
        self.push_screen(TrainingScreen())

    def action_compare(self) -> None:
        """The compare screen: the conversation answered by 2-4 settings side by side (chat_tui.ui.compare)."""
        from chat_tui.ui.compare import open_compare

        open_compare(self)

    # ------------------------------------------------------------------ sending and generating

    async def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        text = event.text
        if not text.strip():
            self.notify("Type a message first: Enter sends, Ctrl+J adds a line.", severity="warning",
                        timeout=3, markup=False)
            return
        if self._busy():
            return
        prompt = self.prompt_input
        prompt.clear_sent(text)
        text = clean(text).strip("\n")
        prompt.remember(text)
        if self.editing is not None:  # the edited message gets a sibling; it and its replies stay
            await self.conversation.remove_from(self.editing)
            self.editing = None
        await self._add_user(text)
        await self._start_reply("new")

    async def _add_user(self, text: str) -> ChatItem:
        store = self.store
        if self.conversation_id is None and store is not None:
            self.conversation_id = self._db(
                store.create_conversation, text,
                model=self.engine.model_name if self.engine else None,
                system_prompt=self.system_prompt,
            )
            self.sub_title = clean_line(text)[:60]
        item = ChatItem("user", text)
        if store is not None and self.conversation_id is not None:
            path = branches.path_ids(self.conversation.items)
            parent = path[-1] if path else None
            # saved before generating
            item.db_id = self._db(store.add_message, self.conversation_id, "user", text, parent=parent)
            self._db(branches.place, store, item)
        await self.conversation.add(item)
        return item

    async def _start_reply(self, mode: str, target: ChatItem | None = None, opening: ChatItem | None = None,
                           knock_out: frozenset[tuple[int, int]] = frozenset(),
                           fork: branches.ForkOpening | None = None) -> None:
        """Answer the path on screen ("new"), or go on with `target` ("continue"). `opening`: the start
        of the new reply, which the model goes on from as text (a knock-out); `fork`: a forked reply's start,
        the model going on from its ids; `knock_out`: the heads (layer, head) switched off for the whole reply."""
        if self._restart_if_stopped():
            self.notify("The model's process had stopped; restarting it (your message waits for it).",
                        severity="warning", timeout=8, markup=False)
        if self.engine is None and self.state == "no model":
            self.notify(
                "No model is loaded (loading it failed). Load one with Ctrl+P → Load model, "
                "then Ctrl+R answers your message.",
                severity="warning", timeout=8, markup=False,
            )
            return
        saved = {"conversation_id": self.conversation_id, "system_prompt": self.system_prompt}
        # the context is the path on screen; the reply goes under its last saved message
        path = branches.path_ids(self.conversation.items, before=target)
        if mode == "continue" and target is not None:
            item = target
            conversation = prompt_messages(self.conversation.items, self.system_prompt, item)
            job = GenJob(conversation=conversation, item=item, mode="continue", base_text=item.content,
                         branch=path, knock_out=knock_out, **saved)
            self.replies.begin(job)
        else:
            item = (fork.item if fork is not None else opening) or ChatItem("assistant", "", status="waiting")
            if self.store is not None and self.conversation_id is not None:
                item.siblings = self._db(branches.new_sibling_position, self.store, self.conversation_id,
                                         path[-1] if path else None) or (1, 1)
            conversation = prompt_messages(self.conversation.items, self.system_prompt)
            sent_text = fork.sent_text if fork is not None else item.content
            if sent_text:  # an open reply: the model goes on from it (and from a fork's ids after it)
                conversation.append(Message("assistant", sent_text))
            job = GenJob(conversation=conversation, item=item, branch=path, base_text=item.content,
                         knock_out=knock_out, prefix_ids=fork.prefix_ids if fork is not None else (), **saved)
            self.replies.begin(job)  # before the await: the app is not settled while the reply's view mounts
            await self.conversation.add(item)
            if job.done:  # Esc while it mounted
                return
        self.notice = ""
        if self.engine is None or self.loading:  # a model on its way (a restart, another model) answers
            item.status = "waiting"
            self.state = "waiting"
            view = self.conversation.view_for(item)
            if view is not None:
                view.refresh_header()
            self._refresh_status()
            return
        self._launch(job)

    def _launch(self, job: GenJob) -> None:
        engine = self.engine
        assert engine is not None
        # attention is captured only while the inspector is on screen (zero cost when hidden)
        pane = self._inspector_pane()
        self.inspect_attention = pane is not None and pane.wants_attention
        self.replies.launch(job, engine, inspect=self.inspect_attention, lens=self.conversation.lens_gutter)
        view = self.conversation.view_for(job.item)
        if view is not None:
            view.refresh_header()
        self.state = "generating"
        self._refresh_status()
        self._flush_timer.resume()
        self._reply_workers[self._generate(job)] = job

    def _params_now(self) -> SamplingParams:
        return self.params

    @work(thread=True, exit_on_error=False, group="generate", name="generate")
    def _generate(self, job: GenJob) -> None:
        """One reply's stream (several may run at once, each in its own worker)."""
        self.replies.stream(job, lambda job: self.post_message(StepsReady(job)))
        self.post_message(GenerationDone(job))

    def on_steps_ready(self, message: StepsReady) -> None:
        """Steps are waiting. The flush timer drains them every FLUSH_INTERVAL (so this message
        comes at most once per interval); only the first token is shown at once."""
        self.replies.steps_ready(message.job)

    def _flush_stream(self) -> None:
        """Every FLUSH_INTERVAL while streaming: hand the new text to the view in one batch.

        Painting is the UI's big cost. When the UI thread has been busy for more than
        UI_CPU_SHARE of the time since the last batch (a slow terminal, a busy machine), the batch
        waits for a later tick (up to MAX_FLUSH_GAP), so the model keeps its speed.
        """
        if not self.replies.streaming:
            self._flush_timer.pause()
            return
        if not self._flush_budget.allow():
            return
        self.replies.flush()

    def on_generation_done(self, message: GenerationDone) -> None:
        self.replies.done(message.job)

    # the ReplySink the controller tells what to show (chat_tui.ui.reply)

    def reply_text(self, job: GenJob, text: str, probs: list[tuple[str, float]]) -> None:
        view = self._view_for(job.item)
        if view is not None:
            view.stream_append(clean(text))
            view.add_token_probs(probs)

    def reply_step(self, job: GenJob, step: Step) -> None:
        if self.conversation.lens_gutter:
            view = self._view_for(job.item)
            gutter = view.lens_gutter if view is not None else None
            if gutter is not None:
                gutter.add_step(step, job.engine)
        pane = self._inspector_pane()
        if pane is not None:
            pane.add_step(step)  # every step: its attention row (cheap; drawn on the pane's tick)

    def reply_progress(self, job: GenJob, final: bool) -> None:
        view = self._view_for(job.item)
        if view is not None:
            view.set_meta(details_text(job.item, None if final else job, self.model_defaults))
        pane = self._inspector_pane()
        if pane is not None:
            pane.show_step(job.last_step)
        self._refresh_status()

    def reply_notice(self, job: GenJob, notice: str) -> None:
        self.notice = notice
        self.notify(notice, severity="warning", timeout=8, markup=False)
        if job.prompt is not None and job.prompt.unsupported:  # a server rejected a setting: mark its row
            from chat_tui.engine.remote import unsupported_settings

            self.sampling.mark_unsupported(unsupported_settings(job.prompt.unsupported))

    def reply_finished(self, job: GenJob, error: BaseException | None) -> None:
        item = job.item
        if self.store is not None and job.conversation_id is not None:
            self._db(branches.place, self.store, item)
        view = self._view_for(item)
        if view is not None:
            view.finish(item.content)
            view.refresh_header()
        if not self.replies.streaming:
            self._flush_timer.pause()
        self.last_job = job
        if self.loading:
            self.state = "loading"  # another model was asked for while this reply ran
        elif error is not None:
            self.state = "error" if self.engine is not None else "no model"
        else:
            self.state = "stopped" if item.status == "stopped" else "idle"
        self.reply_progress(job, final=True)  # the final details, candidates and status

    async def action_quit(self) -> None:
        self.replies.stop_all()  # what arrived is kept, marked stopped
        self.exit()

    def on_unmount(self) -> None:
        self.replies.stop_all()
        if self.engine is not None:
            _close_quietly(self.engine)
        training = self.training
        if training is not None and not training.finished and training.run.running:
            training.run.stop(wait=False)  # like Ctrl-C: the run finishes its step and saves; we do not wait

    async def action_stop(self) -> None:
        job = self.job
        if job is not None:
            if job.engine is None:  # still waiting for the model: nothing to stop but the wait
                self.replies.drop_waiting(job)
                if job.mode == "new":
                    await self.conversation.remove_from(job.item)
                self.state = "loading" if self.engine is None or self.loading else "idle"
                self._refresh_status()
                return
            job.cancel.set()
            self.state = "stopping"
            self._refresh_status()
            return
        if self.editing is not None:
            self._cancel_edit()
            return
        raise SkipAction()

    async def action_regenerate(self) -> None:
        if self._busy(" first"):
            return
        items = self.conversation.items
        if not items:
            self.notify("Nothing to regenerate yet.", markup=False)
            return
        last = items[-1]
        if last.role == "assistant":  # the new reply is its sibling; it stays a branch
            await self.conversation.remove_from(last)
        elif last.role != "user":
            return
        await self._start_reply("new")

    async def action_continue_reply(self) -> None:
        if self._busy(" first"):
            return
        items = self.conversation.items
        last = items[-1] if items else None
        if last is None or last.role != "assistant" or not (
            last.status == "stopped" or last.finish_reason in ("length", "cancelled")
        ):
            self.notify("Only a stopped (or cut-off) reply can be continued.", severity="warning", markup=False)
            return
        await self._start_reply("continue", target=last)

    async def on_knock_out_continue(self, message: KnockOutContinue) -> None:
        """The knock-out view: the last reply again from the cursor's token on, with those heads off, as a
        new branch beside it (the original stays, one ← away)."""
        if self._busy(" first"):
            return
        items = self.conversation.items
        last = items[-1] if items else None
        if last is None or last.role != "assistant" or not last.content.endswith(message.cut_text):
            self.notify("Knock-out continues the last reply, and the inspector shows another one.",
                        severity="warning", markup=False)
            return
        kept = len(last.token_probs) - message.cut_tokens
        opening = ChatItem("assistant", last.content[: len(last.content) - len(message.cut_text)], status="waiting",
                           token_probs=list(last.token_probs[: max(0, kept)]))
        await self.conversation.remove_from(last)
        await self._start_reply("new", opening=opening, knock_out=message.heads)

    def on_text_area_changed(self, event: PromptInput.Changed) -> None:
        """The tokens view follows the input box as you type (not a dialog's text area)."""
        if isinstance(event.text_area, PromptInput):
            pane = self._inspector_pane()
            if pane is not None:
                pane.set_token_text("input box", event.text_area.text)

    def on_descendant_focus(self, event: events.DescendantFocus) -> None:
        """A message chosen (Ctrl+Up, a click): the tokens view shows its tokens while the input box is empty."""
        focused = event.widget  # not self.focused: it raises once the app's last screen has gone (on exit)
        pane = self._inspector_pane() if isinstance(focused, MessageView) else None
        if pane is None:
            return
        source, text = pane.token_source
        if source != "input box" or not text:  # what is being typed comes first
            pane.set_token_text(f"{focused.item.role} message", focused.item.content)  # type: ignore[union-attr]

    def action_edit_last(self) -> None:
        if self._busy(" first"):
            return
        last_user = next((it for it in reversed(self.conversation.items) if it.role == "user"), None)
        if last_user is None:
            self.notify("No message of yours to edit yet.", markup=False)
            return
        self._cancel_edit()
        self.editing = last_user
        view = self.conversation.view_for(last_user)
        if view is not None:
            view.add_class("-editing")
        prompt = self.prompt_input
        prompt.load_text(last_user.content)
        prompt.move_cursor(prompt.document.end)
        prompt.focus()
        self.notify("Editing your last message: Enter sends it as a new branch (the old one stays); Esc cancels.",
                    timeout=5, markup=False)

    async def on_inspector_pane_fork_requested(self, event: InspectorPane.ForkRequested) -> None:
        """F in the inspector: the reply it shows, forked at a token, as a new branch beside it."""
        if self._busy(" first"):
            return
        job, fork = self.last_job, event.fork
        opening = branches.fork_opening(job, fork, self.engine, self.conversation.items)
        if job is None or opening is None:
            self.notify("The inspector's reply is no longer the one on screen: regenerate it to fork it.",
                        severity="warning", markup=False)
            return
        await self.conversation.remove_from(job.item)  # it stays in the store, one ← away
        await self._start_reply("new", fork=opening)

    def action_fork(self) -> None:
        """The palette's Fork: the inspector's picker, at its cursor's token."""
        pane = self._shown_inspector()
        if pane is not None:
            pane.action_fork()

    def on_message_view_fork_requested(self, event: MessageView.ForkRequested) -> None:
        """`f` on a picked reply: the inspector's fork picker, at its cursor's token or the reply's last."""
        job = self.last_job
        if job is None or job.item is not event.item or job.prompt is None:
            self.notify("Only the newest reply can be forked (the inspector holds its candidates): "
                        "regenerate this one (Ctrl+R) to fork it.", severity="warning", markup=False)
            return
        pane = self._shown_inspector()
        if pane is not None:
            pane.fork_at_cursor_or_last()

    def _shown_inspector(self) -> InspectorPane | None:
        if not self.query_one("#inspector").display:
            self.action_toggle_pane("inspector")
        return self._inspector_pane()

    async def on_message_view_sibling_requested(self, event: MessageView.SiblingRequested) -> None:
        """← or → on a message: show the branch through its sibling."""
        item, store, cid = event.item, self.store, self.conversation_id
        if self._busy(" first") or store is None or cid is None or item.db_id is None:
            return
        if self.conversation.view_for(item) is None:
            return  # a key pressed again before the branch switched: its message is no longer on screen
        leaf = self._db(branches.sibling_leaf, store, item.db_id, event.delta)
        if leaf is None:
            if item.siblings[1] < 2:
                self.notify("This message has no other version (Ctrl+R regenerates a reply, Ctrl+L edits "
                            "your last message).", timeout=3, markup=False)
            return
        self._db(store.set_leaf, cid, leaf)
        await self._show_branch(store, cid, focus=self.conversation.position_of(item))

    def on_message_view_delete_requested(self, event: MessageView.DeleteRequested) -> None:
        """Delete on a message: it and everything below it go, in every branch; its siblings stay."""
        item, store, cid = event.item, self.store, self.conversation_id
        if self._busy(" first") or store is None or cid is None or item.db_id is None:
            return
        if self.conversation.view_for(item) is None:
            return  # the message left the screen (a branch switch) before the key was handled
        depth = self.conversation.position_of(item)

        async def done(yes: bool | None) -> None:
            if yes and self.conversation_id == cid and not self._busy(" first"):
                self._db(store.delete_branch, item.db_id)
                await self._show_branch(store, cid, focus=depth)

        detail = branches.deletion_note(item, len(self.conversation.items) - depth - 1)
        self.push_screen(screens().ConfirmScreen("Delete this message?", detail, yes="Delete"), done)

    async def _show_branch(self, store: Store, cid: int, *, focus: int) -> None:
        """The store's branch on screen now replaces the one mounted; the message at `focus` (or the
        last, when the branch is shorter) takes the focus."""
        self._cancel_edit()
        self.last_job = None
        # the inspector's reply may be in the branch no longer shown
        self._clear_inspector(BRANCH_NOT_INSPECTED)
        items = self._db(branches.load_branch, store, cid) or []
        await self.conversation.show(items, focus=min(focus, len(items) - 1) if items else None)
        self._refresh_status()

    def _cancel_edit(self) -> None:
        if self.editing is None:
            return
        view = self.conversation.view_for(self.editing)
        if view is not None:
            view.remove_class("-editing")
        self.editing = None
        self.prompt_input.clear()

    # ------------------------------------------------------------------ sampling pane

    def on_sampling_pane_changed(self, event: SamplingPane.Changed) -> None:
        self.settings = self.settings.edit(event.params)  # the worker reads them at its next token

    def on_sampling_table_reset(self, event: SamplingTable.Reset) -> None:
        if event.which == "neutral":
            self.settings = self.settings.reset_to_neutral()
            done = "Sampling reset to neutral: every processor off, temperature 1"
        else:
            if self.engine is None:
                self.notify("The model is not loaded yet: its defaults are not known.", severity="warning",
                            markup=False)
                return
            self.settings = self.settings.reset_to_defaults(self.engine.default_params())
            done = "Sampling set to the model's defaults (generation_config.json)"
        # a single key resets every setting: stray typing must not cost them
        undo = "u undoes" if self.sampling.table.has_focus else "u in the sampling pane (F5) undoes"
        self.notify(f"{done} · {undo}", timeout=6, markup=False)

    def on_sampling_table_undo_reset(self, event: SamplingTable.UndoReset) -> None:
        before = self.settings.undo_reset()
        if before is None:
            self.bell()
            return
        self.settings = before
        self.notify("Sampling settings as before the reset", timeout=3, markup=False)

    def on_sampling_table_open_editor(self, event: SamplingTable.OpenEditor) -> None:
        if event.name == "stop":

            def done_stop(text: str | None) -> None:
                if text is None:
                    return
                try:
                    params = self.params.with_(stop=screens().decode_stops(text))
                except InvalidParameter as exc:
                    self.notify(str(exc), severity="warning", markup=False)
                    return
                self.settings = self.settings.edit(params)

            stops = screens().encode_stops(self.params.stop)
            self.push_screen(
                screens().TextEditScreen("Stop strings", "\n".join(filter(None, (stops, event.initial))),
                               hint="one per line; write \\n for a newline"),
                done_stop,
            )
        elif event.name == "system_prompt":

            def done_system(text: str | None) -> None:
                if text is None:
                    return
                self.settings = self.settings.with_system_prompt(clean(text).strip("\n"))
                if self.conversation_id is not None and self.store is not None:
                    self._db(self.store.set_system_prompt, self.conversation_id, self.system_prompt)

            text = "\n".join(filter(None, (self.system_prompt, event.initial)))  # a paste comes after the text
            self.push_screen(screens().TextEditScreen("System prompt", text), done_system)
        elif event.name == "order":

            def done_order(order: tuple[str, ...] | None) -> None:
                if order is None:
                    return
                self.settings = self.settings.edit(self.params.with_(order=order))

            self.push_screen(screens().OrderScreen(tuple(self.params.order)), done_order)

    def action_presets(self) -> None:
        def done(result: tuple[str, str] | None) -> None:
            if result is None:
                return
            action, name = result
            if action == "load":
                self.load_preset(name)
            elif action == "save":
                self.action_save_preset()
            elif action == "delete":
                self._delete_preset(name)

        names = list_presets(self.paths)
        self.push_screen(screens().PresetScreen(names, SHIPPED_PRESETS, self._preset_summaries(names)), done)

    def _preset_summaries(self, names: list[str]) -> dict[str, str]:
        """What each preset changes from the model's defaults ("T 0.2 top-p 0.5"), or why it cannot load."""
        base = self.model_defaults or SamplingParams()
        summaries = {}
        for name in names:
            try:
                preset = load_preset(name, self.paths)
                summary = changed_settings(preset.apply(base).to_dict(), base)
                if preset.system_prompt:
                    summary += " · system prompt"
            except (PresetError, InvalidParameter) as exc:
                summary = f"cannot load: {first_line(exc)}"
            summaries[name] = summary
        return summaries

    def load_preset(self, name: str) -> None:
        if self._apply_preset(name):
            self.notify(f"Loaded preset {name}", timeout=3, markup=False)

    def _apply_preset(self, name: str, *, failed: str = "") -> bool:
        """Load the preset `name` into the settings; a bad one is reported (after `failed`): False."""
        try:
            self.settings = self.settings.with_preset(load_preset(name, self.paths))
        except (PresetError, InvalidParameter) as exc:
            self.notify(f"{failed}{exc}", severity="warning", markup=False)
            return False
        return True

    def action_save_preset(self) -> None:
        def done(name: str | None) -> None:
            if not name or not name.strip():
                return
            try:
                path = save_preset(name, self.params, system_prompt=self.system_prompt or None, paths=self.paths)
            except PresetError as exc:
                self.notify(str(exc), severity="warning", markup=False)
                return
            self.settings = self.settings.saved_as(name.strip())
            self.notify(f"Saved preset {name.strip()} to {path}", markup=False)

        self.push_screen(
            screens().InputScreen("Save the current settings as a preset", self.preset_name or "",
                        placeholder="name", hint="letters, digits, space, . _ -"),
            done,
        )

    def _delete_preset(self, name: str) -> None:
        def done(yes: bool | None) -> None:
            if not yes:
                return
            try:
                path = delete_preset(name, self.paths)
            except PresetError as exc:
                self.notify(str(exc), severity="warning", markup=False)
                return
            self.notify(f"Deleted preset {name} ({path})", markup=False)

        self.push_screen(screens().ConfirmScreen(f"Delete preset {name}?", yes="Delete"), done)

    # ------------------------------------------------------------------ focus, copy, links, view

    def action_focus_prompt(self) -> None:
        self.prompt_input.focus()

    async def action_focus_message(self, delta: int) -> None:
        if not await self.conversation.step_focus(delta, self.focused):
            self.prompt_input.focus()

    def action_toggle_probs(self) -> None:
        self.show_probs = not self.show_probs
        self.conversation.set_show_probs(self.show_probs)
        if self.show_probs:
            self.notify("Token colours on: red tokens were unlikely, green ones near-certain (F4 turns off)",
                        timeout=4, markup=False)

    def action_toggle_lens_gutter(self) -> None:
        on = not self.conversation.lens_gutter
        self.conversation.set_lens_gutter(on)
        if on:
            self.notify("Lens gutter on: under each reply, a token's digit is its commitment layer and its "
                        "shade its surprisal (F10 turns off)", timeout=4, markup=False)

    def on_markdown_link_clicked(self, event: Markdown.LinkClicked) -> None:
        event.stop()
        href = event.href
        scheme = urlparse(href).scheme.lower()
        if scheme not in ("http", "https"):
            self.notify(f"Not opening {clean_line(href)[:80]}: only http and https links open.",
                        severity="warning", markup=False)
            return

        def done(yes: bool | None) -> None:
            if yes:
                self.open_url(href)

        self.push_screen(screens().ConfirmScreen("Open this link in your browser?", clean(href), yes="Open"), done)

    # ------------------------------------------------------------------ help and commands

    BINDING_OWNERS: tuple[tuple[str, Any], ...] = ()  # filled below the class

    def binding_rows(self) -> list[tuple[str, str, str, str]]:
        """(where, description, keys, id) for every binding, with the keymap applied."""
        keymap = self.keymap
        rows = []
        seen = set()
        for where, owner in self.binding_owners():
            for binding in Binding.make_bindings(owner.BINDINGS):
                if binding.id is None or (where, binding.id) in seen:
                    continue
                seen.add((where, binding.id))
                keys = keymap.get(binding.id, binding.key)
                shown = ", ".join(
                    self.get_key_display(dataclasses.replace(binding, key=k.strip(), key_display=None))
                    for k in keys.split(",")
                )
                description = binding.description or binding.action
                rows.append((where, description, shown, binding.id))
        return rows

    @classmethod
    def binding_owners(cls) -> tuple[tuple[str, Any], ...]:
        """Every class whose bindings the help screen lists (the inspector's loads here)."""
        from chat_tui.ui.attention import InspectorPane
        from chat_tui.ui.compare import CompareScreen
        from chat_tui.ui.training import TrainingScreen

        dialogs = screens()
        return (*cls.BINDING_OWNERS, ("conversations", dialogs.ConversationListScreen),
                ("presets", dialogs.PresetScreen), ("chain order", dialogs.OrderScreen),
                ("editor", dialogs.TextEditScreen), ("dialog", dialogs.InputScreen), ("confirm", dialogs.ConfirmScreen),
                ("help", dialogs.HelpScreen), ("inspector", InspectorPane), ("training", TrainingScreen),
                ("compare", CompareScreen))

    def action_help(self) -> None:
        self.push_screen(screens().HelpScreen(self.binding_rows(), str(self.paths.config_file)))

    def deliver_screenshot(self, filename: str | None = None, path: str | None = None,
                           time_format: str | None = None) -> str | None:
        """Save an SVG of the screen where exports go (Textual's default, ~/Downloads, may not exist) and
        name the file in the notice (for the palette's Screenshot command)."""
        try:
            folder = self.paths.ensure(Path(path) if path else self.paths.exports)
            saved = self.save_screenshot(filename, str(folder), time_format)
        except OSError as exc:
            self._notify_error("The screenshot was not saved", exc, log_error(self.paths, exc, "screenshot"))
            return None
        self.notify(f"Screenshot saved to {saved}", title="Screenshot", timeout=8, markup=False)
        return saved

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        commands = [
            ("New conversation", "Start an empty conversation (Ctrl+N)", self.action_new_conversation),
            ("Open conversation", "Browse saved conversations (Ctrl+O)", self.action_open_conversations),
            ("Rename conversation", "Give the open conversation a new title", self.action_rename_conversation),
            ("Delete conversation", "Delete the open conversation", self.action_delete_conversation),
            ("Export conversation as Markdown", "Write the conversation to a .md file",
             lambda: self.action_export("markdown")),
            ("Export conversation as JSON", "Write the conversation with every setting to a .json file",
             lambda: self.action_export("json")),
            ("Load model", "A model folder, a Hugging Face hub id, or the bundled model", self.action_load_model_dialog),
            ("Connect to a server", "A model on an OpenAI-compatible server (vLLM, llama.cpp, Ollama, …)",
             self.action_connect_dialog),
            ("Train a model", "Train on your text or dialogues and watch it learn (Ctrl+T)", self.action_train),
            ("Compare", "Answer with two to four settings (or models) side by side on the same random numbers (F9)",
             self.action_compare),
            ("Save preset", "Save the sampling settings as a named preset", self.action_save_preset),
            ("Presets", "Load, save or delete sampling presets", self.action_presets),
            ("Toggle sampling pane", "Show or hide the sampling settings (F2)",
             lambda: self.action_toggle_pane("sampling")),
            ("Toggle inspector", "Show or hide the inspector pane (F3)", lambda: self.action_toggle_pane("inspector")),
            ("Maximize inspector", "The attention inspector on the whole screen (F6 restores)",
             lambda: self.action_maximize("inspector")),
            ("Maximize conversation", "The conversation on the whole screen (F6 restores)",
             lambda: self.action_maximize("conversation")),
            ("Restore panes", "Every pane back in its place (F6)", self.action_restore_panes),
            ("Toggle token colours", "Colour each generated token by its probability (F4)",
             self.action_toggle_probs),
            ("Regenerate reply", "Generate the last reply again (Ctrl+R)", self.action_regenerate),
            ("Continue reply", "Continue a stopped reply (Ctrl+G)", self.action_continue_reply),
            ("Fork reply at the inspector's token", "Restart the reply at the inspector's token with another "
             "candidate, even one the chain dropped, as a new branch (F in the inspector)", self.action_fork),
            ("Edit last message", "Edit your last message and resend it (Ctrl+L)", self.action_edit_last),
            ("Reset sampling to neutral", "Every processor off",
             lambda: self.on_sampling_table_reset(SamplingTable.Reset("neutral"))),
            ("Sampling: model defaults", "The model's generation_config.json",
             lambda: self.on_sampling_table_reset(SamplingTable.Reset("defaults"))),
            ("Help: keys", "List every key binding (F1)", self.action_help),
        ]
        for title, help_text, callback in commands:
            yield SystemCommand(title, help_text, callback)
        for name in list_presets(self.paths):
            yield SystemCommand(f"Load preset: {name}", "Apply this sampling preset",
                                lambda name=name: self.load_preset(name), discover=False)

    # ------------------------------------------------------------------ for tests and benchmarks

    @property
    def settled(self) -> bool:
        """No reply streaming and no Markdown render pending."""
        if self.job is not None:
            return False
        return all(view.settled for view in self.conversation.query(MessageView))


ChatApp.BINDING_OWNERS = (
    ("app", ChatApp),
    ("screen", MainScreen),
    ("prompt", PromptInput),
    ("sampling", SamplingTable),
    ("message", MessageView),
)
