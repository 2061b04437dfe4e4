"""The conversation pane and the prompt under hostile input: line breaks, bursts of keys, tiny
terminals, NaN probabilities, long conversations, huge pastes."""

from __future__ import annotations

from textual.widgets._markdown import MarkdownFence

from chat_tui.ui.conversation import MessageView

from .conftest import ready, send
from .test_app import screen_lines

VERSE = "Citizens:\nwey\nh!\nOf you our\nMENENIUS: hail"
FENCE = "```\nfirst  line\n    second\\\n```"


async def test_single_line_breaks_in_a_reply_are_shown_as_written(make_app):
    app, _ = make_app([f"{VERSE}\n\n{FENCE}\n\nafter the code"])
    async with app.run_test(size=(100, 40)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "a verse please")
        lines = [line.rstrip() for line in screen_lines(app)]
        for verse_line in VERSE.split("\n"):
            assert any(line.endswith(verse_line) for line in lines), f"{verse_line!r} on a line of its own"
        assert not any("wey h!" in line for line in lines), "lines are not joined"
        view = app.conversation.view_for(app.conversation.items[-1])
        assert isinstance(view, MessageView)
        (fence,) = view.query(MarkdownFence)
        assert fence.code.rstrip("\n") == "first  line\n    second\\", "the code block exactly as written"
        assert any(line.endswith("▌first  line") for line in lines)
        assert any(line.endswith("▌    second\\") for line in lines)
        assert app.conversation.items[-1].content.startswith(VERSE)
