"""The inside views on the mini-GPT (issue #14): each checked against the model computed another way."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from chat_tui.engine import EngineError, Message, collect
from chat_tui.engine.inside import INSIDE_VIEWS, inside
from chat_tui.engine.minigpt import MiniGPTEngine
from chat_tui.engine.model import GPT
from chat_tui.engine.params import SamplingParams

TEXT = "Hello there! How are you today?"


@pytest.fixture(scope="module")
def ids(tiny_engine):
    return tiny_engine.encode(TEXT)


def own_probs(engine, ids) -> np.ndarray:
    """The model's next-token distribution as decoding computes it (the runner, not GPT.forward)."""
    logits, _ = engine.runner().prefill(ids, inspect=False)
    logits = np.asarray(logits, dtype=np.float64)
    p = np.exp(logits - logits.max())
    return p / p.sum()


def test_every_view_is_available(tiny_engine):
    assert inside(tiny_engine) is tiny_engine
    assert tiny_engine.inside_views() == dict.fromkeys(INSIDE_VIEWS)


def test_lens_at_the_last_layer_is_the_models_own_distribution(tiny_engine, ids):
    probs = own_probs(tiny_engine, ids)
    for token in (int(probs.argmax()), 7, 100):
        lens = tiny_engine.logit_lens(ids, token, top=3)
        assert [layer.layer for layer in lens.layers] == list(range(tiny_engine.n_layer))
        last = lens.layers[-1]
        assert last.chosen_prob == pytest.approx(probs[token], abs=1e-5)
        assert [t.id for t in last.top] == list(np.argsort(-probs)[:3])
        assert [t.prob for t in last.top] == pytest.approx(list(np.sort(probs)[::-1][:3]), abs=1e-5)
        assert last.chosen_rank == int((probs > probs[token]).sum())
        assert lens.surprisal_bits == pytest.approx(-np.log2(probs[token]), abs=1e-4)
    top = int(probs.argmax())
    lens = tiny_engine.logit_lens(ids, top)
    commit = lens.commit_layer
    assert commit is not None
    assert all(layer.chosen_rank == 0 for layer in lens.layers[commit:])
    assert commit == 0 or lens.layers[commit - 1].chosen_rank > 0
    unlikely = int(probs.argmin())
    assert tiny_engine.logit_lens(ids, unlikely).commit_layer is None


def test_attribution_components_and_bias_sum_to_the_logit(tiny_engine, ids):
    logits, _ = tiny_engine.runner().prefill(ids, inspect=False)
    for token in (3, 50, int(np.argmax(logits))):
        attribution = tiny_engine.attribute(ids, token)
        assert attribution.logit == pytest.approx(float(logits[token]), abs=1e-4)
        assert attribution.residual_error < 1e-4
        names = [c.name for c in attribution.components]
        assert names == ["embed", "L1H1", "L1H2", "L1 MLP", "L2H1", "L2H2", "L2 MLP"]


def test_attribution_sums_to_the_logit_on_the_bundled_model():
    from chat_tui.engine import load_engine

    engine = load_engine(None, device="cpu")
    ids = engine.encode(TEXT)
    logits, _ = engine.runner().prefill(ids, inspect=False)
    for token in (int(np.argmax(logits)), 100):
        attribution = engine.attribute(ids, token)
        assert attribution.logit == pytest.approx(float(logits[token]), abs=1e-4)
        assert attribution.residual_error < 1e-4
        assert attribution.bias != 0.0  # trained: the layer norm's shift and the biases say something
        assert len(attribution.components) == 1 + engine.n_layer * (engine.n_head + 1)


def test_rollout_rows_sum_to_one_and_one_layer_is_half_attention_half_identity(tiny_engine, ids):
    from chat_tui.engine.explain import attention_matrix

    rolled = tiny_engine.rollout(ids)
    assert rolled.rollout.shape == rolled.last_layer.shape == (len(ids),)
    assert rolled.rollout.sum() == pytest.approx(1.0, abs=1e-5)
    assert rolled.last_layer.sum() == pytest.approx(1.0, abs=1e-5)
    assert not np.allclose(rolled.rollout, rolled.last_layer)

    torch.manual_seed(1)
    config = dataclasses.replace(tiny_engine.config, n_layer=1)
    one = MiniGPTEngine(GPT(config).eval(), tiny_engine.tokenizer, SamplingParams(), name="one-layer")
    a = attention_matrix(one.model, ids)[0].mean(0)  # heads averaged
    expected = 0.5 * a[-1] + 0.5 * np.eye(len(ids))[-1]
    result = one.rollout(ids)
    assert result.rollout == pytest.approx(expected, abs=1e-6)
    assert result.last_layer == pytest.approx(a[-1], abs=1e-6)


def test_knocking_out_no_heads_changes_nothing(tiny_engine, ids):
    ko = tiny_engine.knock_out(ids, frozenset())
    assert ko.kl_bits == 0.0
    assert all(before == after for _, before, after in ko.rows)
    assert ko.top_before == ko.top_after


def test_knocking_out_a_head_matches_zeroing_its_slice_by_hand(tiny_engine, ids):
    layer, head = 1, 0
    ko = tiny_engine.knock_out(ids, frozenset({(layer, head)}), top=5)
    reference = copy.deepcopy(tiny_engine.model)
    head_dim = reference.config.n_embd // reference.config.n_head
    with torch.no_grad():
        reference.transformer.h[layer].attn.c_proj.weight[:, head * head_dim : (head + 1) * head_dim] = 0
        logits, _, _ = reference(torch.tensor([ids]), last_only=True)
    after = torch.softmax(logits[0, -1].double(), -1).numpy()
    before = own_probs(tiny_engine, ids)
    for token, p_before, p_after in ko.rows:
        assert p_before == pytest.approx(before[token.id], abs=1e-5)
        assert p_after == pytest.approx(after[token.id], abs=1e-5)
    kl = float((before * (np.log(before) - np.log(after))).sum() / np.log(2))
    assert ko.kl_bits == pytest.approx(kl, abs=1e-4)
    assert ko.kl_bits > 0
    assert ko.top_after == int(after.argmax())


def test_a_head_outside_the_model_is_one_line(tiny_engine, ids):
    with pytest.raises(ValueError, match="L3H1 is outside this model"):
        tiny_engine.knock_out(ids, frozenset({(2, 0)}))


@pytest.mark.parametrize("text", ["你好", "Hello 你好 🙂 world", "a\nb  <|end|>"])
def test_token_pieces_count_as_the_encoder_and_their_bytes_round_trip(tiny_engine, text):
    pieces = tiny_engine.token_pieces(text)
    assert [p.id for p in pieces] == tiny_engine.encode(text)
    assert b"".join(p.data for p in pieces) == text.encode("utf-8")
    for piece in pieces:
        assert 0 <= piece.start < piece.end <= len(text)
        assert piece.data.decode("utf-8", "ignore") in text
    assert pieces[0].start == 0 and pieces[-1].end == len(text)


def test_a_chinese_character_can_be_several_byte_tokens(tiny_engine):
    pieces = tiny_engine.token_pieces("龍")  # not in the tiny tokenizer's corpus: its three UTF-8 bytes
    assert len(pieces) == 3
    assert [len(p.data) for p in pieces] == [1, 1, 1]
    assert all((p.start, p.end) == (0, 1) for p in pieces)


def test_block_trace_has_the_models_numbers(tiny_engine, ids):
    from chat_tui.engine.explain import explain_attention

    trace = tiny_engine.block_trace(ids, 1, 1)
    names = [row.name for row in trace.rows]
    assert names == ["token embedding", "position embedding", "residual in", "layer norm 1", "q", "k", "v",
                     "attention output", "residual + attention", "layer norm 2", "MLP output", "residual + MLP"]
    rows = {row.name: row for row in trace.rows}
    explained = explain_attention(tiny_engine.model, ids, len(ids) - 1, 1, 1)
    assert rows["q"].norm == pytest.approx(explained.query_norm, rel=1e-5)
    assert rows["k"].norm == pytest.approx(explained.key_norms[-1], rel=1e-5)
    assert len(rows["q"].first) == 6 and len(rows["k"].first) == 6
    wte = tiny_engine.model.transformer.wte.weight[ids[-1]].detach()
    assert rows["token embedding"].norm == pytest.approx(float(wte.norm()), rel=1e-6)
    assert "residual in" not in [row.name for row in tiny_engine.block_trace(ids, 0, 0).rows]


def test_the_app_engine_answers_the_same_from_the_model_process(tiny_checkpoint, tiny_engine, ids):
    from chat_tui.engine.process import ProcessEngine

    remote = ProcessEngine.start(tiny_checkpoint, device="cpu")
    try:
        assert inside(remote) is remote
        assert remote.inside_views() == tiny_engine.inside_views()
        assert remote.logit_lens(ids, 5) == tiny_engine.logit_lens(ids, 5)
        assert remote.attribute(ids, 5) == tiny_engine.attribute(ids, 5)
        theirs, ours = remote.rollout(ids), tiny_engine.rollout(ids)
        assert np.array_equal(theirs.rollout, ours.rollout) and np.array_equal(theirs.last_layer, ours.last_layer)
        assert remote.knock_out(ids, frozenset({(0, 1)})) == tiny_engine.knock_out(ids, frozenset({(0, 1)}))
        assert remote.token_pieces("你好") == tiny_engine.token_pieces("你好")
        assert remote.block_trace(ids, 1, 0) == tiny_engine.block_trace(ids, 1, 0)
        with pytest.raises(ValueError, match="outside this model"):  # the child's error, as itself
            remote.block_trace(ids, 5, 0)
        heads = frozenset({(1, 1)})
        params = SamplingParams(temperature=0.8, seed=2, max_new_tokens=8)
        theirs = collect(remote.stream(HELLO, params, knock_out=heads))
        ours = collect(tiny_engine.stream(HELLO, params, knock_out=heads))
        assert [s.token_id for s in theirs.steps] == [s.token_id for s in ours.steps]
        assert theirs.prompt.knocked_out == heads
    finally:
        remote.close()


# ---------------------------------------------------------------------------------------------- replies with heads off

HELLO = [Message("user", TEXT)]


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits, _, _ = model(torch.tensor([ids]), last_only=True)
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_a_reply_with_no_heads_off_is_the_same_reply(tiny_engine):
    params = SamplingParams(temperature=0.9, seed=5, max_new_tokens=12)
    plain = collect(tiny_engine.stream(HELLO, params))
    same = collect(tiny_engine.stream(HELLO, params, knock_out=frozenset()))
    assert [(s.token_id, s.prob) for s in same.steps] == [(s.token_id, s.prob) for s in plain.steps]
    assert same.prompt.knocked_out == frozenset()


def test_a_reply_with_a_head_off_is_the_greedy_reply_of_the_model_without_it(tiny_engine):
    tiny_engine = copy.copy(tiny_engine)
    tiny_engine.eos_ids = set()  # the untrained model would end at once
    heads = frozenset({(1, 0), (0, 1)})
    params = SamplingParams(temperature=0, max_new_tokens=10)
    reply = collect(tiny_engine.stream(HELLO, params, knock_out=heads))
    assert reply.prompt.knocked_out == heads
    reference = copy.deepcopy(tiny_engine.model)
    hd = reference.config.n_embd // reference.config.n_head
    with torch.no_grad():
        for layer, head in heads:
            reference.transformer.h[layer].attn.c_proj.weight[:, head * hd : (head + 1) * hd] = 0
    tokens = [s.token_id for s in reply.steps]
    expected = greedy_reference(reference, reply.prompt.ids, len(tokens))
    assert tokens == expected
    assert tokens != [s.token_id for s in collect(tiny_engine.stream(HELLO, params)).steps]


def test_a_head_outside_the_model_stops_the_reply_in_one_line(tiny_engine):
    with pytest.raises(EngineError, match="L9H1 is outside this model"):
        collect(tiny_engine.stream(HELLO, SamplingParams(max_new_tokens=3), knock_out=frozenset({(8, 0)})))


def test_the_fake_engine_records_the_heads_asked_off():
    from chat_tui.engine.fake import FakeEngine

    fake = FakeEngine("Hi there.")
    reply = collect(fake.stream(HELLO, SamplingParams(), knock_out=frozenset({(0, 1)})))
    assert fake.records[-1].knock_out == frozenset({(0, 1)})
    assert reply.prompt.knocked_out == frozenset({(0, 1)})


def test_views_reusing_the_last_contexts_cache_give_the_same_numbers(tiny_engine, ids):
    fed: list[int] = []
    handle = tiny_engine.model.transformer.wte.register_forward_hook(lambda m, a, out: fed.append(a[0].shape[-1]))

    def fresh(view, *args):
        tiny_engine._views_cache = tiny_engine._last_trace = None
        return view(*args)

    try:
        tiny_engine._views_cache = tiny_engine._last_trace = None
        fed.clear()
        # one token further, the same token again (kept whole), a shorter context, a different one
        for context in (ids[:4], ids[:5], ids[:5], ids[:3], ids[:2] + ids[5:6]):
            lens = tiny_engine.logit_lens(context, 5)
            attribution = tiny_engine.attribute(context, 5)
            trace = tiny_engine.block_trace(context, 1, 1)
            again = fresh(tiny_engine.logit_lens, context, 5)
            assert [x.chosen_prob for x in lens.layers] == pytest.approx([x.chosen_prob for x in again.layers], abs=1e-6)
            theirs = fresh(tiny_engine.attribute, context, 5)
            assert [c.value for c in attribution.components] == pytest.approx(
                [c.value for c in theirs.components], abs=1e-5)
            alone = fresh(tiny_engine.block_trace, context, 1, 1)
            assert [r.norm for r in trace.rows] == pytest.approx([r.norm for r in alone.rows], rel=1e-5)
            assert trace.rows[4].first == pytest.approx(alone.rows[4].first, abs=1e-5)
        tiny_engine._views_cache = tiny_engine._last_trace = None
        fed.clear()
        tiny_engine.logit_lens(ids[:4], 5)  # whole
        tiny_engine.logit_lens(ids[:5], 5)  # one token further
        tiny_engine.attribute(ids[:5], 5)  # the same pass, kept
        tiny_engine.logit_lens(ids[:3], 5)  # back: the shared two kept
        tiny_engine.rollout(ids[:3])  # every position's attention: whole
        assert fed == [4, 1, 1, 3]
    finally:
        handle.remove()


def test_rollout_is_the_last_row_of_the_whole_product():
    from chat_tui.engine.inside_maths import rollout

    rng = np.random.default_rng(0)
    layers = []
    for _ in range(3):
        a = np.tril(rng.random((2, 5, 5)))
        layers.append(a / a.sum(-1, keepdims=True))
    product = np.eye(5)
    for a in layers:
        m = 0.5 * a.mean(0) + 0.5 * np.eye(5)
        product = (m / m.sum(-1, keepdims=True)) @ product
    result = rollout(layers)
    assert result.rollout == pytest.approx(product[-1], abs=1e-6)
    assert result.last_layer == pytest.approx(layers[-1].mean(0)[-1], abs=1e-6)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0, max_new_tokens=40),
                                    SamplingParams(temperature=1.6, top_k=0, top_p=1.0, seed=3, max_new_tokens=40)])
def test_the_decode_loops_commitment_layer_is_the_lens_views(params):
    """The lens gutter's figure read from the decode kernel's residuals equals the lens view's own."""
    from chat_tui.engine import load_engine
    from chat_tui.engine.types import NO_COMMIT

    engine = load_engine(None, device="cpu")
    reply = collect(engine.stream([Message("user", "What is the capital of France?")], params, lens=True))
    ids = list(reply.prompt.ids)
    commits = []
    for step in reply.steps:
        expected = engine.logit_lens(ids, step.token_id, top=1).commit_layer
        assert step.commit_layer == (NO_COMMIT if expected is None else expected), step.index
        commits.append(step.commit_layer)
        ids.append(step.token_id)
    assert len(set(commits)) > 1  # the figure says something: tokens commit at different layers
    if params.temperature > 1:
        assert NO_COMMIT in commits  # a sampled token that is not the model's own top-1
    # asked for nothing, the loop reads no lens
    assert all(s.commit_layer is None for s in collect(engine.stream([Message("user", "Hi")], params)).steps)
