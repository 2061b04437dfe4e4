"""The inspector's export without an app: one free name for the SVG and the safetensors together."""

from __future__ import annotations

import json

import numpy as np
import pytest
from rich.text import Text

from chat_tui.ui.attention.export import attention_tensors, svg_document, write_export
from chat_tui.ui.attention.store import AttentionStore
from tests.ui.attention.harness import fake_engine, fake_steps


def test_an_export_never_overwrites_either_file(tmp_path):
    (tmp_path / "attention-1.svg").write_text("old view")
    (tmp_path / "attention-1-2.safetensors").write_bytes(b"old tensors")
    first = write_export(tmp_path, "attention-1", "<svg/>", None)
    assert [p.name for p in first] == ["attention-1-3.svg"]
    assert (tmp_path / "attention-1.svg").read_text() == "old view"
    second = write_export(tmp_path / "new", "attention-1", "<svg/>", None)
    assert [p.name for p in second] == ["attention-1.svg"]  # the folder is made


def test_the_tensors_and_their_metadata_round_trip(tmp_path):
    safetensors = pytest.importorskip("safetensors.numpy")
    engine = fake_engine()
    store = AttentionStore()
    for step in fake_steps(engine):
        store.add_step(step)
    tensors = attention_tensors(store, engine)
    svg, saved = write_export(tmp_path, "attention-2", "<svg/>", tensors)
    assert svg.suffix == ".svg" and saved == tmp_path / "attention-2.safetensors"
    arrays = safetensors.load_file(str(saved))
    assert arrays["attention"].dtype == np.float16 and arrays["token_ids"].tolist() == store.ids
    with open(saved, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
    assert header["backend"] == "fake" and header["model"] == engine.model_name
    assert json.loads(header["tokens"]) == store.tokens and header["prompt_length"] == str(store.prompt_length)


def test_the_svg_has_every_part_and_the_title():
    svg = svg_document([Text("Heatmap 1/6"), Text("[bold]not markup[/bold]")], 40, "chat-tui attention · Heatmap")
    assert "chat-tui&#160;attention&#160;·&#160;Heatmap" in svg and "Heatmap&#160;1/6" in svg
    assert "[bold]not&#160;markup[/bold]" in svg
