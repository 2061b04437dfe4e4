"""A conversation is a tree: regenerate, edit-and-resend and continue add branches; ← and → on a
message move between its versions and show that branch below it."""

from __future__ import annotations

import dataclasses
import math

from textual.widgets import OptionList

from chat_tui.config import get_paths
from chat_tui.engine.explain import replay_chain
from chat_tui.engine.fake import FakeEngine
from chat_tui.engine.params import SamplingParams
from chat_tui.engine.types import Candidate, Message, PromptInfo
from chat_tui.store import ConversationInfo, Store
from chat_tui.ui.branches import Fork, fork_choices, fork_opening, fork_text, verdict
from chat_tui.ui.conversation import MessageView
from chat_tui.ui.reply import receipt_text
from chat_tui.ui.screens import ConfirmScreen, HelpScreen, PickScreen, conversation_label
from chat_tui.ui.state import ChatItem, GenJob
from tests.ui.conftest import inspector_ready, ready, send, wait_for


def header(app, item) -> str:
    view = app.conversation.view_for(item)
    return str(view.query_one(".who").render())


async def focus_reply(pilot, app) -> MessageView:
    await pilot.press("ctrl+up")
    await wait_for(pilot, lambda: isinstance(app.focused, MessageView), what="a message to take the focus")
    return app.focused


async def switch(pilot, app, key: str) -> None:
    before = app.conversation.items
    await pilot.press(key)
    await wait_for(pilot, lambda: app.conversation.items is not before and app.settled, what="the other branch")


async def three_versions(pilot, app, engine) -> None:
    """Ask "hi", then regenerate twice: three replies, siblings under one question."""
    await ready(pilot, app)
    await send(pilot, app, "hi")
    for calls in (2, 3):
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda calls=calls: engine.calls == calls and app.job is None and app.settled)


async def test_regenerate_twice_gives_three_siblings_and_navigation_shows_each(make_app):
    app, engine = make_app(["first answer", "second answer", "third answer"])
    async with app.run_test() as pilot:
        await three_versions(pilot, app, engine)
        reply = app.conversation.items[-1]
        assert reply.content == "third answer" and "‹ 3/3 ›" in header(app, reply)
        await focus_reply(pilot, app)
        await switch(pilot, app, "left")
        assert [i.content for i in app.conversation.items] == ["hi", "second answer"]
        assert "‹ 2/3 ›" in header(app, app.conversation.items[-1])
        assert app.focused.item is app.conversation.items[-1], "the focus stays on the switched message"
        await switch(pilot, app, "left")
        assert [i.content for i in app.conversation.items] == ["hi", "first answer"]
        assert "‹ 1/3 ›" in header(app, app.conversation.items[-1])
        await pilot.press("left")  # no sibling before the first: nothing changes
        assert app.conversation.items[-1].content == "first answer"
        await switch(pilot, app, "right")
        await switch(pilot, app, "right")
        assert app.conversation.items[-1].content == "third answer"
        assert "‹" not in header(app, app.conversation.items[0]), "the question has one version"
        cid = app.conversation_id
    store = Store(get_paths().database)
    replies = [m for m in store.messages(cid) if m.role == "assistant"]
    assert [m.content for m in replies] == ["first answer", "second answer", "third answer"]
    assert len({m.parent_id for m in replies}) == 1, "siblings: one parent"
    assert store.get_conversation(cid).branches == 3


async def test_two_quick_presses_switch_without_an_error(make_app):
    """The second ← can reach the app after the first has replaced the message it was pressed on."""
    app, engine = make_app(["first answer", "second answer", "third answer"])
    async with app.run_test() as pilot:
        await three_versions(pilot, app, engine)
        view = await focus_reply(pilot, app)
        # both presses reach the app from the message first shown (as when keys arrive faster than a switch)
        view.post_message(MessageView.SiblingRequested(view.item, -1))
        view.post_message(MessageView.SiblingRequested(view.item, -1))
        await wait_for(pilot, lambda: app.settled and app.conversation.items[-1].content != "third answer",
                       what="another version")
        await pilot.pause(0.1)
        assert app.conversation.items[-1].content in ("first answer", "second answer")
        assert not any("error" in n.message.lower() for n in app._notifications)
        assert app.is_running


async def test_edit_and_resend_keeps_the_original_branch(make_app):
    app, engine = make_app(["one", "two"])
    async with app.run_test() as pilot:
        await ready(pilot, app)
        await send(pilot, app, "helo")
        await pilot.press("ctrl+l")
        await pilot.press("backspace", "l", "o")
        await pilot.press("enter")
        await wait_for(pilot, lambda: engine.calls == 2 and app.job is None and app.settled)
        question = app.conversation.items[0]
        assert [i.content for i in app.conversation.items] == ["hello", "two"]
        assert "‹ 2/2 ›" in header(app, question)
        assert [m.content for m in engine.records[-1].conversation] == ["hello"], "the old branch is not sent"
        await pilot.press("ctrl+up", "up")
        assert app.focused.item is question
        await switch(pilot, app, "left")
        assert [i.content for i in app.conversation.items] == ["helo", "one"]
        cid = app.conversation_id
    store = Store(get_paths().database)
    assert sorted(m.content for m in store.messages(cid)) == ["hello", "helo", "one", "two"]
    assert [m.content for m in store.branch(cid)] == ["helo", "one"], "the branch on screen is remembered"


async def test_switching_a_sibling_then_sending_continues_from_the_branch_on_screen(make_app):
    app, engine = make_app(["alpha", "beta", "gamma"])
    async with app.run_test() as pilot:
        await ready(pilot, app)
        await send(pilot, app, "q")
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: engine.calls == 2 and app.job is None and app.settled)
        await focus_reply(pilot, app)
        await switch(pilot, app, "left")
        assert app.conversation.items[-1].content == "alpha"
        await send(pilot, app, "more")
        sent = [(m.role, m.content) for m in engine.records[-1].conversation]
        assert sent == [("user", "q"), ("assistant", "alpha"), ("user", "more")]
        q, alpha, more, gamma = app.conversation.items
        assert gamma.content == "gamma"
        assert gamma.meta["branch"] == [q.db_id, alpha.db_id, more.db_id], "the receipt names the path"
        cid = app.conversation_id
    store = Store(get_paths().database)
    assert [m.content for m in store.branch(cid)] == ["q", "alpha", "more", "gamma"]
    assert store.branch(cid)[-1].meta["branch"] == [q.db_id, alpha.db_id, more.db_id]


def test_the_conversation_list_shows_the_branch_count_when_there_are_several():
    one = ConversationInfo(id=1, title="t", created_at=0, updated_at=0, messages=4, branches=1)
    three = ConversationInfo(id=2, title="t", created_at=0, updated_at=0, messages=6, branches=3)
    assert "branches" not in conversation_label(one).plain
    assert "6 messages · 3 branches" in conversation_label(three).plain


async def test_fork_at_a_dropped_candidate_starts_with_the_kept_prefix_and_the_forced_token(make_app):
    app, engine = make_app(["alpha beta gamma delta"])
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await inspector_ready(pilot, app)
        await send(pilot, app, "hi")
        original = app.conversation.items[-1]
        pane = app.inspector
        await wait_for(pilot, lambda: pane.store.generated >= 4, what="the inspector to take the reply in")
        if not pane.display:
            await pilot.press("f3")
        pane.focus()
        await pilot.press("6")  # the candidates view
        pane.state.cursor = pane.store.prompt_length + 2  # the third token, " gamma"
        kept = tuple(pane.store.ids[pane.store.prompt_length:pane.state.cursor])  # "alpha", " beta"
        await pilot.press("F")
        await wait_for(pilot, lambda: isinstance(app.screen, PickScreen), what="the fork picker")
        picker = app.screen
        dropped = next(i for i, name in enumerate(picker.names) if "dropped by top-p" in name)
        forced = picker.names[dropped].split("'")[1]
        options = picker.query_one(OptionList)
        options.highlighted = dropped
        await pilot.press("enter")
        await wait_for(pilot, lambda: engine.calls == 2 and app.job is None and app.settled, what="the fork")
        reply = app.conversation.items[-1]
        assert reply.content.startswith("alpha beta" + forced)
        record = engine.records[-1]
        forced_id = reply.meta["fork"]["token_id"]
        assert engine.token_text(forced_id) == forced
        assert record.prefix_ids == (*kept, forced_id), "the model went on from the ids themselves"
        assert record.conversation[-1].role == "user", "not from their text, tokenized again"
        assert "continued_from_text" not in reply.meta["fork"]
        receipt = reply.meta["fork"]["receipt"]
        assert receipt.startswith(f"forked at token 3: {forced!r} (p = ") and "dropped by top-p" in receipt
        assert receipt.endswith("instead of ' gamma'")
        assert reply.token_probs[2][0] == forced, "the forced token keeps its probability for the colours"
        view = app.conversation.view_for(reply)
        assert "forked at token 3" in str(view.query_one(".meta").render())  # the one line names it
        assert receipt in receipt_text(reply)  # and `i`, the full receipt, says which token and why
        await pilot.press("f4")
        colours = view.query_one(".probs").render()
        marked = [colours.plain[s.start:s.end] for s in colours.spans if s.style.reverse]
        assert marked == [forced], "the colour view marks the forced token"
        assert "‹ 2/2 ›" in header(app, reply)
        await focus_reply(pilot, app)
        await switch(pilot, app, "left")
        assert app.conversation.items[-1].content == original.content, "the original reply stays a branch"
        cid = app.conversation_id
    store = Store(get_paths().database)
    saved = [m for m in store.messages(cid) if m.role == "assistant"]
    assert len(saved) == 2 and saved[1].meta["fork"]["dropped_by"] == "top_p"
    assert saved[0].parent_id == saved[1].parent_id


async def test_delete_on_a_message_removes_that_version_and_its_branch_only(make_app):
    app, engine = make_app(["first", "second", "third", "after"])
    async with app.run_test() as pilot:
        await ready(pilot, app)
        await send(pilot, app, "q")
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: engine.calls == 2 and app.job is None and app.settled)
        await send(pilot, app, "follow-up")  # under "second"
        await pilot.press("ctrl+up", "up", "up")
        assert app.focused.item.content == "second" and "‹ 2/2 ›" in header(app, app.focused.item)
        await pilot.press("delete")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the question")
        await switch(pilot, app, "y")
        assert [i.content for i in app.conversation.items] == ["q", "first"], "its sibling shows"
        assert "‹" not in header(app, app.conversation.items[-1])
        cid = app.conversation_id
    store = Store(get_paths().database)
    assert sorted(m.content for m in store.messages(cid)) == ["first", "q"]


def test_fork_choices_list_every_other_candidate_with_what_the_chain_did():
    engine = FakeEngine(["alpha beta gamma delta"])
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=7)
    steps = list(engine.stream([Message("user", "hi")], params))
    step = steps[2]  # " gamma": top-p drops some candidates there
    replay = replay_chain(step, None, params)
    choices = fork_choices(step, replay, None, engine)
    assert step.token_id not in [c[0] for c in choices] and len(choices) == len(replay.ids) - 1
    assert {stage for *_, stage in choices} >= {"top_p"}
    assert [c[2] for c in choices] == sorted((c[2] for c in choices), reverse=True), "most likely first"
    # without a replay (a server's steps): kept or dropped where the chain probability says, else unknown
    server_step = dataclasses.replace(step, top=[
        Candidate(-1, " kept", 0.5, 0.6), Candidate(-1, " cut", 0.1, 0.0), Candidate(-1, " ?", 0.1, math.nan)])
    assert [c[3] for c in fork_choices(server_step, None, None, None)] == [None, "dropped", ""]
    assert [verdict(c[3]) for c in fork_choices(server_step, None, None, None)] == [
        "kept by the chain", "dropped by the chain", "the chain unknown"]


def test_a_fork_is_continued_from_the_text_of_its_kept_tokens_and_the_forced_one():
    engine = FakeEngine(["x"])
    ids = engine.encode("alpha beta")
    fork = Fork(index=2, prefix_ids=tuple(ids), prefix_texts=("alpha", " beta"), token_id=engine.encode(" to")[0],
                token=" to", prob=0.0288, dropped_by="top_p", instead_of=" gamma", prompt_ids=())
    assert fork_text(fork, engine) == "alpha beta to"
    assert fork_text(dataclasses.replace(fork, prefix_ids=(-1, -1), token_id=-1), engine) == "alpha beta to"
    assert fork.receipt() == "forked at token 3: ' to' (p = 2.88%, dropped by top-p) instead of ' gamma'"


def test_a_fork_of_a_fork_goes_on_from_all_its_ids_and_a_server_reply_from_its_text():
    """A reply that was itself a fork was prefilled with ids after its open text: forking it again keeps those,
    then its own kept tokens, then the forced one. Tokens without ids (a server's) go on from their text."""
    engine = FakeEngine(["x"])
    earlier, kept, forced = engine.encode("alpha"), engine.encode(" beta gamma"), engine.encode(" to")[0]
    item = ChatItem("assistant", "Well, alpha beta gamma", token_probs=[("Well", 1.0), (",", 1.0), ("alpha", 1.0),
                                                                     (" beta", 1.0), (" gamma", 1.0)])
    prompt = PromptInfo(ids=[1, 2, 3, *earlier], tokens=[], spans=[], dropped_messages=0, dropped_tokens=0,
                        seed=0, prefill_s=0.0, prefix_ids=tuple(earlier))
    job = GenJob(conversation=[Message("user", "hi"), Message("assistant", "Well,")], item=item,
                 base_text="Well,alpha", prompt=prompt, count=3)
    fork = Fork(index=2, prefix_ids=tuple(kept), prefix_texts=(" beta", " gamma"), token_id=forced, token=" to",
                prob=0.01, dropped_by="top_p", instead_of=" delta", prompt_ids=tuple(prompt.ids))
    opening = fork_opening(job, fork, engine, [item])
    assert opening is not None and opening.item.content == "Well,alpha beta gamma to"
    assert opening.sent_text == "Well," and opening.prefix_ids == (*earlier, *kept, forced)
    assert "continued_from_text" not in opening.item.meta["fork"]
    server = fork_opening(job, dataclasses.replace(fork, token_id=-1), engine, [item])
    assert server is not None and server.prefix_ids == () and server.sent_text == "Well,alpha beta gamma to"
    assert server.item.meta["fork"]["continued_from_text"] is True


async def test_f_on_a_picked_reply_forks_it_at_its_last_token(make_app):
    app, engine = make_app(["alpha beta gamma delta"])
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await inspector_ready(pilot, app)
        await send(pilot, app, "hi")
        pane = app.inspector
        await wait_for(pilot, lambda: pane.store.generated >= 4 and app.job is None, what="the whole reply")
        reply_ids = pane.store.ids[pane.store.prompt_length:]
        await focus_reply(pilot, app)
        await pilot.press("f")
        await wait_for(pilot, lambda: isinstance(app.screen, PickScreen), what="the fork picker")
        assert pane.display and pane.state.cursor == pane.store.length - 1, "at the reply's last token"
        await pilot.press("enter")
        await wait_for(pilot, lambda: engine.calls == 2 and app.job is None and app.settled, what="the fork")
        fork = app.conversation.items[-1].meta["fork"]
        assert fork["at"] == len(reply_ids) - 1
        assert engine.records[-1].prefix_ids == (*reply_ids[:-1], fork["token_id"])
        # a message that is not the inspector's reply cannot be: it says so
        await focus_reply(pilot, app)
        await pilot.press("up")
        await wait_for(pilot, lambda: app.focused.item.role == "user", what="the user's message")
        await pilot.press("f")
        await wait_for(pilot, lambda: any("Only the newest reply" in n.message for n in app._notifications),
                       what="the notice")


async def test_the_keys_screen_lists_the_fork_key_of_a_picked_message(make_app):
    app, _ = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await pilot.press("f1")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), what="the keys screen")
        table = app.screen.query_one("DataTable")
        rows = [[str(cell) for cell in table.get_row_at(i)] for i in range(table.row_count)]
        assert any(row[3] == "fork_here" and "f" in row for row in rows)
