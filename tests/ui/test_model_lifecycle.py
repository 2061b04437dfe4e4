"""The model's life in the app: a failed load keeps the model in use, a switch starts the status bar
afresh, and a model process that dies is started again."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from chat_tui.config import get_paths
from chat_tui.engine.fake import FakeEngine
from chat_tui.engine.types import EngineError
from chat_tui.ui.app import ChatApp
from chat_tui.ui.sampling import SamplingTable

# replies that run on, 20 ms a token: a kill lands mid-reply
from tests.engine.test_process_engine import slow

from .conftest import ready, send, wait_for
from .test_app import row_index


def notifications(app: ChatApp) -> list[str]:
    return [str(n.message) for n in app._notifications]


def status(app: ChatApp) -> str:
    return str(app.query_one("#status").render())


def short_replies(app: ChatApp) -> None:
    app.params = app.params.with_(max_new_tokens=5, seed=1)
    app.params_touched = True


async def send_and_wait(pilot, app: ChatApp, text: str) -> None:
    """Send, and wait for the reply as long as a model process takes to start on a busy machine."""
    await send(pilot, app, text, wait=False)
    await wait_for(pilot, lambda: app.job is None and app.settled, timeout=120, what="the reply")


async def test_a_failed_load_keeps_the_model_in_use(home, tiny_checkpoint, tmp_path):
    no_model = tmp_path / "not-a-model"
    no_model.mkdir()
    (no_model / "notes.txt").write_text("no weights here", encoding="utf-8")
    app = ChatApp(str(tiny_checkpoint), paths=get_paths(), device="cpu")  # the model in the app's process
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: app.engine is not None or app.state == "no model", timeout=120,
                       what="the model to load")
        first = app.engine
        assert first is not None, app.load_note
        short_replies(app)
        assert app.open_checkpoint(no_model)
        await wait_for(pilot, lambda: app.state != "loading", timeout=120, what="the load to fail")
        failed = next(n for n in notifications(app) if "failed" in n)
        assert str(no_model) in failed and "; still using tiny" in failed and "Details in" in failed
        assert app.engine is first and app.state == "idle"
        line = status(app)
        assert "tiny" in line and "none loaded" not in line
        await send(pilot, app, "Hello!")
        reply = app.conversation.items[-1]
        assert reply.status == "complete" and reply.tokens
        assert not any("No model is loaded" in n for n in notifications(app))


async def test_a_prompt_sent_while_a_load_fails_is_answered_by_the_model_in_use(make_app):
    app, first = make_app(["still here"])
    release = threading.Event()

    def failing_load():
        release.wait(10)
        raise EngineError("/models/broken: no weights")

    async with app.run_test() as pilot:
        await ready(pilot, app)
        app.engine_factory = failing_load
        app.load_model("/models/broken")
        await send(pilot, app, "anyone there?", wait=False)
        assert app.conversation.items[-1].status == "waiting"  # the model asked for would answer
        release.set()
        await wait_for(pilot, lambda: app.job is None and app.settled, what="the reply")
        assert app.engine is first
        assert app.conversation.items[-1].content == "still here"
        # the path is named once (the error names it already)
        assert any("Loading failed: /models/broken: no weights" in n and "still using fake" in n
                   for n in notifications(app))


async def test_switching_models_clears_the_status_bar_parts_of_the_old_one(home, make_app):
    app, _ = make_app(["short reply"], context_length=48)
    async with app.run_test(size=(160, 40)) as pilot:
        await ready(pilot, app)
        app.params = app.params.with_(max_new_tokens=16)
        app.params_touched = True
        for i in range(4):
            await send(pilot, app, f"message number {i} " + "word " * 6)
        before = status(app)
        assert "left out to fit the context" in before and "tok/s" in before
        second = FakeEngine(["hi"], model_name="bigger", context_length=4096)
        app.engine_factory = lambda: second
        app.load_model("bigger")
        await wait_for(pilot, lambda: app.engine is second, what="the second model")
        after = status(app)
        assert "bigger" in after and "ctx –/4096" in after
        assert "left out" not in after and "tok/s" not in after


@pytest.mark.skipif(os.name != "posix", reason="the model runs in its own process on POSIX only")
async def test_a_killed_model_process_is_started_again(home, tiny_checkpoint):
    app = ChatApp(str(tiny_checkpoint), paths=get_paths(), device="cpu", model_process=True,
                  load_options={"setup": slow})
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: app.engine is not None or app.state == "no model", timeout=120,
                       what="the model to load")
        first = app.engine
        assert first is not None, app.load_note
        # killed mid-reply: what arrived is kept, and the process starts again at once
        app.params = app.params.with_(max_new_tokens=10_000, seed=1)
        app.params_touched = True
        await send(pilot, app, "Hello!", wait=False)
        await wait_for(pilot, lambda: app.job is not None and app.job.count >= 3, timeout=60,
                       what="a few tokens")
        os.kill(first.pid, signal.SIGKILL)
        await wait_for(pilot, lambda: app.job is None, timeout=60, what="the reply to fail")
        partial = app.conversation.items[-1]
        assert partial.status == "error" and partial.content
        message = next(n for n in notifications(app) if "Generation failed" in n)
        assert "stopped unexpectedly" in message and "killed by signal 9" in message
        assert "restarting it" in message
        short_replies(app)
        await send_and_wait(pilot, app, "Are you back?")  # waits for the new process if it is not ready yet
        reply = app.conversation.items[-1]
        assert reply.status == "complete" and reply.tokens == 5
        second = app.engine
        assert second is not first and second.pid != first.pid
        assert second.model_name == first.model_name and second.device == "cpu"
        # killed while idle: the next prompt starts it again and waits for it
        os.kill(second.pid, signal.SIGKILL)
        await wait_for(pilot, lambda: not second.alive, timeout=30, what="the process to go")
        await send(pilot, app, "And now?", wait=False)
        await wait_for(pilot, lambda: any("had stopped; restarting it" in n for n in notifications(app)),
                       timeout=10, what="the restart notice")
        if app.job is not None and app.job.engine is None:  # still waiting (the mini-GPT restarts in well under 1 s)
            assert "restarting the model's process" in status(app)
        await wait_for(pilot, lambda: app.job is None and app.settled, timeout=120, what="the reply")
        reply = app.conversation.items[-1]
        assert reply.status == "complete" and reply.tokens == 5
        assert app.engine is not second


async def test_a_failed_load_keeps_the_settings_typed_for_the_model_in_use(make_app):
    """The load that failed would have brought its model's defaults; the model that stays keeps the
    user's settings, also when its process is started again later."""
    app, first = make_app(["still here"])

    def failing_load():
        raise EngineError("/models/broken: no weights")

    async with app.run_test() as pilot:
        await ready(pilot, app)
        await pilot.press("f5")
        app.query_one(SamplingTable).cursor = row_index("temperature")
        await pilot.press(*"0.3", "enter")
        assert app.params.temperature == 0.3
        app.engine_factory = failing_load
        assert app.open_checkpoint("/models/broken")
        await wait_for(pilot, lambda: app.state != "loading", what="the load to fail")
        assert app.engine is first
        first.alive = False  # its process dies: the next prompt starts the same model again
        app.engine_factory = lambda: FakeEngine(["back"], defaults=first.default_params())
        await send(pilot, app, "anyone there?")
        assert app.engine is not first and app.conversation.items[-1].content == "back"
        assert app.params.temperature == 0.3
        assert "model defaults" not in str(app.query_one("#sampling-title").render())
