"""Stop strings that never leak into the released text, however the stream is cut.

Pure Python (no torch): the decode loops of every backend feed it the text each token adds.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringFilter:
    """Hold back text only while it could still become a stop string; swallow the stop string.

    `feed(text)` returns the text that is safe to show now and whether a stop string appeared.
    When one appears, everything before it is released, and the stop string and anything after
    it are swallowed (later feeds return ``("", True)``). The match chosen is the one that is
    complete first in the stream (the smallest end; on a tie, the longest), so the result does not
    depend on how the text was cut into feeds. `flush()` releases what is still held back once the
    stream ends without a stop. With no stop strings, text passes straight through.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        if isinstance(stops, str):
            stops = (stops,)
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(s for s in stops if s))
        # every proper prefix of a stop string: a tail of the text equal to one of these is held back
        self._prefixes = frozenset(s[:i] for s in self.stops for i in range(1, len(s)))
        self._longest_prefix = max((len(s) - 1 for s in self.stops), default=0)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the stream

    @property
    def held(self) -> str:
        """The text held back for now (it could be the start of a stop string)."""
        return self._held

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        if not text:
            return "", False
        buffer = self._held + text
        best: tuple[int, int, str] | None = None  # (end, -length, stop)
        for stop in self.stops:
            start = buffer.find(stop)
            if start >= 0:
                key = (start + len(stop), -len(stop), stop)
                if best is None or key < best:
                    best = key
        if best is not None:
            end, neg_length, stop = best
            self._held = ""
            self.stopped = True
            self.matched = stop
            return buffer[: end + neg_length], True
        hold = 0
        for length in range(min(len(buffer), self._longest_prefix), 0, -1):
            if buffer[-length:] in self._prefixes:
                hold = length
                break
        if hold:
            self._held = buffer[-hold:]
            return buffer[:-hold], False
        self._held = ""
        return buffer, False

    def flush(self) -> str:
        """Release the text held back (at the end of a stream that did not stop)."""
        if self.stopped:
            return ""
        held, self._held = self._held, ""
        return held
