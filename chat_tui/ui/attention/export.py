"""The inspector's export (`x`): the view as an SVG and the reply's attention as safetensors, side by
side under one free name (attention-YYYYmmdd-HHMMSS[-n].svg / .safetensors). No Textual here."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
from rich.console import Console, RenderableType

from chat_tui.engine.files import free_path
from chat_tui.engine.types import Engine
from chat_tui.ui.attention.store import AttentionStore

FORMAT = "chat-tui attention 1"


def svg_document(parts: list[RenderableType], width: int, title: str) -> str:
    """`parts` printed one under the other, `width` cells wide, as an SVG document."""
    console = Console(record=True, width=width, file=io.StringIO(), force_terminal=True,
                      color_system="truecolor", legacy_windows=False)
    for part in parts:
        console.print(part)
    return console.export_svg(title=title)


def attention_tensors(store: AttentionStore, engine: Engine | None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The reply's attention as safetensors-ready arrays and metadata (token texts as JSON)."""
    positions, attention = store.dense()
    tensors = {
        "attention": attention,  # float16 (layers, heads, rows, keys)
        "positions": positions,  # the query position of each row
        "token_ids": np.asarray(store.ids, dtype=np.int64),
    }
    metadata = {
        "format": FORMAT,
        "tokens": json.dumps(store.tokens, ensure_ascii=False),
        "prompt_length": str(store.prompt_length),
        "spans": json.dumps([[s.message_index, s.role, s.start, s.end] for s in store.spans]),
        "layers": str(store.n_layers),
        "heads": str(store.n_heads),
        "dropped_rows": str(store.dropped_rows),
        "seed": "" if store.seed is None else str(store.seed),
        "model": (engine.model_name if engine is not None else "") or "",
        "backend": (engine.backend if engine is not None else "") or "",
        "checkpoint_hash": (engine.checkpoint_hash if engine is not None else "") or "",
    }
    return tensors, metadata


def export_stem() -> str:
    """The name of an export made now (before the free-name suffix)."""
    return time.strftime("attention-%Y%m%d-%H%M%S")


def write_export(folder: Path, stem: str, svg: str,
                 tensors: tuple[dict[str, np.ndarray], dict[str, str]] | None) -> list[Path]:
    """Write the SVG (and the tensors with their metadata) under the first free `stem[-n]` in
    `folder`; the paths written, the SVG first."""
    folder.mkdir(parents=True, exist_ok=True)
    svg_path = free_path(folder / f"{stem}.svg", siblings=(".safetensors",))
    svg_path.write_text(svg, encoding="utf-8")
    written = [svg_path]
    if tensors is not None:
        from safetensors.numpy import save_file

        path = svg_path.with_suffix(".safetensors")
        arrays, metadata = tensors
        save_file(arrays, str(path), metadata=metadata)
        written.append(path)
    return written
