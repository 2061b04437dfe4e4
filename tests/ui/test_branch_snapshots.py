"""SVG snapshots of branches: a reply with three versions, the second on screen (‹ 2/3 ›), and a reply
forked at a token the chain dropped, its receipt under it.

Update after an intended change with: pytest tests/ui/test_branch_snapshots.py --snapshot-update
"""

from __future__ import annotations

import pytest
from textual.widgets import OptionList

from chat_tui.ui.screens import PickScreen

from .conftest import send, wait_for
from .test_branches import focus_reply, switch
from .test_snapshots import make, steady  # noqa: F401 - the fixture

SIZES = [(120, 40), (80, 24)]


async def settle(pilot) -> None:
    app = pilot.app
    await wait_for(pilot, lambda: app.job is None and app.settled, what="the replies")
    pane = app._inspector_pane()
    if pane is not None and pane.display:
        await wait_for(pilot, lambda: not pane._dirty, what="the inspector's last frame")
    await pilot.pause(0.1)


async def three_versions(pilot) -> None:
    app = pilot.app
    await wait_for(pilot, lambda: app.engine is not None and app._inspector_pane() is not None)
    app.prompt_input.cursor_blink = False
    await send(pilot, app, "Name a colour")
    for calls in (2, 3):
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda calls=calls: app.engine.calls == calls and app.job is None and app.settled)
    await focus_reply(pilot, app)
    await switch(pilot, app, "left")
    await settle(pilot)


async def forked(pilot) -> None:
    app = pilot.app
    await wait_for(pilot, lambda: app.engine is not None and app._inspector_pane() is not None)
    app.prompt_input.cursor_blink = False
    await send(pilot, app, "Say four words")
    pane = app.inspector
    await wait_for(pilot, lambda: pane.store.generated >= 4, what="the inspector to take the reply in")
    if not pane.display:
        await pilot.press("f3")
    pane.focus()
    await pilot.press("6")  # the candidates view
    pane.state.cursor = pane.store.prompt_length + 2
    await pilot.press("F")
    await wait_for(pilot, lambda: isinstance(app.screen, PickScreen), what="the fork picker")
    dropped = next(i for i, name in enumerate(app.screen.names) if "dropped by top-p" in name)
    app.screen.query_one(OptionList).highlighted = dropped
    await pilot.press("enter")
    await wait_for(pilot, lambda: app.engine.calls == 2, what="the fork")
    app.prompt_input.focus()
    await settle(pilot)
    await pilot.press("f4")  # the colours: the forced token is marked
    app.clear_notifications()
    await pilot.pause(0.1)


def four_words(conversation, params) -> str:
    """Four words; a forked reply goes on from where the fork left it."""
    if conversation[-1].role == "assistant":
        return conversation[-1].content + " and on."
    return "alpha beta gamma delta"


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_a_reply_with_three_versions(snap_compare, steady, size):  # noqa: F811
    app = make(["Blue.", "Green, like grass.", "Red."])
    assert snap_compare(app, terminal_size=size, run_before=three_versions)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_a_reply_forked_at_a_dropped_token(snap_compare, steady, size):  # noqa: F811
    app = make([four_words])
    assert snap_compare(app, terminal_size=size, run_before=forked)
