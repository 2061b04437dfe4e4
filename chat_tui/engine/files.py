"""Writing files so that a crash, Ctrl-C or a full disk never leaves half of one (no torch here:
the app's settings use it too)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder, fsync, rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these are ordinary files others may read
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def free_path(path: Path, siblings: tuple[str, ...] = ()) -> Path:
    """`path`, or `name-2.ext`, `name-3.ext`, … : the first that does not exist yet.

    `siblings` are other suffixes written next to it (an export's .svg and .safetensors): a name is
    free only when none of them exists either.
    """
    stem, suffix = path.stem, path.suffix
    candidate, n = path, 1
    while candidate.exists() or any(candidate.with_suffix(s).exists() for s in siblings):
        n += 1
        candidate = path.with_name(f"{stem}-{n}{suffix}")
    return candidate


def format_duration(seconds: float | None, missing: str = "--:--") -> str:
    """`mm:ss`, or `h:mm:ss` from an hour up; `missing` for None, NaN or infinity."""
    import math

    if seconds is None or not math.isfinite(seconds):
        return missing
    whole = int(round(seconds))
    h, rest = divmod(whole, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
