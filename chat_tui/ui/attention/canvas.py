"""The inspector's drawing surface: the heatmap's rows cached as levels and as Strips
(`HeatmapPainter`), and the widget that shows the pane's current view line by line (`AttentionCanvas`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from rich.style import Style
from textual.geometry import Region
from textual.strip import Strip
from textual.widget import Widget

from chat_tui.ui.attention.render import MASKED, Heatmap, Scale, row_levels
from chat_tui.ui.attention.store import AttentionStore, HeadMode

if TYPE_CHECKING:
    from chat_tui.ui.attention.pane import InspectorPane


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

    def draw(self, heatmap: Heatmap, row_keys: list[int], width: int, base: Style) -> list[Strip]:
        """`heatmap` as Strips of `width` cells; a line whose rows (`row_keys`, from `row_key`) and
        marks are unchanged is the very same Strip as last time."""
        cache = self.strips
        step = heatmap.rows_per_line
        cols = heatmap.levels.shape[1]
        strips = []
        for y in range(heatmap.line_count):
            top = row_keys[y * step]
            bottom = row_keys[y * step + 1] if step == 2 and y * step + 1 < len(row_keys) else None
            key = (top, bottom, heatmap.gutter_mark(y), heatmap.row_label(y), heatmap.label_width, cols,
                   heatmap.mode, width, base)
            strip = cache.get(key)
            if strip is None:
                strip = Strip(heatmap.line(y, base)).extend_cell_length(width, base).crop(0, width)
                cache[key] = strip
            strips.append(strip)
        if heatmap.axis:
            key = ("axis", heatmap.cursor_col, heatmap.axis_labels, heatmap.axis_end, heatmap.label_width, cols,
                   width, base)
            strip = cache.get(key)
            if strip is None:
                strip = Strip(heatmap.axis_line(base)).extend_cell_length(width, base).crop(0, width)
                cache[key] = strip
            strips.append(strip)
        return strips


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
            self.refresh()
            return
        changed = [y for y, (a, b) in enumerate(zip(old, new, strict=True)) if a is not b]
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
