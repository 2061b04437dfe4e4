"""The InspectorPane with Pilot: keys, live updates, throttling, notes, export."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest

from chat_tui.engine.params import SamplingParams
from chat_tui.ui.attention import REDRAW_HZ, VIEWS, InspectorPane
from chat_tui.ui.attention.canvas import AttentionCanvas
from chat_tui.ui.attention.pane import HEATMAP_LABEL_WIDTH
from tests.ui.attention.harness import InspectorHarness, fake_engine, fake_steps


def canvas_text(app: InspectorHarness) -> str:
    canvas = app.query_one(AttentionCanvas)
    lines = canvas.render_lines(canvas.content_region.reset_offset)  # type: ignore[arg-type]
    return "\n".join(strip.text for strip in lines)


def view_text(pane: InspectorPane) -> str:
    canvas = pane.query_one(AttentionCanvas)
    size = canvas.content_size
    rendered = pane.render_view(size.width, size.height)
    from rich.console import Console

    console = Console(width=size.width, record=True, force_terminal=False, file=io.StringIO())
    console.print(rendered)
    return console.export_text()


async def settle(pilot, app) -> None:
    await pilot.pause(1.5 / REDRAW_HZ)
    await app.workers.wait_for_complete()
    await pilot.pause(1.5 / REDRAW_HZ)


def test_binding_ids_are_unique_and_namespaced():
    from textual.binding import Binding

    bindings = list(Binding.make_bindings(InspectorPane.BINDINGS))
    ids = [b.id for b in bindings]
    assert all(i and i.startswith("inspector.") for i in ids)
    assert len(set(ids)) == len(ids)
    keys = {b.key for b in bindings}
    for key in ("left_square_bracket", "right_square_bracket", "left_curly_bracket", "right_curly_bracket",
                "m", "up", "down", "home", "end", "f", "n", "v", "x"):
        assert key in keys


async def test_keys_move_through_layers_heads_tokens_and_views():
    engine = fake_engine(n_layer=3, n_head=4)
    app = InspectorHarness(engine, color_mode="truecolor")
    async with app.run_test(size=(100, 30)) as pilot:
        pane = app.pane
        app.feed(fake_steps(engine))
        await settle(pilot, app)
        n = pane.store.length
        assert pane.position == n - 1 and pane.follow
        await pilot.press("]")
        assert pane.attn_layer == 1
        await pilot.press("[", "[")
        assert pane.attn_layer == 2  # wraps
        await pilot.press("}", "}")
        assert pane.head == 2
        await pilot.press("{")
        assert pane.head == 1
        await pilot.press("m")
        assert pane.head_mode == "mean"
        await pilot.press("m")
        assert pane.head_mode == "max"
        await pilot.press("}")  # a head key goes back to single heads
        assert pane.head_mode == "single" and pane.head == 1
        await pilot.press("up", "up")
        assert pane.position == n - 3 and not pane.follow
        await pilot.press("home")
        assert pane.position == 0
        await pilot.press("down")
        assert pane.position == 1
        await pilot.press("pagedown")
        assert pane.position > 1
        await pilot.press("end")
        assert pane.position == n - 1 and pane.follow
        await pilot.press("f")
        assert not pane.follow
        await pilot.press("f")
        assert pane.follow
        scales = [pane.scale]
        for _ in range(4):
            await pilot.press("n")
            scales.append(pane.scale)
        assert scales[0] == scales[-1] and len(set(scales)) == 4
        seen = [pane.view]
        for _ in range(len(VIEWS)):
            await pilot.press("v")
            seen.append(pane.view)
        assert seen[:-1] == list(VIEWS) and seen[-1] == VIEWS[0]
        await pilot.press("4")
        assert pane.view == "heads"
        await pilot.press("V")
        assert pane.view == "explain"
        await pilot.press("2", "s")
        assert pane.sort_rows
        await settle(pilot, app)
        assert "by weight" in canvas_text(app)


async def test_live_rows_follow_and_redraws_are_throttled():
    engine = fake_engine("word " * 60)
    app = InspectorHarness(engine, color_mode="truecolor")
    async with app.run_test(size=(100, 30)) as pilot:
        pane = app.pane
        steps = fake_steps(engine)
        app.feed(steps[:1])
        await settle(pilot, app)
        # one frame per tick at most, however fast the steps come
        before = pane.redraws
        started = time.perf_counter()
        for s in steps[1:]:
            pane.add_step(s)
        await pilot.pause(0.3)
        elapsed = time.perf_counter() - started
        assert pane.store.generated == len(steps)
        assert pane.redraws - before <= int(elapsed * REDRAW_HZ) + 3
        assert pane.position == pane.store.length - 1
        assert "▲" in canvas_text(app)  # the newest token's key column is marked


async def test_a_new_row_computes_only_itself():
    engine = fake_engine("a b c d e f g h i j")
    app = InspectorHarness(engine, color_mode="truecolor")
    async with app.run_test(size=(100, 40)) as pilot:
        pane = app.pane
        steps = fake_steps(engine)
        app.feed(steps[:3])
        await settle(pilot, app)
        computed = pane.painter.computed
        for s in steps[3:6]:
            pane.add_step(s)
            await settle(pilot, app)
        assert pane.painter.computed - computed == 3  # three new rows, nothing else redone


async def test_two_thousand_tokens_scroll_and_pan():
    n = 2000
    rng = np.random.default_rng(1)
    from chat_tui.engine.types import MessageSpan, PromptInfo, Step

    rows = []
    for i in range(n - 1, n + 1):
        r = rng.random((1, 2, i + 1)).astype(np.float32)
        rows.append((r / r.sum(-1, keepdims=True)).astype(np.float16))
    full = np.zeros((1, 2, n - 1, n - 1), dtype=np.float16)
    for i in range(n - 1):
        r = rng.random(i + 1).astype(np.float32)
        full[0, :, i, : i + 1] = r / r.sum()
    prompt = PromptInfo(ids=list(range(n - 1)), tokens=[f"w{i}" for i in range(n - 1)],
                        spans=[MessageSpan(0, "user", 0, n - 1)], dropped_messages=0, dropped_tokens=0,
                        seed=0, prefill_s=0.0, attention=full)
    step = Step(index=0, position=n - 1, token_id=1, token="end", text="end", prob=1.0, chain_prob=1.0, top=[],
                attention=rows[0], top_ids=None, top_logits=None, logsumexp=0.0, step_s=0.0, elapsed_s=0.0,
                prompt=prompt)
    app = InspectorHarness(None, color_mode="truecolor")
    async with app.run_test(size=(100, 30)) as pilot:
        pane = app.pane
        pane.add_step(step)
        await settle(pilot, app)
        rows_shown, c0, c1 = pane.heatmap_window(*pane.query_one(AttentionCanvas).content_size)
        assert rows_shown.stop == n and c0 <= n - 1 < c1  # follow: the newest row and its key in view
        map_w = pane.query_one(AttentionCanvas).content_size.width - HEATMAP_LABEL_WIDTH - 1  # the query labels
        assert c1 == n and n - 1 - c0 == map_w - 1 - map_w // 4  # a quarter of the width left for new tokens
        assert rows_shown.start >= c0 - 1  # no blank rows above the first key shown
        await pilot.press("home")
        rows_shown, c0, c1 = pane.heatmap_window(*pane.query_one(AttentionCanvas).content_size)
        assert rows_shown.start == 0 and c0 == 0
        await pilot.press("right")
        _, c0_after, _ = pane.heatmap_window(*pane.query_one(AttentionCanvas).content_size)
        assert c0_after > 0
        await pilot.press("left")
        _, c0_back, _ = pane.heatmap_window(*pane.query_one(AttentionCanvas).content_size)
        assert c0_back == 0


async def test_backend_without_attention_says_why():
    engine = fake_engine()
    engine.attention_unavailable = "this backend runs through an API that returns no attention"
    app = InspectorHarness(engine, color_mode="truecolor")
    async with app.run_test(size=(100, 30)) as pilot:
        assert not app.pane.wants_attention
        app.feed(fake_steps(engine, inspect=False))
        await settle(pilot, app)
        assert "cannot give attention" in canvas_text(app)
        assert "API" in view_text(app.pane)
        await pilot.press("6")  # the candidates need no attention
        await settle(pilot, app)
        assert "sampled" in canvas_text(app)


async def test_reply_started_while_hidden_is_explained():
    engine = fake_engine()
    app = InspectorHarness(engine, color_mode="truecolor")
    async with app.run_test(size=(100, 30)) as pilot:
        assert app.pane.wants_attention
        app.feed(fake_steps(engine, inspect=False))
        await settle(pilot, app)
        assert "not captured" in view_text(app.pane)
        app.pane.display = False
        await pilot.pause()
        assert not app.pane.wants_attention


async def test_memory_cap_note():
    engine = fake_engine()
    app = InspectorHarness(engine, color_mode="truecolor", cap_bytes=4000)
    async with app.run_test(size=(100, 30)) as pilot:
        app.feed(fake_steps(engine))
        await settle(pilot, app)
        assert app.pane.store.dropped_rows > 0
        notice = app.pane.query_one("#attn-notice")
        assert notice.display and "oldest rows dropped" in str(notice.render())


async def test_candidates_replay_new_settings(tmp_path):
    engine = fake_engine()
    app = InspectorHarness(engine, color_mode="truecolor")
    async with app.run_test(size=(110, 30)) as pilot:
        pane = app.pane
        app.feed(fake_steps(engine, params=SamplingParams(temperature=0.8, top_k=5, seed=7)))
        await pilot.press("6", "up", "up")
        await settle(pilot, app)
        text = canvas_text(app)
        assert "sampled" in text and "top-k" in text and "now" not in text.splitlines()[1]
        pane.params_changed(SamplingParams(temperature=0.8, top_k=2, seed=7))
        await settle(pilot, app)
        text = canvas_text(app)
        assert "now: T 0.8 k 2" in text
        assert text.count("top-k") > 5  # the two columns: as sampled and with k = 2
        await pilot.press("home")
        await settle(pilot, app)
        assert "part of the prompt" in canvas_text(app)


async def test_export_writes_svg_and_safetensors(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    engine = fake_engine()
    app = InspectorHarness(engine, color_mode="truecolor", export_dir=tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        app.feed(fake_steps(engine))
        await settle(pilot, app)
        store = app.pane.store
        await pilot.press("x")
        await settle(pilot, app)
        exported = [n.message for n in app._notifications]
    svg = list(tmp_path.glob("*.svg"))
    tensors = list(tmp_path.glob("*.safetensors"))
    assert len(svg) == 1 and len(tensors) == 1
    assert svg[0].read_text().startswith("<svg")
    data = load_file(str(tensors[0]))
    assert any("Exported" in m for m in exported)
    assert data["attention"].shape == (2, 4, store.length, store.length)
    assert data["attention"].dtype == np.float16
    np.testing.assert_array_equal(data["positions"], np.arange(store.length))
    with safe_open(str(tensors[0]), "np") as f:
        meta = f.metadata()
    assert json.loads(meta["tokens"]) == store.tokens
    assert int(meta["prompt_length"]) == store.prompt_length


@pytest.mark.parametrize("where", ["here", "in-its-own-process"])
async def test_explain_and_candidates_views_with_the_model(tiny_engine, tiny_checkpoint, where):
    pytest.importorskip("torch")
    from chat_tui.engine.process import ProcessEngine
    from chat_tui.engine.types import Message

    engine = tiny_engine if where == "here" else ProcessEngine.start(tiny_checkpoint, device="cpu")
    try:
        # 30 candidates listed: the ten beyond top-k show the stage that dropped them
        params = SamplingParams(temperature=0.9, top_k=20, seed=2, max_new_tokens=6, top_candidates=30)
        steps = list(engine.stream([Message("user", "Hello there")], params, inspect=True))
        app = InspectorHarness(engine, color_mode="truecolor")
        async with app.run_test(size=(110, 40)) as pilot:
            app.feed(steps)
            await pilot.press("3")
            await settle(pilot, app)
            text = canvas_text(app)
            assert "softmax(q·kⱼ ÷ √16)" in text
            assert "matches the stored row" in text
            await pilot.press("6")
            await settle(pilot, app)
            text = canvas_text(app)
            assert "sampled" in text and "top-k" in text and "replay failed" not in text
    finally:
        if engine is not tiny_engine:
            engine.close()


async def test_moving_while_explanations_are_computed_ends_on_the_token_selected(tiny_checkpoint):
    """Each move asks for another explanation; they are computed one at a time, those superseded
    while they waited are skipped, and the view ends on the selected token's, not "computing"."""
    pytest.importorskip("torch")
    from chat_tui.engine.process import ProcessEngine
    from chat_tui.engine.types import Message

    engine = ProcessEngine.start(tiny_checkpoint, device="cpu")
    try:
        params = SamplingParams(temperature=0.9, top_k=20, seed=2, max_new_tokens=12)
        steps = list(engine.stream([Message("user", "Hello there")], params, inspect=True))
        app = InspectorHarness(engine, color_mode="truecolor")
        async with app.run_test(size=(110, 40)) as pilot:
            app.feed(steps)
            await pilot.press("3", *["up"] * 6)
            await settle(pilot, app)
            assert app.pane.position == app.pane.store.length - 7
            text = canvas_text(app)
            assert "matches the stored row" in text and "computing q·k" not in text
            assert f"▶{app.pane.position} " in app.pane.header_text(60).plain
    finally:
        engine.close()


async def test_a_token_that_is_part_of_a_character_shows_its_byte_in_the_candidates(tiny_engine):
    """Biased towards the three bytes of "龍" (none a character alone), the reply's tokens are labelled
    `<0xE9>`, `<0xBE>` or `<0x8D>` in the candidates view, never as U+FFFD."""
    from chat_tui.engine.types import Message

    fragments = tiny_engine.encode("龍")
    assert len(fragments) == 3
    params = SamplingParams(temperature=0, max_new_tokens=3, top_candidates=5,
                            logit_bias=tuple((i, 100.0) for i in fragments))
    steps = list(tiny_engine.stream([Message("user", "Hello there")], params, inspect=True))
    app = InspectorHarness(tiny_engine, color_mode="truecolor")
    async with app.run_test(size=(110, 40)) as pilot:
        app.feed(steps)
        await pilot.press("6")
        await settle(pilot, app)
        text = canvas_text(app)
        assert all(s.token in ("<0xE9>", "<0xBE>", "<0x8D>") for s in steps)
        assert f"▶ {steps[-1].token}" in text  # the sampled token, at the cursor
        assert "\ufffd" not in text
