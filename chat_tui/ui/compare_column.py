"""One column of the compare screen: its settings line, its reply as it streams (the token where the
columns diverge marked), its figures and its Keep button.

The reply and every token are untrusted model output: they are shown as Rich `Text` after `clean`, never
as markup.
"""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Button, Input, Static

from chat_tui.engine.compare import ColumnAtDivergence, ColumnStats, choice_probability
from chat_tui.engine.params import settings_summary
from chat_tui.engine.types import Step
from chat_tui.textsafe import clean, clean_line

STOP_LABEL = {"eos": "ended its turn", "stop": "stop string", "length": "max tokens", "context": "context full",
              "cancelled": "stopped"}


def token_label(text: str) -> str:
    """A token's text as a label: quoted, control characters visible ("'\\n'" shows as '⏎')."""
    return repr(clean_line(text.replace("\n", "⏎")))


class CompareColumn(Vertical, can_focus=True):
    """A column: `label` ("A"), its settings line, its model's name; the screen feeds it steps."""

    DEFAULT_CSS = """
    CompareColumn { width: 1fr; height: 1fr; border: round $panel-lighten-2; padding: 0 1; }
    CompareColumn:focus-within, CompareColumn:focus { border: round $accent; }
    CompareColumn .column-title { height: 1; text-style: bold; }
    CompareColumn .column-settings { height: 1; border: none; padding: 0; margin: 0; }
    CompareColumn .column-settings:focus { background: $boost; }
    CompareColumn .column-reply-scroll { height: 1fr; }
    CompareColumn .column-divergence { height: auto; max-height: 4; color: $warning; }
    CompareColumn .column-stats { height: auto; color: $text-muted; }
    CompareColumn .column-error { height: auto; color: $error; }
    CompareColumn .column-foot { height: 1; }
    CompareColumn .column-foot Button { min-width: 8; height: 1; border: none; margin: 0; }
    """

    class SettingsSubmitted(Message):
        """The user wrote a settings line and pressed Enter."""

        def __init__(self, column: CompareColumn, text: str) -> None:
            super().__init__()
            self.column = column
            self.text = text

    class KeepPressed(Message):
        def __init__(self, column: CompareColumn) -> None:
            super().__init__()
            self.column = column

    def __init__(self, label: str, settings_text: str, model_name: str, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.label = label
        self.settings_text = settings_text
        self.model_name = model_name
        self.steps: list[Step] = []
        self.summary = ""  # the settings in short ("T 0.7 top-p 0.9")
        self.divergence_index: int | None = None
        self.reply = Text()  # the reply as drawn
        self._drawn = 0  # how many of `steps` `reply` shows
        self._marked: int | None = None  # the divergence index `reply` shows marked

    def compose(self) -> ComposeResult:
        yield Static(self._title(), classes="column-title")
        yield Input(self.settings_text, placeholder="the chat's settings; e.g. temperature=0.7 top_p=0.9", compact=True,
                    classes="column-settings")
        with VerticalScroll(classes="column-reply-scroll"):
            yield Static(Text(""), classes="column-reply")
        yield Static(Text(""), classes="column-divergence")
        yield Static(Text(""), classes="column-error")
        yield Static(Text(""), classes="column-stats")
        with Horizontal(classes="column-foot"):
            yield Button("Keep", compact=True, classes="column-keep")

    def _title(self) -> Text:
        title = Text(f"{self.label} ", style="bold")
        title.append(clean_line(self.model_name), style="")
        if self.summary:
            title.append(f" · {self.summary}", style="dim")
        return title

    # ------------------------------------------------------------------ what the screen tells it

    def restart(self, settings_text: str, params_summary: str, model_name: str) -> None:
        """A new run: its settings and model; the old reply goes."""
        self.settings_text = settings_text
        self.summary = params_summary
        self.model_name = model_name
        self.steps = []
        self.divergence_index = None
        self.reply, self._drawn, self._marked = Text(), 0, None
        self.query_one(".column-settings", Input).value = settings_text
        self.query_one(".column-title", Static).update(self._title())
        self.show_error("")
        self.refresh_reply()
        self.query_one(".column-divergence", Static).update(Text(""))
        self.query_one(".column-stats", Static).update(Text("waiting for the model…"))

    def relabel(self, label: str) -> None:
        self.label = label
        self.query_one(".column-title", Static).update(self._title())

    def show_error(self, text: str) -> None:
        self.query_one(".column-error", Static).update(Text(clean_line(text)))

    def mark_divergence(self, index: int | None, at: ColumnAtDivergence | None, labels: list[str]) -> None:
        self.divergence_index = index
        note = Text("")
        if index is not None and at is not None:
            if at.token_id is None:
                note = Text(f"diverges at token {index}: this reply had ended")
            else:
                note = Text(f"diverges at token {index}: chose {token_label(at.token)} "
                            f"({choice_probability(at.prob, at.chain_prob, None)})")
                for other in at.others:
                    note.append(f"\n{labels[other.column]}'s {token_label(other.token)} here: "
                                + choice_probability(other.prob, other.chain_prob, other.dropped_by))
        self.query_one(".column-divergence", Static).update(note)

    def refresh_reply(self) -> None:
        """The reply so far, the diverging token in reverse video (or a visible stand-in when it adds no text).

        Only the new steps are added, unless the divergence mark moved (then the reply is drawn again)."""
        if self._marked != self.divergence_index:
            self.reply, self._drawn, self._marked = Text(), 0, self.divergence_index
        if self._drawn == len(self.steps) and self._drawn:
            return
        for step in self.steps[self._drawn:]:
            if step.index == self.divergence_index:
                shown = clean(step.text) or f"⟨{clean_line(step.token)}⟩"
                self.reply.append(shown, style="reverse bold")
            else:
                self.reply.append(clean(step.text))
        self._drawn = len(self.steps)
        self.query_one(".column-reply", Static).update(self.reply)

    def show_stats(self, stats: ColumnStats) -> None:
        parts = [f"{stats.tokens} tokens", f"{stats.tokens_per_s:.1f} tok/s"]
        if stats.mean_logprob is not None and stats.perplexity is not None:
            parts.append(f"log-p {stats.mean_logprob:.2f} (ppl {stats.perplexity:.2f})")
        parts.append(STOP_LABEL.get(stats.stop_reason or "", "streaming…"))
        self.query_one(".column-stats", Static).update(Text(" · ".join(parts)))

    # ------------------------------------------------------------------ what it tells the screen

    @on(Input.Submitted, ".column-settings")
    def _settings_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.post_message(self.SettingsSubmitted(self, event.value))

    @on(Button.Pressed, ".column-keep")
    def _keep_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.post_message(self.KeepPressed(self))


def params_summary(params) -> str:
    return settings_summary(params, short=True) or "neutral"
