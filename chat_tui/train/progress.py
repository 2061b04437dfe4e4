"""Seeing a run train: a Rich progress bar and a live loss chart in the terminal.

`LossChart` is a plain Rich renderable (braille dots, train and validation curves), so the same
chart can be shown by the Textual app in a Static widget, fed from metrics.jsonl.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.text import Text

from chat_tui.engine.files import format_duration

# Braille: each character is a 2 x 4 grid of dots; bit values by (column, row).
_DOTS = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))


class LossChart:
    """Train (and validation) loss against step, drawn with braille dots."""

    def __init__(self, width: int | None = None, height: int = 10) -> None:
        self.width = width
        self.height = height
        self.train: list[tuple[float, float]] = []
        self.val: list[tuple[float, float]] = []

    def add(self, entry: dict) -> None:
        step = entry.get("step")
        if step is None:
            return
        if isinstance(entry.get("loss"), (int, float)) and math.isfinite(entry["loss"]):
            self.train.append((float(step), float(entry["loss"])))
        if isinstance(entry.get("val_loss"), (int, float)) and math.isfinite(entry["val_loss"]):
            self.val.append((float(step), float(entry["val_loss"])))

    @classmethod
    def from_metrics(cls, rows: Sequence[dict], **kwargs) -> LossChart:
        chart = cls(**kwargs)
        for row in rows:
            chart.add(row)
        return chart

    def render_lines(self, width: int) -> list[Text]:
        label_width = 7
        cols = max(10, width - label_width - 1)
        rows = max(3, self.height)
        points = self.train + self.val
        if not points:
            return [Text("  waiting for the first logged step…", style="dim")]
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        x0, x1 = min(xs), max(xs)
        y0, y1 = min(ys), max(ys)
        if y1 - y0 < 1e-9:
            y0, y1 = y0 - 0.5, y1 + 0.5
        if x1 - x0 < 1e-9:
            x1 = x0 + 1
        W, H = cols * 2, rows * 4
        grid = [[0] * cols for _ in range(rows)]
        style = [[""] * cols for _ in range(rows)]

        def dot(px: int, py: int, colour: str) -> None:
            if 0 <= px < W and 0 <= py < H:
                r, c = py // 4, px // 2
                grid[r][c] |= _DOTS[px % 2][py % 4]
                style[r][c] = colour

        def to_px(x: float, y: float) -> tuple[int, int]:
            px = round((x - x0) / (x1 - x0) * (W - 1))
            py = round((y1 - y) / (y1 - y0) * (H - 1))
            return px, py

        for series, colour in ((self.train, "cyan"), (self.val, "magenta")):
            previous = None
            for x, y in series:
                px, py = to_px(x, y)
                if previous is None:
                    dot(px, py, colour)
                else:  # a straight line from the previous point
                    qx, qy = previous
                    n = max(abs(px - qx), abs(py - qy), 1)
                    for i in range(n + 1):
                        dot(round(qx + (px - qx) * i / n), round(qy + (py - qy) * i / n), colour)
                previous = (px, py)

        lines = []
        for r in range(rows):
            if r == 0:
                label = f"{y1:>{label_width}.3f}"
            elif r == rows - 1:
                label = f"{y0:>{label_width}.3f}"
            else:
                label = " " * label_width
            line = Text(label + "┤", style="dim")
            for c in range(cols):
                ch = chr(0x2800 + grid[r][c]) if grid[r][c] else " "
                line.append(ch, style=style[r][c] or None)
            lines.append(line)
        axis = Text(" " * label_width + "└" + "─" * cols, style="dim")
        left, right = f"step {int(x0)}", f"{int(x1)}"
        foot = Text(" " * (label_width + 1) + left + " " * max(1, cols - len(left) - len(right)) + right, style="dim")
        legend = Text(" " * (label_width + 1))
        legend.append("⣿ train", style="cyan")
        if self.val:
            legend.append("   ⣿ validation", style="magenta")
        return [*lines, axis, foot, legend]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = self.width or options.max_width
        yield from self.render_lines(width)


class ConsoleProgress:
    """The terminal view of a run: progress bar + loss chart on a TTY, one line per log otherwise."""

    def __init__(self, total_steps: int | None, *, time_budget: float | None = None, title: str = "training",
                 console: Console | None = None, live: bool | None = None) -> None:
        self.console = console or Console(file=sys.stdout)
        self.live_mode = self.console.is_terminal if live is None else live
        self.total = total_steps
        self.time_budget = time_budget
        self.chart = LossChart(height=10)
        self.last_val: float | None = None
        self.title = title
        self._live = None
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=None),
            TaskProgressColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            expand=True,
        )
        self.task = self.progress.add_task(title, total=total_steps or 100, info="starting…")

    def __enter__(self) -> ConsoleProgress:
        if self.live_mode:
            from rich.live import Live

            self._live = Live(Group(self.progress, self.chart), console=self.console, refresh_per_second=4,
                              transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None

    def log(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def update(self, entry: dict) -> None:
        self.chart.add(entry)
        if "val_loss" in entry:
            self.last_val = entry["val_loss"]
        step = entry.get("step", 0)
        parts = [f"step {step}" + (f"/{self.total}" if self.total else ""), f"loss {entry.get('loss', float('nan')):.4f}"]
        if self.last_val is not None:
            parts.append(f"val {self.last_val:.4f}")
        if "val_bpb" in entry:
            parts.append(f"{entry['val_bpb']:.3f} bpb")
        parts.append(f"{entry.get('tokens_per_s', 0):,.0f} tok/s")
        parts.append(f"lr {entry.get('lr', 0):.2e}")
        parts.append(f"left {format_duration(entry.get('eta_s'))}")
        info = "  ".join(parts)
        if self.total:
            completed = step
        elif self.time_budget:
            completed = 100 * min(1.0, entry.get("elapsed_s", 0) / self.time_budget)
        else:
            completed = 0
        self.progress.update(self.task, completed=completed, info=info)
        if not self.live_mode:
            self.console.print(info, markup=False, highlight=False, soft_wrap=True)
