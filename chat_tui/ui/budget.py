"""How often the UI redraws while a reply streams: as often as asked, unless it is already busy."""

from __future__ import annotations

import time


class UIBudget:
    """Says whether a periodic redraw may run now (call it from the UI thread).

    It may, unless the UI thread has used more than `share` of a core since the last redraw it
    allowed: on a slow terminal, a busy machine or with a fast model, the model's thread needs the
    same interpreter lock for every token. It never holds a redraw back longer than `max_gap` s.
    """

    def __init__(self, share: float, max_gap: float) -> None:
        self.share = share
        self.max_gap = max_gap
        self._wall = 0.0  # wall clock and UI thread CPU time at the last allowed redraw
        self._cpu = 0.0

    def allow(self) -> bool:
        now, cpu = time.perf_counter(), time.thread_time()
        since = now - self._wall
        if since < self.max_gap and cpu - self._cpu > self.share * since:
            return False
        self._wall, self._cpu = now, cpu
        return True
