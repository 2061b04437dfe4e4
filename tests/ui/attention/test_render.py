"""The heatmap renderable: known matrices give known cells, in every colour mode."""

from __future__ import annotations

import time

import numpy as np
import pytest
from rich.color import Color, ColorSystem, ColorType
from rich.console import Console

from chat_tui.ui.attention.render import (
    EXCLUDED,
    EXCLUDED_RGB,
    MASKED,
    PALETTE_RGB,
    Heatmap,
    detect_mode,
    matrix_levels,
    row_levels,
    scale_row,
    to_levels,
)


def rgb(color: Color | None):
    return None if color is None else tuple(color.get_truecolor())


def grid(heatmap: Heatmap):
    """[(char, fg rgb, bg rgb)] per cell, per line."""
    out = []
    for line in heatmap.lines():
        row = []
        for seg in line:
            style = seg.style
            fg = rgb(style.color) if style is not None and style.color is not None else None
            bg = rgb(style.bgcolor) if style is not None and style.bgcolor is not None else None
            row.extend((ch, fg, bg) for ch in seg.text)
        out.append(row)
    return out


def level(v: float) -> int:
    return int(round(v * 255))


def test_palette_ends():
    assert len(PALETTE_RGB) == 256
    assert PALETTE_RGB[0] == (0, 0, 4)  # inferno: black for no attention
    assert PALETTE_RGB[255] == (252, 255, 164)  # pale yellow for all of it
    brightness = [sum(c) for c in PALETTE_RGB]
    assert brightness == sorted(brightness)  # monotone: more attention is always brighter


def test_known_matrix_truecolor_cells():
    # query 0 sees key 0 only; query 1 splits 0.25 / 0.75
    m = np.array([[1.0, np.nan], [0.25, 0.75]])
    cells = grid(Heatmap.from_matrix(m, "linear", mode="truecolor"))
    assert len(cells) == 1  # two query rows per terminal line
    (c0, c1) = cells[0]
    assert c0 == ("▀", PALETTE_RGB[255], PALETTE_RGB[level(0.25)])
    # key 1 is after query 0: only the lower half is drawn
    assert c1 == ("▄", PALETTE_RGB[level(0.75)], None)


def test_odd_rows_leave_the_last_lower_half_empty():
    m = np.tril(np.full((3, 3), 1 / 3))
    m[0, 0], m[1, :2] = 1.0, 0.5
    cells = grid(Heatmap.from_matrix(m, "linear"))
    assert len(cells) == 2
    assert [c[0] for c in cells[1]] == ["▀", "▀", "▀"]
    assert all(c[2] is None for c in cells[1])  # no fourth row: no background
    assert cells[1][0][1] == PALETTE_RGB[level(1 / 3)]


def test_scales():
    w = np.array([0.1, 0.2, 0.7], dtype=np.float32)
    np.testing.assert_allclose(scale_row(w, "linear"), w)
    np.testing.assert_allclose(scale_row(w, "rowmax"), w / 0.7, rtol=1e-6)
    np.testing.assert_allclose(scale_row(w, "sqrt"), np.sqrt(w), rtol=1e-6)
    nosink = scale_row(np.array([0.9, 0.02, 0.08], dtype=np.float32), "nosink")
    assert np.isnan(nosink[0])
    np.testing.assert_allclose(nosink[1:], [0.25, 1.0], rtol=1e-6)
    assert to_levels(nosink)[0] == EXCLUDED
    assert scale_row(np.zeros(3, np.float32), "rowmax").tolist() == [0, 0, 0]


def test_sink_column_is_grey():
    m = np.array([[1.0, np.nan], [0.9, 0.1]])
    cells = grid(Heatmap.from_matrix(m, "nosink"))
    assert cells[0][0] == ("▀", EXCLUDED_RGB, EXCLUDED_RGB)
    assert cells[0][1] == ("▄", PALETTE_RGB[255], None)  # 0.1 is the row's maximum without the sink


def test_row_levels_window_and_mask():
    w = np.array([0.5, 0.25, 0.25], dtype=np.float32)
    assert row_levels(w, "linear", 1, 5).tolist() == [level(0.25), level(0.25), MASKED, MASKED]
    assert row_levels(None, "linear", 0, 3).tolist() == [MASKED] * 3


def test_monochrome_fallback_uses_shades_and_no_colour():
    m = np.array(
        [
            [1.0, np.nan, np.nan, np.nan, np.nan],
            [0.5, 0.5, np.nan, np.nan, np.nan],
            [0.0, 0.3, 0.7, np.nan, np.nan],
            [0.05, 0.25, 0.45, 0.25, np.nan],
            [0.0, 0.1, 0.3, 0.5, 0.95],
        ]
    )
    heatmap = Heatmap.from_matrix(m, "linear", mode="mono")
    cells = grid(heatmap)
    assert len(cells) == 5  # one query row per line
    assert ["".join(c[0] for c in row) for row in cells] == [
        "█    ",
        "▒▒   ",
        "·░▓  ",
        "·░▒░ ",
        "··░▒█",
    ]
    assert all(c[1] is None and c[2] is None for row in cells for c in row)
    sink = grid(Heatmap.from_matrix(m[:2, :2], "nosink", mode="mono"))
    assert sink[1][0][0] == "×"


def test_256_colour_fallback():
    m = np.array([[1.0, np.nan], [0.25, 0.75]])
    heatmap = Heatmap.from_matrix(m, "linear", mode="256")
    seg = heatmap.lines()[0][0]
    assert seg.style.color.type == ColorType.EIGHT_BIT
    assert seg.style.bgcolor.type == ColorType.EIGHT_BIT
    assert seg.style.color.number == Color.from_rgb(*PALETTE_RGB[255]).downgrade(ColorSystem.EIGHT_BIT).number
    assert seg.style.color.number != seg.style.bgcolor.number
    # the terminal's 256-colour console prints only 38;5 / 48;5 codes
    console = Console(color_system="256", force_terminal=True, width=10, record=True)
    with console.capture() as capture:
        console.print(heatmap)
    out = capture.get()
    assert "38;5;" in out and "48;5;" in out and "38;2;" not in out


def test_detect_mode():
    assert detect_mode(Console(color_system="truecolor", force_terminal=True)) == "truecolor"
    assert detect_mode(Console(color_system="256", force_terminal=True)) == "256"
    assert detect_mode(Console(color_system="standard", force_terminal=True)) == "mono"
    assert detect_mode(Console(color_system="truecolor", force_terminal=True), no_color=True) == "mono"
    assert detect_mode(Console(color_system="standard", force_terminal=True), headless=True) == "truecolor"


def test_one_by_one():
    cells = grid(Heatmap.from_matrix(np.array([[1.0]]), "linear"))
    assert cells == [[("▀", PALETTE_RGB[255], None)]]
    assert grid(Heatmap.from_matrix(np.array([[1.0]]), "linear", mode="mono")) == [[("█", None, None)]]
    # with the cursor gutter and the key axis
    heatmap = Heatmap(matrix_levels(np.array([[1.0]])), cursor_row=0, cursor_col=0, axis=True)
    lines = grid(heatmap)
    assert [c[0] for c in lines[0]] == ["▀", "▀"]  # gutter mark (upper row) then the cell
    assert [c[0] for c in lines[1]] == [" ", "▲"]


def test_cursor_gutter_marks_the_half():
    m = np.tril(np.full((4, 4), 0.25))
    lines = grid(Heatmap(matrix_levels(m), cursor_row=3))
    assert [row[0][0] for row in lines] == [" ", "▄"]  # row 3 is the lower half of line 1
    lines = grid(Heatmap(matrix_levels(m), cursor_row=2, mode="mono"))
    assert [row[0][0] for row in lines] == [" ", " ", "▶", " "]


def test_axis_labels_stay_clear_of_the_cursor():
    m = np.tril(np.full((2, 12), 0.5))
    text = "".join(c[0] for c in grid(Heatmap(matrix_levels(m), cursor_col=11, axis=True,
                                              axis_labels=("0", "11")))[-1])
    assert text == "0       11 ▲"


def test_two_thousand_token_matrix():
    # what real heads look like: a sink on the first token, a local band, a little noise
    rng = np.random.default_rng(0)
    n = 2000
    i, j = np.indices((n, n), dtype=np.float32)
    m = np.exp(-np.abs(i - j) / 8.0) + 0.02 * (rng.random((n, n), dtype=np.float32) > 0.995)
    m[:, 0] += 5.0
    m = np.tril(m)
    m /= m.sum(axis=1, keepdims=True)
    m[np.triu_indices(n, 1)] = np.nan
    # the whole matrix: every row and key drawn, 1000 lines of 2000 cells
    start = time.perf_counter()
    levels = matrix_levels(m, "rowmax")
    lines = Heatmap(levels).lines()
    took = time.perf_counter() - start
    assert len(lines) == 1000
    assert all(sum(len(s.text) for s in line) == n for line in lines)
    last = grid(Heatmap(levels[-2:]))[0]
    top = m[-2] / np.nanmax(m[-2])
    bottom = m[-1] / np.nanmax(m[-1])
    for j in (0, 7, 1998):
        assert last[j][1] == PALETTE_RGB[level(top[j])]
        assert last[j][2] == PALETTE_RGB[level(bottom[j])]
    assert last[1999] == ("▄", PALETTE_RGB[level(bottom[1999])], None)
    assert took < 30.0  # a sanity bound only; the benchmark measures the real frame


@pytest.mark.parametrize("mode", ["truecolor", "256", "mono"])
def test_renders_through_rich(mode):
    console = Console(width=40, force_terminal=True, color_system="truecolor", record=True)
    m = np.tril(np.full((6, 6), 1 / 6))
    console.print(Heatmap.from_matrix(m, mode=mode, cursor_row=5, cursor_col=5, axis=True))
    text = console.export_text()
    assert "▲" in text
