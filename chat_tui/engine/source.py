"""What a model argument names, decided without loading anything (no torch, no transformers).

The Load model dialog uses it to refuse a mistyped path at once; the Hugging Face loader uses the
same rules before it looks in the cache or downloads.
"""

from __future__ import annotations

import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def looks_like_hub_id(text: str) -> bool:
    return bool(HUB_ID.match(text)) and ".." not in text and len(text) <= 96 and not text.endswith((".", "-"))


def source_problem(text: str) -> str | None:
    """Why `text` can name no model (a missing path that is not a hub id, or a file), else None."""
    path = Path(text).expanduser()
    if path.exists():
        return None if path.is_dir() else f"{text}: not a folder (a model is a folder with config.json and weights)"
    return None if looks_like_hub_id(text) else f"{text}: no such folder"


def is_server_url(text: str) -> bool:
    """Whether `text` names an OpenAI-compatible server (http:// or https://) rather than a model here."""
    return text.lower().startswith(("http://", "https://"))
