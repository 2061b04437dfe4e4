"""Durations as people type them ("90s", "10m", "1h30m"), for --time-budget and the training screen.

Kept apart from the training loop so that reading one imports no torch.
"""

from __future__ import annotations

import re


def parse_duration(text: str) -> float:
    """'90', '90s', '10m', '1h', '1h30m' → seconds."""
    raw = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", raw):
        value = float(raw)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", raw)
        if not parts or "".join(f"{n}{u}" for n, u in parts) != re.sub(r"\s+", "", raw):
            raise ValueError(f"cannot read the duration {text!r} (use e.g. 90s, 10m, 1h30m)")
        value = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)
    if value <= 0:
        raise ValueError(f"the duration {text!r} must be positive")
    return value
