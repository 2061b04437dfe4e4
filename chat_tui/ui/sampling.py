"""The sampling pane: every setting of the engine's chain, edited from the keyboard.

Without the focus the pane is compact: one line per setting that differs from the model's defaults,
plus the selected one. With the focus (F5, a click) it shows every setting with its range and help.

One focusable table (so Tab does not walk through fifteen rows): Up/Down choose a row,
Left/Right step its value (Shift for ten steps), typing a number edits it and Enter applies it.
A value outside its range is refused on the spot and the range is shown. Enter, Space or
Left/Right turn an on/off setting over. Enter on the stop strings, the system prompt or the
chain order opens an editor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rich.text import Text
from textual import events
from textual.actions import SkipAction
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.geometry import Region
from textual.message import Message
from textual.reactive import reactive
from textual.widget import Widget
from textual.widgets import Static

from chat_tui.engine.params import (
    FLAGS,
    SPECS,
    InvalidParameter,
    ParamSpec,
    SamplingParams,
    check_flag,
    check_value,
    logit_bias_text,
    order_summary,
)
from chat_tui.ui.text import clean_line

NUMERIC_ROWS: tuple[tuple[str, str], ...] = (
    ("temperature", "temperature"),
    ("top_k", "top-k"),
    ("top_p", "top-p"),
    ("min_p", "min-p"),
    ("typical_p", "typical-p"),
    ("repetition_penalty", "rep. penalty"),
    ("repetition_window", "rep. window"),
    ("presence_penalty", "presence"),
    ("frequency_penalty", "frequency"),
    ("max_new_tokens", "max tokens"),
    ("seed", "seed"),
    ("top_candidates", "candidates"),
)
FLAG_ROWS: tuple[tuple[str, str], ...] = (
    ("slide_context", "slide window"),
)
TEXT_ROWS: tuple[tuple[str, str], ...] = (
    ("stop", "stop"),
    ("system_prompt", "system"),
    ("order", "order"),
    ("logit_bias", "logit bias"),
)
UNSUPPORTED = "not supported by this server"
TEXT_HELP = {
    "stop": "stop strings: the reply ends before any of them (Enter edits, one per line)",
    "system_prompt": "system prompt: sent before the conversation (Enter edits)",
    "order": "order of the sampling chain's stages (Enter edits)",
    "logit_bias": "token:bias pairs added to the raw logits, e.g. 50256:-100,198:5 (paste them; --logit-bias)",
}


def short_number(x: float) -> str:
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    if x >= 2**62:
        return "2⁶³-1"
    if float(x).is_integer() and abs(x) >= 10_000:
        mantissa, exponent = f"{x:.0e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def range_label(spec: ParamSpec) -> str:
    left = "(" if spec.low_open else "["
    right = ")" if math.isinf(spec.high) else "]"
    return f"{left}{short_number(spec.low)}, {short_number(spec.high)}{right}"


def extends_number(buffer: str, char: str, spec: ParamSpec) -> bool:
    """Whether typing `char` after `buffer` still spells the start of a number for `spec`.

    Letters of stray text (the E of "ROMEO") and signs where no number has one do not start an edit.
    """
    if char in "0123456789":
        return True
    negative_start = char == "-" and not buffer and spec.low < 0
    if spec.kind is int:
        return negative_start
    mantissa, exponent_mark, exponent = buffer.lower().partition("e")
    if char in "eE":
        return not exponent_mark and any(c.isdigit() for c in mantissa)
    if char in "+-" and exponent_mark and not exponent:
        return True
    if char == ".":
        return not exponent_mark and "." not in mantissa
    return negative_start


def format_value(spec: ParamSpec | None, value: object) -> str:
    if value is None:
        return "random"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def unsupported_line(label: str, width: int) -> Text:
    """A row whose setting the server rejected: the note takes the place of the value and the range. In the
    compact pane the label gives up its padding before the note is cut ("top-k not supported")."""
    fits = [(shown, note) for note in (UNSUPPORTED, "not supported", "unsupported")
            for shown in (label, label.rstrip()) if len(shown) + 1 + len(note) <= width]
    label, note = fits[0] if fits else (label.rstrip(), "unsupported")
    room = max(width - len(label) - 1, 0)
    line = Text(f"{label} ", end="")
    line.append(note[:room].rjust(room), style="dim italic")
    return line


@dataclass
class Row:
    name: str
    label: str
    spec: ParamSpec | None  # None for the on/off and the text rows

    @property
    def is_flag(self) -> bool:
        return self.name in FLAGS


ROWS: tuple[Row, ...] = (
    tuple(Row(n, label, SPECS[n]) for n, label in NUMERIC_ROWS)
    + tuple(Row(n, label, None) for n, label in FLAG_ROWS)
    + tuple(Row(n, label, None) for n, label in TEXT_ROWS)
)


class SamplingTable(Widget, can_focus=True):
    """The rows of the sampling pane, as one focusable widget."""

    # its styles are in app.tcss: each DEFAULT_CSS is one more stylesheet to parse before the first frame
    COMPONENT_CLASSES = {"sampling-table--cursor", "sampling-table--selected"}

    BINDINGS = [
        Binding("up", "move(-1)", "Previous setting", show=False, id="param_previous"),
        Binding("down", "move(1)", "Next setting", show=False, id="param_next"),
        Binding("left", "step(-1)", "Less", id="param_decrease"),
        Binding("right", "step(1)", "More", id="param_increase"),
        Binding("shift+left", "step(-10)", "Less ×10", show=False, id="param_decrease_more"),
        Binding("shift+right", "step(10)", "More ×10", show=False, id="param_increase_more"),
        Binding("enter", "edit", "Edit/apply", id="param_edit"),
        Binding("space", "toggle", "Turn on/off", show=False, id="param_toggle"),
        Binding("backspace", "backspace", "Delete a digit", show=False, id="param_backspace"),
        Binding("escape", "cancel_edit", "Cancel the edit", show=False, id="param_cancel"),
        Binding("n", "neutral", "Neutral", id="params_neutral"),
        Binding("d", "defaults", "Model defaults", id="params_defaults"),
        Binding("u", "undo_reset", "Undo a reset", show=False, id="params_undo_reset"),
        Binding("p", "app.presets", "Presets", show=False, id="presets"),
        Binding("s", "app.save_preset", "Save preset", show=False, id="save_preset"),
    ]

    cursor = reactive(0)

    class Commit(Message):
        """A row's new value (from a step or an edit), still to be validated."""

        def __init__(self, name: str, value: object) -> None:
            super().__init__()
            self.name = name
            self.value = value

    class OpenEditor(Message):
        def __init__(self, name: str, initial: str = "") -> None:
            super().__init__()
            self.name = name
            self.initial = initial

    class Reset(Message):
        def __init__(self, which: str) -> None:
            super().__init__()
            self.which = which  # "neutral" or "defaults"

    class UndoReset(Message):
        """Put back the settings the last reset replaced."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.params = SamplingParams()
        self.defaults: SamplingParams | None = None  # the model's own (None: not known yet)
        self.system_prompt = ""
        self.editing: str | None = None
        self.error: str | None = None  # the last refusal, shown until the next change
        self.unsupported: frozenset[str] = frozenset()  # the settings a server rejected (mark_unsupported)

    # ------------------------------------------------------------------ rendering

    @property
    def row(self) -> Row:
        return ROWS[self.cursor]

    def value_text(self, row: Row) -> str:
        if row.is_flag:
            return "on" if getattr(self.params, row.name) else "off"
        if row.name == "stop":
            return ", ".join(repr(s)[1:-1] for s in self.params.stop) or "none"
        if row.name == "system_prompt":
            return self.system_prompt.splitlines()[0] if self.system_prompt.strip() else "none"
        if row.name == "order":
            return order_summary(self.params.order)
        if row.name == "logit_bias":
            return logit_bias_text(self.params.logit_bias) or "none"
        return format_value(row.spec, getattr(self.params, row.name))

    @property
    def compact(self) -> bool:
        """Without the focus only the settings that differ from the model's defaults are listed."""
        return not self.has_focus

    def differs(self, row: Row) -> bool:
        """Whether `row`'s value is not the model's default (SamplingParams' own before a model loads)."""
        if row.name == "system_prompt":
            return bool(self.system_prompt.strip())
        defaults = self.defaults or SamplingParams()
        return getattr(self.params, row.name) != getattr(defaults, row.name)

    def shown_rows(self) -> list[int]:
        """The indices of ROWS on screen: all of them, or (compact) those that differ plus the selected one."""
        if not self.compact:
            return list(range(len(ROWS)))
        return [i for i, row in enumerate(ROWS) if i == self.cursor or self.differs(row)]

    def get_content_height(self, container, viewport, width: int) -> int:  # noqa: ANN001
        return len(self.shown_rows())

    def render(self) -> Text:
        width = max(self.size.width, 20)
        out = Text(no_wrap=True, overflow="ellipsis", end="")
        compact = self.compact
        range_width = 10 if width >= 30 and not compact else 0
        label_width = 12 if width >= 24 else 9
        value_width = max(width - label_width - range_width - 2, 4)
        cursor_style = self.get_component_rich_style("sampling-table--cursor")
        selected_style = self.get_component_rich_style("sampling-table--selected")
        shown_rows = self.shown_rows()
        for n, i in enumerate(shown_rows):
            row = ROWS[i]
            selected = i == self.cursor
            focused = selected and self.has_focus
            line_style = cursor_style if focused else (selected_style if selected else "")
            label = row.label[:label_width].ljust(label_width)
            if selected and self.editing is not None:
                shown = self.editing + "▏"
                valid = self._buffer_ok(row, self.editing)
                value_style = "bold green" if valid else "bold red"
            else:
                shown = clean_line(self.value_text(row))
                value_style = "bold" if row.spec is not None or row.is_flag else "italic"
            if len(shown) > value_width:
                shown = shown[: value_width - 1] + "…"
            rng = range_label(row.spec) if row.spec is not None else ("on/off" if row.is_flag else "…")
            rng = rng if len(rng) <= range_width else ""
            line = Text(end="")
            line.append(label, style="")
            line.append(" ")
            line.append(shown.rjust(value_width), style=value_style)
            if range_width:
                line.append(" ")
                line.append(rng.rjust(range_width), style="dim")
            if row.name in self.unsupported and not (selected and self.editing is not None):
                line = unsupported_line(label, width)
            if line_style:
                line.stylize_before(line_style)
            out.append_text(line)
            if n < len(shown_rows) - 1:
                out.append("\n")
        return out

    def mark_unsupported(self, names: frozenset[str]) -> None:
        """Show these settings as not supported by the server (they are left out of its requests)."""
        self.unsupported = names
        self.refresh()

    @staticmethod
    def _buffer_ok(row: Row, buffer: str) -> bool:
        if row.spec is None:
            return True
        try:
            check_value(row.spec, buffer)
        except InvalidParameter:
            return False
        return True

    def watch_cursor(self, _old: int, new: int) -> None:
        self.editing = None
        self.refresh(layout=self.compact)
        if self.parent is not None and isinstance(self.parent, VerticalScroll):
            self.parent.scroll_to_region(Region(0, self.shown_rows().index(new), 1, 1), animate=False)
        self.post_message(self.CursorMoved(ROWS[new]))

    class CursorMoved(Message):
        def __init__(self, row: Row) -> None:
            super().__init__()
            self.row = row

    def on_focus(self) -> None:
        self.refresh(layout=True)
        self.post_message(self.CursorMoved(self.row))

    def on_blur(self) -> None:
        if self.editing is not None:
            self.editing = None
        self.refresh(layout=True)

    def on_click(self, event: events.Click) -> None:
        shown = self.shown_rows()
        if 0 <= event.y < len(shown):
            self.cursor = shown[event.y]
        self.focus()

    def show(self, params: SamplingParams, system_prompt: str, defaults: SamplingParams | None = None) -> None:
        self.params = params
        self.system_prompt = system_prompt
        if defaults is not None:
            self.defaults = defaults
        self.refresh(layout=True)

    # ------------------------------------------------------------------ keys

    def action_move(self, delta: int) -> None:
        if self.editing is not None:
            self.action_edit()  # leaving a row applies what was typed
        self.cursor = (self.cursor + delta) % len(ROWS)

    def action_step(self, steps: int) -> None:
        row = self.row
        if row.is_flag:
            self.action_toggle()
            return
        if row.spec is None:
            self.post_message(self.OpenEditor(row.name))
            return
        if self.editing is not None:
            return
        spec = row.spec
        current = getattr(self.params, row.name)
        if current is None:
            current = 0
        value = current + spec.step * steps
        if spec.kind is float:
            value = round(value, 6)
        low_bad = value <= spec.low if spec.low_open else value < spec.low
        if low_bad:
            if spec.low_open:
                # the open end itself is refused: the smallest step above it is the floor
                value = round(spec.low + spec.step, 6) if current > spec.low + spec.step else current
            else:
                value = spec.low
        if value > spec.high:
            value = spec.high
        if spec.kind is int:
            value = int(value)
        if value == current and getattr(self.params, row.name) is not None:
            self.app.bell()
            return
        self.post_message(self.Commit(row.name, value))

    def action_toggle(self) -> None:
        """Turn an on/off setting over (Space, Enter, Left/Right on its row)."""
        row = self.row
        if not row.is_flag:
            raise SkipAction()
        self.post_message(self.Commit(row.name, not getattr(self.params, row.name)))

    def action_edit(self) -> None:
        row = self.row
        if row.is_flag:
            self.action_toggle()
            return
        if row.spec is None:
            self.post_message(self.OpenEditor(row.name))
            return
        if self.editing is None:
            self.editing = ""
            self.refresh()
            return
        buffer, self.editing = self.editing, None
        self.refresh()
        if buffer == "" and not row.spec.optional:
            return  # nothing typed: keep the value
        self.post_message(self.Commit(row.name, buffer))

    def action_backspace(self) -> None:
        if self.editing is None:
            if self.row.spec is not None:
                self.editing = format_value(self.row.spec, getattr(self.params, self.row.name))
                if self.editing == "random":
                    self.editing = ""
            else:
                raise SkipAction()
        self.editing = self.editing[:-1]
        self.refresh()

    def action_cancel_edit(self) -> None:
        if self.editing is None:
            raise SkipAction()  # let Esc stop a reply
        self.editing = None
        self.refresh()

    def action_neutral(self) -> None:
        self.post_message(self.Reset("neutral"))

    def action_defaults(self) -> None:
        self.post_message(self.Reset("defaults"))

    def action_undo_reset(self) -> None:
        self.post_message(self.UndoReset())

    def on_key(self, event: events.Key) -> None:
        row = self.row
        char = event.character
        if char is None or row.spec is None or not extends_number(self.editing or "", char, row.spec):
            return  # a binding's letter goes on to its binding; stray text goes nowhere
        event.stop()
        event.prevent_default()
        self.editing = (self.editing or "") + char
        self.refresh()

    def on_paste(self, event: events.Paste) -> None:
        """A paste types its text: a number is applied as typed digits and Enter would be."""
        event.stop()
        text = event.text.strip()
        row = self.row
        if not text:
            return
        if row.is_flag or row.name == "logit_bias":  # refused by the check like any bad value
            self.post_message(self.Commit(row.name, text))
            return
        if row.spec is None:
            if row.name != "order":  # the stop strings and the system prompt open with the paste added
                self.post_message(self.OpenEditor(row.name, text))
            return
        self.editing = None
        self.refresh()
        self.post_message(self.Commit(row.name, text))


class SamplingPane(Vertical):
    """Title, the rows, and a help line that names the range and any refusal.

    Compact (the settings that differ from the model's) until its table takes the focus; then it
    says so with `Expanded`, and the app gives it the width of the full table.
    """

    class Changed(Message):
        def __init__(self, params: SamplingParams) -> None:
            super().__init__()
            self.params = params

    class Expanded(Message):
        """The pane changed between compact and full (the app gives it its width)."""

    @property
    def expanded(self) -> bool:
        return self.has_class("-expanded")

    def on_descendant_focus(self) -> None:
        self._expand(True)

    def on_descendant_blur(self) -> None:
        self._expand(False)

    def _expand(self, full: bool) -> None:
        if full != self.expanded:
            self.set_class(full, "-expanded")
            self.post_message(self.Expanded())

    def compose(self) -> ComposeResult:
        yield Static(Text("Sampling", style="bold"), classes="pane-title", id="sampling-title")
        with VerticalScroll(id="sampling-rows", can_focus=False):
            yield SamplingTable(id="sampling-table")
        yield Static("", id="param-help")
        yield Static(Text("F5: every setting", style="dim"),
                     id="sampling-hint")

    @property
    def table(self) -> SamplingTable:
        return self.query_one(SamplingTable)

    def show(self, params: SamplingParams, system_prompt: str, *, preset: str | None = None,
             defaults: SamplingParams | None = None) -> None:
        """`preset`: what the title names (a preset, "custom", "model defaults"…); `defaults`: the
        model's own settings (the compact pane lists what differs from them)."""
        self.table.show(params, system_prompt, defaults)
        title = Text("Sampling", style="bold")
        if preset:
            title.append(f" · {clean_line(preset)}", style="italic")
        self.query_one("#sampling-title", Static).update(title)
        self._help(self.table.row)

    def mark_unsupported(self, names: frozenset[str]) -> None:
        """Mark the settings the server rejected, on their rows and in the help line."""
        if names != self.table.unsupported:
            self.table.mark_unsupported(names)
            self._help(self.table.row)

    def _help(self, row: Row, error: str | None = None) -> None:
        help_ = self.query_one("#param-help", Static)
        if error:
            help_.update(Text(error, style="bold red"))
            help_.add_class("-error")
            return
        help_.remove_class("-error")
        if row.name in self.table.unsupported:
            text = Text(f"{row.label}: {UNSUPPORTED}", style="bold")
            text.append(" (it rejected this setting: left out of every request)", style="dim")
        elif row.spec is not None:
            text = Text(f"{row.label} {range_label(row.spec)}: ", style="bold")
            text.append(row.spec.help)
            text.append("  ←/→ step · type + Enter · n neutral · d defaults", style="dim")
        elif row.is_flag:
            text = Text(f"{row.label}: ", style="bold")
            text.append(FLAGS[row.name])
            text.append("  Space/Enter turns it on or off", style="dim")
        else:
            text = Text(TEXT_HELP.get(row.name, row.label))
        help_.update(text)

    def on_sampling_table_cursor_moved(self, event: SamplingTable.CursorMoved) -> None:
        self._help(event.row)

    def on_sampling_table_commit(self, event: SamplingTable.Commit) -> None:
        event.stop()
        table = self.table
        spec = SPECS.get(event.name)
        try:
            if spec is not None:
                value = check_value(spec, event.value)
            else:  # an on/off setting, or the logit bias's text (checked by SamplingParams)
                value = event.value if event.name == "logit_bias" else check_flag(event.name, event.value)
            params = table.params.with_(**{event.name: value})
        except InvalidParameter as exc:
            shown = clean_line(str(exc.value))[:20]
            allowed = range_label(spec) if spec is not None else exc.allowed
            message = f"✗ {event.name} = {shown} refused: allowed {allowed}"
            self._help(table.row, message)
            self.app.bell()
            self.notify(message, severity="warning", timeout=4, markup=False)
            return
        table.show(params, table.system_prompt)
        self._help(table.row)
        self.post_message(self.Changed(params))
