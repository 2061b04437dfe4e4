"""Truth: what the inspector shows equals the model's own numbers.

- the row view's weights equal a direct forward pass of the model;
- the explain view's softmax(scaled scores) equals the weights, and the scaled scores are the
  model's own pre-softmax scores;
- the candidates view's kept set equals what the sampling chain keeps on the full logits.

Run on a tiny random mini-GPT (always) and on the bundled model with a fixed seed (when its
weights are present).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from chat_tui.engine.explain import (  # noqa: E402
    ExplainUnavailable,
    attention_matrix,
    explain_attention,
    full_logits,
    replay_chain,
    vocab_size_of,
)
from chat_tui.engine.params import SamplingParams  # noqa: E402
from chat_tui.engine.sampling import apply_chain  # noqa: E402
from chat_tui.engine.types import Message  # noqa: E402
from chat_tui.ui.attention.store import AttentionStore  # noqa: E402
from chat_tui.ui.attention.views import explain_view, row_view  # noqa: E402

FLOAT16_ATOL = 2e-3  # rows travel as float16


def bundled_engine():
    from chat_tui.engine import CheckpointError, bundled_model_path, load_engine

    try:
        path = bundled_model_path()
    except CheckpointError:
        return None
    if not (path / "model.safetensors").exists() and not (path / "model.pt").exists():
        return None
    return load_engine(path, device="cpu")


@pytest.fixture(scope="module")
def bundled():
    engine = bundled_engine()
    if engine is None:
        pytest.skip("the bundled model (assets/minigpt) is not there yet")
    return engine


def stream(engine, params: SamplingParams, text: str = "The quick brown fox jumps over the lazy dog"):
    store = AttentionStore()
    steps = []
    for s in engine.stream([Message("user", text)], params, inspect=True):
        store.add_step(s)
        steps.append(s)
    return store, steps


def check_rows_equal_forward_pass(engine, store: AttentionStore) -> None:
    direct = attention_matrix(engine, store.ids)  # (L, H, N, N), one pass over the whole context
    n = store.length
    assert direct.shape[2] == n
    for pos in range(n):
        row = store.row(pos)
        assert row is not None
        np.testing.assert_allclose(row.astype(np.float32), direct[:, :, pos, : pos + 1], atol=FLOAT16_ATOL, rtol=0)
    # and what the row view prints (percent with one decimal) is that same weight
    layer, head, pos = engine.n_layer - 1, engine.n_head - 1, n - 1
    weights = store.head_row(pos, layer, head)
    text = row_view(weights, store.tokens, pos, width=60, height=n + 5).plain.splitlines()[1:]
    shown = {int(line.split()[0]): float(re.search(r"(\d+\.\d)%|100%", line).group(0).rstrip("%")) for line in text}
    assert sorted(shown) == list(range(n))
    for j, percent in shown.items():
        assert abs(percent - direct[layer, head, pos, j] * 100) <= 0.05 + FLOAT16_ATOL * 100


def check_explain(engine, store: AttentionStore, layers=None) -> None:
    ids = store.ids
    model = engine.model
    with torch.inference_mode():
        _, _, captured = model(torch.tensor([ids]), capture=True)
    for pos in (0, len(ids) // 2, len(ids) - 1):
        for layer in layers if layers is not None else range(engine.n_layer):
            for head in range(engine.n_head):
                e = explain_attention(engine, ids, pos, layer, head)
                scores, weights = captured[layer].scores, captured[layer].weights
                # the model's own pre-softmax scores, and softmax(scaled) = weights
                np.testing.assert_allclose(e.scaled, scores[0, head, pos, : pos + 1].double().numpy(), atol=1e-5)
                np.testing.assert_allclose(e.qk * e.scale, e.scaled, atol=1e-5)
                soft = np.exp(e.scaled - e.scaled.max())
                np.testing.assert_allclose(soft / soft.sum(), e.weights, atol=1e-6)  # float32 softmax
                np.testing.assert_allclose(e.weights, weights[0, head, pos, : pos + 1].double().numpy(), atol=1e-6)
                assert e.scale == pytest.approx(1 / np.sqrt(e.head_dim))
                assert e.value_norms.shape == (pos + 1,) and (e.value_norms >= 0).all()
                stored = store.row(pos)[layer, head].astype(np.float64)
                np.testing.assert_allclose(e.weights, stored, atol=FLOAT16_ATOL)
    text = explain_view(e, stored, store.tokens, pos, width=60, height=40).plain
    assert "softmax(q·kⱼ ÷ √" in text and "q·k" in text and "‖wⱼvⱼ‖" in text


def check_candidates(engine, steps, store: AttentionStore, extra: list[SamplingParams]) -> int:
    """The replayed kept set equals apply_chain's on the full logits; returns how many were exact."""
    vocab = vocab_size_of(engine)
    exact = 0
    for s in steps:
        context = store.context_ids(s.position)
        logits = full_logits(engine, context)
        # the stored logits are the model's
        np.testing.assert_allclose(s.top_logits, logits[torch.from_numpy(s.top_ids.astype(np.int64))].numpy(),
                                   atol=1e-4)
        for params in [s.params, *extra]:
            replay = replay_chain(s, context, params, vocab_size=vocab)
            full = apply_chain(logits, context, params, track=True)
            kept_full = set(np.flatnonzero(full.dropped_by == -1).tolist())
            if replay.exact:
                exact += 1
                assert not replay.tail_kept or replay.kept_ids() < kept_full
                if not replay.tail_kept:
                    assert replay.kept_ids() == kept_full
                np.testing.assert_allclose(
                    replay.chain_probs, full.probs[replay.ids].astype(np.float64), atol=1e-5
                )
                # the dropping stage of every stored candidate is the chain's own
                np.testing.assert_array_equal(replay.dropped_by, full.dropped_by[replay.ids])
            else:
                assert replay.notes  # the view says it is approximate
        # the step's own candidates, as reported while sampling, agree with the replay
        replay = replay_chain(s, context, s.params, vocab_size=vocab)
        if replay.exact:
            index = {int(t): i for i, t in enumerate(replay.ids.tolist())}
            for c in s.top:
                assert c.prob == pytest.approx(replay.raw_probs[index[c.id]], abs=1e-6)
                assert c.chain_prob == pytest.approx(replay.chain_probs[index[c.id]], abs=1e-5)
    return exact


TINY_EXTRA = [
    SamplingParams(temperature=0.7, top_k=30),
    SamplingParams(temperature=1.4, top_k=8, top_p=0.5),
    SamplingParams(top_k=50, min_p=0.2, repetition_penalty=1.3),
    SamplingParams(temperature=0.0),
    SamplingParams(),  # neutral: everything kept, tail included
    SamplingParams(temperature=0.8, top_p=0.6),  # depends on the unseen tail: flagged approximate
]


def test_tiny_model_truth(tiny_engine):
    params = SamplingParams(temperature=0.9, top_k=40, seed=3, max_new_tokens=12)
    store, steps = stream(tiny_engine, params)
    assert store.has_attention and store.generated == len(steps)
    check_rows_equal_forward_pass(tiny_engine, store)
    check_explain(tiny_engine, store)
    exact = check_candidates(tiny_engine, steps, store, TINY_EXTRA)
    assert exact >= len(steps) * 4  # top-k and greedy settings are always exact


def test_replay_flags_what_it_cannot_know(tiny_engine):
    params = SamplingParams(temperature=0.9, top_k=40, seed=3, max_new_tokens=3)
    store, steps = stream(tiny_engine, params)
    s = steps[0]
    # the tiny random model is nearly uniform: a third of the mass lies outside the stored 256
    replay = replay_chain(s, store.context_ids(s.position), SamplingParams(temperature=0.5, top_p=0.5),
                          vocab_size=vocab_size_of(tiny_engine))
    assert replay.tail_mass > 0.05
    assert not replay.exact and any("approximate" in n for n in replay.notes)
    neutral = replay_chain(s, store.context_ids(s.position), SamplingParams(), vocab_size=vocab_size_of(tiny_engine))
    assert neutral.exact and neutral.tail_kept
    np.testing.assert_allclose(neutral.chain_probs, neutral.raw_probs, atol=1e-6)


def test_explain_is_refused_for_a_backend_without_the_model():
    from tests.ui.attention.harness import fake_engine

    with pytest.raises(ExplainUnavailable, match="fake backend"):
        explain_attention(fake_engine(), [1, 2, 3], 2, 0, 0)


def test_bundled_model_truth_with_a_fixed_seed(bundled):
    params = bundled.default_params().with_(seed=1234, max_new_tokens=24)
    store, steps = stream(bundled, params, "what is ai")
    assert len(steps) >= 2
    check_rows_equal_forward_pass(bundled, store)
    check_explain(bundled, store, layers=(0, bundled.n_layer - 1))
    exact = check_candidates(bundled, steps, store, [SamplingParams(temperature=0.7, top_k=10, top_p=0.8)])
    assert exact >= len(steps)  # the model's defaults (top-k 40) are exact on every token
