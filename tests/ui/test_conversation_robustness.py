"""The conversation pane and the prompt under hostile input: line breaks, bursts of keys, tiny
terminals, NaN probabilities, long conversations, huge pastes."""

from __future__ import annotations

import dataclasses
import math

import pytest
from textual import events
from textual.keys import _character_to_key
from textual.widgets._markdown import MarkdownFence

from chat_tui.config import get_paths
from chat_tui.engine.fake import FakeEngine
from chat_tui.store import Store
from chat_tui.ui.conversation import MessageView
from chat_tui.ui.prompt import PROMPT_LIMIT

from .conftest import ready, send, wait_for
from .test_app import screen_lines

VERSE = "Citizens:\nwey\nh!\nOf you our\nMENENIUS: hail"
LONG = " ".join(f"word{i}" for i in range(150))
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


class NaNEngine(FakeEngine):
    """A FakeEngine whose every token reports the probabilities a broken checkpoint gives."""

    def stream(self, *args, **kwargs):
        for step in super().stream(*args, **kwargs):
            bad = (math.nan, math.inf, -math.inf)[step.index % 3]
            top = [dataclasses.replace(c, prob=bad, chain_prob=bad) for c in step.top]
            yield dataclasses.replace(step, prob=bad, chain_prob=bad, top=top)


async def test_nan_and_infinite_probabilities_never_crash_the_colours(make_app):
    app, _ = make_app(engine=NaNEngine(["some broken words here"]))
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await pilot.press("f4")  # token colours on while the reply streams
        await send(pilot, app, "go")
        assert app.is_running
        reply = app.conversation.items[-1]
        assert reply.status == "complete" and reply.content == "some broken words here"
        view = app.conversation.view_for(reply)
        rendered = view.query_one(".probs").render()
        assert "some broken words here" in str(rendered)
        await pilot.press("f4")
        await pilot.press("f4")
        assert app.is_running


def burst(app, text: str, *, then: tuple[str, ...] = ("enter",)) -> None:
    """Queue `text` and the keys `then` as one terminal write delivers them: all at once."""
    for char in text:
        key = char if char.isalnum() else _character_to_key(char)
        app.post_message(events.Key(key, char))
    for key in then:
        app.post_message(events.Key(key, "\r" if key == "enter" else None))


TYPED = ("The quick brown fox, typed by a paste tool: " + "jumps over the lazy dog; " * 10)[:281]


async def test_keys_that_arrive_with_enter_in_one_write_all_reach_the_prompt(make_app):
    app, engine = make_app(["ok"])
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        burst(app, TYPED, then=("enter", *"next"))
        await wait_for(pilot, lambda: len(app.conversation.items) == 2 and app.job is None and app.settled,
                       what="the reply")
        assert app.conversation.items[0].content == TYPED, "every key before Enter is in the prompt"
        assert engine.records[-1].conversation[-1].content == TYPED
        assert app.prompt_input.text == "next", "keys after Enter stay for the next prompt"
    (conversation,) = Store(get_paths().database).list_conversations()
    assert Store(get_paths().database).messages(conversation.id)[0].content == TYPED


async def test_a_pasted_newline_does_not_send(make_app):
    app, _ = make_app(["ok"])
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        app.post_message(events.Paste("first line\nsecond line\n"))
        await pilot.pause()
        assert app.prompt_input.text == "first line\nsecond line\n" and not app.conversation.items


@pytest.mark.parametrize("size", [(1, 10), (2, 40), (10, 3), (19, 30)])
async def test_any_terminal_size_is_survived_and_too_small_says_so(make_app, size):
    # 5 ms a token: the reply streams long enough to be seen starting and to be resized under
    # (an instant one could end between two polls of `app.job`, which made this test flaky)
    app, _ = make_app([LONG], token_delay=0.005)
    async with app.run_test(size=size) as pilot:
        await ready(pilot, app)
        await pilot.pause(0.1)
        assert app.is_running
        notice = app.query_one("#too-small")
        assert notice.display and "too small" in str(notice.render())
        assert not app.query_one("#body").display and not app.query_one("#prompt").display
        await pilot.resize_terminal(100, 30)
        await pilot.pause()
        assert not notice.display and app.query_one("#body").display and app.prompt_input.display
        app.prompt_input.load_text("after the resize")  # sent as Enter would (the key route is tested elsewhere)
        app.prompt_input.action_submit()
        await wait_for(pilot, lambda: app.job is not None, what="the reply to start")
        await pilot.resize_terminal(*size)  # small again while the reply streams
        await pilot.pause(0.05)
        await pilot.press("f1")  # a dialog opened at this size
        await pilot.pause(0.05)
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.job is None and app.settled, timeout=60, what="the reply")
        await pilot.resize_terminal(100, 30)
        await pilot.pause()
        assert app.is_running and app.conversation.items[-1].content == LONG
        assert any("word149" in line for line in screen_lines(app)), "the reply is drawn again"


async def test_a_long_session_keeps_a_bounded_number_of_messages_mounted(make_app):
    app, _ = make_app(["a reply\nin two lines"])
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        conversation = app.conversation
        conversation.page, conversation.max_mounted = 3, 6
        for n in range(8):
            await send(pilot, app, f"prompt {n}")
        mounted = list(conversation.query(MessageView))
        assert len(conversation.items) == 16 and len(mounted) == 6
        assert [v.item for v in mounted] == conversation.items[-6:], "the newest stay, in order"
        assert conversation.view_for(conversation.items[-1]).query_one(".body").display
        earlier = conversation.query_one("#earlier")
        assert earlier.display and "10" in str(earlier.label), "the button offers the unmounted ones"
        earlier.press()
        # the window moves up a page: three earlier messages mounted, the three newest unmounted (at most 6)
        await wait_for(pilot, lambda: [v.item for v in conversation.query(MessageView)] == conversation.items[-9:-3],
                       what="the window a page earlier")
        assert conversation.query_one("#later").display, "the button offers the newest again"
        assert all(item.meta.get("token_probs") is None for item in conversation.items), "one copy of the colours"
        assert conversation.items[-1].token_probs, "the colours are kept"


def notifications(app) -> list[str]:
    return [str(n.message) for n in app._notifications]


async def test_a_megabyte_paste_is_cut_with_a_notice_and_sends_whole(make_app):
    app, engine = make_app(["ok"], context_length=256)
    pasted = ("All work and no play makes Jack a dull boy.\n" * 24_000)[:1_000_000]
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        app.post_message(events.Paste(pasted))
        await pilot.pause()
        prompt_text = app.prompt_input.text
        assert prompt_text == pasted[:PROMPT_LIMIT]
        (notice,) = notifications(app)
        assert "1,000,000 characters" in notice and f"last {1_000_000 - PROMPT_LIMIT:,}" in notice
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(app.conversation.items) == 2 and app.job is None and app.settled,
                       timeout=60, what="the reply")
        user = app.conversation.items[0]
        assert user.content == prompt_text.strip("\n"), "what was in the prompt is sent and kept whole"
        view = app.conversation.view_for(user)
        assert "more characters not shown" in str(view.query_one(".body").render())
        view.action_copy_message()
        assert app.clipboard == user.content
        assert any("start of your message was cut" in n for n in notifications(app))


async def test_a_prompt_longer_than_the_context_says_what_was_cut(make_app):
    app, engine = make_app(["ok"], context_length=64)
    message = " ".join(f"w{i}" for i in range(300))
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, message)
        (notice,) = [n for n in notifications(app) if "context" in n]
        assert "the start of your message was cut" in notice and f"of its {len(message):,} characters" in notice
        seen = engine.records[-1]
        assert seen.conversation[-1].content == message, "the engine was given it all and cut it itself"
        assert "start of your message" in str(app.query_one("#status").render())


async def test_a_thousand_message_conversation_opens_and_pages_to_either_end_by_keys(make_app):
    store = Store(get_paths().database)
    cid = store.create_conversation("long")
    store.add_messages(cid, [("user" if i % 2 == 0 else "assistant", f"message {i}") for i in range(1000)])
    store.close()
    app, _ = make_app(["x"], conversation_id=cid, context_length=8192)  # the whole conversation fits
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: len(app.conversation.items) == 1000, what="the conversation")
        await ready(pilot, app)
        conversation = app.conversation

        def shown() -> list[str]:
            return [view.item.content for view in conversation.query(MessageView)]

        def focused_content() -> str | None:
            return app.focused.item.content if isinstance(app.focused, MessageView) else None

        assert shown()[-1] == "message 999" and len(shown()) == conversation.page
        assert any(line.rstrip().endswith("message 999") for line in screen_lines(app)), "opens at the end"
        await pilot.press("ctrl+up")  # the newest message takes the focus
        assert app.focused.item.content == "message 999"
        await pilot.press("home")
        await wait_for(pilot, lambda: focused_content() == "message 0" and conversation.scroll_y == 0, timeout=30,
                       what="the first message, scrolled to the top")  # 24 messages to lay out on a busy CI
        assert shown()[0] == "message 0"
        assert any(line.rstrip().endswith("message 0") for line in screen_lines(app)), "the top is on screen"
        for _ in range(conversation.page):  # Down walks on past the mounted page into the next
            await pilot.press("down")
        assert app.focused.item.content == f"message {conversation.page}"
        assert len(shown()) <= conversation.max_mounted
        await pilot.press("end")
        await wait_for(pilot, lambda: focused_content() == "message 999"
                       and any(line.rstrip().endswith("message 999") for line in screen_lines(app)),
                       what="the last message, on screen")
        assert shown()[-1] == "message 999"
        for _ in range(conversation.page):  # Up walks back past the mounted page into the one before
            await pilot.press("up")
        assert app.focused.item.content == f"message {999 - conversation.page}"
        await pilot.press("home")
        await send(pilot, app, "a new message")  # sending while paged back shows the newest again
        assert shown()[-2:] == ["a new message", "x"] and len(conversation.items) == 1002
