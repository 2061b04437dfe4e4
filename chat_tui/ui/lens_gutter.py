"""The lens gutter under a reply (issue #14; toggled with the `lens_gutter` binding): one cell per
token, its digit the token's commitment layer (the first layer from which the chosen token stays the
logit lens's top-1, counted from 1) and its shade the token's surprisal (−log₂ p: dark = expected,
light = surprising).

The surprisal comes with every token (its probability). The commitment layer comes with the token too
when the reply was started with the gutter on and the engine reads the lens in its decode loop (the
mini-GPT: `Step.commit_layer`, about one projection through the output head a token). Otherwise it is
asked of the engine (`chat_tui.engine.inside`) in a thread worker, a batch at a time, for the tokens
streamed while the gutter is on. A lens is a forward pass over the whole prefix, dearer than a decode step: while the
reply streams the worker idles `STREAMING_SLACK` times as long as each lens took (it keeps to a tenth
of the time), and catches up when the reply ends. The cells are redrawn at most a few times a second.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from rich.color import Color
from rich.style import Style
from rich.text import Text
from textual import work
from textual.widgets import Static

from chat_tui.engine.inside import Inside, inside
from chat_tui.engine.types import NO_COMMIT, Step
from chat_tui.ui.state import ChatItem

REFRESH_S = 0.25  # the cells are redrawn at most this often while tokens arrive
STREAMING_SLACK = 9.0  # while the reply streams, idle this many times each lens's time
SHADE_BITS = 10.0  # surprisal at which the shade is lightest
LEGEND = "lens: digit = commitment layer (– none) · shade = surprisal, light = surprising"


def shade(prob: float) -> Style:
    """A grey background for a token's surprisal, with a digit that stays readable on it."""
    if not (prob == prob) or prob <= 0.0:  # NaN (no probability) or impossible: no shade
        return Style(dim=True)
    bits = min(-math.log2(min(prob, 1.0)), SHADE_BITS)
    level = int(32 + bits / SHADE_BITS * 200)
    return Style(bgcolor=Color.from_rgb(level, level, level), color="black" if level > 140 else "white")


def cell(commit: int | None, known: bool) -> str:
    if not known:
        return " "
    if commit is None:
        return "–"
    return str(commit + 1) if commit < 9 else "+"


class LensGutter(Static):
    """The strip of lens cells for one reply (mounted by its MessageView, hidden until toggled on)."""

    DEFAULT_CSS = """
    LensGutter {
        height: auto;
        margin: 0 0 0 0;
    }
    """

    def __init__(self, item: ChatItem) -> None:
        super().__init__("", classes="lens-gutter")
        self.item = item
        self._lens_ids: list[int] = []  # the context by position: the prompt's ids, then the reply's tokens
        self.commit: dict[int, int | None] = {}  # token index (in item.token_probs) -> commitment layer
        self._lens_pending: list[tuple[int, int, int]] = []  # (token index, position, token id) not yet asked
        self._lens_asking = False
        self._lens_none = False  # the engine said it has no lens: the cells show the surprisal only
        self._lens_timer = None
        self._laid_out: tuple[int, int] | None = None  # (cell lines, width) at the last layout

    # ------------------------------------------------------------------ fed by the app

    def add_step(self, step: Step, engine: object) -> None:
        """A token of the reply arrived (called before it joins `item.token_probs`, so its index is
        that list's length now)."""
        if step.prompt is not None:
            self._lens_ids = list(step.prompt.ids)
        index = len(self.item.token_probs)
        if step.position == len(self._lens_ids) and step.token_id >= 0:
            if step.commit_layer is not None:  # the decode loop read the lens itself: nothing to ask
                self.commit[index] = None if step.commit_layer == NO_COMMIT else step.commit_layer
            else:
                self._lens_pending.append((index, step.position, step.token_id))
            self._lens_ids.append(step.token_id)
        self._kick(inside(engine))
        self.schedule()

    def schedule(self) -> None:
        """Redraw soon (one redraw for all the tokens that arrive meanwhile)."""
        if self._lens_timer is None and self.is_mounted:
            self._lens_timer = self.set_timer(REFRESH_S, self._redraw)

    def on_show(self) -> None:
        self._redraw()

    # ------------------------------------------------------------------ the commitment layers (worker)

    def _kick(self, source: Inside | None) -> None:
        if self._lens_asking or not self._lens_pending or source is None or self._lens_none:
            return
        batch, self._lens_pending = self._lens_pending, []
        self._lens_asking = True
        self._compute(source, batch)

    @work(thread=True, exit_on_error=False, group="lens-gutter")
    def _compute(self, source: Inside, batch: Sequence[tuple[int, int, int]]) -> None:
        results: dict[int, int | None] = {}
        try:
            self._lens_none = bool(source.inside_views().get("lens"))
        except Exception:
            self._lens_none = True
        for index, position, token_id in [] if self._lens_none else batch:
            started = time.perf_counter()
            try:
                results[index] = source.logit_lens(self._lens_ids[:position], token_id, top=1).commit_layer
            except Exception:  # an engine that cannot: the cell stays blank, the reply goes on
                continue
            if self.item.status == "generating":  # leave the model and the UI to the stream
                time.sleep((time.perf_counter() - started) * STREAMING_SLACK)
        self.app.call_from_thread(self._computed, results, source)

    def _computed(self, results: dict[int, int | None], source: Inside) -> None:
        self.commit.update(results)
        self._lens_asking = False
        self._kick(source)
        self.schedule()

    # ------------------------------------------------------------------ drawing

    def _redraw(self) -> None:
        self._lens_timer = None
        if not self.display:
            return
        text = Text(LEGEND + "\n", style="dim", end="")
        for index, (_, prob) in enumerate(self.item.token_probs):
            text.append(cell(self.commit.get(index), index in self.commit), style=shade(prob))
        # a new layout of the conversation only when the strip needs another line (a layout of a long
        # conversation costs the reply's stream more than the strip itself)
        width = self.content_size.width
        lines = (len(self.item.token_probs) + width - 1) // width if width else -1
        self.update(text, layout=(lines, width) != self._laid_out)
        self._laid_out = (lines, width)
