"""Every engine is an `Engine`; `explainer()` says which can explain; `close()` is always safe.

The model in its own process (ProcessEngine) is checked in tests/engine/test_process_engine.py, the Hugging
Face engine here on a tiny random Llama.
"""

from __future__ import annotations

import numpy as np
import pytest

from chat_tui.engine import Engine, Message, SamplingParams, collect, explainer
from chat_tui.engine.explain import (
    ExplainUnavailable,
    attention_matrix,
    can_explain,
    explain_attention,
    replay_chain,
    replay_for,
    vocab_size_of,
)
from chat_tui.engine.fake import FakeEngine

HELLO = [Message("user", "Hello there! How are you today?")]


def test_the_fake_is_an_engine_that_explains_nothing():
    engine = FakeEngine(["Hi there."])
    assert isinstance(engine, Engine)
    assert explainer(engine) is None and not can_explain(engine)
    assert engine.vocab_size is None and vocab_size_of(engine) is None  # its vocabulary grows as it reads
    with pytest.raises(ExplainUnavailable, match="fake backend"):
        explain_attention(engine, [1, 2, 3], 2, 0, 0)
    # its steps still replay, here, on their stored logits
    step = collect(engine.stream(HELLO, SamplingParams(temperature=0.8, seed=1))).steps[0]
    assert replay_for(engine, step, [], None).chosen == step.token_id
    assert engine.alive
    engine.close()
    engine.close()  # twice is fine
    assert engine.alive  # nothing was held outside Python's memory: it still answers
    assert collect(engine.stream(HELLO, SamplingParams(seed=1))).text == "Hi there."


def test_the_minigpt_is_an_engine_and_its_own_explainer(tiny_engine):
    assert isinstance(tiny_engine, Engine)
    assert explainer(tiny_engine) is tiny_engine and can_explain(tiny_engine)
    assert tiny_engine.vocab_size == tiny_engine.config.vocab_size == vocab_size_of(tiny_engine)
    assert tiny_engine.alive

    reply = collect(tiny_engine.stream(HELLO, SamplingParams(temperature=0.9, seed=4, max_new_tokens=5)))
    ids = reply.prompt.ids + [s.token_id for s in reply.steps]
    explained = explainer(tiny_engine).explain_attention(ids, len(ids) - 1, 1, 1)
    # the weights it explains are the model's own (one direct forward pass)
    direct = attention_matrix(tiny_engine.model, ids)[1, 1, len(ids) - 1, : len(ids)]
    np.testing.assert_allclose(explained.weights, direct, atol=1e-5)
    assert explain_attention(tiny_engine, ids, len(ids) - 1, 1, 1).weights.tolist() == explained.weights.tolist()

    step, context = reply.steps[-1], ids[:-1]
    for params in (None, SamplingParams(temperature=1.5, top_k=5)):
        mine = tiny_engine.replay_chain(step, context, params)
        bare = replay_chain(step, context, params, vocab_size=tiny_engine.vocab_size)
        assert np.array_equal(mine.dropped_by, bare.dropped_by) and np.allclose(mine.chain_probs, bare.chain_probs)
        assert (mine.exact, mine.tail_kept) == (bare.exact, bare.tail_kept)

    tiny_engine.close()
    tiny_engine.close()  # an in-process model has nothing to stop: it goes with the engine
    assert tiny_engine.alive


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    pytest.importorskip("transformers")
    from tests.engine.test_hf import build_model, train_bpe

    return build_model("llama", tmp_path_factory.mktemp("hf") / "tiny-llama", train_bpe())


@pytest.fixture(scope="module")
def llama(llama_path):
    from chat_tui.engine import load_engine

    return load_engine(llama_path, device="cpu")


def test_a_llama_family_hf_engine_explains_its_attention(llama):
    # issue #14: Explain reads the queries and keys of GPT-2 and the Llama/Mistral/Qwen/Gemma families
    # (another architecture explains nothing: tests/engine/test_inside_hf.py)
    assert explainer(llama) is llama
    assert vocab_size_of(llama) == llama.model.config.vocab_size
    explained = explain_attention(llama, [1, 2, 3], 2, 0, 0)
    assert explained.weights.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="outside"):
        explain_attention(llama, [1, 2, 3], 5, 0, 0)


def test_the_hf_engine_is_an_engine(llama_path):
    from chat_tui.engine import load_engine

    engine = load_engine(llama_path, device="cpu")  # its own: it is closed here
    assert isinstance(engine, Engine)
    assert engine.vocab_size == engine.model.config.vocab_size
    assert engine.alive
    engine.close()
    engine.close()  # twice is harmless


def test_a_hf_model_in_its_own_process_is_an_engine_that_explains_as_in_process(llama_path, llama):
    from chat_tui.engine.process import ProcessEngine

    engine = ProcessEngine.start(llama_path, device="cpu")
    try:
        assert isinstance(engine, Engine) and engine.alive
        assert explainer(engine) is engine and can_explain(engine)
        assert engine.vocab_size == llama.model.config.vocab_size
        theirs, ours = engine.explain_attention([1, 2, 3], 2, 1, 1), llama.explain_attention([1, 2, 3], 2, 1, 1)
        assert np.allclose(theirs.weights, ours.weights) and np.allclose(theirs.qk, ours.qk)
        # its steps replay here, on their stored logits, as the in-process engine's do
        step = collect(engine.stream(HELLO, SamplingParams(temperature=0.8, seed=1, max_new_tokens=2))).steps[0]
        here, there = replay_for(engine, step, [], None), replay_for(llama, step, [], None)
        assert np.array_equal(here.dropped_by, there.dropped_by) and here.exact == there.exact
    finally:
        engine.close()
    engine.close()
    assert not engine.alive
