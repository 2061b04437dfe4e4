"""The training screen: start a run in the background, watch its losses live, chat with its checkpoint.

The run is `chat_tui.train.run.TrainingRun`, a separate process, so the UI never waits on it: a
0.5 s timer reads the new metrics.jsonl rows (`run.poll()`, a file read that never blocks) and
redraws the loss chart and the figures. Starting a run imports torch (the training modules need
it), so that happens in a thread worker, never on import of `chat_tui.ui` and never on the UI
thread. The run lives on the app (`ChatApp.training`), not on the screen: Esc goes back to the
chat, training goes on, and Ctrl+T (or the palette's "Train a model") shows it again.

Everything that comes from files or the user (paths, error messages, metric values) is shown
through `clean_line` / `safe_text`, never as markup.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rich.console import RenderableType
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.geometry import Size
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import Button, Footer, Input, Label, Select, Static

from chat_tui.engine.files import format_duration, free_path
from chat_tui.errors import TrainingError, first_line
from chat_tui.train.config import TrainConfig, setting_text  # no torch: the settings and their defaults
from chat_tui.train.data import DataError  # no torch: the data checks' error
from chat_tui.train.progress import LossChart  # rich only: no torch
from chat_tui.ui.errors import describe, log_error
from chat_tui.ui.text import clean_line, safe_text

POLL_INTERVAL = 0.5  # seconds between reads of metrics.jsonl

# (field id, label, pretrain only); a field starts at TrainConfig.defaults(kind), as `chat-tui train` does
NUMBER_FIELDS: tuple[tuple[str, str, bool], ...] = (
    ("n_layer", "Layers", True),
    ("n_head", "Heads", True),
    ("n_embd", "Width", True),
    ("block_size", "Context", True),
    ("batch_size", "Batch", False),
    ("vocab_size", "Vocab (BPE)", True),
    ("max_steps", "Steps", False),
    ("time_budget", "Time budget", False),
    ("lr", "Learning rate", False),
    ("eval_every", "Eval every", False),
)
# Time budget may be left empty; Steps may be left empty when a time budget is given.
PLACEHOLDERS = {"time_budget": "optional: 90s, 10m, 1h30m", "max_steps": "or none, with a time budget"}
INT_LIMITS = {"n_layer": 64, "n_head": 64, "n_embd": 8192, "block_size": 65536, "batch_size": 4096,
              "vocab_size": 1_000_000, "max_steps": 10_000_000, "eval_every": 10_000_000}


def form_defaults(kind: str) -> dict[str, str]:
    """The form's number fields as a new run of this kind starts (an unset one, the time budget, empty)."""
    defaults = TrainConfig.defaults(kind)
    values = {name: getattr(defaults, name) for name, *_ in NUMBER_FIELDS}
    return {name: "" if value is None else setting_text(value) for name, value in values.items()}


class FormError(ValueError):
    """A form value that cannot be used: one line, shown under the form."""


class RunLike(Protocol):
    """What the screen needs of `chat_tui.train.run.TrainingRun` (tests pass a stand-in)."""

    out: Path

    @property
    def running(self) -> bool: ...
    @property
    def returncode(self) -> int | None: ...
    def poll(self) -> list[dict]: ...
    def status(self) -> dict: ...
    def error(self) -> str | None: ...
    def latest_checkpoint(self) -> Path | None: ...
    def stop(self, *, wait: bool = True, timeout: float | None = 120.0) -> int | None: ...


@dataclass
class TrainingSession:
    """One run started from the app, and what has been read of it so far."""

    run: RunLike
    settings: dict[str, Any]
    rows: list[dict] = field(default_factory=list)
    chart: LossChart = field(default_factory=lambda: LossChart(height=10))
    last_val: float | None = None
    stopping: bool = False
    finished: bool = False

    def read(self) -> int:
        """Take the run's new metrics rows; returns how many arrived."""
        rows = self.run.poll()
        for row in rows:
            if not isinstance(row, dict):
                continue
            self.rows.append(row)
            self.chart.add(row)
            val = _num(row.get("val_loss"))
            if val is not None:
                self.last_val = val
        return len(rows)

    def update(self) -> None:
        """Poll the run; once its process has ended, read the last rows and mark it finished."""
        self.read()
        if not self.finished and not self.run.running:
            self.read()
            self.finished = True

    @property
    def state(self) -> str:
        """running, stopping, done, interrupted or failed."""
        if not self.finished:
            return "stopping" if self.stopping else "running"
        if self.run.error():
            return "failed"
        code = self.run.returncode
        if code == 130:
            return "interrupted"
        state = self.run.status().get("state")
        return state if state in ("done", "interrupted", "failed") else "done"


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def default_out(paths: Any) -> str:
    """A fresh folder under the data folder: runs/model, runs/model-2, …"""
    return str(free_path(Path(paths.data) / "runs" / "model"))


def _whole(name: str, label: str, text: str) -> int:
    try:
        value = int(text.strip().replace("_", ""))
    except ValueError:
        raise FormError(f"{label} must be a whole number, not {clean_line(text.strip())[:30]!r}") from None
    if value < 1:
        raise FormError(f"{label} must be at least 1, not {value}")
    if value > INT_LIMITS[name]:
        raise FormError(f"{label} must be at most {INT_LIMITS[name]:,}, not {value:,}")
    return value


def parse_form(values: dict[str, str], *, resume: bool = False) -> dict[str, Any]:
    """The TrainConfig keyword arguments from the form's texts, or a FormError saying what is wrong.

    Pure Python (no torch): `TrainConfig.validate` runs again in the worker that starts the run.
    """
    kind = values.get("kind", "pretrain")
    if kind not in ("pretrain", "sft"):
        raise FormError(f"unknown kind {clean_line(str(kind))!r}: choose pretrain or sft")
    out_text = values.get("out", "").strip()
    if not out_text:
        raise FormError("Output folder: give a folder for the checkpoint and metrics")
    out = Path(out_text).expanduser()
    if out.exists() and not out.is_dir():
        raise FormError(f"Output folder: {clean_line(str(out))} is a file, not a folder")
    has_run = (out / "train_state.pt").is_file()
    if resume:
        if not has_run:
            raise FormError(f"Nothing to resume: {clean_line(str(out))} holds no saved run")
        return {"kind": kind, "out": str(out)}
    if has_run:
        raise FormError(f"{clean_line(str(out))} already holds a run: choose another folder, or Resume it")
    try:
        data = shlex.split(values.get("data", ""))
    except ValueError as exc:
        raise FormError(f"Data: {exc} (quote paths that contain spaces)") from None
    if not data:
        raise FormError("Data: give one or more text files or folders (separated by spaces)")
    for item in data:
        if not Path(item).expanduser().exists():
            raise FormError(f"Data: no such file or folder: {clean_line(item)}")
    cfg: dict[str, Any] = {"kind": kind, "data": [str(Path(p).expanduser()) for p in data], "out": str(out)}
    if kind == "sft":
        base = values.get("init_from", "").strip()
        if not base:
            raise FormError("Fine-tuning needs a checkpoint to start from (From)")
        base_path = Path(base).expanduser()
        if not (base_path / "config.json").is_file():
            raise FormError(f"From: {clean_line(base)} is not a checkpoint folder (no config.json)")
        cfg["init_from"] = str(base_path)
    else:
        tokenizer = values.get("tokenizer", "char")
        if tokenizer not in ("char", "bpe"):
            raise FormError(f"unknown tokenizer {clean_line(str(tokenizer))!r}: choose char or bpe")
        cfg["tokenizer"] = tokenizer
    for name, label, pretrain_only in NUMBER_FIELDS:
        if pretrain_only and kind == "sft":
            continue
        text = values.get(name, "")
        if name == "vocab_size" and cfg.get("tokenizer") != "bpe":
            continue  # a character model's vocabulary is its text's characters
        if name == "time_budget":
            if text.strip():
                from chat_tui.train.duration import parse_duration

                try:
                    cfg["time_budget"] = parse_duration(text)
                except ValueError as exc:
                    raise FormError(f"Time budget: {exc}") from None
            continue
        if name == "max_steps" and not text.strip() and values.get("time_budget", "").strip():
            cfg["max_steps"] = None  # as long as the time budget allows
            continue
        if name == "lr":
            try:
                lr = float(text.strip())
            except ValueError:
                raise FormError(f"Learning rate must be a number such as 1e-3, not {clean_line(text.strip())[:30]!r}") from None
            if not (math.isfinite(lr) and 0 < lr <= 1):
                raise FormError(f"Learning rate must be above 0 and at most 1, not {lr:g}")
            cfg["lr"] = lr
        else:
            cfg[name] = _whole(name, label, text)
    if kind == "pretrain" and cfg["n_embd"] % cfg["n_head"]:
        raise FormError(f"Width ({cfg['n_embd']}) must be a multiple of Heads ({cfg['n_head']})")
    steps = cfg["max_steps"]
    warmup = TrainConfig.defaults(kind).warmup
    cfg["warmup"] = warmup if steps is None else min(warmup, steps // 5)  # never most of a short run
    cfg["log_every"] = min(10, cfg["eval_every"])
    return cfg


class LossChartView(Widget):
    """The run's LossChart, drawn to the widget's height (axis, step labels and legend take 3 lines)."""

    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002
        super().__init__(id=id)
        self.chart: LossChart | None = None

    def show(self, chart: LossChart | None) -> None:
        self.chart = chart
        self.refresh()

    def render(self) -> RenderableType:
        if self.chart is None:
            return ""
        self.chart.height = max(3, self.size.height - 3)
        return self.chart


class FiguresView(Widget):
    """Label-value pairs packed into lines of the widget's width; a pair is never split."""

    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002
        super().__init__(id=id)
        self.parts: list[tuple[str, str]] = []

    def show(self, parts: list[tuple[str, str]]) -> None:
        if parts != self.parts:
            self.parts = parts
            self.refresh(layout=True)

    def pack(self, width: int) -> Text:
        text = Text(end="")
        used = 0
        for label, value in self.parts:
            size = len(label) + 1 + len(value)
            if used and used + 3 + size > width:
                text.append("\n")
                used = 0
            elif used:
                text.append("   ")
                used += 3
            text.append(f"{label} ", style="dim")
            text.append(clean_line(value), style="bold")
            used += size
        return text

    def render(self) -> RenderableType:
        return self.pack(self.size.width or 80)

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        return self.pack(width).plain.count("\n") + 1 if self.parts else 0


class TrainingScreen(ModalScreen[None]):
    """Train a model: the form on the left, the live run on the right.

    Modal (and opaque) so that the chat's keys (regenerate, continue…) do not act behind it; Ctrl+Q
    and the command palette still work."""

    CSS_PATH = "training.tcss"  # parsed when the screen first opens, not before the chat's first frame

    BINDINGS = [
        Binding("ctrl+s", "start", "Start", id="training_start"),
        Binding("ctrl+b", "stop_run", "Stop run", id="training_stop"),
        Binding("ctrl+o", "open_checkpoint", "Chat with latest checkpoint", id="training_open_checkpoint"),
        Binding("escape", "close", "Back to chat", id="training_close"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._starting = False
        self._live = False  # between mount and unmount: the widgets can be updated

    # ------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        app = self.app
        session = getattr(app, "training", None)
        settings: dict[str, Any] = dict(session.settings) if session is not None else {}
        kind = settings.get("kind", "pretrain")
        yield Static(Text("Train a model"), id="train-title")
        with Horizontal(id="train-body"):
            with VerticalScroll(id="train-form"):
                with Horizontal(classes="field"):
                    yield Label("Kind")
                    yield Select([("pretrain: learn from text", "pretrain"), ("sft: fine-tune on dialogues", "sft")],
                                 value=kind, allow_blank=False, compact=True, id="kind")
                yield self._input_field("data", "Data", " ".join(shlex.quote(p) for p in settings.get("data", [])),
                                        "files/folders, space-separated")
                yield self._input_field("out", "Output folder", settings.get("out") or default_out(app.paths),
                                        "a new folder")
                yield self._input_field("init_from", "From (sft)", settings.get("init_from") or "",
                                        "checkpoint folder to fine-tune")
                with Horizontal(classes="field", id="field-tokenizer"):
                    yield Label("Tokenizer")
                    yield Select([("char: a token per character", "char"), ("bpe: byte-level BPE", "bpe")],
                                 value=settings.get("tokenizer", "char"), allow_blank=False, compact=True,
                                 id="tokenizer")
                defaults = form_defaults(kind)
                for name, label, _pretrain_only in NUMBER_FIELDS:
                    value = settings.get(name)
                    shown = f"{value:g}" if isinstance(value, float) else str(value) if value is not None else None
                    yield self._input_field(name, label, shown or defaults[name], PLACEHOLDERS.get(name, ""))
                with Horizontal(id="train-buttons"):
                    yield Button("Start", id="start", variant="primary", compact=True)
                    yield Button("Stop", id="stop", compact=True)
                    yield Button("Resume", id="resume", compact=True)
                    yield Button("Chat", id="open", compact=True)
                yield Static("", id="train-error")
                yield Static(Text("Ctrl+S start · Ctrl+B stop · Ctrl+O chat with the latest checkpoint · "
                                  "Esc back to the chat (training goes on)"), id="train-hint")
            with Vertical(id="train-run"):
                yield Static("", id="train-state")
                yield FiguresView(id="train-figures")
                yield LossChartView(id="train-chart")
                yield Static("", id="train-checkpoint")
        yield Footer()

    def _input_field(self, name: str, label: str, value: str, placeholder: str) -> Horizontal:
        return Horizontal(
            Label(label),
            Input(clean_line(value), placeholder=placeholder, compact=True, id=name, select_on_focus=False),
            classes="field", id=f"field-{name}",
        )

    def on_mount(self) -> None:
        self._live = True
        self._apply_kind(self.query_one("#kind", Select).value, swap_defaults=False)
        self.set_interval(POLL_INTERVAL, self._tick)
        self._tick()
        self.query_one("#data", Input).focus()

    def on_unmount(self) -> None:
        self._live = False

    # ------------------------------------------------------------------ the form

    def form_values(self) -> dict[str, str]:
        values = {name: self.query_one(f"#{name}", Input).value for name, *_ in NUMBER_FIELDS}
        for name in ("data", "out", "init_from"):
            values[name] = self.query_one(f"#{name}", Input).value
        values["kind"] = str(self.query_one("#kind", Select).value)
        values["tokenizer"] = str(self.query_one("#tokenizer", Select).value)
        return values

    @on(Select.Changed, "#kind")
    def _kind_changed(self, event: Select.Changed) -> None:
        self._apply_kind(event.value, swap_defaults=True)

    @on(Select.Changed, "#tokenizer")
    def _tokenizer_changed(self, event: Select.Changed) -> None:
        self._apply_kind(self.query_one("#kind", Select).value, swap_defaults=False)

    def _apply_kind(self, kind: Any, *, swap_defaults: bool) -> None:
        sft = kind == "sft"
        off = {"tokenizer", *(name for name, _label, pretrain_only in NUMBER_FIELDS if pretrain_only)} if sft else {"init_from"}
        if self.query_one("#tokenizer", Select).value != "bpe":
            off.add("vocab_size")  # a character model's vocabulary is its text's characters
        for name in ("init_from", "tokenizer", *(n for n, *_ in NUMBER_FIELDS)):
            row = self.query_one(f"#field-{name}")
            row.set_class(name in off, "-off")
            for widget in row.query("Input, Select"):
                widget.disabled = name in off
        if swap_defaults:  # a default of the other kind becomes this kind's default; a typed value stays
            other = form_defaults("pretrain" if sft else "sft")
            for name, value in form_defaults("sft" if sft else "pretrain").items():
                box = self.query_one(f"#{name}", Input)
                if value != other[name] and box.value.strip() == other[name]:
                    box.value = value

    def show_error(self, message: str | None) -> None:
        self.query_one("#train-error", Static).update(safe_text(message or "", one_line=True))

    # ------------------------------------------------------------------ actions

    @property
    def session(self) -> TrainingSession | None:
        return getattr(self.app, "training", None)

    def action_start(self, resume: bool = False) -> None:
        session = self.session
        if self._starting:
            self.show_error("A run is starting…")
            return
        if session is not None and not session.finished:
            self.show_error("A run is already going: stop it first (Ctrl+B)")
            return
        try:
            settings = parse_form(self.form_values(), resume=resume)
        except FormError as exc:
            self.show_error(str(exc))
            return
        self.show_error(None)
        self._starting = True
        self.query_one("#train-state", Static).update(Text("starting… (loading the trainer)", style="bold"))
        self._start_worker(settings, resume)

    @work(thread=True, exclusive=True, exit_on_error=False, group="training", name="start-training")
    def _start_worker(self, settings: dict[str, Any], resume: bool) -> None:
        app = self.app
        try:
            from chat_tui.train.run import TrainingRun  # imports torch: here, in the worker thread

            if resume:
                from chat_tui.train.loop import resume_config

                cfg = resume_config(settings["out"])
            else:
                cfg = TrainConfig(**settings)
            run = TrainingRun.start(cfg, resume=resume)
        except Exception as exc:  # a bad setting, an unreadable folder: one line, the details in the log
            if isinstance(exc, (TrainingError, DataError)):  # the trainer's own one-line messages
                message = clean_line(first_line(exc))
            else:
                message = describe(exc)
                if not isinstance(exc, OSError):
                    log_error(app.paths, exc, "starting a training run")
            app.call_from_thread(self._start_failed, message)
            return
        session = TrainingSession(run, {**settings, **_settings_of(cfg)})
        app.call_from_thread(self._started, session)

    def _start_failed(self, message: str) -> None:
        self._starting = False
        if self._live:
            self.show_error(message)
            self._tick()
        else:
            self.app.notify(f"Training did not start: {message}", severity="error", markup=False)

    def _started(self, session: TrainingSession) -> None:
        self._starting = False
        self.app.training = session  # type: ignore[attr-defined]  # kept by the app: Esc does not stop it
        if self._live:
            self._tick()

    def action_stop_run(self) -> None:
        session = self.session
        if session is None or session.finished:
            self.show_error("No run is going")
            return
        if not session.stopping:
            session.stopping = True
            session.run.stop(wait=False)  # like Ctrl-C: it finishes the step, saves and exits; the timer sees it end
        self._tick()

    def action_open_checkpoint(self) -> None:
        session = self.session
        if session is None:
            self.show_error("No run yet: start one first")
            return
        path = session.run.latest_checkpoint()
        if path is None:
            every = session.settings.get("eval_every")
            when = f" (every {every} steps)" if isinstance(every, int) else ""
            self.show_error(f"No checkpoint yet: the first one is saved at the first evaluation{when}")
            return
        step = session.run.status().get("saved_step")
        open_checkpoint = getattr(self.app, "open_checkpoint", None)
        if open_checkpoint is None or not open_checkpoint(path):
            return
        going = " while training goes on (Ctrl+T shows it)" if not session.finished else ""
        at = f" at step {step}" if isinstance(step, int) else ""
        self.app.notify(f"Opening the checkpoint{at} from {clean_line(str(path))}{going}", markup=False)
        self.dismiss()

    def action_close(self) -> None:
        self.dismiss()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        event.stop()
        button = event.button.id
        if button == "start":
            self.action_start()
        elif button == "resume":
            self.action_start(resume=True)
        elif button == "stop":
            self.action_stop_run()
        elif button == "open":
            self.action_open_checkpoint()

    # ------------------------------------------------------------------ the live view

    def _tick(self) -> None:
        if not self._live:
            return
        session = self.session
        if session is not None:
            session.update()
        self._show(session)

    def _show(self, session: TrainingSession | None) -> None:
        going = session is not None and not session.finished
        self.query_one("#start", Button).disabled = going or self._starting
        self.query_one("#resume", Button).disabled = going or self._starting
        self.query_one("#stop", Button).disabled = not going or (session is not None and session.stopping)
        self.query_one("#open", Button).disabled = session is None or session.run.latest_checkpoint() is None
        state_line = self.query_one("#train-state", Static)
        figures = self.query_one("#train-figures", FiguresView)
        chart_view = self.query_one("#train-chart", LossChartView)
        checkpoint = self.query_one("#train-checkpoint", Static)
        if session is None:
            if not self._starting:
                state_line.update(Text("No run yet: fill in the form and press Start.", style="dim"))
            figures.show([])
            chart_view.show(None)
            checkpoint.update("")
            return
        state = session.state
        style = {"running": "bold green", "stopping": "bold yellow", "done": "bold", "interrupted": "bold yellow",
                 "failed": "bold red"}.get(state, "bold")
        line = Text(end="")  # wraps in a narrow column: the run folder is never cut
        line.append(state, style=style)
        line.append(" · ")
        line.append(clean_line(str(session.settings.get("kind", ""))))
        line.append(" · ")
        line.append(clean_line(str(session.run.out)), style="dim")
        error = session.run.error() if session.finished else None
        if error:
            line.append(" · ")
            line.append(clean_line(error), style="red")
        state_line.update(line)
        figures.show(self._figures(session))
        chart_view.show(session.chart)
        latest = session.run.latest_checkpoint()
        status = session.run.status()
        if latest is None:
            checkpoint.update(Text("no checkpoint yet", style="dim"))
        else:
            text = Text("checkpoint", style="dim", end="")
            saved = status.get("saved_step")
            if isinstance(saved, int):
                text.append(f" at step {saved}", style="dim")
            best = _num(status.get("best_val_loss"))
            if best is not None:
                text.append(f" · best val loss {best:.4f}", style="dim")
            text.append(" · Ctrl+O chats with it", style="dim")
            checkpoint.update(text)

    def _figures(self, session: TrainingSession) -> list[tuple[str, str]]:
        """(label, value) for step, loss, val loss, tok/s, lr, time left, elapsed."""
        row = session.rows[-1] if session.rows else {}
        max_steps = session.settings.get("max_steps")
        step = _num(row.get("step"))
        loss, rate, lr = _num(row.get("loss")), _num(row.get("tokens_per_s")), _num(row.get("lr"))
        step_text = str(int(step)) if step is not None else "–"
        if isinstance(max_steps, int):
            step_text += f"/{max_steps}"
        return [
            ("step", step_text),
            ("loss", f"{loss:.4f}" if loss is not None else "–"),
            ("val loss", f"{session.last_val:.4f}" if session.last_val is not None else "–"),
            ("tok/s", f"{rate:,.0f}" if rate is not None else "–"),
            ("lr", f"{lr:.2e}" if lr is not None else "–"),
            ("time left", "–" if session.finished else format_duration(_num(row.get("eta_s")), missing="–")),
            ("elapsed", format_duration(_num(row.get("elapsed_s")), missing="–")),
        ]


def _settings_of(cfg: Any) -> dict[str, Any]:
    """The settings the screen shows (and prefills) from a TrainConfig."""
    keys = ("kind", "data", "out", "init_from", "tokenizer", "max_steps", "eval_every",
            *(name for name, *_ in NUMBER_FIELDS))
    return {k: getattr(cfg, k) for k in keys if getattr(cfg, k, None) is not None}
