"""SVG snapshots of the compare screen (pytest-textual-snapshot): two columns, the divergence marked.

Update after an intended change with: pytest tests/ui/test_compare_snapshots.py --snapshot-update
"""

from __future__ import annotations

import dataclasses

import pytest

from chat_tui.config import get_paths
from chat_tui.engine.fake import FakeEngine
from chat_tui.engine.params import SamplingParams
from chat_tui.ui import compare
from chat_tui.ui.app import ChatApp
from chat_tui.ui.compare import CompareScreen

from .conftest import ready, wait_for

GREEDY, SAMPLED = "The capital of France is Paris, of course.", "The capital of France is a city of light and cafés."


@pytest.fixture
def steady(home, monkeypatch):
    # the speed is wall-clock time: a picture needs a fixed one
    stats = compare.column_stats
    monkeypatch.setattr(compare, "column_stats", lambda steps: dataclasses.replace(stats(steps), tokens_per_s=42.0))
    return home


def make() -> ChatApp:
    engine = FakeEngine([lambda conversation, params: GREEDY if params.greedy else SAMPLED],
                        defaults=SamplingParams(temperature=0.0, seed=7))
    for text in ("capital of France?", GREEDY, SAMPLED):  # the columns' threads would number new words in any order
        engine.encode(text)
    return ChatApp(engine_factory=lambda: engine, paths=get_paths(), new=True)


async def two_columns(pilot) -> None:
    app = pilot.app
    await ready(pilot, app)
    app.prompt_input.cursor_blink = False
    app.prompt_input.load_text("capital of France?")
    await pilot.press("f9")
    await wait_for(pilot, lambda: isinstance(app.screen, CompareScreen), what="the compare screen")
    screen = app.screen
    await wait_for(pilot, lambda: len(screen.runs) == 2 and not screen.streaming
                   and all(run.steps for run in screen.runs), what="both columns")
    await pilot.pause(0.1)


def test_compare_screen_120x40(snap_compare, steady):
    assert snap_compare(make(), terminal_size=(120, 40), run_before=two_columns)


def test_compare_screen_80x24(snap_compare, steady):
    assert snap_compare(make(), terminal_size=(80, 24), run_before=two_columns)
