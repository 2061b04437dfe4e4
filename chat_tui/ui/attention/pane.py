"""The attention inspector pane: six views of the reply's attention and sampling, fed Step by Step.

The app calls `add_step` for every Step it receives (cheap: the row goes into the store and the
pane is marked dirty); a timer redraws at most `REDRAW_HZ` times a second, and only what is on
screen is drawn, so the stream never waits for the pane. While the pane is hidden the app asks the
engine for no attention at all (`wants_attention`).

Views (`v` cycles, `1`–`6` jump): heatmap, row, explain, heads overview, turns, candidates.
Keys (ids under `inspector.`): `[` `]` layer, `{` `}` head, `m` single/mean/max head, ↑ ↓ PgUp PgDn
Home End token cursor, ← → pan the keys (heatmap) or scroll (lists), `f` follow the newest token,
`n` colour scale, `s` sort, `x` export (SVG of the view + safetensors of the attention).

torch is never imported here: the explain and replay numbers are computed in thread workers by
`chat_tui.engine.explain`, which are started only when those views are shown.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from rich.console import Console, RenderableType
from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.geometry import Region
from textual.message import Message as TextualMessage
from textual.strip import Strip
from textual.widget import Widget
from textual.widgets import Static

from chat_tui.engine.explain import can_explain
from chat_tui.engine.params import SamplingParams
from chat_tui.engine.types import Step
from chat_tui.ui.attention.render import (
    MASKED,
    SCALE_LABEL,
    SCALES,
    ColorMode,
    Heatmap,
    Scale,
    detect_mode,
    row_levels,
)
from chat_tui.ui.attention.stats import head_stats
from chat_tui.ui.attention.store import DEFAULT_CAP_BYTES, AttentionStore, HeadMode
from chat_tui.ui.attention.views import (
    candidates_view,
    explain_view,
    fit,
    heads_view,
    row_view,
    turns_view,
)
from chat_tui.ui.budget import UIBudget
from chat_tui.ui.text import clean_line, token_label

if TYPE_CHECKING:
    from chat_tui.engine.types import Engine

REDRAW_HZ = 10  # at most this many redraws a second while a reply streams
# ... fewer when the UI thread is busy (see UIBudget), but at least one every REDRAW_MAX_GAP seconds
REDRAW_UI_SHARE = 0.3
REDRAW_MAX_GAP = 0.4
VIEWS = ("heatmap", "row", "explain", "heads", "turns", "candidates")
VIEW_TITLE = {
    "heatmap": "Heatmap",
    "row": "Row",
    "explain": "Explain",
    "heads": "Heads",
    "turns": "Turns",
    "candidates": "Candidates",
}
HEAD_MODES: tuple[HeadMode, ...] = ("single", "mean", "max")


class HeatmapPainter:
    """Levels of the visible window, cached per row: a new token computes only its own row."""

    def __init__(self, store: AttentionStore) -> None:
        self.store = store
        self._key: tuple | None = None
        self._rows: dict[int, np.ndarray] = {}
        self.strips: dict[tuple, Strip] = {}  # finished lines of cells, for the same key
        self.computed = 0  # rows computed since creation (for tests and the benchmark)

    def row_key(self, position: int) -> int:
        """What a drawn row depends on besides the painter's key: the row, and whether it is still kept."""
        return position if self.store.row(position) is not None else -1 - position

    def levels(
        self, rows: range, c0: int, c1: int, layer: int, head: int, mode: HeadMode, scale: Scale
    ) -> np.ndarray:
        key = (self.store.epoch, layer, head if mode == "single" else -1, mode, scale, c0, c1)
        if key != self._key:
            self._key = key
            self._rows = {}
            self.strips = {}
        elif len(self._rows) > 4 * max(len(rows), 64):
            keep = set(rows)
            self._rows = {p: v for p, v in self._rows.items() if p in keep}
            self.strips = {}
        out = np.full((len(rows), c1 - c0), MASKED, dtype=np.int16)
        store = self.store
        for i, p in enumerate(rows):
            if store.row(p) is None:
                continue
            levels = self._rows.get(p)
            if levels is None:
                levels = row_levels(store.head_row(p, layer, head, mode), scale, c0, c1)
                self._rows[p] = levels
                self.computed += 1
            out[i] = levels
        return out


class AttentionCanvas(Widget):
    """The body of the pane: draws the current view at its own size, line by line.

    Each frame is a list of Strips; a heatmap line whose rows and cursor mark did not change is
    the very same Strip as before (cached by the painter), and only changed lines are repainted.
    """

    DEFAULT_CSS = """
    AttentionCanvas {
        height: 1fr;
        width: 1fr;
    }
    """

    def __init__(self, pane: InspectorPane, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.pane = pane
        self._strips: list[Strip] = []
        self._frame_size: tuple[int, int] | None = None
        self.repainted_lines = 0  # lines handed to Textual to repaint (for tests and the benchmark)

    def _build(self) -> tuple[list[Strip], tuple[int, int]]:
        size = self.content_size
        width, height = max(size.width, 1), max(size.height, 1)
        strips = self.pane.frame_strips(width, height, self.rich_style)
        return strips, (width, height)

    def update_frame(self) -> None:
        """Draw the view again; refresh only the lines that changed."""
        if not self.is_mounted or self.content_size.area == 0:
            self.refresh()
            return
        old, old_size = self._strips, self._frame_size
        new, size = self._build()
        self._strips, self._frame_size = new, size
        if old_size != size or len(old) != len(new):
            self.repainted_lines += len(new)
            self.refresh()
            return
        changed = [y for y, (a, b) in enumerate(zip(old, new, strict=True)) if a is not b]
        self.repainted_lines += len(changed)
        if len(changed) == len(new):
            self.refresh()
        elif changed:
            self.refresh(*[Region(0, y, size[0], 1) for y in changed])

    def on_resize(self) -> None:
        self._frame_size = None
        self.update_frame()

    def render_line(self, y: int) -> Strip:
        size = self.content_size
        if self._frame_size != (max(size.width, 1), max(size.height, 1)):
            self._strips, self._frame_size = self._build()
        if 0 <= y < len(self._strips):
            return self._strips[y]
        return Strip.blank(size.width, self.rich_style)


class InspectorPane(Vertical, can_focus=True):
    """The attention inspector (mount it with id `inspector`)."""

    DEFAULT_CSS = """
    InspectorPane {
        height: 1fr;
    }
    InspectorPane:focus {
        background-tint: $foreground 4%;
    }
    InspectorPane > #attn-header {
        height: 2;
    }
    InspectorPane > #attn-notice {
        height: auto;
        max-height: 3;
        color: $text-warning;
    }
    InspectorPane > #attn-notice.-empty {
        display: none;
    }
    """

    BINDINGS: ClassVar = [
        Binding("v", "cycle_view(1)", "View", id="inspector.next_view"),
        Binding("V", "cycle_view(-1)", "Previous view", id="inspector.previous_view", show=False),
        Binding("1", "show_view('heatmap')", "Heatmap", id="inspector.view_heatmap", show=False),
        Binding("2", "show_view('row')", "Row view", id="inspector.view_row", show=False),
        Binding("3", "show_view('explain')", "Explain view", id="inspector.view_explain", show=False),
        Binding("4", "show_view('heads')", "Heads overview", id="inspector.view_heads", show=False),
        Binding("5", "show_view('turns')", "Turns view", id="inspector.view_turns", show=False),
        Binding("6", "show_view('candidates')", "Candidates view", id="inspector.view_candidates", show=False),
        Binding("]", "layer(1)", "Next layer", id="inspector.next_layer"),
        Binding("[", "layer(-1)", "Previous layer", id="inspector.previous_layer", show=False),
        Binding("}", "head(1)", "Next head", id="inspector.next_head", show=False),
        Binding("{", "head(-1)", "Previous head", id="inspector.previous_head", show=False),
        Binding("m", "head_mode", "Head/mean/max", id="inspector.head_mode", show=False),
        Binding("up", "cursor(-1)", "Previous token", id="inspector.cursor_up", show=False),
        Binding("down", "cursor(1)", "Next token", id="inspector.cursor_down", show=False),
        Binding("pageup", "cursor_page(-1)", "Tokens page up", id="inspector.cursor_page_up", show=False),
        Binding("pagedown", "cursor_page(1)", "Tokens page down", id="inspector.cursor_page_down", show=False),
        Binding("home", "cursor_home", "First token", id="inspector.cursor_first", show=False),
        Binding("end", "cursor_end", "Newest token (follow)", id="inspector.cursor_last", show=False),
        Binding("left", "pan(-1)", "Pan/scroll back", id="inspector.pan_left", show=False),
        Binding("right", "pan(1)", "Pan/scroll on", id="inspector.pan_right", show=False),
        Binding("f", "follow", "Follow", id="inspector.follow", show=False),
        Binding("n", "scale", "Colour scale", id="inspector.scale", show=False),
        Binding("s", "sort", "Sort rows", id="inspector.sort", show=False),
        Binding("x", "export", "Export", id="inspector.export"),
    ]

    class Exported(TextualMessage):
        """The export finished: the files written (or the error)."""

        def __init__(self, paths: list[Path], error: str | None = None) -> None:
            super().__init__()
            self.paths = paths
            self.error = error

    def __init__(
        self,
        *,
        id: str = "inspector",
        cap_bytes: int = DEFAULT_CAP_BYTES,
        engine: Engine | None = None,
        color_mode: ColorMode | None = None,
        export_dir: Path | None = None,
        classes: str | None = None,
    ) -> None:
        super().__init__(id=id, classes=classes)
        self.store = AttentionStore(cap_bytes)
        self.painter = HeatmapPainter(self.store)
        self.engine: Engine | None = engine
        self.color_mode: ColorMode | None = color_mode  # None: from the terminal
        self.export_dir = export_dir
        self.params: SamplingParams | None = None  # the current settings (candidates "now")
        self.last_step: Step | None = None
        self.view = "heatmap"
        self.attn_layer = 0
        self.head = 0
        self.head_mode: HeadMode = "single"
        self.scale: Scale = "rowmax"
        self.cursor: int | None = None
        self.follow = True
        self.sort_rows = False
        self.sort_explain = True
        self.offsets: dict[str, int] = dict.fromkeys(VIEWS, 0)
        self.redraws = 0  # frames drawn (for tests and benchmarks)
        self._dirty = False
        self._r0 = 0
        self._c0 = 0
        self._pan_manual = False
        self._page_rows = 10
        self._row_keys: list[int] = []
        self._shown_params: SamplingParams | None = None
        self._shown_header: Text | None = None
        self._shown_notice = ""
        self._explain: dict[tuple, Any] = {}
        self._explain_busy = False
        self._replay: dict[tuple, Any] = {}
        self._replay_busy = False

    # ------------------------------------------------------------------ composition

    def compose(self) -> ComposeResult:
        yield Static("", id="attn-header")
        yield AttentionCanvas(self, id="attn-canvas")
        yield Static("", id="attn-notice", classes="-empty")

    def on_mount(self) -> None:
        self._redraw_budget = UIBudget(REDRAW_UI_SHARE, REDRAW_MAX_GAP)
        self._timer = self.set_interval(1.0 / REDRAW_HZ, self._tick)
        self._update_chrome()

    def on_show(self) -> None:
        self.redraw()

    # ------------------------------------------------------------------ feeding (the app calls these)

    def set_engine(self, engine: Engine | None) -> None:
        """The model the steps come from (for the explain view and the unavailability note)."""
        self.engine = engine
        if engine is not None:
            self.attn_layer = min(self.attn_layer, max(0, engine.n_layer - 1))
            self.head = min(self.head, max(0, engine.n_head - 1))
        self._explain.clear()
        self._replay.clear()
        self.redraw()

    @property
    def unavailable(self) -> str | None:
        engine = self.engine
        return engine.attention_unavailable if engine is not None else None

    @property
    def wants_attention(self) -> bool:
        """Ask the engine for attention (`inspect=True`) only while the pane is on screen."""
        return bool(self.display) and self.is_attached and self.unavailable is None

    def add_step(self, step: Step) -> None:
        """Take in one streamed Step; the pane redraws on its next tick."""
        if step.prompt is not None:
            self._explain.clear()
            self._replay.clear()
            self._r0 = self._c0 = 0
            self._pan_manual = False
            if not self.follow:
                self.cursor = None
                self.follow = True
        self.store.add_step(step)
        self.last_step = step
        self._dirty = True

    def show_step(self, step: Step | None) -> None:
        """Compatibility with the placeholder pane: a step not yet seen is taken in."""
        if step is not None and step is not self.last_step:
            self.add_step(step)

    def params_changed(self, params: SamplingParams) -> None:
        """The user changed a sampling setting: the candidates view replays the chain with it."""
        self.params = params
        if self.view == "candidates":
            self.redraw()

    def clear(self) -> None:
        """Forget the reply (another conversation was opened)."""
        self.store.reset()
        self.last_step = None
        self.cursor = None
        self.follow = True
        self._explain.clear()
        self._replay.clear()
        self.redraw()

    # ------------------------------------------------------------------ drawing

    def current_params(self) -> SamplingParams | None:
        """The settings in force now: those given to `params_changed`, else the app's `params`."""
        if self.params is not None:
            return self.params
        params = getattr(self.app, "params", None)
        return params if isinstance(params, SamplingParams) else None

    def _tick(self) -> None:
        if self.view == "candidates" and self.current_params() != self._shown_params:
            self._dirty = True  # a setting changed in the sampling pane: replay at once
        if self._dirty and self._redraw_budget.allow():
            self.redraw()

    def redraw(self) -> None:
        self._dirty = False
        if not self.is_mounted:
            return
        self._update_chrome()
        try:
            canvas = self.query_one(AttentionCanvas)
        except Exception:  # not composed yet
            return
        canvas.update_frame()

    @property
    def mode(self) -> ColorMode:
        if self.color_mode is not None:
            return self.color_mode
        try:
            app = self.app
        except Exception:
            return "truecolor"
        return detect_mode(app.console, getattr(app, "no_color", False), getattr(app, "is_headless", False))

    @property
    def position(self) -> int | None:
        """The selected token's position (the newest when following); None with no tokens."""
        n = self.store.length
        if n == 0:
            return None
        if self.follow or self.cursor is None:
            return n - 1
        return min(max(self.cursor, 0), n - 1)

    @property
    def n_layers(self) -> int:
        return self.store.n_layers or (self.engine.n_layer if self.engine is not None else 1)

    @property
    def n_heads(self) -> int:
        return self.store.n_heads or (self.engine.n_head if self.engine is not None else 1)

    def selection_label(self) -> str:
        head = {"single": f"H{self.head}", "mean": "mean H", "max": "max H"}[self.head_mode]
        return f"L{self.attn_layer}/{self.n_layers - 1} {head}" + (f"/{self.n_heads - 1}" if self.head_mode == "single" else "")

    def header_text(self, width: int) -> Text:
        title = Text(end="")
        title.append(VIEW_TITLE[self.view], style="bold")
        title.append(f" {VIEWS.index(self.view) + 1}/6", style="dim")
        if self.view in ("heatmap", "row", "explain", "heads", "turns"):
            title.append("  " + self.selection_label(), style="bold cyan")
        title.truncate(width)
        line2 = Text(end="")
        pos = self.position
        if pos is None:
            line2.append("no tokens yet", style="dim")
        else:
            kind = "reply" if pos >= self.store.prompt_length else "prompt"
            line2.append(f"▶{pos} ", style="bold bright_cyan")
            line2.append(fit(token_label(self.store.tokens[pos]), 12).rstrip(), style="bold")
            line2.append(f" {kind}", style="dim")
            if self.view == "heatmap":
                line2.append(f" · {SCALE_LABEL[self.scale]}", style="dim")
            if self.follow:
                line2.append(" · follow", style="green")
        line2.truncate(width)
        out = Text(end="")
        out.append_text(title)
        out.append("\n")
        out.append_text(line2)
        return out

    def notice_text(self) -> str:
        store = self.store
        notes = []
        engine = self.engine
        if engine is not None and engine.attention_unavailable:
            if store.has_attention:  # lost after what is shown (else the view itself says why it is empty)
                notes.append(f"attention no longer captured: {clean_line(engine.attention_unavailable)}")
        elif engine is not None and engine.attention_note:  # some layers have none (state-space, linear)
            notes.append(clean_line(engine.attention_note))
        if store.dropped_rows:
            notes.append(
                f"{store.dropped_rows} oldest rows dropped to stay under "
                f"{store.cap_bytes / 2**20:.0f} MB of attention"
            )
        return " · ".join(notes)

    def _update_chrome(self) -> None:
        try:
            header = self.query_one("#attn-header", Static)
            notice = self.query_one("#attn-notice", Static)
        except Exception:
            return
        width = max(self.content_size.width, 10)
        text = self.header_text(width)
        if text != self._shown_header:  # the header has a fixed height: no layout pass
            self._shown_header = text
            header.update(text, layout=False)
        note = self.notice_text()
        if note != self._shown_notice:  # rare: this one may change the layout
            self._shown_notice = note
            notice.update(Text(note, style="yellow") if note else "")
            notice.set_class(not note, "-empty")

    def why_no_attention(self) -> str | None:
        """Why the attention views are empty (None when there is attention to show)."""
        if self.store.has_attention:
            return None
        if self.unavailable:
            return f"This backend cannot give attention: {self.unavailable}"
        if self.store.length == 0:
            return "No reply yet. Attention shows here, row by row, while the model answers."
        return (
            "Attention was not captured for this reply: the inspector was hidden when it started. "
            "It is captured from the next reply on while the pane is open."
        )

    def render_view(self, width: int, height: int) -> RenderableType:
        """The current view, drawn to fit width × height cells."""
        self.redraws += 1
        view = self.view
        if view != "candidates":
            why = self.why_no_attention()
            if why is not None:
                return Text(why, style="dim")
        pos = self.position
        if pos is None:
            return Text("No reply yet.", style="dim")
        if view == "heatmap":
            return self.render_heatmap(width, height)
        if view == "candidates":
            return self.render_candidates(width, height)
        if self.store.row(pos) is None:
            reason = "dropped for the memory cap" if pos < self.store.first_kept else "not captured"
            return Text(f"Token {pos}: its attention row was {reason}.", style="dim")
        mode = self.mode
        offset = self.offsets[view]
        if view == "row":
            weights = self.store.head_row(pos, self.attn_layer, self.head, self.head_mode)
            assert weights is not None
            return row_view(weights, self.store.tokens, pos, width=width, height=height, offset=offset,
                            sort=self.sort_rows, mode=mode)
        if view == "explain":
            return self.render_explain(pos, width, height)
        if view == "heads":
            row = self.store.row(pos)
            assert row is not None
            return heads_view(head_stats(row), self.attn_layer, self.head, width=width, height=height,
                              offset=offset, mode=mode)
        if view == "turns":
            weights = self.store.head_row(pos, self.attn_layer, self.head, self.head_mode)
            assert weights is not None
            owner, labels = self.store.groups()
            return turns_view(weights, owner, labels, width=width, height=height, offset=offset, mode=mode)
        raise ValueError(view)

    def frame_strips(self, width: int, height: int, base: Style) -> list[Strip]:
        """The current view as `height` Strips of `width` cells over the `base` style."""
        renderable = self.render_view(width, height)
        if isinstance(renderable, Heatmap):
            strips = self._heatmap_strips(renderable, width, base)
        else:
            console = self.app.console
            options = console.options.update(width=width, height=height, no_wrap=False, highlight=False,
                                             markup=False)
            lines = console.render_lines(renderable, options, style=base, pad=True)
            strips = [Strip(line, width) for line in lines[:height]]
        blank = Strip.blank(width, base)
        return strips + [blank] * (height - len(strips))

    def _heatmap_strips(self, heatmap: Heatmap, width: int, base: Style) -> list[Strip]:
        painter = self.painter
        cache = painter.strips
        keys = self._row_keys
        step = heatmap.rows_per_line
        cols = heatmap.levels.shape[1]
        strips = []
        for y in range(heatmap.line_count):
            top = keys[y * step]
            bottom = keys[y * step + 1] if step == 2 and y * step + 1 < len(keys) else None
            key = (top, bottom, heatmap.gutter_mark(y), cols, heatmap.mode, width, base)
            strip = cache.get(key)
            if strip is None:
                strip = Strip(heatmap.line(y, base)).extend_cell_length(width, base).crop(0, width)
                cache[key] = strip
            strips.append(strip)
        if heatmap.axis:
            key = ("axis", heatmap.cursor_col, heatmap.axis_labels, heatmap.axis_end, cols, width, base)
            strip = cache.get(key)
            if strip is None:
                strip = Strip(heatmap.axis_line(base)).extend_cell_length(width, base).crop(0, width)
                cache[key] = strip
            strips.append(strip)
        return strips

    def heatmap_window(self, width: int, height: int) -> tuple[range, int, int]:
        """(query rows, first key, end key) of the heatmap at this size; follows the cursor."""
        n = self.store.length
        pos = self.position or 0
        mode = self.mode
        step = 1 if mode == "mono" else 2
        map_w = max(1, width - 1)
        rows_visible = max(1, height - 1) * step
        self._page_rows = max(1, rows_visible - step)
        # keys: the cursor's column stays in view; on leaving it the window jumps so that the cursor
        # sits near the right edge with an eighth of the width free for the next tokens (until then
        # a new token changes only its own line)
        free = max(1, map_w // 8)
        if n <= map_w:
            c0 = 0
        else:
            c0 = self._c0
            if not self._pan_manual and (pos < c0 or pos >= c0 + map_w):
                c0 = pos - (map_w - 1 - free)
            c0 = max(0, min(c0, n - 1 if self._pan_manual else n - 1 - free))
        self._c0 = c0
        # query rows: likewise, a quarter of the map free below the newest row when following
        r0 = self._r0
        if n <= rows_visible:
            r0 = 0
        elif self.follow and pos >= r0 + rows_visible:
            r0 = pos - (3 * rows_visible) // 4
        elif pos < r0:
            r0 = pos
        elif pos >= r0 + rows_visible:
            r0 = pos - rows_visible + 1
        # rows above the first key shown would be blank (row i sees keys 0..i): start at that key
        if not self._pan_manual:
            r0 = max(r0, min(c0, pos))
        r0 = max(0, min(r0, pos))
        if step == 2 and r0 % 2:  # even rows on top: the pairs in each cell stay the same as it scrolls
            r0 = r0 + 1 if pos >= r0 + 1 else r0 - 1
        self._r0 = max(0, r0)
        return range(self._r0, min(n, self._r0 + rows_visible)), c0, min(n, c0 + map_w)

    def render_heatmap(self, width: int, height: int) -> Heatmap:
        rows, c0, c1 = self.heatmap_window(width, height)
        pos = self.position or 0
        # cached per row for the whole width, so a longer context does not invalidate the rows drawn
        span = max(1, width - 1)
        # always the full width (keys past the newest are blank), so a new token changes no other line
        levels = self.painter.levels(rows, c0, c0 + span, self.attn_layer, self.head, self.head_mode, self.scale)
        self._row_keys = [self.painter.row_key(p) for p in rows]
        return Heatmap(
            levels,
            mode=self.mode,
            cursor_row=pos - rows.start if pos in rows else None,
            cursor_col=pos - c0 if c0 <= pos < c1 else None,
            gutter=True,
            axis=height > 1,
            axis_labels=(f"{c0}", f"{c1 - 1}"),
            axis_end=c1 - 1 - c0,
        )

    # ------------------------------------------------------------------ explain (worker)

    def render_explain(self, pos: int, width: int, height: int) -> Text:
        stored = self.store.row(pos)
        head = self.head
        note = None
        if self.head_mode != "single":
            note = f"explaining head {head}: a {self.head_mode} of heads is not one softmax (m: single)"
        stored_head = stored[self.attn_layer, head].astype(np.float64) if stored is not None else None
        key = (self.store.epoch, pos, self.attn_layer, head)
        result = self._explain.get(key)
        unavailable = None
        explanation = None
        engine = self.engine
        if engine is None:
            unavailable = "no model is loaded, so q·k and the value sizes cannot be computed."
        elif not can_explain(engine):
            unavailable = (
                f"the {engine.backend} backend gives attention weights only; q·k, the scaled scores "
                "and the value sizes need the model's queries and keys (the mini-GPT has them)."
            )
        elif isinstance(result, Exception):
            unavailable = str(result)
        elif result is not None:
            explanation = result
        else:
            self._request_explain(key, list(self.store.ids[: pos + 1]), pos, self.attn_layer, head)
        return explain_view(
            explanation, stored_head, self.store.tokens, pos, width=width, height=height,
            offset=self.offsets["explain"], sort=self.sort_explain, unavailable=unavailable,
            pending=explanation is None and unavailable is None, head_note=note, mode=self.mode,
        )

    def _request_explain(self, key: tuple, ids: list[int], pos: int, layer: int, head: int) -> None:
        if self._explain_busy:
            return
        self._explain_busy = True
        engine = self.engine

        def work() -> None:
            try:
                from chat_tui.engine.explain import explain_attention

                result: Any = explain_attention(engine, ids, pos, layer, head)
            except Exception as exc:  # shown in the view
                result = exc
            self._from_thread(self._explained, key, result)

        self.run_worker(work, thread=True, group="attn-explain", exit_on_error=False)

    def _explained(self, key: tuple, result: Any) -> None:
        self._explain_busy = False
        if len(self._explain) > 256:
            self._explain.clear()
        self._explain[key] = result
        self.redraw()

    def _from_thread(self, fn, *args) -> None:
        try:
            self.app.call_from_thread(fn, *args)
        except Exception:  # the app is closing
            pass

    # ------------------------------------------------------------------ candidates (worker)

    def render_candidates(self, width: int, height: int) -> Text:
        pos = self.position
        assert pos is not None
        step = self.store.step_at(pos)
        if step is None:
            return Text(
                f"Token {pos} is part of the prompt: it was not sampled. "
                "Move to a token of the reply (↓ or End).",
                style="dim",
            )
        current = self.current_params()
        self._shown_params = current
        sampled_with = step.params
        now = current if current is not None and current != sampled_with else None
        if now is not None and sampled_with is not None and (
                now.with_(top_candidates=sampled_with.top_candidates) == sampled_with):
            now = None  # only the number of rows listed changed: the chain is the one sampled with
        listing = current if current is not None else step.params
        key = (self.store.epoch, pos, step.params, now)
        result = self._replay.get(key)
        unavailable = None
        as_sampled = replay_now = None
        texts = None
        if step.top_ids is None:
            unavailable = "this backend stores no logits: the chain cannot be replayed."
        elif isinstance(result, Exception):
            unavailable = f"replay failed: {result}"
        elif result is not None:
            as_sampled, replay_now, texts = result
        else:
            self._request_replay(key, step, self.store.context_ids(pos), now)
        return candidates_view(step, as_sampled, replay_now, width=width, height=height,
                               offset=self.offsets["candidates"], mode=self.mode,
                               unavailable=unavailable, texts=texts,
                               rows=listing.top_candidates if listing is not None else None)

    def _request_replay(self, key: tuple, step: Step, context: list[int], now: SamplingParams | None) -> None:
        if self._replay_busy:
            return
        self._replay_busy = True
        engine = self.engine

        def work() -> None:
            try:
                from chat_tui.engine.explain import replay_for

                as_sampled = replay_for(engine, step, context, step.params)
                replay_now = replay_for(engine, step, context, now) if now is not None else None
                texts = None
                if engine is not None and step.top_ids is not None:
                    texts = {int(i): engine.token_text(int(i)) for i in step.top_ids.tolist()}
                result: Any = (as_sampled, replay_now, texts)
            except Exception as exc:  # shown in the view
                result = exc
            self._from_thread(self._replayed, key, result)

        self.run_worker(work, thread=True, group="attn-replay", exit_on_error=False)

    def _replayed(self, key: tuple, result: Any) -> None:
        self._replay_busy = False
        if len(self._replay) > 256:
            self._replay.clear()
        self._replay[key] = result
        self.redraw()

    # ------------------------------------------------------------------ actions

    def _moved(self) -> None:
        self._pan_manual = False
        self.redraw()

    def action_cycle_view(self, delta: int) -> None:
        self.view = VIEWS[(VIEWS.index(self.view) + delta) % len(VIEWS)]
        self.redraw()

    def action_show_view(self, name: str) -> None:
        if name in VIEWS:
            self.view = name
            self.redraw()

    def action_layer(self, delta: int) -> None:
        self.attn_layer = (self.attn_layer + delta) % max(1, self.n_layers)
        self.redraw()

    def action_head(self, delta: int) -> None:
        if self.head_mode != "single":
            self.head_mode = "single"
        else:
            self.head = (self.head + delta) % max(1, self.n_heads)
        self.redraw()

    def action_head_mode(self) -> None:
        self.head_mode = HEAD_MODES[(HEAD_MODES.index(self.head_mode) + 1) % len(HEAD_MODES)]
        self.redraw()

    def action_cursor(self, delta: int) -> None:
        pos = self.position
        if pos is None:
            return
        self.follow = False
        self.cursor = min(max(pos + delta, 0), self.store.length - 1)
        self._moved()

    def action_cursor_page(self, delta: int) -> None:
        self.action_cursor(delta * self._page_rows)

    def action_cursor_home(self) -> None:
        if self.store.length:
            self.follow = False
            self.cursor = 0
            self._moved()

    def action_cursor_end(self) -> None:
        self.follow = True
        self.cursor = None
        self._moved()

    def action_follow(self) -> None:
        self.follow = not self.follow
        if not self.follow:
            self.cursor = self.position
        else:
            self.cursor = None
        self._moved()

    def action_pan(self, delta: int) -> None:
        canvas = self.query_one(AttentionCanvas)
        if self.view == "heatmap":
            map_w = max(1, canvas.content_size.width - 1)
            self._c0 = max(0, self._c0 + delta * max(1, map_w // 2))
            self._pan_manual = True
        else:
            page = max(1, canvas.content_size.height - 3)
            self.offsets[self.view] = max(0, self.offsets[self.view] + delta * page)
        self.redraw()

    def action_scale(self) -> None:
        self.scale = SCALES[(SCALES.index(self.scale) + 1) % len(SCALES)]
        self.redraw()

    def action_sort(self) -> None:
        if self.view == "explain":
            self.sort_explain = not self.sort_explain
        else:
            self.sort_rows = not self.sort_rows
        self.offsets[self.view] = 0
        self.redraw()

    # ------------------------------------------------------------------ export

    def _export_folder(self) -> Path:
        if self.export_dir is not None:
            return self.export_dir
        paths = getattr(self.app, "paths", None)
        if paths is not None and hasattr(paths, "exports"):
            return Path(paths.exports)
        from chat_tui.config import get_paths

        return get_paths().exports

    def view_svg(self, width: int | None = None, height: int | None = None) -> str:
        """The current view (with its header) as an SVG document."""
        canvas = self.query_one(AttentionCanvas)
        width = width or max(canvas.content_size.width, 20)
        height = height or max(canvas.content_size.height, 5)
        console = Console(record=True, width=width, file=io.StringIO(), force_terminal=True,
                          color_system="truecolor", legacy_windows=False)
        console.print(self.header_text(width))
        console.print(self.render_view(width, height))
        note = self.notice_text()
        if note:
            console.print(Text(note, style=Style(color="yellow")))
        return console.export_svg(title=f"chat-tui attention · {VIEW_TITLE[self.view]}")

    def export_tensors(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """The reply's attention as safetensors-ready arrays and metadata (token texts as JSON)."""
        store = self.store
        positions, attention = store.dense()
        tensors = {
            "attention": attention,  # float16 (layers, heads, rows, keys)
            "positions": positions,  # the query position of each row
            "token_ids": np.asarray(store.ids, dtype=np.int64),
        }
        engine = self.engine
        metadata = {
            "format": "chat-tui attention 1",
            "tokens": json.dumps(store.tokens, ensure_ascii=False),
            "prompt_length": str(store.prompt_length),
            "spans": json.dumps([[s.message_index, s.role, s.start, s.end] for s in store.spans]),
            "layers": str(store.n_layers),
            "heads": str(store.n_heads),
            "dropped_rows": str(store.dropped_rows),
            "seed": "" if store.seed is None else str(store.seed),
            "model": getattr(engine, "model_name", "") or "",
            "backend": getattr(engine, "backend", "") or "",
            "checkpoint_hash": getattr(engine, "checkpoint_hash", "") or "",
        }
        return tensors, metadata

    def action_export(self) -> None:
        if not self.store.has_attention and self.store.length == 0:
            self.notify("Nothing to export yet", severity="warning", markup=False)
            return
        svg = self.view_svg()
        tensors, metadata = self.export_tensors() if self.store.has_attention else (None, None)
        folder = self._export_folder()
        stem = time.strftime("attention-%Y%m%d-%H%M%S")

        def work() -> None:
            written: list[Path] = []
            try:
                folder.mkdir(parents=True, exist_ok=True)
                base = folder / stem
                n = 1
                while base.with_suffix(".svg").exists() or base.with_suffix(".safetensors").exists():
                    n += 1
                    base = folder / f"{stem}-{n}"
                svg_path = base.with_suffix(".svg")
                svg_path.write_text(svg, encoding="utf-8")
                written.append(svg_path)
                if tensors is not None:
                    from safetensors.numpy import save_file

                    path = base.with_suffix(".safetensors")
                    save_file(tensors, str(path), metadata=metadata)
                    written.append(path)
                self._from_thread(self._exported, written, None)
            except Exception as exc:
                self._from_thread(self._exported, written, f"{type(exc).__name__}: {exc}")

        self.run_worker(work, thread=True, group="attn-export", exit_on_error=False)

    def _exported(self, paths: list[Path], error: str | None) -> None:
        if error is not None:
            self.notify(f"Export failed: {error}", severity="error", markup=False)
        else:
            self.notify("Exported " + ", ".join(str(p) for p in paths), timeout=6, markup=False)
        self.post_message(self.Exported(paths, error))
