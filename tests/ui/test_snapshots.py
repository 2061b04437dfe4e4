"""SVG snapshots (pytest-textual-snapshot) of the main screen and the conversation list.

Update after an intended change with: pytest tests/ui/test_snapshots.py --snapshot-update
"""

from __future__ import annotations

import pytest

from chat_tui.config import get_paths
from chat_tui.engine.fake import FakeEngine
from chat_tui.engine.params import SamplingParams
from chat_tui.store import Store
from chat_tui.ui.app import ChatApp
from chat_tui.ui.state import GenJob

from .conftest import CODE_REPLY, inspector_ready, send, wait_for


class Clock:
    """A deterministic clock for the store: 2025-03-01 12:00 UTC, one minute per call."""

    def __init__(self) -> None:
        self.t = 1_740_830_400.0

    def __call__(self) -> float:
        self.t += 60
        return self.t


@pytest.fixture
def steady(home, monkeypatch):
    # wall-clock figures would change every run
    monkeypatch.setattr(GenJob, "tokens_per_s", property(lambda self: 42.0 if self.count > 1 else None))
    monkeypatch.setenv("TZ", "UTC")
    import time

    time.tzset()
    return home


def make(replies) -> ChatApp:
    store = Store(get_paths().database, now=Clock())
    engine = FakeEngine(replies, defaults=SamplingParams(temperature=0.8, top_p=0.95, seed=7))
    return ChatApp(engine_factory=lambda: engine, paths=get_paths(), store=store, new=True)


async def one_exchange(pilot) -> None:
    app = pilot.app
    await wait_for(pilot, lambda: app.engine is not None)
    # the inspector is mounted just after the first frame: a reply sent before that reached it
    # only in part (the picture then depended on how fast the machine was)
    await inspector_ready(pilot, app)
    app.prompt_input.cursor_blink = False
    await send(pilot, app, "Write an add function in Python")
    # the inspector redraws on a 10 Hz timer: wait until it has drawn the whole reply, so the
    # picture is the one a user sees, not whichever frame the timer had reached (a loaded CI
    # machine caught it one frame later than this snapshot did)
    pane = app._inspector_pane()
    if pane is not None and pane.display:
        await wait_for(pilot, lambda: pane.last_step is not None and pane.last_step.finish_reason is not None
                       and not pane._dirty, what="the inspector's last frame")
        # where the heatmap's window stands depends on which frames the 10 Hz timer drew while the
        # reply streamed (it jumps when the newest token leaves it): start it over, as a new reply
        # does, so that the picture does not depend on the machine's speed
        pane.state.first_row = pane.state.first_key = 0
        pane.redraw()
    await pilot.pause(0.1)


def test_main_screen_120x40(snap_compare, steady):
    assert snap_compare(make([CODE_REPLY]), terminal_size=(120, 40), run_before=one_exchange)


def test_main_screen_80x24(snap_compare, steady):
    assert snap_compare(make([CODE_REPLY]), terminal_size=(80, 24), run_before=one_exchange)


@pytest.mark.parametrize("size", [(80, 24), (120, 40), (200, 50)])
def test_conversation_list(snap_compare, steady, size):
    store = Store(get_paths().database, now=Clock())
    for title, n in (("Sourdough starter schedule", 6), ("Explain attention [in] transformers", 12),
                     ("Rust borrow checker question", 4), ("Trip to Lisbon", 8)):
        cid = store.create_conversation(title, model="minigpt")
        store.add_messages(cid, [("user" if i % 2 == 0 else "assistant", f"{title}, message {i}") for i in range(n)])
    store.close()

    async def open_list(pilot) -> None:
        app = pilot.app
        await wait_for(pilot, lambda: app.engine is not None)
        app.prompt_input.cursor_blink = False
        await pilot.press("ctrl+o")
        await pilot.pause(0.1)

    assert snap_compare(make(["x"]), terminal_size=size, run_before=open_list)


def test_main_screen_200x50(snap_compare, steady):
    assert snap_compare(make([CODE_REPLY]), terminal_size=(200, 50), run_before=one_exchange)


def _maximised_inspector(view_key: str):
    async def run(pilot) -> None:
        await one_exchange(pilot)
        pilot.app.action_maximize("inspector")
        pane = pilot.app._inspector_pane()
        await pilot.press(view_key)
        await pilot.pause(0.2)
        pane.redraw()
        await pilot.pause(0.1)

    return run


@pytest.mark.parametrize("view_key", ["1", "2", "3", "4", "5", "6"])
def test_maximised_inspector_120x40(snap_compare, steady, view_key):
    assert snap_compare(make([CODE_REPLY]), terminal_size=(120, 40), run_before=_maximised_inspector(view_key))


def test_maximised_inspector_200x50(snap_compare, steady):
    assert snap_compare(make([CODE_REPLY]), terminal_size=(200, 50), run_before=_maximised_inspector("1"))


async def _full_sampling(pilot) -> None:
    await one_exchange(pilot)
    await pilot.press("f5")
    await pilot.pause(0.2)


@pytest.mark.parametrize("size", [(80, 24), (120, 40), (200, 50)])
def test_full_sampling_pane(snap_compare, steady, size):
    assert snap_compare(make([CODE_REPLY]), terminal_size=size, run_before=_full_sampling)




def test_lens_gutter_and_lens_view_120x40(snap_compare, steady):
    """The gutter under the reply, and the inspector's lens view for the reply's last token."""

    def lens_cells(gutter) -> str:
        return str(gutter.render()).split("\n", 1)[1]

    async def run_before(pilot) -> None:
        app = pilot.app
        await wait_for(pilot, lambda: app.engine is not None)
        await pilot.press("f10")
        await one_exchange(pilot)
        gutter = app.conversation.view_for(app.conversation.items[-1]).lens_gutter
        n = len(app.conversation.items[-1].token_probs)
        await wait_for(pilot, lambda: len(lens_cells(gutter)) == n and " " not in lens_cells(gutter),
                       what="the gutter's layers")
        pane = app.inspector
        pane.action_show_view("lens")
        await wait_for(pilot, lambda: "commitment layer" in str(pane.render_view(60, 30)), what="the lens")
        pane.redraw()
        app.clear_notifications()  # the F10 notice times out: the picture must not depend on when
        await pilot.pause(0.2)

    reply = "The quick brown fox jumps over the lazy dog."
    assert snap_compare(make([reply]), terminal_size=(120, 40), run_before=run_before)
