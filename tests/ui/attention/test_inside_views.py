"""The inspector's inside-the-next-token views (issue #14) with Pilot, on the FakeEngine's made-up
numbers: what a user sees in each view, for the token under the cursor."""

from __future__ import annotations

import pytest

from chat_tui.engine.inside import head_name
from chat_tui.engine.params import SamplingParams
from chat_tui.ui.attention.state import VIEW_SUBTITLE
from tests.ui.attention.harness import InspectorHarness, fake_engine, fake_steps
from tests.ui.attention.test_pane import settle
from tests.ui.attention.test_pane import view_text as pane_text


def harness(engine=None, **kwargs) -> InspectorHarness:
    engine = engine or fake_engine(n_layer=3, n_head=4)
    app = InspectorHarness(engine, color_mode="truecolor", width=kwargs.pop("width", 70), **kwargs)
    app.steps = fake_steps(engine, params=SamplingParams(temperature=0.8, top_k=5, seed=7))
    return app


def view_text(pane) -> str:
    """The view's words on one line (a narrow pane wraps them)."""
    return " ".join(pane_text(pane).split())


async def shown(pilot, app, *keys: str) -> str:
    if keys:
        await pilot.press(*keys)
    for _ in range(3):  # the view asks a worker, which redraws when done
        await settle(pilot, app)
    return view_text(app.pane)


@pytest.mark.parametrize(("key", "view"), [("7", "lens"), ("8", "attribution"), ("9", "rollout"),
                                           ("0", "knockout"), ("t", "tokens"), ("b", "block")])
async def test_each_view_has_its_key_title_and_plain_words_description(key, view):
    app = harness()
    async with app.run_test(size=(120, 40)) as pilot:
        app.feed(app.steps)
        await shown(pilot, app, key)
        assert app.pane.view == view
        header = app.pane.header_text(120).plain  # the description, in plain words, under the title
        assert "inside" in header and VIEW_SUBTITLE[view] in header


async def test_lens_names_the_commitment_layer_of_the_token_under_the_cursor():
    app = harness()
    engine = app.engine
    async with app.run_test(size=(120, 40)) as pilot:
        app.feed(app.steps)
        pane = app.pane
        for _ in range(2):
            text = await shown(pilot, app, "7", "up")
            pos = pane.position
            commit = engine.fake_commit_layer(pane.store.ids[:pos])
            assert f"commitment layer: layer {commit + 1}/3" in text
            # the layers are counted from 1, the committed one marked
            assert f"◆L{commit + 1}" in text


async def test_attribution_shows_the_top_head_and_the_check_line_with_its_error():
    app = harness()
    engine = app.engine
    async with app.run_test(size=(120, 40)) as pilot:
        app.feed(app.steps)
        text = await shown(pilot, app, "8")
        assert "components + bias = the logit, to 1e-4: error" in text and "✓" in text
        top = text.split("pushed up", 1)[1].split()[0]
        assert top == head_name(*engine.decisive_head)  # the head that wrote the token leads
        assert "pushed down" in text and "MLP" in text


async def test_rollout_shows_a_bar_per_context_token_beside_the_last_layer():
    app = harness()
    async with app.run_test(size=(120, 40)) as pilot:
        app.feed(app.steps)
        text = await shown(pilot, app, "9", "home", "down", "down")
        assert "rollout" in text and "last layer" in text
        rows = [line for line in pane_text(app.pane).splitlines() if line.strip()[:1].isdigit()]
        assert len(rows) == 3  # tokens 0, 1 and 2: the context of the cursor's token


async def test_knock_out_of_the_decisive_head_changes_the_top_token():
    app = harness()
    engine = app.engine
    layer, head = engine.decisive_head
    async with app.run_test(size=(120, 40)) as pilot:
        app.feed(app.steps)
        text = await shown(pilot, app, "0")
        assert "heads off: none" in text and "press k" in text
        # an ordinary head: the top token stays
        text = await shown(pilot, app, "k")
        assert "heads off: L1H1" in text and "the top token stays the same" in text and "KL" in text
        await pilot.press("k")  # back on
        await pilot.press(*["]"] * layer, *["}"] * head)
        text = await shown(pilot, app, "k")
        assert f"heads off: {head_name(layer, head)}" in text
        assert "the top token changes" in text
        assert "Continue with these heads off" in text
        text = await shown(pilot, app, "K")
        assert "heads off: none" in text


async def test_tokens_view_shows_ids_bytes_and_the_count_and_why_chinese_takes_bytes():
    app = harness()
    async with app.run_test(size=(120, 40)) as pilot:
        text = await shown(pilot, app, "t")
        assert "Type in the input box" in text
        app.pane.set_token_text("input box", "Hi 你好")
        text = await shown(pilot, app)
        assert "input box: 8 tokens of 2,048 in the context window" in text
        assert "<0xE4>" in text and "E4" in text
        assert "byte-level BPE" in text


async def test_block_view_counts_layers_and_heads_from_1_and_shows_q_and_k():
    app = harness()
    async with app.run_test(size=(120, 40)) as pilot:
        app.feed(app.steps)
        text = await shown(pilot, app, "b", "]", "}", "}")
        assert "layer 2/3 · head 3/4" in text
        assert "q (head 3)" in text and "first entries" in text and "residual + MLP" in text


async def test_an_unavailable_view_says_why_in_one_line():
    engine = fake_engine(n_layer=2, n_head=2, unavailable_views={"block": "not available for this architecture"})
    app = harness(engine)
    async with app.run_test(size=(120, 40)) as pilot:
        app.feed(app.steps)
        text = await shown(pilot, app, "b")
        assert "Not available: not available for this architecture" in text


async def test_a_head_picked_in_the_heads_overview_is_off_in_the_knock_out_view():
    app = harness()
    async with app.run_test(size=(120, 40)) as pilot:
        app.feed(app.steps)
        await shown(pilot, app, "4", "]", "}", "k")
        assert app.pane.state.knocked == frozenset({(1, 1)})
        text = await shown(pilot, app, "0")
        assert "heads off: L2H2" in text and "KL" in text
