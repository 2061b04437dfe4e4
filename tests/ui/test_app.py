"""Pilot tests of the chat app against the deterministic FakeEngine."""

from __future__ import annotations

import html
import json
import re
import threading

import pytest
from textual.widgets import Markdown
from textual.widgets._markdown import MarkdownFence

from chat_tui.config import get_paths
from chat_tui.engine.fake import FakeEngine
from chat_tui.engine.params import SamplingParams
from chat_tui.engine.types import EngineError
from chat_tui.store import Store
from chat_tui.ui.app import ChatApp
from chat_tui.ui.conversation import MessageView
from chat_tui.ui.reply import receipt_text
from chat_tui.ui.sampling import ROWS, SamplingTable
from chat_tui.ui.screens import ConfirmScreen, ConversationListScreen, HelpScreen

from .conftest import CODE_REPLY, press_now, ready, send, wait_for

LONG_REPLY = " ".join(f"word{i}" for i in range(200))


def notifications(app: ChatApp) -> list[str]:
    return [str(n.message) for n in app._notifications]


def row_index(name: str) -> int:
    return next(i for i, row in enumerate(ROWS) if row.name == name)


async def test_send_streams_markdown_and_saves(make_app):
    app, engine = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "Write an add function")
        user, reply = app.conversation.items
        assert user.role == "user" and user.content == "Write an add function"
        assert reply.content == CODE_REPLY and reply.status == "complete"
        view = app.conversation.view_for(reply)
        assert view is not None and view.query(MarkdownFence), "the fenced code block renders as code"
        meta = str(view.query_one(".meta").render())
        # one line under the reply; the model and the seed are in the full receipt (i on the message)
        assert "tokens" in meta and "tok/s" in meta and "defaults · ended" in meta and "\n" not in meta
        receipt = receipt_text(reply)
        assert "fake-model" in receipt and "seed: 7" in receipt
        assert app.state == "idle"
    store = Store(get_paths().database)
    (conv,) = store.list_conversations()
    saved = store.messages(conv.id)
    assert [m.role for m in saved] == ["user", "assistant"]
    assert saved[1].content == CODE_REPLY
    assert saved[1].seed == 7 and saved[1].checkpoint_hash == engine.checkpoint_hash
    assert saved[1].params["temperature"] == 0.8 and saved[1].model == "fake-model"


async def test_streaming_appends_in_batches_then_one_full_render(make_app, monkeypatch):
    calls = {"append": 0, "update": 0}
    original_append, original_update = Markdown.append, Markdown.update

    def counting_append(self, markdown):
        calls["append"] += 1
        return original_append(self, markdown)

    def counting_update(self, markdown):
        calls["update"] += bool(markdown)  # the empty update at mount does not parse anything
        return original_update(self, markdown)

    monkeypatch.setattr(Markdown, "append", counting_append)
    monkeypatch.setattr(Markdown, "update", counting_update)
    reply = CODE_REPLY + "\n\n" + LONG_REPLY
    app, engine = make_app([reply], token_delay=0.001)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        calls.update(append=0, update=0)
        await send(pilot, app, "go")
        tokens = app.last_job.count
        assert tokens > 200
        assert calls["update"] == 1, "one final full render"
        assert 1 <= calls["append"] < tokens / 4, f"{calls['append']} appends for {tokens} tokens"
        assert app.conversation.items[-1].content == reply


async def test_empty_prompt_is_refused_with_a_hint(make_app):
    app, _ = make_app()
    async with app.run_test() as pilot:
        await ready(pilot, app)
        app.prompt_input.load_text("  \n\t ")
        await pilot.press("enter")
        await pilot.pause()
        assert app.conversation.items == []
        assert any("Type a message first" in n for n in notifications(app))


async def test_newline_key_and_prompt_history(make_app):
    app, _ = make_app(["ok"])
    async with app.run_test() as pilot:
        await ready(pilot, app)
        prompt = app.prompt_input
        prompt.focus()
        await pilot.press("a", "ctrl+j", "b")
        assert prompt.text == "a\nb"
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(app.conversation.items) == 2 and app.settled)
        assert app.conversation.items[0].content == "a\nb"
        await send(pilot, app, "second")
        assert prompt.text == ""
        await pilot.press("up")
        assert prompt.text == "second"
        await pilot.press("up")  # the cursor is on the first line of "a\nb": Up recalls further
        assert prompt.text == "a\nb"
        await pilot.press("down", "down")
        assert prompt.text == "second"
        await pilot.press("down")
        assert prompt.text == ""


async def test_escape_stops_within_one_token_and_keeps_the_partial_reply(make_app):
    app, engine = make_app([LONG_REPLY], token_delay=0.01)
    async with app.run_test() as pilot:
        await ready(pilot, app)
        await send(pilot, app, "talk", wait=False)
        await wait_for(pilot, lambda: app.job is not None and app.job.count >= 5, what="a few tokens")
        # Count from when the app handled Esc (under load the key can sit in the queue a while).
        cancel, counted = app.job.cancel, []

        def set_and_count() -> None:
            counted.append(len(engine.params_seen))
            threading.Event.set(cancel)

        cancel.set = set_and_count
        await press_now(pilot, "escape")
        await wait_for(pilot, lambda: bool(counted), what="Esc handled")
        produced_at_stop = counted[0]
        await wait_for(pilot, lambda: app.job is None and app.settled, what="the stop")
        reply = app.conversation.items[-1]
        assert reply.status == "stopped"
        assert len(engine.params_seen) <= produced_at_stop + 1, "stopped within one token"
        assert 0 < len(reply.content) < len(LONG_REPLY)
        assert LONG_REPLY.startswith(reply.content)
        assert app.state == "stopped"
        view = app.conversation.view_for(reply)
        assert "stopped" in str(view.query_one(".who").render())
    store = Store(get_paths().database)
    saved = store.messages(store.latest_conversation_id())
    assert saved[-1].status == "stopped" and saved[-1].content == reply.content


async def test_continue_a_stopped_reply(make_app):
    app, engine = make_app([LONG_REPLY], token_delay=0.005)
    async with app.run_test() as pilot:
        await ready(pilot, app)
        await send(pilot, app, "talk", wait=False)
        await wait_for(pilot, lambda: app.job is not None and app.job.count >= 3)
        await press_now(pilot, "escape")
        await wait_for(pilot, lambda: app.job is None and app.settled)
        assert app.conversation.items[-1].status == "stopped"
        partial, stopped_id = app.conversation.items[-1].content, app.conversation.items[-1].db_id
        engine.token_delay = 0.0
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: app.last_job.mode == "continue" and app.job is None and app.settled)
        reply = app.conversation.items[-1]
        assert len(app.conversation.items) == 2
        assert engine.records[-1].conversation[-1].role == "assistant"
        assert engine.records[-1].conversation[-1].content == partial
        assert reply.content == LONG_REPLY and reply.status == "complete"
        assert reply.meta["continuations"][0]["tokens"] > 0
        # the continued reply is a new sibling: the stopped one stays, one ← away
        assert reply.db_id != stopped_id and reply.siblings == (2, 2) and reply.meta["continued_from"] == stopped_id
    store = Store(get_paths().database)
    saved = store.branch(store.latest_conversation_id())
    assert len(saved) == 2 and saved[-1].content == LONG_REPLY and saved[-1].status == "complete"
    kept = {m.id: m for m in store.messages(store.latest_conversation_id())}[stopped_id]
    assert (kept.content, kept.status) == (partial, "stopped")


async def test_regenerate_replaces_the_last_reply(make_app):
    app, engine = make_app(["first answer", "second answer"])
    async with app.run_test() as pilot:
        await ready(pilot, app)
        await send(pilot, app, "hi")
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: engine.calls == 2 and app.job is None and app.settled)
        assert [i.content for i in app.conversation.items] == ["hi", "second answer"]
        assert engine.records[-1].conversation[-1].content == "hi"
    store = Store(get_paths().database)
    assert [m.content for m in store.branch(store.latest_conversation_id())] == ["hi", "second answer"]


async def test_edit_last_message_and_resend(make_app):
    app, engine = make_app(["one", "two"])
    async with app.run_test() as pilot:
        await ready(pilot, app)
        await send(pilot, app, "helo")
        await pilot.press("ctrl+l")
        assert app.prompt_input.text == "helo"
        await pilot.press("backspace", "l", "o")
        await pilot.press("enter")
        await wait_for(pilot, lambda: engine.calls == 2 and app.job is None and app.settled)
        assert [i.content for i in app.conversation.items] == ["hello", "two"]
    store = Store(get_paths().database)
    assert [m.content for m in store.branch(store.latest_conversation_id())] == ["hello", "two"]


async def test_parameter_edit_applies_mid_reply(make_app):
    app, engine = make_app([" ".join(LONG_REPLY.split()[:100])], token_delay=0.01)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "talk", wait=False)
        await wait_for(pilot, lambda: app.job is not None and app.job.count >= 3)
        table = app.query_one(SamplingTable)
        table.focus()
        table.cursor = row_index("temperature")
        await press_now(pilot, "0", ".", "2", "enter")
        await wait_for(pilot, lambda: app.params.temperature == 0.2)
        await wait_for(pilot, lambda: app.job is None and app.settled)
        temps = [p.temperature for p in engine.params_seen]
        assert temps[0] == 0.8 and temps[-1] == 0.2
        switch = temps.index(0.2)
        assert 3 <= switch < len(temps) - 1 and all(t == 0.2 for t in temps[switch:])
        reply = app.conversation.items[-1]
        assert reply.meta["param_changes"][0][0] == switch
        assert reply.meta["param_changes"][0][1]["temperature"] == 0.2
        assert reply.params["temperature"] == 0.8


async def test_invalid_values_are_refused_with_the_range(make_app):
    app, _ = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        table = app.query_one(SamplingTable)
        table.focus()
        table.cursor = row_index("top_p")
        before = app.params
        await pilot.press("1", ".", "5", "enter")
        assert app.params == before
        help_text = str(app.query_one("#param-help").render())
        assert "refused" in help_text and "(0, 1]" in help_text
        assert any("(0, 1]" in n for n in notifications(app))
        await pilot.press("0", "enter")  # the open end is refused too
        assert app.params == before
        # arrows step the value, and the low end stops at the floor
        table.cursor = row_index("temperature")
        await pilot.press("right")
        assert app.params.temperature == pytest.approx(0.85)
        await pilot.press("shift+left")
        assert app.params.temperature == pytest.approx(0.35)
        table.cursor = row_index("top_k")
        await pilot.press("left")
        assert app.params.top_k == 0
        # seed: backspace empties it, which means random
        table.cursor = row_index("seed")
        await pilot.press("backspace", "enter")
        assert app.params.seed is None
        await pilot.press("n")
        assert app.params.temperature == 1.0 and app.params.top_p == 1.0
        await pilot.press("d")
        assert app.params == app.engine.default_params()


def screen_lines(app: ChatApp) -> list[str]:
    """The text on screen, line by line, from the SVG screenshot."""
    lines: dict[float, list[str]] = {}
    for match in re.finditer(r'<text[^>]*y="([\d.]+)"[^>]*>([^<]*)</text>', app.export_screenshot()):
        lines.setdefault(float(match.group(1)), []).append(html.unescape(match.group(2)).replace("\xa0", " "))
    return ["".join(parts) for _, parts in sorted(lines.items())]


@pytest.mark.parametrize(
    ("evil", "shown"),
    [
        ("[/bold]", "[/bold]"),
        ("[@click=app.quit]x[/]", "[@click=app.quit]x[/]"),
        ("\x1b]52;c;aGk=\x07", "␛]52;c;aGk=␇"),
        ("[link=javascript:x]y[/link]\x9b31m", "[link=javascript:x]y[/link]\ufffd31m"),
    ],
)
async def test_markup_and_escape_codes_render_as_text(make_app, evil, shown):
    reply = f"before {evil} after\n\n`{evil}`\n\n```\n{evil}\n```\n"
    app, _ = make_app([reply])
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, f"user says {evil}")
        await pilot.pause(0.1)
        lines = screen_lines(app)
        text = "\n".join(lines)
        assert "\x1b" not in text and "\x07" not in text and "\x9b" not in text
        assert any(line.rstrip().endswith(f"user says {shown}") for line in lines), "the user's text, literally"
        assert any(f"before {shown} after" in line for line in lines), "the reply's paragraph, literally"
        assert sum(line.rstrip().endswith(shown) for line in lines) >= 3, "inline code and the fence too"
        assert app.conversation.items[0].content == f"user says {shown}"
        assert app.conversation.items[1].content == reply  # stored as generated; cleaned when shown
        for view in app.conversation.query(MessageView):  # clicking the text triggers nothing
            await pilot.click(view)
        await pilot.pause()
        assert app.is_running


async def test_links_open_only_http_after_confirmation(make_app, monkeypatch):
    opened = []
    app, _ = make_app(["see [a](javascript:alert(1)) and [b](https://example.com)"])
    monkeypatch.setattr(app, "open_url", lambda url, **kw: opened.append(url))
    async with app.run_test() as pilot:
        await ready(pilot, app)
        await send(pilot, app, "links")
        markdown = app.conversation.query_one(Markdown)
        markdown.post_message(Markdown.LinkClicked(markdown, "javascript:alert(1)"))
        await pilot.pause()
        assert opened == [] and any("only http and https" in n for n in notifications(app))
        markdown.post_message(Markdown.LinkClicked(markdown, "https://example.com"))
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("n")
        assert opened == []
        markdown.post_message(Markdown.LinkClicked(markdown, "https://example.com"))
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        assert opened == ["https://example.com"]


async def test_generation_failure_is_logged_and_notified(make_app, home):
    app, _ = make_app(["a b c d e f g"], fail_at=3)
    async with app.run_test() as pilot:
        await ready(pilot, app)
        await send(pilot, app, "break")
        assert app.is_running
        reply = app.conversation.items[-1]
        assert reply.status == "error" and reply.content == "a b c"
        log = get_paths().log_file
        assert log.exists() and "Traceback" in log.read_text() and "failed on purpose" in log.read_text()
        message = next(n for n in notifications(app) if "Generation failed" in n)
        assert str(log) in message and "Traceback" not in message
        # the app goes on working
        app.engine.fail_at = None
        await send(pilot, app, "again")
        assert app.conversation.items[-1].status == "complete"


async def test_model_load_failure_keeps_the_app_running(home):
    def boom():
        raise EngineError("no such checkpoint: /nowhere")

    app = ChatApp(engine_factory=boom, paths=get_paths())
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.state == "no model")
        assert any("no such checkpoint" in n and "Details in" in n for n in notifications(app))
        assert "no model" in str(app.query_one("#status").render())


async def test_typing_before_the_model_loads_and_the_first_prompt_waits(home):
    release = threading.Event()
    engine = FakeEngine(["loaded reply"])

    def slow_factory():
        release.wait(10)
        return engine

    app = ChatApp(engine_factory=slow_factory, paths=get_paths())
    async with app.run_test() as pilot:
        await pilot.pause()
        assert app.engine is None and app.state == "loading"
        assert "loading" in str(app.query_one("#status").render())
        await pilot.press(*"hello", "enter")
        await wait_for(pilot, lambda: len(app.conversation.items) == 2)
        assert app.conversation.items[1].status == "waiting" and app.state == "waiting"
        release.set()
        await wait_for(pilot, lambda: app.conversation.items[1].status == "complete" and app.settled)
        assert app.conversation.items[1].content == "loaded reply"


async def test_persistence_round_trip_and_flags(make_app):
    app, _ = make_app(["answer one", "answer two"])
    async with app.run_test() as pilot:
        await ready(pilot, app)
        await send(pilot, app, "first conversation")
        first_id = app.conversation_id
        await pilot.press("ctrl+n")
        await send(pilot, app, "second conversation")
        second_id = app.conversation_id
    assert first_id != second_id

    app, _ = make_app(["x"])  # default: the latest conversation reopens
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: len(app.conversation.items) == 2)
        assert app.conversation_id == second_id
        assert [i.content for i in app.conversation.items] == ["second conversation", "answer two"]
        assert app.conversation.view_for(app.conversation.items[1]) is not None
        assert "seed: 7" in receipt_text(app.conversation.items[1])  # the receipt is kept with the reply
        assert app.prompt_input.prompt_history == ["second conversation"]

    app, _ = make_app(["x"], conversation_id=first_id)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: len(app.conversation.items) == 2)
        assert app.conversation.items[0].content == "first conversation"

    app, _ = make_app(["x"], new=True)
    async with app.run_test() as pilot:
        await ready(pilot, app)
        await pilot.pause(0.1)
        assert app.conversation.items == [] and app.conversation_id is None


async def test_keymap_remap_from_the_config_file(make_app, home):
    config = home / "config"
    config.mkdir(parents=True)
    (config / "config.toml").write_text(
        '[keymap]\nsend = "ctrl+s"\nregenerate = "f12"\nnot_a_binding = "f11"\n', encoding="utf-8"
    )
    app, engine = make_app(["r1", "r2"])
    async with app.run_test() as pilot:
        await ready(pilot, app)
        app.prompt_input.focus()
        await pilot.press("h", "i", "enter")  # Enter is no longer send: it inserts a newline
        assert app.prompt_input.text == "hi\n" and app.conversation.items == []
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: len(app.conversation.items) == 2 and app.job is None and app.settled)
        await pilot.press("ctrl+r")  # old key does nothing now
        await pilot.pause(0.1)
        assert engine.calls == 1
        await pilot.press("f12")
        await wait_for(pilot, lambda: engine.calls == 2 and app.job is None and app.settled)
        assert any("not_a_binding" in n for n in notifications(app))
        rows = {row[3]: row for row in app.binding_rows()}
        assert rows["send"][2] == "^s" and rows["regenerate"][2] == "f12"


async def test_a_theme_picked_in_the_app_is_saved_for_the_next_start(make_app, home):
    from chat_tui.config import get_paths, load_config

    config = home / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "config.toml").write_text('# mine\nmarkdown = true\n\n[keymap]\nsend = "ctrl+s"\n', encoding="utf-8")
    app, _ = make_app()
    async with app.run_test() as pilot:
        await ready(pilot, app)
        assert "theme" not in (config / "config.toml").read_text()  # starting changes nothing
        app.theme = "nord"  # what the palette's theme command does
        await pilot.pause(0.05)
        assert any("saved" in n for n in notifications(app))
    text = (config / "config.toml").read_text()
    assert text.startswith("# mine\nmarkdown = true\n") and 'send = "ctrl+s"' in text
    saved = load_config(get_paths())
    assert saved.theme == "nord" and saved.keymap == {"send": "ctrl+s"} and not saved.warnings
    app, _ = make_app()
    async with app.run_test() as pilot:
        await ready(pilot, app)
        assert app.theme == "nord"


async def test_every_binding_has_an_id_and_the_help_screen_lists_them(make_app):
    app, _ = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        for _, owner in ChatApp.binding_owners():
            from textual.binding import Binding

            for binding in Binding.make_bindings(owner.BINDINGS):
                assert binding.id, f"{owner.__name__} {binding.key} has no id"
        await pilot.press("f1")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen))
        table = app.screen.query_one("DataTable")
        ids = {str(table.get_row_at(i)[3]) for i in range(table.row_count)}
        for expected in ("send", "newline", "stop", "regenerate", "continue", "copy_message", "copy_code",
                         "params_neutral", "params_defaults", "toggle_sampling", "open_conversations"):
            assert expected in ids
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)


async def test_command_palette_commands(make_app):
    app, _ = make_app()
    async with app.run_test() as pilot:
        await ready(pilot, app)
        titles = [c.title for c in app.get_system_commands(app.screen)]
        for expected in ("New conversation", "Open conversation", "Rename conversation", "Delete conversation",
                         "Export conversation as Markdown", "Export conversation as JSON", "Load model",
                         "Save preset", "Toggle sampling pane", "Toggle inspector", "Theme",
                         "Load preset: greedy"):
            assert expected in titles
        await pilot.press("ctrl+p")
        await pilot.pause()
        assert app.screen.__class__.__name__ == "CommandPalette"


async def test_export_markdown_and_json(make_app, tmp_path):
    app, _ = make_app(["an answer"])
    async with app.run_test() as pilot:
        await ready(pilot, app)
        await send(pilot, app, "export me")
        for fmt, name in (("markdown", "c.md"), ("json", "c.json")):
            app.action_export(fmt)
            await pilot.pause()
            box = app.screen.query_one("Input")
            box.value = str(tmp_path / name)
            await pilot.press("enter")
            await pilot.pause()
        md = (tmp_path / "c.md").read_text()
        assert "export me" in md and "an answer" in md
        data = json.loads((tmp_path / "c.json").read_text())
        assert data["messages"][1]["seed"] == 7 and data["messages"][1]["settings"]["top_p"] == 0.95


async def test_copy_message_and_code_block(make_app):
    app, _ = make_app()
    async with app.run_test() as pilot:
        await ready(pilot, app)
        await send(pilot, app, "code please")
        await pilot.press("ctrl+up")
        assert isinstance(app.focused, MessageView) and app.focused.item.role == "assistant"
        await pilot.press("c")
        assert app.clipboard == CODE_REPLY
        await pilot.press("b")
        assert app.clipboard == "def add(a, b):\n    return a + b\n"
        assert any("Copied python code block 1 of 1" in n for n in notifications(app))
        await pilot.press("up")
        assert app.focused.item.role == "user"
        await pilot.press("enter")
        assert app.focused is app.prompt_input


async def test_probability_colours_toggle(make_app):
    app, _ = make_app(["colourful words here"])
    async with app.run_test() as pilot:
        await ready(pilot, app)
        await send(pilot, app, "go")
        view = app.conversation.view_for(app.conversation.items[-1])
        await pilot.press("f4")
        assert view.query_one(".probs").display and not view.query_one(".body").display
        rendered = view.query_one(".probs").render()
        assert "colourful words here" in str(rendered)
        shown = [(span.start, span.end, str(span.style)) for span in rendered.spans]
        await pilot.press("f4")
        assert view.query_one(".body").display
        cid = app.conversation_id
    # reopened in a later session, the reply still colours by probability, the same way
    app, _ = make_app(["unused"], conversation_id=cid)
    async with app.run_test() as pilot:
        await ready(pilot, app)
        await wait_for(pilot, lambda: len(app.conversation.items) == 2)
        view = app.conversation.view_for(app.conversation.items[-1])
        app.conversation.focus()
        await pilot.press("f4")
        rendered = view.query_one(".probs").render()
        assert "colourful words here" in str(rendered)
        assert [(span.start, span.end, str(span.style)) for span in rendered.spans] == shown


async def test_old_turns_dropped_notice(make_app):
    app, engine = make_app(["short reply"], context_length=48)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        app.params = app.params.with_(max_new_tokens=16)
        app.params_touched = True
        for i in range(4):
            await send(pilot, app, f"message number {i} " + "word " * 6)
        assert engine.records[-1] is not None
        assert "left out to fit the context" in str(app.query_one("#status").render())


async def test_resize_while_streaming_never_raises(make_app):
    app, _ = make_app([CODE_REPLY + "\n\n" + LONG_REPLY], token_delay=0.002)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "stream", wait=False)
        sizes = [(80, 24), (60, 20), (40, 12), (200, 60), (61, 20), (120, 40), (79, 23)]
        for width, height in sizes * 2:
            await pilot.resize_terminal(width, height)
            await pilot.pause(0.01)
        await wait_for(pilot, lambda: app.job is None and app.settled)
        assert app.is_running and app.conversation.items[-1].status == "complete"
        await pilot.resize_terminal(120, 40)
        await pilot.pause()
        assert app.query_one("#sampling").display and app.query_one("#inspector").display
        await pilot.resize_terminal(80, 24)
        await pilot.pause()
        assert app.query_one("#sampling").display and not app.query_one("#inspector").display
        await pilot.press("f3")  # asking for the inspector makes room for it
        assert app.query_one("#inspector").display and not app.query_one("#sampling").display
        await pilot.resize_terminal(60, 20)
        await pilot.pause()
        assert not app.query_one("#sampling").display and not app.query_one("#inspector").display
        await pilot.press("f2")  # narrow: the pane stacks above the conversation
        await pilot.pause()
        assert app.query_one("#sampling").display and app.query_one("#body").has_class("-narrow")


async def test_conversation_list_lazy_rename_delete(make_app, home):
    store = Store(get_paths().database)
    for i in range(120):
        cid = store.create_conversation(f"conversation {i}")
        store.add_message(cid, "user", f"hello {i}")
    store.close()
    app, _ = make_app(["x"], new=True)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: isinstance(app.screen, ConversationListScreen))
        options = app.screen.query_one("OptionList")
        assert options.option_count == ConversationListScreen.PAGE, "only the first page loads"
        assert "conversation 119" in str(options.get_option_at_index(0).prompt)
        await pilot.press("end")
        await pilot.pause()
        assert options.option_count > ConversationListScreen.PAGE
        await pilot.press("home", "r")
        await pilot.pause()
        app.screen.query_one("Input").value = "renamed [bold]title[/]"
        await pilot.press("enter")
        await pilot.pause()
        assert "renamed [bold]title[/]" in str(options.get_option_at_index(0).prompt)
        await pilot.press("delete")
        await pilot.pause()
        await pilot.press("y")
        await pilot.pause()
        assert "conversation 118" in str(options.get_option_at_index(0).prompt)
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(app.conversation.items) == 1)
        assert app.conversation.items[0].content == "hello 118"


async def test_corrupt_database_is_moved_aside(make_app, home):
    paths = get_paths()
    paths.data.mkdir(parents=True)
    paths.database.write_bytes(b"this is not a database at all" * 100)
    app, _ = make_app(["fine"])
    async with app.run_test() as pilot:
        await ready(pilot, app)
        assert any("damaged" in n and "moved to" in n for n in notifications(app))
        await send(pilot, app, "still works")
    moved = list(paths.data.glob("conversations.db.corrupt-*"))
    assert len(moved) == 1 and moved[0].read_bytes().startswith(b"this is not")
    assert Store(paths.database).count_conversations() == 1


async def test_presets_load_and_save(make_app):
    app, _ = make_app()
    async with app.run_test() as pilot:
        await ready(pilot, app)
        app.load_preset("greedy")
        assert app.params.temperature == 0.0
        app.load_preset("creative")
        assert app.params.temperature == 1.1 and app.params.presence_penalty == 0.3
        app.action_save_preset()
        await pilot.pause()
        app.screen.query_one("Input").value = "my preset"
        await pilot.press("enter")
        await pilot.pause()
        assert (get_paths().presets / "my preset.toml").exists()
        app.load_preset("precise")
        app.load_preset("my preset")
        assert app.params.temperature == 1.1


async def test_large_conversation_opens_with_only_the_newest_messages_mounted(make_app):
    store = Store(get_paths().database)
    cid = store.create_conversation("big")
    store.add_messages(cid, [("user" if i % 2 == 0 else "assistant", f"message {i}") for i in range(1000)])
    store.close()
    app, _ = make_app(["x"])
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: len(app.conversation.items) == 1000)
        views = list(app.conversation.query(MessageView))
        assert len(views) == app.conversation.page
        assert views[-1].item.content == "message 999"
        app.conversation.query_one("#earlier").press()
        await pilot.pause(0.2)
        assert len(list(app.conversation.query(MessageView))) == 2 * app.conversation.page


async def test_system_prompt_reaches_the_engine(make_app):
    app, engine = make_app(["ok"])
    async with app.run_test() as pilot:
        await ready(pilot, app)
        app.system_prompt = "You are terse."
        await send(pilot, app, "hi")
        assert engine.records[-1].conversation[0].role == "system"
        assert app.conversation.items[-1].meta["system_prompt"] == "You are terse."


def test_params_change_record_is_sampling_params():
    assert isinstance(SamplingParams().to_dict(), dict)


async def test_sending_without_a_model_keeps_the_message_and_explains(home):
    def boom():
        raise EngineError("no such checkpoint")

    engine = FakeEngine(["late answer"])
    app = ChatApp(engine_factory=boom, paths=get_paths())
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.state == "no model")
        app.prompt_input.load_text("anyone there?")
        await pilot.press("enter")
        await pilot.pause()
        assert [i.role for i in app.conversation.items] == ["user"]
        assert any("No model is loaded" in n for n in notifications(app))
        app.engine_factory = lambda: engine  # Load model, then regenerate answers the message
        app.load_model(None)
        await wait_for(pilot, lambda: app.engine is not None)
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: len(app.conversation.items) == 2 and app.job is None and app.settled)
        assert app.conversation.items[1].content == "late answer"


async def test_new_conversation_clears_the_attention_inspector(make_app):
    app, _ = make_app()
    async with app.run_test(size=(160, 40)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "Write an add function")
        await wait_for(pilot, lambda: app.inspector.store.tokens != [], what="the inspector to fill")
        assert app.inspector.store.kept_rows > 0
        await app.action_new_conversation()
        await pilot.pause()
        assert app.inspector.store.tokens == [] and app.inspector.store.kept_rows == 0


async def test_code_blocks_are_highlighted_by_their_language_never_guessed(make_app, monkeypatch):
    import pygments.lexers
    from textual.widgets._markdown import MarkdownFence

    guessed = []
    monkeypatch.setattr(pygments.lexers, "guess_lexer", lambda *a, **k: guessed.append(a) or None)
    reply = "Plain:\n\n```\nx = 1\n```\n\nOdd:\n\n```nosuchlanguage\ny = 2\n```\n\nPython:\n\n```python\ndef f(): pass\n```"
    app, _ = make_app([reply])
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "code please")
        await pilot.pause(0.1)
        view = app.conversation.view_for(app.conversation.items[-1])
        fences = list(view.query(MarkdownFence))
        assert [f.code.strip() for f in fences] == ["x = 1", "y = 2", "def f(): pass"]
        assert guessed == []  # guessing imports every Pygments lexer and tries each one, at every update
        plain, odd, python = (f._highlighted_code for f in fences)
        def styles(content) -> set[str]:
            return {str(span.style) for span in content.spans}

        assert styles(plain) <= {"$text"} and styles(odd) <= {"$text"}  # shown as plain text
        assert styles(python) - {"$text"}  # a declared language is still highlighted
