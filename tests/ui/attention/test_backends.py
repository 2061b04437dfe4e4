"""The inspector on the Hugging Face backend (a tiny random Llama with grouped-query attention).

The mini-GPT is covered by test_truth.py and the FakeEngine by test_pane.py; this checks that the
pane takes the HF engine's Steps, draws every view, replays the chain exactly on its stored logits,
and explains a Llama-family head's weights from its own q and k (after the rotary embedding).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from chat_tui.engine import load_engine  # noqa: E402
from chat_tui.engine.explain import replay_chain, vocab_size_of  # noqa: E402
from chat_tui.engine.params import SamplingParams  # noqa: E402
from chat_tui.engine.sampling import apply_chain  # noqa: E402
from chat_tui.engine.types import Message  # noqa: E402
from chat_tui.ui.attention import REDRAW_HZ, VIEWS  # noqa: E402
from chat_tui.ui.attention.canvas import AttentionCanvas  # noqa: E402
from tests.engine.test_hf import bpe_json, build_model  # noqa: E402, F401  (bpe_json is a fixture)
from tests.ui.attention.harness import InspectorHarness  # noqa: E402


@pytest.fixture(scope="module")
def llama(tmp_path_factory, bpe_json):  # noqa: F811
    return load_engine(build_model("llama", tmp_path_factory.mktemp("hf") / "tiny-llama", bpe_json), device="cpu")


def canvas_text(app) -> str:
    canvas = app.query_one(AttentionCanvas)
    return "\n".join(strip.text for strip in canvas.render_lines(canvas.content_region.reset_offset))


async def test_every_view_on_the_hf_backend(llama):
    # 30 candidates listed: the ten beyond top-k show the stage that dropped them
    params = SamplingParams(temperature=0.8, top_k=20, seed=5, max_new_tokens=8, top_candidates=30)
    steps = list(llama.stream([Message("user", "Hello there! How are you today?")], params, inspect=True))
    assert llama.attention_unavailable is None
    app = InspectorHarness(llama, color_mode="truecolor", width=60)
    async with app.run_test(size=(110, 36)) as pilot:
        pane = app.pane
        app.feed(steps)
        store = pane.store
        assert store.has_attention and store.n_layers == llama.n_layer and store.n_heads == llama.n_head
        assert store.kept_rows == store.length
        texts = {}
        for i, view in enumerate(VIEWS):
            await pilot.press(str(i + 1), "up")
            for _ in range(3):
                await pilot.pause(1.5 / REDRAW_HZ)
                await app.workers.wait_for_complete()
            texts[view] = canvas_text(app)
        assert "▲" in texts["heatmap"]
        # a Llama-family engine explains: q·k ÷ √d, softmax, and the check against the captured row
        assert "softmax(q·kⱼ ÷ √8)" in texts["explain"] and "‖out‖" in texts["explain"]
        assert "this reply" in texts["turns"] and "user 1" in texts["turns"]
        assert "sampled" in texts["candidates"] and "top-k" in texts["candidates"]

    # the candidates' kept set is the chain's own on the full logits
    model = llama.model
    for s in steps:
        context = store.context_ids(s.position)
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([context])).logits[0, -1].float()
        replay = replay_chain(s, context, s.params, vocab_size=vocab_size_of(llama))
        full = apply_chain(logits, context, s.params, track=True)
        assert replay.exact
        assert replay.kept_ids() == set(np.flatnonzero(full.dropped_by == -1).tolist())
