"""The attention heatmap as a Rich renderable: half-block cells, colour scales and colour fallbacks.

A cell of the terminal shows two query rows: the upper half block ``▀`` takes the upper row's
colour as its foreground and the lower row's as its background. Weights become one of 256 levels
of an *inferno*-like palette (dark = little attention, pale yellow = much), drawn as:

- ``truecolor``: the palette's RGB colours;
- ``256``: the same colours mapped to the xterm 256-colour palette;
- ``mono``: one query row per line, the level as a shade ``·░▒▓█`` and no colour at all.

Cells a query cannot see (keys after it) and rows not captured are left blank; a key left out of
the scale (the first token under the ``nosink`` scale) is grey (``×`` in monochrome).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import numpy as np
from rich.cells import cell_len, set_cell_size
from rich.color import Color, ColorSystem
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.segment import Segment
from rich.style import Style
from rich.text import Text

ColorMode = Literal["truecolor", "256", "mono"]
Scale = Literal["linear", "rowmax", "sqrt", "nosink"]
SCALES: tuple[Scale, ...] = ("linear", "rowmax", "sqrt", "nosink")
SCALE_LABEL = {
    "linear": "linear",
    "rowmax": "÷ row max",
    "sqrt": "√ weight",
    "nosink": "no sink, ÷ max",  # the first token left out before scaling
}
# what the colours mean under each scale, for the legend under the heatmap (n cycles the scale)
SCALE_MEANING = {
    "linear": "0 → 1: the weight itself",
    "rowmax": "0 → the row's max in view",
    "sqrt": "0 → 1 as √weight: faint ones show",
    "nosink": "0 → max, sink (grey) left out",
}
# the first token soaks up much of many heads' attention whatever it says (an "attention sink")
SINK_NOTE = "sink: the first token, where heads park attention they do not need elsewhere"

LEVELS = 256
MASKED = -1  # no value: a key after the query, or a row not captured
EXCLUDED = -2  # a key left out of the scale (the attention sink)

# inferno, from matplotlib (CC0), at nine evenly spaced stops
_ANCHORS = np.array(
    [
        (0, 0, 4),
        (31, 12, 72),
        (85, 15, 109),
        (136, 34, 106),
        (186, 54, 85),
        (227, 89, 51),
        (249, 140, 10),
        (249, 201, 50),
        (252, 255, 164),
    ],
    dtype=np.float64,
)
EXCLUDED_RGB = (96, 96, 96)
MONO_SHADES = "·░▒▓█"
MONO_EXCLUDED = "×"


def _palette_rgb() -> list[tuple[int, int, int]]:
    x = np.linspace(0.0, 1.0, LEVELS)
    stops = np.linspace(0.0, 1.0, len(_ANCHORS))
    channels = [np.interp(x, stops, _ANCHORS[:, c]) for c in range(3)]
    return [(int(round(r)), int(round(g)), int(round(b))) for r, g, b in zip(*channels, strict=True)]


PALETTE_RGB: list[tuple[int, int, int]] = _palette_rgb()
_COLORS: dict[str, list[Color]] = {}


def palette(mode: ColorMode) -> list[Color]:
    """The 256 colours of the levels (index 256: the excluded grey) for a colour mode."""
    if mode not in _COLORS:
        colors = [Color.from_rgb(*rgb) for rgb in [*PALETTE_RGB, EXCLUDED_RGB]]
        if mode == "256":
            colors = [c.downgrade(ColorSystem.EIGHT_BIT) for c in colors]
        _COLORS[mode] = colors
    return _COLORS[mode]


def level_color(level: int, mode: ColorMode = "truecolor") -> Color:
    """The colour a level (0..255, or EXCLUDED) is drawn in."""
    return palette(mode)[LEVELS if level == EXCLUDED else level]


def mono_char(level: int) -> str:
    if level == MASKED:
        return " "
    if level == EXCLUDED:
        return MONO_EXCLUDED
    return MONO_SHADES[min(len(MONO_SHADES) - 1, level * len(MONO_SHADES) // LEVELS)]


def detect_mode(console: Console, no_color: bool = False, headless: bool = False) -> ColorMode:
    """The best mode the terminal allows: truecolor, else 256 colours, else monochrome shades.

    Headless (tests, screenshots) draws in truecolor whatever the environment says, so that a
    snapshot does not depend on the TERM of the machine that takes it.
    """
    if no_color:
        return "mono"
    if headless:
        return "truecolor"
    system = console.color_system
    if system in ("truecolor", "windows"):
        return "truecolor"
    if system == "256":
        return "256"
    return "mono"


# ----------------------------------------------------------------------------------------------------
# weights -> levels


def scale_row(weights: np.ndarray, scale: Scale, *, has_sink: bool = True) -> np.ndarray:
    """float32 values in [0, 1] for one query row (NaN for an excluded key); `has_sink`: the
    first value is the first token's (the ``nosink`` scale leaves it out)."""
    w = np.asarray(weights, dtype=np.float32)
    if w.size == 0:
        return w
    if scale == "linear":
        v = w
    elif scale == "sqrt":
        v = np.sqrt(np.maximum(w, 0.0))
    elif scale == "rowmax":
        top = float(w.max())
        v = w / top if top > 0 else np.zeros_like(w)
    elif scale == "nosink" and not has_sink:
        top = float(w.max())
        v = w / top if top > 0 else np.zeros_like(w)
    elif scale == "nosink":
        v = np.empty_like(w)
        v[0] = np.nan
        if w.size > 1:
            top = float(w[1:].max())
            v[1:] = w[1:] / top if top > 0 else 0.0
    else:
        raise ValueError(f"unknown scale {scale!r}")
    return np.clip(v, 0.0, 1.0)


def to_levels(values: np.ndarray) -> np.ndarray:
    """int16 levels 0..255 for values in [0, 1]; NaN becomes EXCLUDED."""
    v = np.asarray(values, dtype=np.float32)
    nan = np.isnan(v)
    levels = np.rint(np.where(nan, 0.0, np.clip(v, 0.0, 1.0)) * (LEVELS - 1)).astype(np.int16)
    levels[nan] = EXCLUDED
    return levels


def row_levels(weights: np.ndarray | None, scale: Scale, c0: int, c1: int) -> np.ndarray:
    """int16 levels of keys [c0, c1) for one query row; MASKED past the row's end (or without a row).

    The scale is computed over the keys shown: a row whose attention falls mostly before the
    window still shows how it spreads over the keys in view (the window's share is said elsewhere).
    """
    out = np.full(c1 - c0, MASKED, dtype=np.int16)
    if weights is None:
        return out
    n = weights.shape[0]
    hi = min(c1, n)
    if hi > c0:
        out[: hi - c0] = to_levels(scale_row(weights[c0:hi], scale, has_sink=c0 == 0))
    return out


def matrix_levels(matrix: np.ndarray, scale: Scale = "linear") -> np.ndarray:
    """int16 (R, C) levels of a causal matrix: row i has keys 0..i (the rest, and NaN rows, MASKED)."""
    m = np.asarray(matrix, dtype=np.float32)
    rows, cols = m.shape
    out = np.full((rows, cols), MASKED, dtype=np.int16)
    for i in range(rows):
        if np.isnan(m[i, 0]):
            continue
        n = min(i + 1, cols)
        out[i, :n] = row_levels(m[i, :n], scale, 0, n)
    return out


# ----------------------------------------------------------------------------------------------------
# levels -> segments


_STYLE_CACHE: dict[tuple, Style] = {}
GUTTER_STYLE = Style(color="bright_cyan", bold=True)
AXIS_STYLE = Style(color="bright_cyan")
DIM_STYLE = Style(dim=True)


def _cell_style(mode: ColorMode, fg: int, bg: int, base: Style | None = None) -> Style:
    """The style of a cell (cached): `base` (the widget's own style, for its background) under it."""
    key = (mode, fg, bg, base)
    style = _STYLE_CACHE.get(key)
    if style is None:
        colors = palette(mode)
        style = Style(
            color=None if fg == MASKED else colors[LEVELS if fg == EXCLUDED else fg],
            bgcolor=None if bg == MASKED else colors[LEVELS if bg == EXCLUDED else bg],
        )
        if base is not None:
            style = base + style
        if len(_STYLE_CACHE) > 200_000:
            _STYLE_CACHE.clear()
        _STYLE_CACHE[key] = style
    return style


def _styled(style: Style | None, base: Style | None) -> Style | None:
    if base is None:
        return style
    return base if style is None else base + style


def half_block_line(
    top: np.ndarray, bottom: np.ndarray | None, mode: ColorMode, base: Style | None = None
) -> list[Segment]:
    """One line of cells showing two query rows (`bottom` None: only the upper one).

    Runs of identical cells become one Segment (found with numpy, so a wide line of few colours
    costs little).
    """
    t = np.asarray(top, dtype=np.int16)
    b = np.full_like(t, MASKED) if bottom is None else np.asarray(bottom, dtype=np.int16)
    if t.size == 0:
        return []
    t_masked = t == MASKED
    # "▀" (fg top, bg bottom); "▄" (fg bottom, no bg) when only the top is masked; " " when both are
    fg = np.where(t_masked, b, t)
    bg = np.where(t_masked, MASKED, b)
    char = np.where(t_masked, np.where(b == MASKED, 0, 1), 2)
    change = np.flatnonzero((fg[1:] != fg[:-1]) | (bg[1:] != bg[:-1]) | (char[1:] != char[:-1])) + 1
    starts = [0, *change.tolist()]
    ends = [*change.tolist(), t.size]
    fg_l, bg_l, ch_l = fg.tolist(), bg.tolist(), char.tolist()
    chars = (" ", "▄", "▀")
    return [
        Segment(chars[ch_l[i]] * (j - i), _cell_style(mode, fg_l[i], bg_l[i], base))
        for i, j in zip(starts, ends, strict=True)
    ]


def mono_line(levels: np.ndarray, base: Style | None = None) -> list[Segment]:
    text = "".join(mono_char(level) for level in levels.tolist())
    return [Segment(text, base)] if text else []


class Heatmap:
    """A heatmap of levels (R query rows × C keys), optionally with a cursor gutter and a key axis.

    `cursor_row`: index into the R rows of the selected query (marked in a one-cell gutter on the
    left: ``▀`` or ``▄`` says which of the cell's two rows it is); `cursor_col`: index into the C
    keys marked ``▲`` on an axis line under the map (None: no axis line).
    """

    def __init__(
        self,
        levels: np.ndarray,
        *,
        mode: ColorMode = "truecolor",
        cursor_row: int | None = None,
        cursor_col: int | None = None,
        gutter: bool = False,
        axis: bool = False,
        axis_labels: tuple[str, str] | None = None,
        axis_end: int | None = None,
        row_labels: list[str] | None = None,
        footer: list[Text] | None = None,
    ) -> None:
        self.levels = np.asarray(levels, dtype=np.int16)
        if self.levels.ndim != 2:
            raise ValueError("levels must be a 2-D array")
        self.mode: ColorMode = mode
        self.cursor_row = cursor_row
        self.cursor_col = cursor_col
        self.gutter = gutter or cursor_row is not None
        self.axis = axis
        self.axis_labels = axis_labels
        self.axis_end = axis_end  # the last column holding a key (the right label ends there)
        # the query tokens down the left, one per row (then one row per line, in colour too)
        self.row_labels = row_labels
        self.label_width = max((cell_len(t) for t in row_labels), default=0) + 1 if row_labels else 0
        self.footer = footer or []  # lines under the axis (the cursor row's top keys, the legend)

    @classmethod
    def from_matrix(cls, matrix: np.ndarray, scale: Scale = "linear", **kwargs) -> Heatmap:
        return cls(matrix_levels(matrix, scale), **kwargs)

    @property
    def width(self) -> int:
        return self.label_width + self.levels.shape[1] + (1 if self.gutter else 0)

    @property
    def rows_per_line(self) -> int:
        return 1 if self.mode == "mono" or self.row_labels is not None else 2

    def row_label(self, y: int) -> str:
        return self.row_labels[y] if self.row_labels is not None and y < len(self.row_labels) else ""

    @property
    def line_count(self) -> int:
        """Lines of the map (without the axis line)."""
        rows = self.levels.shape[0]
        return -(-rows // self.rows_per_line)

    def gutter_mark(self, y: int) -> str:
        step = self.rows_per_line
        c = self.cursor_row
        if c is None or c // step != y:
            return " "
        return "▶" if step == 1 else ("▀" if c % 2 == 0 else "▄")

    def line(self, y: int, base: Style | None = None) -> list[Segment]:
        """The segments of map line `y` (gutter included); `base` goes under every style."""
        rows = self.levels.shape[0]
        r = y * self.rows_per_line
        if self.mode == "mono":
            segments = mono_line(self.levels[r], base)
        elif self.rows_per_line == 1:  # a whole cell per row: both halves in its colour
            segments = half_block_line(self.levels[r], self.levels[r], self.mode, base)
        else:
            bottom = self.levels[r + 1] if r + 1 < rows else None
            segments = half_block_line(self.levels[r], bottom, self.mode, base)
        mark = self.gutter_mark(y)
        if self.gutter:
            segments.insert(0, Segment(mark, _styled(GUTTER_STYLE if mark != " " else None, base)))
        if self.label_width:
            text = set_cell_size(self.row_label(y), self.label_width - 1).rjust(self.label_width - 1) + " "
            segments.insert(0, Segment(text, _styled(GUTTER_STYLE if mark != " " else DIM_STYLE, base)))
        return segments

    def lines(self, base: Style | None = None) -> list[list[Segment]]:
        out = [self.line(y, base) for y in range(self.line_count)]
        if self.axis:
            out.append(self.axis_line(base))
        return out

    def axis_line(self, base: Style | None = None) -> list[Segment]:
        cols = self.levels.shape[1]
        chars = [" "] * cols
        col = self.cursor_col
        if self.axis_labels is not None:
            left, right = self.axis_labels
            for i, ch in enumerate(left[:cols]):
                chars[i] = ch
            end = cols - 1 if self.axis_end is None else min(self.axis_end, cols - 1)
            start = end + 1 - len(right)
            if col is not None and start <= col <= end:  # keep the label clear of the ▲
                start = col - len(right) - 1
            if start > len(left):
                for i, ch in enumerate(right):
                    chars[start + i] = ch
        dim = _styled(DIM_STYLE, base)
        segments = [Segment(" " * (self.label_width + (1 if self.gutter else 0)), base)]
        if col is not None and 0 <= col < cols:
            segments.append(Segment("".join(chars[:col]), dim))
            segments.append(Segment("▲", _styled(AXIS_STYLE, base)))
            segments.append(Segment("".join(chars[col + 1 :]), dim))
        else:
            segments.append(Segment("".join(chars), dim))
        return [s for s in segments if s.text]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for line in self.lines():
            yield from line
            yield Segment.line()

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(self.width, self.width)


def legend(scale: Scale, mode: ColorMode, width: int) -> Text:
    """One line: the palette from dark to bright and what its ends mean under `scale`."""
    out = Text(end="")
    ramp = 6
    for i in range(ramp):
        level = i * (LEVELS - 1) // (ramp - 1)
        if mode == "mono":
            out.append(mono_char(level))
        else:
            out.append("█", style=Style(color=level_color(level, mode)))
    out.append(f" {SCALE_MEANING[scale]}", style="dim")
    if scale == "nosink":  # the word first appears here: say what it means
        out.append(f"\n{SINK_NOTE}", style="dim italic")
    return out


def cells(lines: Iterable[list[Segment]]) -> list[list[tuple[str, Style | None]]]:
    """(character, style) per cell of rendered lines (for tests and exports)."""
    out = []
    for line in lines:
        row: list[tuple[str, Style | None]] = []
        for seg in line:
            for ch in seg.text:
                row.append((ch, seg.style))
        out.append(row)
    return out
