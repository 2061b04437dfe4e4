"""The inside views in the whole app (FakeEngine via `make_app`): the tokens view follows the input
box and a chosen message; "Continue with these heads off" regenerates the reply with those heads off."""

from __future__ import annotations

from chat_tui.engine.inside import head_name
from chat_tui.ui.reply import details_line
from tests.ui.attention.test_pane import view_text as pane_text
from tests.ui.conftest import ready, send, wait_for

REPLY = "The quick brown fox jumps over the lazy dog."


def view_text(pane) -> str:
    """The view's words on one line (a narrow pane wraps them)."""
    return " ".join(pane_text(pane).split())


async def test_continue_with_heads_off_regenerates_the_reply_from_the_cursor_with_those_heads(make_app):
    app, engine = make_app([REPLY])
    layer, head = engine.decisive_head
    async with app.run_test(size=(160, 40)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "Say the pangram")
        pane = app.inspector
        await wait_for(pilot, lambda: pane.store.generated > 0, what="the inspector to fill")
        pane.focus()
        await pilot.press("0", *["]"] * layer, *["}"] * head, "k", *["up"] * 4)
        await wait_for(pilot, lambda: "the top token changes" in view_text(pane), what="the knock-out")
        cut_from = pane.position
        kept = "".join(pane.store.step_at(i).text for i in range(pane.store.prompt_length, cut_from))
        calls = len(engine.records)
        await pilot.press("c")
        await wait_for(pilot, lambda: len(engine.records) > calls and app.job is None and app.settled,
                       what="the continuation")
        record = engine.records[-1]
        assert record.knock_out == frozenset({(layer, head)})
        # the engine was asked to go on from the cursor's token, not from the end of the reply
        assert record.conversation[-1].role == "assistant" and record.conversation[-1].content == kept
        item = app.conversation.items[-1]
        assert item.content == REPLY
        assert f"heads off: {head_name(layer, head)}" in details_line(item)
        assert item.meta["knocked_out"] == [head_name(layer, head)]


async def test_tokens_view_follows_the_input_box_as_you_type_and_a_chosen_message(make_app):
    app, _ = make_app(["Hello there."])
    async with app.run_test(size=(160, 40)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "hi")
        pane = app.inspector
        pane.action_show_view("tokens")
        app.prompt_input.focus()
        await pilot.press("H", "i", "space")
        await wait_for(pilot, lambda: "input box: 2 tokens" in view_text(pane), what="the tokens of 'Hi '")
        await pilot.press("你")
        await wait_for(pilot, lambda: "input box: 5 tokens" in view_text(pane), what="the bytes of 你")
        assert "<0xE4>" in view_text(pane)
        app.prompt_input.clear()
        await pilot.press("ctrl+up")
        await wait_for(pilot, lambda: "assistant message: 3 tokens" in view_text(pane), what="the reply's tokens")
