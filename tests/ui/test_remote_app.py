"""The app connected to an OpenAI-compatible server, driven with Pilot, the official SDK as the
client (engine.remote): a real `chat-tui serve` on a loopback port, and a real `transformers serve`
that lists two models (its Hugging Face cache holds two copies of the exported bundled model) and
rejects the settings it does not take (top_k)."""

from __future__ import annotations

import sys

import pytest

pytest.importorskip("openai", reason="the openai extra is not installed (pip install 'chat-tui[openai]')")
pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'chat-tui[serve]')")

from chat_tui.config import get_paths  # noqa: E402
from chat_tui.engine import Message, load_engine  # noqa: E402
from chat_tui.engine.remote import RemoteEngine  # noqa: E402
from chat_tui.engine.types import collect  # noqa: E402
from chat_tui.ui.app import ChatApp  # noqa: E402
from chat_tui.ui.attention import InspectorPane  # noqa: E402
from chat_tui.ui.attention.canvas import AttentionCanvas  # noqa: E402
from chat_tui.ui.sampling import ROWS, UNSUPPORTED, SamplingTable  # noqa: E402
from chat_tui.ui.screens import InputScreen, PickScreen  # noqa: E402
from tests.engine.test_remote import (  # noqa: E402, F401 - fixtures
    Scripted,
    chat_tui_serve,
    free_port,
    running,
    scripted,
    two_models_url,
)

from .conftest import ready, send, wait_for  # noqa: E402


@pytest.fixture(scope="module")
def server_url():
    port = free_port()
    with running([sys.executable, "-m", "chat_tui", "serve", "--port", str(port)], port, seconds=60):
        yield f"http://127.0.0.1:{port}/v1"


def canvas_text(app) -> str:
    canvas = app.query_one(AttentionCanvas)
    return "\n".join(strip.text for strip in canvas.render_lines(canvas.content_region.reset_offset))


async def test_a_reply_from_the_server_with_its_candidates_and_no_attention(home, server_url):
    greedy = load_engine(None).default_params().with_(temperature=0, top_candidates=5, max_new_tokens=30)
    own = collect(load_engine(None).stream([Message("user", "What is AI?")], greedy))
    app = ChatApp(engine_factory=lambda: RemoteEngine(server_url), paths=get_paths())
    async with app.run_test(size=(140, 44)) as pilot:
        await ready(pilot, app)
        app.params = greedy
        await send(pilot, app, "What is AI?")
        await wait_for(pilot, lambda: app.job is None and app.last_job is not None, timeout=60, what="the reply")
        assert app.last_job.text == own.text  # the server ran the same model, greedy
        status = str(app.query_one("#status").render())
        assert server_url in status and "(openai)" in status and "/0" not in status
        assert "setting changes apply from the next request" in status  # a server cannot change them mid-reply
        app.action_toggle_pane("inspector")
        await pilot.pause(0.3)
        pane = app.query_one(InspectorPane)
        await pilot.press("f3")  # focus moves with the keys; the view keys act on the pane
        pane.focus()
        # the attention view: one line that says why, no blank panes, no error
        await wait_for(pilot, lambda: "attention is not available over the OpenAI protocol"
                       in " ".join(canvas_text(app).split()), what="the inspector's line")
        await pilot.press("6")  # the candidates view
        await pilot.pause(0.5)
        await app.workers.wait_for_complete()
        text = canvas_text(app)
        last = own.steps[-1]  # the pane shows the reply's last token: its candidates are the server's logprobs
        assert f"sampled {last.prob:.1%} with" in text and "server's own sampler chose" in text
        rows = [line for line in text.splitlines() if line.startswith(("▶", "  ")) and "%" in line]
        assert [row.split()[1 if row.startswith("▶") else 0] for row in rows][:3] == \
            [c.text.strip() for c in last.top[:3]]
        assert sum(row.startswith("▶") for row in rows) == 1  # the sampled token, once
        # the saved reply records the server and exactly what was sent
        saved = app.store.messages(app.conversation_id)[-1]
        assert saved.meta["server"] == server_url and saved.meta["sent"]["temperature"] == 0
        assert saved.meta["backend"] == "openai" and saved.model == "minigpt"  # the server's name for the model


async def test_connect_to_a_server_from_the_palette(home, server_url):
    app = ChatApp(paths=get_paths(), model_process=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        assert app.engine.backend == "minigpt"
        app.action_connect_dialog()
        await wait_for(pilot, lambda: isinstance(app.screen, InputScreen) and app.screen.query("#input"),
                       what="the dialog")
        app.screen.query_one("#input").value = server_url  # as typed
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.engine is not None and app.engine.backend == "openai", timeout=60,
                       what="the server's model")
        assert app.engine.model_name == "minigpt" and app.engine.device == server_url
        await send(pilot, app, "Hello!")
        await wait_for(pilot, lambda: app.job is None and app.last_job is not None and app.last_job.text,
                       timeout=60, what="the reply")


async def test_a_server_with_two_models_asks_which_and_marks_the_setting_it_rejects(home, two_models_url):  # noqa: F811
    app = ChatApp(paths=get_paths(), model_process=True)  # as chat-tui runs: the client in the model's process
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        app.action_connect_dialog()
        await wait_for(pilot, lambda: isinstance(app.screen, InputScreen) and app.screen.query("#input"),
                       what="the dialog")
        app.screen.query_one("#input").value = two_models_url  # no model name: the server has two
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, PickScreen), timeout=60, what="the model picker")
        assert sorted(app.screen.names) == ["chat-tui/minigpt-a", "chat-tui/minigpt-b"]
        wanted = app.screen.names[1]
        await pilot.press("down", "enter")
        await wait_for(pilot, lambda: app.engine is not None and app.engine.backend == "openai", timeout=60,
                       what="the server's model")
        assert app.engine.model_name == wanted
        status = str(app.query_one("#status").render())
        assert wanted in status
        table = app.query_one(SamplingTable)
        assert "not supp" not in str(table.render())
        # top-k on: transformers serve rejects it; the reply comes without it and the row says so
        app.params = app.params.with_(temperature=0, top_k=5, max_new_tokens=8)
        await send(pilot, app, "What is AI?", wait=False)  # its first request loads the model: it takes a while
        await wait_for(pilot, lambda: app.job is None and app.last_job is not None, timeout=300, what="the reply")
        assert app.last_job.text
        lines = str(table.render()).splitlines()  # the row's note, as long as the pane's width allows
        assert [line.split()[0] for line in lines if "not supp" in line] == ["top-k"]  # "not supported", cut to fit
        table.focus()
        table.cursor = [row.name for row in ROWS].index("top_k")
        await wait_for(pilot, lambda: UNSUPPORTED in str(app.query_one("#param-help").render()),
                       what="the help line on top-k")
        assert "top_k" not in app.store.messages(app.conversation_id)[-1].meta["sent"]
        # the other model starts clean: what the server rejected was remembered for that model
        other = next(name for name in ("chat-tui/minigpt-a", "chat-tui/minigpt-b") if name != wanted)
        first = app.engine
        app.connect_to_server(f"{two_models_url} {other}")
        await wait_for(pilot, lambda: app.engine is not first and app.engine is not None, timeout=60,
                       what="the other model")
        assert app.engine.model_name == other and "not supp" not in str(table.render())


async def test_the_key_is_never_saved_logged_or_exported(home, chat_tui_serve):  # noqa: F811
    """As `chat-tui --base-url URL --api-key-env CT_TEST_KEY` starts it, against a server that asks for a key."""
    app = ChatApp(paths=get_paths(), model="minigpt", model_process=False,
                  load_options={"base_url": chat_tui_serve, "api_key_env": "CT_TEST_KEY"})
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        assert app.engine.backend == "openai"
        await send(pilot, app, "Hello!")
        await wait_for(pilot, lambda: app.job is None and app.last_job is not None and app.last_job.text,
                       timeout=60, what="the reply")
        exported = app.store.export_json(app.conversation_id) + app.store.export_markdown(app.conversation_id)
        assert chat_tui_serve in exported and "sk-test-4242" not in exported
    files = [path for path in home.rglob("*") if path.is_file()]
    assert files and not [path for path in files if b"sk-test-4242" in path.read_bytes()]


async def test_a_setting_a_server_rejected_in_an_earlier_session_is_marked_from_the_first_reply(home, scripted):  # noqa: F811
    _, url = scripted
    Scripted.behaviour = "no-top-k"  # rejects top_k, as the OpenAI API does
    memory = get_paths().server_memory  # as the command line passes it
    earlier = RemoteEngine(url, timeout=5, remember=memory)
    collect(earlier.stream([Message("user", "Hi")], earlier.default_params().with_(top_k=5)))
    assert "top_k" in earlier.unsupported
    Scripted.calls.clear()
    app = ChatApp(paths=get_paths(), model="m1", model_process=True,
                  load_options={"base_url": url, "server_memory": str(memory)})
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        table = app.query_one(SamplingTable)
        app.params = app.params.with_(top_k=5, max_new_tokens=8)
        await send(pilot, app, "What is AI?")
        await wait_for(pilot, lambda: app.job is None and app.last_job is not None, timeout=60, what="the reply")
        assert Scripted.calls and not [call for call in Scripted.calls if "top_k" in call]  # never sent, not once
        lines = str(table.render()).splitlines()  # the row's note, as long as the pane's width allows
        assert [line.split()[0] for line in lines if "not supp" in line] == ["top-k"]


async def test_a_server_that_cannot_be_reached_is_one_notice_and_the_model_stays(home):
    app = ChatApp(paths=get_paths(), model_process=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        before = app.engine
        url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
        app.connect_to_server(url)
        notices = lambda: [str(n.message) for n in app._notifications if url in str(n.message)]  # noqa: E731
        await wait_for(pilot, notices, timeout=30, what="the notice")
        assert "cannot connect" in notices()[0] and "Traceback" not in notices()[0]
        assert app.engine is before  # still the model it had
        await send(pilot, app, "Hello!")
        assert app.last_job is not None and app.last_job.text
