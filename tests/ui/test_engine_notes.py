"""What the engine knows about a reply reaches the user: the sliding window (its setting in the sampling
pane, its note in the status bar), how a Hugging Face model decodes and which layers have attention,
also from a model in its own process."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from textual.widgets import Static

from chat_tui.config import get_paths
from chat_tui.engine import Message, SamplingParams, load_engine
from chat_tui.engine.process import ProcessEngine
from chat_tui.ui.app import ChatApp

from .conftest import ready, send, wait_for
from .test_dialogs_and_sampling import focus_row

NO_CACHE_NOTE = "no KV cache: recomputing the whole sequence each step (slower)"


def status(app: ChatApp) -> str:
    return str(app.query_one("#status").render())


# ------------------------------------------------------------------ the sliding window


async def test_the_slide_setting_is_turned_off_and_on_in_the_sampling_pane(make_app):
    app, _ = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        assert app.params.slide_context is True
        await focus_row(pilot, app, "slide_context")
        help_text = str(app.query_one("#param-help", Static).render())
        assert "slide the window" in help_text
        await pilot.press("space")
        assert app.params.slide_context is False
        assert "slide window" in str(app.sampling.table.render()) and " off " in str(app.sampling.table.render())
        await pilot.press("enter")
        assert app.params.slide_context is True
        await pilot.press("left")
        assert app.params.slide_context is False
        await pilot.press(*"xyz")  # stray letters change nothing
        assert app.params.slide_context is False


@pytest.fixture(scope="module")
def block64(tmp_path_factory, tiny_tokenizer) -> Path:
    from tests.test_cli_slide import save_endless64

    return save_endless64(tmp_path_factory.mktemp("slide") / "block64", tiny_tokenizer)


async def test_the_status_bar_says_the_window_slid_and_ctx_stays_within_the_context(home, block64):
    engine = load_engine(block64, device="cpu")
    app = ChatApp(engine_factory=lambda: engine, paths=get_paths())
    async with app.run_test(size=(140, 40)) as pilot:
        await ready(pilot, app)
        app.params = SamplingParams(temperature=0, max_new_tokens=150)
        app.params_touched = True
        await send(pilot, app, "Hello there! How are you today?")
        await wait_for(pilot, lambda: app.job is None and app.state == "idle", timeout=60, what="the reply")
        reply = app.conversation.items[-1]
        assert reply.tokens == 150 and reply.finish_reason == "length"
        line = status(app)
        used, limit = map(int, re.search(r"ctx (\d+)/(\d+)", line).groups())
        assert limit == 64 and 0 < used <= limit, line
        assert f"the model now sees only the last {used} tokens" in line, line


# ------------------------------------------------------------------ how a Hugging Face model decodes


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random GPT-1 (no KV cache), Reformer (no cache, no attention weights) and Bamba (attention in
    one layer of two), as tests/engine/test_hf_architectures.py builds them."""
    pytest.importorskip("transformers")
    from tests.engine.test_hf import train_bpe
    from tests.engine.test_hf_architectures import build

    tokenizer_json = train_bpe()
    folder = tmp_path_factory.mktemp("hf")
    return {arch: build(arch, folder / arch, tokenizer_json) for arch in ("openai-gpt", "reformer", "bamba")}


def test_the_model_process_brings_the_decode_note_and_what_a_reply_learns_about_attention(hf_models):
    engine = ProcessEngine.start(hf_models["reformer"], device="cpu", chat_format="plain")
    try:
        assert engine.decode_note == NO_CACHE_NOTE  # known at load
        assert engine.attention_unavailable is None  # learnt only when the inspector asks
        stream = engine.stream([Message("user", "Hello")], SamplingParams(temperature=0, max_new_tokens=3),
                               inspect=True)
        for step in stream:  # as the app reads it: up to the last step, then the stream is closed
            if step.finish_reason is not None:
                break
        stream.close()
        learnt = engine.attention_unavailable  # what the child's engine found while inspecting
        assert learnt and learnt.startswith("reformer") and "attention weights" in learnt
    finally:
        engine.close()


async def test_the_status_bar_shows_the_decode_note(home, hf_models):
    engine = load_engine(hf_models["openai-gpt"], device="cpu", chat_format="plain")
    app = ChatApp(engine_factory=lambda: engine, paths=get_paths())
    async with app.run_test(size=(200, 40)) as pilot:
        await ready(pilot, app)
        assert NO_CACHE_NOTE in status(app)


async def test_the_inspector_names_the_layers_without_attention_from_the_model_process(home, hf_models):
    app = ChatApp(str(hf_models["bamba"]), paths=get_paths(), device="cpu", model_process=True,
                  load_options={"chat_format": "plain"})
    async with app.run_test(size=(160, 40)) as pilot:
        await wait_for(pilot, lambda: app.engine is not None or app.state == "no model", timeout=120,
                       what="the model to load")
        assert app.engine is not None and app.engine.pid, app.load_note
        app.params = app.params.with_(temperature=0, max_new_tokens=4)
        app.params_touched = True
        await send(pilot, app, "Hello")
        await wait_for(pilot, lambda: app.job is None and app.state == "idle", timeout=60, what="the reply")
        assert app.inspect_attention, "the reply was inspected"
        app.inspector.redraw()
        await pilot.pause()
        notice = str(app.inspector.query_one("#attn-notice", Static).render())
        assert "attention of layer 0 shown; layer 1 has no attention weights" in notice
