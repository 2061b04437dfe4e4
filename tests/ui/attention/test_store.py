"""AttentionStore: rows fed incrementally, the memory cap, message groups, views' plain text."""

from __future__ import annotations

import numpy as np

from chat_tui.engine.types import MessageSpan, PromptInfo, Step
from chat_tui.ui.attention.stats import head_stats, turn_shares
from chat_tui.ui.attention.store import AttentionStore
from chat_tui.ui.attention.views import candidates_view, row_view, turns_view
from tests.ui.attention.harness import fake_engine, fake_steps


def causal(layers: int, heads: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = rng.random((layers, heads, n, n)) * np.tril(np.ones((n, n)))
    return (m / m.sum(-1, keepdims=True)).astype(np.float16)


def prompt(n: int, attention=None, tokens=None) -> PromptInfo:
    return PromptInfo(
        ids=list(range(n)), tokens=tokens or [f"t{i}" for i in range(n)],
        spans=[MessageSpan(0, "system", 1, 3), MessageSpan(1, "user", 3, n - 1), MessageSpan(-1, "assistant", n - 1, n)],
        dropped_messages=0, dropped_tokens=0, seed=1, prefill_s=0.0, attention=attention,
    )


def step(position: int, row, index: int = 0, pinfo=None, token: str = "x") -> Step:
    return Step(
        index=index, position=position, token_id=100 + position, token=token, text=token, prob=0.5, chain_prob=0.6,
        top=[], attention=row, top_ids=None, top_logits=None, logsumexp=0.0, step_s=0.0, elapsed_s=0.0,
        prompt=pinfo,
    )


def test_rows_are_taken_in_without_recomputing():
    full = causal(2, 3, 8)
    store = AttentionStore()
    p = prompt(5, full[:, :, :5, :5])
    for i, pos in enumerate(range(5, 8)):
        store.add_step(step(pos, full[:, :, pos, : pos + 1], index=i, pinfo=p if i == 0 else None))
    assert store.length == 8 and store.prompt_length == 5 and store.generated == 3
    assert store.n_layers == 2 and store.n_heads == 3
    for pos in range(8):
        np.testing.assert_array_equal(store.row(pos), full[:, :, pos, : pos + 1])
        assert store.row(pos).dtype == np.float16
    np.testing.assert_allclose(store.head_row(6, 1, 2), full[1, 2, 6, :7].astype(np.float32))
    np.testing.assert_allclose(store.head_row(6, 1, 0, "mean"), full[1, :, 6, :7].astype(np.float32).mean(0), rtol=1e-6)
    np.testing.assert_allclose(store.head_row(6, 1, 0, "max"), full[1, :, 6, :7].astype(np.float32).max(0))
    assert store.nbytes == sum(store.row(i).nbytes for i in range(8))
    assert store.kept_rows == 8
    assert store.step_at(6).attention is None and store.step_at(6).token_id == 106
    assert store.context_ids(6) == [0, 1, 2, 3, 4, 105]
    positions, dense = store.dense()
    assert positions.tolist() == list(range(8)) and dense.shape == (2, 3, 8, 8)
    np.testing.assert_array_equal(dense[:, :, 7, :], full[:, :, 7, :])
    assert dense[0, 0, 2, 3] == 0


def test_memory_cap_drops_the_oldest_rows():
    full = causal(2, 2, 40)
    per_key = 2 * 2 * 2  # layers × heads × float16
    # room for rows 30..39 of the prompt only
    cap = per_key * sum(i + 1 for i in range(30, 40))
    store = AttentionStore(cap_bytes=cap)
    store.begin(prompt(40, full))
    assert store.first_kept == 30 and store.dropped_rows == 30
    assert store.row(29) is None and store.row(30) is not None
    assert store.nbytes <= cap
    store.add_step(step(40, causal(2, 2, 41)[:, :, 40, :]))
    assert store.nbytes <= cap and store.dropped_rows == 32  # two rows of 31 and 32 keys make room for 41
    assert store.row(31) is None and store.row(40) is not None
    assert store.has_attention and store.kept_rows == 41 - 32
    assert store.nbytes == sum(store.row(i).nbytes for i in range(32, 41))


def test_a_new_reply_starts_afresh():
    store = AttentionStore()
    store.begin(prompt(4, causal(1, 1, 4)))
    epoch = store.epoch
    store.add_step(step(4, None, pinfo=prompt(4, None)))  # the pane was hidden: no attention
    assert store.epoch > epoch
    assert not store.has_attention and store.missing_rows == 5 and store.length == 5


def test_turn_groups_and_shares():
    store = AttentionStore()
    store.begin(prompt(6, causal(1, 1, 6)))
    store.add_step(step(6, causal(1, 1, 7)[:, :, 6, :]))
    owner, labels = store.groups()
    assert labels == ["system", "user 1", "reply header", "other (specials)", "this reply"]
    assert owner == [3, 0, 0, 1, 1, 2, 4]
    w = np.array([0.1, 0.2, 0.1, 0.3, 0.1, 0.15, 0.05])
    np.testing.assert_allclose(turn_shares(w, owner, len(labels)), [0.3, 0.4, 0.15, 0.1, 0.05])
    text = turns_view(w, owner, labels, width=40, height=10).plain
    assert "user 1" in text and "40.0%" in text


def test_fake_engine_spans_cover_every_message():
    engine = fake_engine()
    store = AttentionStore()
    for s in fake_steps(engine):
        store.add_step(s)
    owner, labels = store.groups()
    assert labels[:4] == ["system", "user 1", "reply 1", "user 2"]
    assert labels[-1] == "this reply"
    row = store.head_row(store.length - 1, 0, 0)
    assert abs(turn_shares(row, owner, len(labels)).sum() - 1.0) < 1e-2


def test_head_stats():
    row = np.zeros((1, 3, 4))
    row[0, 0] = [1, 0, 0, 0]  # all on the first token
    row[0, 1] = [0, 0, 1, 0]  # all on the previous token
    row[0, 2] = [0.25] * 4  # uniform
    stats = head_stats(row)
    np.testing.assert_allclose(stats.entropy[0], [0, 0, 2])
    assert stats.max_entropy == 2
    np.testing.assert_allclose(stats.first[0], [1, 0, 0.25])
    np.testing.assert_allclose(stats.previous[0], [0, 1, 0.25])


def test_untrusted_token_text_stays_literal():
    nasty = "[bold red]x[/bold red]\x1b[2J\x1b]52;c;aGk=\x07"
    w = np.array([0.5, 0.5], dtype=np.float32)
    text = row_view(w, ["a", nasty], 1, width=60, height=5)
    assert "\x1b" not in text.plain and "\x07" not in text.plain
    assert "[bold red]x[/" in text.plain  # cropped to the label's width, but literal
    wide = row_view(w, ["a", nasty], 1, width=90, height=5).plain
    assert "[bold red]x[/bold red]␛[2J" in wide
    assert not any("red" in str(span.style) for span in text.spans)


def test_candidates_view_lists_the_steps_candidates():
    engine = fake_engine()
    steps = fake_steps(engine)
    s = steps[2]
    text = candidates_view(s, None, None, width=44, height=20).plain
    assert "▶" in text and "sampled" in text
    assert text.count("\n") <= 19


def test_row_view_sorted_and_windowed():
    w = np.array([0.1, 0.6, 0.3], dtype=np.float32)
    plain = row_view(w, ["a", "b", "c"], 2, width=40, height=10, sort=True).plain.splitlines()
    assert [line.split()[1] for line in plain[1:]] == ["b", "c", "a"]
    long = np.full(100, 0.01, dtype=np.float32)
    lines = row_view(long, [str(i) for i in range(100)], 99, width=40, height=8, offset=10).plain.splitlines()
    assert len(lines) == 8
    assert lines[1].startswith("↑") and lines[-1].startswith("↓")
