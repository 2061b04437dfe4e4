"""The attention inspector pane: six views of the reply's attention and sampling, fed Step by Step.

The app calls `add_step` for every Step it receives (cheap: the row goes into the store and the
pane is marked dirty); a timer redraws at most `REDRAW_HZ` times a second, and only what is on
screen is drawn, so the stream never waits for the pane. While the pane is hidden the app asks the
engine for no attention at all (`wants_attention`).

Views (`v` cycles, `1`–`6` jump): heatmap, row, explain, heads overview, turns, candidates; then the
views inside the next token (issue #14; `7` `8` `9` `0` `t` `b` jump): lens, attribution, rollout,
knock-out (`k` switches the selected head off or on, `K` all on, `c` continues the reply with them
off), tokens (of the text the app hands over with `set_token_text`) and block. Those are asked of the
engine (`chat_tui.engine.inside`) in a worker, only while shown and only for the token under the cursor.
Keys (ids under `inspector.`): `[` `]` layer, `{` `}` head, `m` single/mean/max head, ↑ ↓ PgUp PgDn
Home End token cursor, ← → pan the keys (heatmap) or scroll (lists), `f` follow the newest token,
`n` colour scale, `s` sort, `x` export (SVG of the view + safetensors of the attention).

What is shown is an `InspectorState` (state.py); the canvas and its heatmap cache are in canvas.py;
the explain and replay numbers are computed in Textual thread workers (jobs.py), started only when
those views are shown, and torch is never imported here; the export is export.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from rich.console import RenderableType
from rich.style import Style
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.strip import Strip
from textual.widgets import Static
from textual.worker import get_current_worker

from chat_tui.engine.explain import Explanation
from chat_tui.engine.inside import INSIDE_VIEWS, Head, Inside, head_name, inside
from chat_tui.engine.params import SamplingParams
from chat_tui.engine.types import Explainer, Step, explainer
from chat_tui.errors import first_line
from chat_tui.ui.attention import export, inside_views, jobs
from chat_tui.ui.attention.canvas import AttentionCanvas, HeatmapPainter
from chat_tui.ui.attention.render import ColorMode, Heatmap, detect_mode, legend
from chat_tui.ui.attention.state import VIEW_TITLE, InspectorState
from chat_tui.ui.attention.stats import head_stats
from chat_tui.ui.attention.store import DEFAULT_CAP_BYTES, AttentionStore
from chat_tui.ui.attention.views import (
    candidates_view,
    explain_view,
    fit,
    heads_view,
    row_view,
    turns_view,
)
from chat_tui.ui.branches import Fork, fork_choices, fork_label
from chat_tui.ui.budget import UIBudget
from chat_tui.ui.messages import KnockOutContinue
from chat_tui.ui.screens import PickScreen
from chat_tui.ui.text import clean_line, token_label

if TYPE_CHECKING:
    from chat_tui.engine.types import Engine

REDRAW_HZ = 10  # at most this many redraws a second while a reply streams
# ... fewer when the UI thread is busy (see UIBudget), but at least one every REDRAW_MAX_GAP seconds
REDRAW_UI_SHARE = 0.3
REDRAW_MAX_GAP = 0.4
RESULTS_KEPT = 256  # explanations and replays remembered (per kind) before the cache starts over
MAX_CELL_WIDTH = 4  # columns a key may take when the pane has room to spare
HEATMAP_LABEL_WIDTH = 7  # the query tokens' column (6 cells and a space)


def heatmap_margins(width: int, height: int) -> tuple[int, int]:
    """(columns of the query labels, lines under the map for the top keys and the legend) at this size."""
    return (HEATMAP_LABEL_WIDTH if width >= 24 else 0), (3 if height >= 12 else 0)

class InspectorPane(Vertical, can_focus=True):
    """The attention inspector (mount it with id `inspector`).

    The app tells it what it needs: `set_engine`, `add_step` for each Step, `params_changed` when
    the sampling settings change, `clear` for another conversation, and `export_dir`.
    """

    DEFAULT_CSS = """
    InspectorPane {
        height: 1fr;
    }
    InspectorPane:focus {
        background-tint: $foreground 4%;
    }
    InspectorPane > #attn-header {
        height: 4;
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
        Binding("7", "show_view('lens')", "Lens view", id="inspector.view_lens", show=False),
        Binding("8", "show_view('attribution')", "Attribution view", id="inspector.view_attribution", show=False),
        Binding("9", "show_view('rollout')", "Rollout view", id="inspector.view_rollout", show=False),
        Binding("0", "show_view('knockout')", "Knock-out view", id="inspector.view_knockout", show=False),
        Binding("t", "show_view('tokens')", "Tokens view", id="inspector.view_tokens", show=False),
        Binding("b", "show_view('block')", "Block view", id="inspector.view_block", show=False),
        Binding("k", "knock", "Head off/on (knock-out)", id="inspector.knock_head", show=False),
        Binding("K", "knock_none", "All heads on (knock-out)", id="inspector.knock_none", show=False),
        Binding("c", "knock_continue", "Continue with these heads off", id="inspector.knock_continue",
                show=False),
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
        Binding("F", "fork", "Fork the reply here", id="inspector.fork"),
        Binding("question_mark", "view_help", "Explain this view", id="inspector.view_help"),
    ]

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
        self.state = InspectorState(self.store)
        self.painter = HeatmapPainter(self.store)
        self.engine: Engine | None = engine
        if engine is not None:
            self.state.set_model(engine.n_layer, engine.n_head)
        self.color_mode: ColorMode | None = color_mode  # None: from the terminal
        self.export_dir = export_dir  # None: the configured exports folder
        self.params: SamplingParams | None = None  # the settings in force (candidates "now"), from the app
        self.last_step: Step | None = None
        self.redraws = 0  # frames drawn: test_pane checks the throttle with it
        self._dirty = False
        self._row_keys: list[int] = []
        self._footer_strips: dict[tuple, list[Strip]] = {}  # the heatmap's lines under the map, by their text
        self._shown_header: Text | None = None
        self._shown_notice = ""
        # results by key; the key last asked for, so that a pending one is not asked again; the lock
        # runs one computation at a time (a request superseded while it waited is skipped)
        self._explain: dict[tuple, Explanation | Exception] = {}
        self._explain_asked: tuple | None = None
        self._explain_lock = threading.Lock()
        self._replay: dict[tuple, jobs.Replay | Exception] = {}
        self._replay_asked: tuple | None = None
        self._replay_lock = threading.Lock()
        self._inside: dict[tuple, object] = {}
        self._inside_asked: tuple | None = None
        self._inside_lock = threading.Lock()
        self._inside_views: dict[str, str | None] | None = None  # the engine's answer, asked once
        self.token_source: tuple[str, str] = ("", "")  # (what it is, its text) for the tokens view

    # the selection, read on the pane (the state holds it)
    view = property(lambda self: self.state.view)
    attn_layer = property(lambda self: self.state.attn_layer)
    head = property(lambda self: self.state.head)
    head_mode = property(lambda self: self.state.head_mode)
    scale = property(lambda self: self.state.scale)
    follow = property(lambda self: self.state.follow)
    sort_rows = property(lambda self: self.state.sort_rows)
    position = property(lambda self: self.state.position, doc="The selected token's position (None: no tokens).")

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
        self._inside_views = None
        if engine is not None:
            self.state.set_model(engine.n_layer, engine.n_head)
        else:
            self.state.model_layers = self.state.model_heads = 1  # what is shown keeps its layer and head
        self._forget_results()
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
            self._forget_results()
            self.state.new_reply()
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
        if self.state.view == "candidates":
            self.redraw()

    def clear(self, why: str | None = None) -> None:
        """Forget the reply (another conversation or branch was opened); `why`: what the empty views say."""
        self.store.reset()
        self.last_step = None
        self.state.forget(why)
        self._forget_results()
        self.redraw()

    def _forget_results(self) -> None:
        self._explain.clear()
        self._explain_asked = None
        self._replay.clear()
        self._replay_asked = None
        self._inside.clear()
        self._inside_asked = None

    # ------------------------------------------------------------------ drawing

    def _tick(self) -> None:
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
        return detect_mode(app.console, app.no_color, app.is_headless)

    def heatmap_window(self, width: int, height: int) -> tuple[range, int, int]:
        """(query rows, first key, end key) of the heatmap at this size; follows the cursor."""
        label_width, footer = heatmap_margins(width, height)
        return self.state.heatmap_window(width - label_width, height - footer, 1 if label_width else 2)

    def header_text(self, width: int) -> Text:
        return self.state.header_text(width)

    def notice_text(self) -> str:
        engine = self.engine
        if engine is None:
            return self.state.notice_text(None, None)
        return self.state.notice_text(engine.attention_unavailable, engine.attention_note)

    def on_resize(self) -> None:
        """Maximised, restored or resized: the header's subtitle wraps to the new width."""
        self.call_after_refresh(self._update_chrome)

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

    def render_view(self, width: int, height: int) -> RenderableType:
        """The current view, drawn to fit width × height cells."""
        self.redraws += 1
        state, store = self.state, self.store
        view = state.view
        if view in INSIDE_VIEWS:
            return self.render_inside(view, width, height)
        if view != "candidates":
            why = state.why_no_attention(self.unavailable)
            if why is not None:
                return Text(why, style="dim")
        pos = state.position
        if pos is None:
            return Text("No reply yet.", style="dim")
        if view == "heatmap":
            return self.render_heatmap(width, height)
        if view == "candidates":
            return self.render_candidates(pos, width, height)
        if store.row(pos) is None:
            reason = "dropped for the memory cap" if pos < store.first_kept else "not captured"
            return Text(f"Token {pos}: its attention row was {reason}.", style="dim")
        mode = self.mode
        offset = state.offsets[view]
        if view == "row":
            weights = store.head_row(pos, state.attn_layer, state.head, state.head_mode)
            assert weights is not None
            return row_view(weights, store.tokens, pos, width=width, height=height, offset=offset,
                            sort=state.sort_rows, mode=mode)
        if view == "explain":
            return self.render_explain(pos, width, height)
        if view == "heads":
            row = store.row(pos)
            assert row is not None
            return heads_view(head_stats(row), state.attn_layer, state.head, width=width, height=height,
                              offset=offset, mode=mode)
        if view == "turns":
            weights = store.head_row(pos, state.attn_layer, state.head, state.head_mode)
            assert weights is not None
            owner, labels = store.groups()
            return turns_view(weights, owner, labels, width=width, height=height, offset=offset, mode=mode)
        raise ValueError(view)

    def frame_strips(self, width: int, height: int, base: Style) -> list[Strip]:
        """The current view as `height` Strips of `width` cells over the `base` style."""
        renderable = self.render_view(width, height)
        console = self.app.console
        options = console.options.update(width=width, height=height, no_wrap=False, highlight=False,
                                         markup=False)
        if isinstance(renderable, Heatmap):
            strips = self.painter.draw(renderable, self._row_keys, width, base)
            lines_only = options.reset_height()  # a footer line is as tall as its text, not the view
            for text in renderable.footer:
                # the same Strips for the same text, so that an unchanged footer line is not repainted
                key = (text.plain, tuple(text.spans), width, base)
                cached = self._footer_strips.get(key)
                if cached is None:
                    if len(self._footer_strips) > 64:
                        self._footer_strips.clear()
                    cached = [Strip(line, width) for line in console.render_lines(text, lines_only, style=base, pad=True)]
                    self._footer_strips[key] = cached
                strips += cached
            strips = strips[:height]
        else:
            lines = console.render_lines(renderable, options, style=base, pad=True)
            strips = [Strip(line, width) for line in lines[:height]]
        blank = Strip.blank(width, base)
        return strips + [blank] * (height - len(strips))

    def render_heatmap(self, width: int, height: int) -> Heatmap:
        state, store = self.state, self.store
        rows, c0, c1 = self.heatmap_window(width, height)
        label_width, footer_lines = heatmap_margins(width, height)
        pos = state.position or 0
        # cached per row for the whole width, so a longer context does not invalidate the rows drawn
        span = max(1, width - label_width - 1)
        # always the full width (keys past the newest are blank), so a new token changes no other line
        levels = self.painter.levels(rows, c0, c0 + span, state.attn_layer, state.head, state.head_mode, state.scale)
        # few keys in a wide pane: each key gets more columns (a whole maximised screen is used)
        cell = max(1, min(MAX_CELL_WIDTH, span // max(1, c1 - c0)))
        if cell > 1:
            levels = np.repeat(levels[:, : c1 - c0], cell, axis=1)
        self._row_keys = [self.painter.row_key(p) for p in rows]
        footer: list[Text] = []
        if footer_lines:
            footer = [self.top_keys_text(pos, c0, c1), legend(state.scale, self.mode, width)]
        return Heatmap(
            levels,
            mode=self.mode,
            cursor_row=pos - rows.start if pos in rows else None,
            cursor_col=(pos - c0) * cell if c0 <= pos < c1 else None,
            gutter=True,
            axis=height > 1,
            axis_labels=(f"{c0}", f"{c1 - 1}"),
            axis_end=(c1 - c0) * cell - 1,
            row_labels=[fit(token_label(store.tokens[p]), label_width - 1) for p in rows] if label_width else None,
            footer=footer,
        )

    def top_keys_text(self, pos: int, c0: int, c1: int) -> Text:
        """The selected token's three largest weights (its keys named), and how much falls off-window."""
        state = self.state
        out = Text(end="")
        weights = self.store.head_row(pos, state.attn_layer, state.head, state.head_mode)
        out.append(fit(token_label(self.store.tokens[pos]), 8).rstrip(), style="bold bright_cyan")
        if weights is None:
            out.append(" not captured", style="dim")
            return out
        out.append(" looks most at ", style="dim")
        top = np.argsort(-weights, kind="stable")[:3]
        for n, k in enumerate(top.tolist()):
            if n:
                out.append(" · ", style="dim")
            out.append(fit(token_label(self.store.tokens[k]), 8).rstrip(), style="bold")
            out.append(f" {weights[k]:.0%}")
        off = float(weights[:c0].sum() + weights[c1:].sum()) / max(float(weights.sum()), 1e-12)
        if off >= 0.005:
            out.append(f" · {off:.0%} off-window", style="yellow")
        return out

    # ------------------------------------------------------------------ explain (worker)

    def render_explain(self, pos: int, width: int, height: int) -> Text:
        state = self.state
        stored = self.store.row(pos)
        head = state.head
        note = None
        if state.head_mode != "single":
            note = f"explaining head {head}: a {state.head_mode} of heads is not one softmax (m: single)"
        stored_head = stored[state.attn_layer, head].astype(np.float64) if stored is not None else None
        key = (self.store.epoch, pos, state.attn_layer, head)
        result = self._explain.get(key)
        unavailable = None
        explanation = None
        engine = self.engine
        source = explainer(engine)
        if engine is None:
            unavailable = "no model is loaded, so q·k and the value sizes cannot be computed."
        elif source is None:
            unavailable = (
                f"the {engine.backend} backend gives attention weights only; q·k, the scaled scores "
                "and the value sizes need the model's queries and keys (the mini-GPT has them)."
            )
        elif isinstance(result, Exception):
            unavailable = first_line(result)
        elif result is not None:
            explanation = result
        elif key != self._explain_asked:
            self._explain_asked = key
            self.explain_in_background(source, key, list(self.store.ids[: pos + 1]), pos, state.attn_layer, head)
        return explain_view(
            explanation, stored_head, self.store.tokens, pos, width=width, height=height,
            offset=state.offsets["explain"], sort=state.sort_explain, unavailable=unavailable,
            pending=explanation is None and unavailable is None, head_note=note, mode=self.mode,
        )

    @work(thread=True, exclusive=True, group="attn-explain", exit_on_error=False)
    def explain_in_background(self, source: Explainer, key: tuple, ids: list[int], pos: int, layer: int,
                              head: int) -> None:
        with self._explain_lock:
            if get_current_worker().is_cancelled:  # another token was asked for while this one waited
                return
            try:
                result: Explanation | Exception = source.explain_attention(ids, pos, layer, head)
            except Exception as exc:  # shown in the view
                result = exc
        self.post_message(jobs.ExplainReady(key, result))

    @on(jobs.ExplainReady)
    def _explained(self, message: jobs.ExplainReady) -> None:
        if len(self._explain) > RESULTS_KEPT:
            self._explain.clear()
        self._explain[message.key] = message.result
        self.redraw()

    # ------------------------------------------------------------------ inside the next token (worker)

    def set_token_text(self, source: str, text: str) -> None:
        """The text the tokens view cuts into tokens, and what it is ("input box", "assistant message")."""
        if (source, text) != self.token_source:
            self.token_source = (source, text)
            if self.state.view == "tokens":
                self.redraw()

    def _inside_request(self, view: str, pos: int | None) -> tuple[tuple, list[int], int] | str:
        """(cache key, ids, token id) of what `view` asks the engine for, or why there is nothing to ask."""
        state, store = self.state, self.store
        if view == "tokens":
            source, text = self.token_source
            if not text:
                return "Type in the input box (or select a message): its tokens show here as you type."
            return (store.epoch, view, source, text), [], -1
        if pos is None:
            return "No reply yet: this view opens up the token under the cursor."
        ids = store.ids[: pos + 1]
        if any(i < 0 for i in ids):
            return f"Token {pos}: some token ids before it were not kept, so the model cannot be asked again."
        if view in ("lens", "attribution", "knockout"):  # the prediction of the cursor's token
            if pos == 0:
                return "The first token has no prediction before it: move the cursor on (↓)."
            if view == "knockout" and not state.knocked:
                return ""  # the view says how to pick heads
            heads = state.knocked if view == "knockout" else frozenset()
            return (store.epoch, view, pos, heads), ids[:pos], ids[pos]
        layer_head = (state.attn_layer, state.head) if view == "block" else ()
        return (store.epoch, view, pos, layer_head), ids, ids[pos]

    def render_inside(self, view: str, width: int, height: int) -> Text:
        state, store = self.state, self.store
        engine = self.engine
        offset = state.offsets[view]
        source = inside(engine)
        warn = "yellow"
        if engine is None:
            return inside_views.note_view("No model is loaded.", width, height)
        if source is None:
            return inside_views.note_view(f"Not available: the {engine.backend} backend does not open up its next token.",
                width, height, warn)
        reason = (self._inside_views or {}).get(view)
        if reason:
            return inside_views.note_view(f"Not available: {clean_line(reason)}", width, height, warn)
        pos = state.position
        request = self._inside_request(view, pos)
        result: object = None
        if isinstance(request, tuple):
            key, ids, token_id = request
            result = self._inside.get(key)
            if result is None and key != self._inside_asked:
                self._inside_asked = key
                self.inside_in_background(source, key, view, ids, token_id, state.attn_layer, state.head,
                                          state.knocked, self.token_source[1])
        if isinstance(result, Exception):
            return inside_views.note_view(f"Could not compute it: {first_line(result)}", width, height, warn)
        n_layers, n_heads = state.n_layers, state.n_heads
        if view == "knockout" and not (isinstance(request, str) and request):
            selected = inside_views.head_label(state.attn_layer, state.head, n_layers, n_heads)
            can_continue = pos is not None and pos >= store.prompt_length and store.step_at(pos) is not None
            return inside_views.knockout_view(
                result, state.knocked, selected, width=width, height=height, offset=offset,  # type: ignore[arg-type]
                pending=isinstance(request, tuple), can_continue=can_continue)
        if isinstance(request, str):
            return inside_views.note_view(request, width, height)
        if result is None:
            return inside_views.note_view("computing…", width, height)
        token = store.tokens[pos] if pos is not None and pos < len(store.tokens) else ""
        if view == "lens":
            return inside_views.lens_view(result, token, width=width, height=height,  # type: ignore[arg-type]
                                          offset=offset, mode=self.mode)
        if view == "attribution":
            return inside_views.attribution_view(result, token, n_heads,  # type: ignore[arg-type]
                                                 width=width, height=height, offset=offset)
        if view == "rollout":
            assert pos is not None
            return inside_views.rollout_view(result, store.tokens, pos, width=width,  # type: ignore[arg-type]
                                             height=height, offset=offset, mode=self.mode)
        if view == "tokens":
            return inside_views.tokens_view(result, self.token_source[0],  # type: ignore[arg-type]
                                            getattr(engine, "context_length", None), width=width,
                                            height=height, offset=offset)
        return inside_views.block_view(result, token, n_layers, n_heads, width=width,  # type: ignore[arg-type]
                                       height=height, offset=offset)

    @work(thread=True, exclusive=True, group="attn-inside", exit_on_error=False)
    def inside_in_background(self, source: Inside, key: tuple, view: str, ids: list[int], token_id: int,
                             layer: int, head: int, heads: frozenset[Head], text: str) -> None:
        with self._inside_lock:
            if get_current_worker().is_cancelled:  # another token or view was asked for while this waited
                return
            views = self._inside_views
            try:
                if views is None:
                    views = source.inside_views()
                result: object = None
                if not views.get(view):
                    result = jobs.inside_result(source, view, ids, token_id, layer, head, heads, text)
            except Exception as exc:  # shown in the view
                result = exc
        self.post_message(jobs.InsideReady(key, result, views))

    @on(jobs.InsideReady)
    def _inside_ready(self, message: jobs.InsideReady) -> None:
        if message.views is not None:
            self._inside_views = message.views
        if len(self._inside) > RESULTS_KEPT:
            self._inside.clear()
        if message.result is not None:
            self._inside[message.key] = message.result
        self.redraw()

    def action_knock(self) -> None:
        state = self.state
        state.toggle_knocked()
        if state.view != "knockout":  # picked in another view (the heads overview): say where it shows
            selected = (state.attn_layer, state.head)
            self.notify(f"{head_name(*selected)} {'off' if selected in state.knocked else 'on again'} "
                        f"for the knock-out view (0 shows it)", timeout=3, markup=False)
        self.redraw()

    def action_knock_none(self) -> None:
        self.state.knocked = frozenset()
        self.redraw()

    def action_knock_continue(self) -> None:
        """Ask the app to generate the reply again from the cursor's token on with the chosen heads off."""
        state, store = self.state, self.store
        pos = state.position
        if state.view != "knockout":
            return
        if not state.knocked:
            self.notify("No heads are off: pick one with [ ] { } and press k.", severity="warning", markup=False)
            return
        if pos is None or pos < store.prompt_length or store.step_at(pos) is None:
            self.notify("Move the cursor to a token of the reply: it continues from there.", severity="warning",
                        markup=False)
            return
        steps = [store.step_at(i) for i in range(pos, store.length)]
        cut = "".join(s.text for s in steps if s is not None)
        self.post_message(KnockOutContinue(state.knocked, cut, len(steps)))

    # ------------------------------------------------------------------ candidates (worker)

    def render_candidates(self, pos: int, width: int, height: int) -> Text:
        step = self.store.step_at(pos)
        if step is None:
            return Text(
                f"Token {pos} is part of the prompt: it was not sampled. "
                "Move to a token of the reply (↓ or End).",
                style="dim",
            )
        current = self.params
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
        if step.top_ids is None and step.chain_prob != step.chain_prob:
            unavailable = ("the server's own sampler chose: its probabilities are shown, and the chain cannot "
                           "be replayed here.")
        elif step.top_ids is None:
            unavailable = "this backend stores no logits: the chain cannot be replayed."
        elif isinstance(result, Exception):
            unavailable = f"replay failed: {first_line(result)}"
        elif result is not None:
            as_sampled, replay_now, texts = result.as_sampled, result.now, result.texts
        elif key != self._replay_asked:
            self._replay_asked = key
            self.replay_in_background(self.engine, key, step, self.store.context_ids(pos), now)
        return candidates_view(step, as_sampled, replay_now, width=width, height=height,
                               offset=self.state.offsets["candidates"], mode=self.mode,
                               unavailable=unavailable, texts=texts,
                               rows=listing.top_candidates if listing is not None else None)

    @work(thread=True, exclusive=True, group="attn-replay", exit_on_error=False)
    def replay_in_background(self, engine: Engine | None, key: tuple, step: Step, context: list[int],
                             now: SamplingParams | None) -> None:
        with self._replay_lock:
            if get_current_worker().is_cancelled:  # another token or setting was asked for meanwhile
                return
            try:
                result: jobs.Replay | Exception = jobs.replay(engine, step, context, now)
            except Exception as exc:  # shown in the view
                result = exc
        self.post_message(jobs.ReplayReady(key, result))

    @on(jobs.ReplayReady)
    def _replayed(self, message: jobs.ReplayReady) -> None:
        if len(self._replay) > RESULTS_KEPT:
            self._replay.clear()
        self._replay[message.key] = message.result
        self.redraw()

    # ------------------------------------------------------------------ fork

    class ForkRequested(Message):
        """Fork the reply at the cursor's token, to another candidate (the app does it)."""

        def __init__(self, fork: Fork) -> None:
            super().__init__()
            self.fork = fork

    def action_fork(self) -> None:
        """Pick a candidate at the cursor's token, kept or dropped by the chain, to fork the reply to."""
        pos = self.state.cursor
        step = self.store.step_at(pos) if pos is not None and pos >= 0 else None
        if step is None:
            self.notify("Move the cursor to a token of the reply (↓ or End), then F forks the reply there.",
                        severity="warning", markup=False)
            return
        store = self.store  # what the fork keeps, read now: a new reply would replace it
        prefix = range(store.prompt_length, pos)
        where = Fork(
            index=step.index, prefix_ids=tuple(store.ids[p] for p in prefix),
            prefix_texts=tuple(s.text if (s := store.step_at(p)) is not None else "" for p in prefix),
            token_id=-1, token="", prob=float("nan"), dropped_by=None, instead_of=step.token,
            prompt_ids=tuple(store.ids[: store.prompt_length]),
        )
        self.fork_choices_in_background(step, store.context_ids(pos), where)

    def fork_at_cursor_or_last(self) -> None:
        """The fork picker at the cursor's token of the reply, or at the reply's last token when the cursor is
        not on one (a fork asked for from the conversation)."""
        store, state = self.store, self.state
        if store.generated and (state.follow or state.cursor is None or state.cursor < store.prompt_length):
            state.follow, state.cursor = False, store.length - 1
            self.redraw()
        self.action_fork()

    @work(thread=True, exclusive=True, group="fork", exit_on_error=False)
    def fork_choices_in_background(self, step: Step, context: list[int], where: Fork) -> None:
        """The chain replayed on the step's stored logits says which stage drops each candidate
        (in the model's process, it may wait for a reply streaming there)."""
        replay = texts = None
        if step.top_ids is not None:
            with contextlib.suppress(Exception):  # without it the candidates are still listed
                result = jobs.replay(self.engine, step, context, None)
                replay, texts = result.as_sampled, result.texts
        choices = fork_choices(step, replay, texts, self.engine)
        self.app.call_from_thread(self._pick_fork, step, choices, where)

    def _pick_fork(self, step: Step, choices: list[tuple[int, str, float, str | None]], where: Fork) -> None:
        if not choices:
            self.notify("No other candidate is known at this token.", severity="warning", markup=False)
            return
        labels = [f"{n}. {fork_label(text, prob, stage)}" for n, (_, text, prob, stage) in enumerate(choices, 1)]

        def done(picked: str | None) -> None:
            if picked is not None:
                token_id, text, prob, stage = choices[labels.index(picked)]
                self.post_message(self.ForkRequested(dataclasses.replace(
                    where, token_id=token_id, token=text, prob=prob, dropped_by=stage)))

        self.app.push_screen(PickScreen(
            f"Fork the reply at token {step.index} ({clean_line(repr(step.token))}) to", labels,
            hint="the reply keeps its tokens before this one, takes the one picked and goes on with the "
                 "settings now, as a new branch · Enter forks · Esc cancels"), done)

    # ------------------------------------------------------------------ actions

    def action_cycle_view(self, delta: int) -> None:
        self.state.cycle_view(delta)
        self.redraw()

    def action_show_view(self, name: str) -> None:
        if self.state.show_view(name):
            self.redraw()

    def action_layer(self, delta: int) -> None:
        self.state.step_layer(delta)
        self.redraw()

    def action_head(self, delta: int) -> None:
        self.state.step_head(delta)
        self.redraw()

    def action_head_mode(self) -> None:
        self.state.cycle_head_mode()
        self.redraw()

    def action_cursor(self, delta: int) -> None:
        if self.state.move_cursor(delta):
            self.redraw()

    def action_cursor_page(self, delta: int) -> None:
        if self.state.move_page(delta):
            self.redraw()

    def action_cursor_home(self) -> None:
        if self.state.cursor_home():
            self.redraw()

    def action_cursor_end(self) -> None:
        self.state.cursor_end()
        self.redraw()

    def action_follow(self) -> None:
        self.state.toggle_follow()
        self.redraw()

    def action_pan(self, delta: int) -> None:
        size = self.query_one(AttentionCanvas).content_size
        label_width, footer = heatmap_margins(size.width, size.height)
        self.state.pan(delta, size.width - label_width, size.height - footer)
        self.redraw()

    def action_scale(self) -> None:
        self.state.cycle_scale()
        self.redraw()

    def action_view_help(self) -> None:
        from chat_tui.ui.attention.help import ViewHelpScreen

        self.app.push_screen(ViewHelpScreen(self.state.view, VIEW_TITLE[self.state.view]))

    def action_sort(self) -> None:
        self.state.toggle_sort()
        self.redraw()

    # ------------------------------------------------------------------ export

    def view_svg(self, width: int | None = None, height: int | None = None) -> str:
        """The current view (with its header) as an SVG document."""
        canvas = self.query_one(AttentionCanvas)
        width = width or max(canvas.content_size.width, 20)
        height = height or max(canvas.content_size.height, 5)
        parts: list[RenderableType] = [self.header_text(width), self.render_view(width, height)]
        note = self.notice_text()
        if note:
            parts.append(Text(note, style=Style(color="yellow")))
        return export.svg_document(parts, width, f"chat-tui attention · {VIEW_TITLE[self.state.view]}")

    def action_export(self) -> None:
        if not self.store.has_attention and self.store.length == 0:
            self.notify("Nothing to export yet", severity="warning", markup=False)
            return
        svg = self.view_svg()
        tensors = export.attention_tensors(self.store, self.engine) if self.store.has_attention else None
        folder = self.export_dir
        if folder is None:
            from chat_tui.config import get_paths

            folder = get_paths().exports
        self.export_in_background(folder, export.export_stem(), svg, tensors)

    @work(thread=True, group="attn-export", exit_on_error=False)
    def export_in_background(self, folder: Path, stem: str, svg: str,
                             tensors: tuple[dict[str, np.ndarray], dict[str, str]] | None) -> None:
        try:
            written = export.write_export(folder, stem, svg, tensors)
        except Exception as exc:
            self.post_message(jobs.ExportDone([], f"{type(exc).__name__}: {first_line(exc)}"))
        else:
            self.post_message(jobs.ExportDone(written))

    @on(jobs.ExportDone)
    def _exported(self, message: jobs.ExportDone) -> None:
        if message.error is not None:
            self.notify(f"Export failed: {message.error}", severity="error", markup=False)
        else:
            self.notify("Exported " + ", ".join(str(p) for p in message.paths), timeout=6, markup=False)
