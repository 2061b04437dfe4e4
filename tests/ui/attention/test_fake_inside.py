"""The FakeEngine's inside views: the made-up numbers keep the rules the inspector's tests lean on."""

from __future__ import annotations

import numpy as np

from chat_tui.engine.fake import FakeEngine
from chat_tui.engine.inside import INSIDE_VIEWS, inside


def engine() -> FakeEngine:
    return FakeEngine(n_layer=3, n_head=4)


def test_the_fake_is_an_inside_engine_and_says_which_views_it_cannot_show():
    fake = FakeEngine(unavailable_views={"block": "not for this one"})
    assert inside(fake) is fake
    views = fake.inside_views()
    assert list(views) == list(INSIDE_VIEWS)
    assert views["block"] == "not for this one" and views["lens"] is None


def test_lens_commits_at_the_known_layer_and_stays_top_1_after_it():
    fake = engine()
    ids = fake.encode("one two three four")
    lens = fake.logit_lens(ids[:-1], ids[-1])
    assert lens.commit_layer == fake.fake_commit_layer(ids[:-1])
    for layer in lens.layers:
        assert (layer.chosen_rank == 0) == (layer.layer >= lens.commit_layer)
        assert len(layer.top) == 3
    assert np.isclose(lens.surprisal_bits, -np.log2(lens.layers[-1].chosen_prob))


def test_attribution_components_and_bias_add_up_to_the_logit_and_the_decisive_head_leads():
    fake = engine()
    ids = fake.encode("one two three")
    attribution = fake.attribute(ids[:-1], ids[-1])
    assert attribution.residual_error < 1e-9
    top = max(attribution.components, key=lambda c: c.value)
    assert (top.layer, top.head) == fake.decisive_head
    assert len(attribution.components) == 1 + 3 * (4 + 1)


def test_rollout_rows_sum_to_one():
    fake = engine()
    rollout = fake.rollout(fake.encode("a b c d e"))
    assert rollout.rollout.shape == (5,)
    assert abs(float(rollout.rollout.sum()) - 1.0) < 1e-5
    assert abs(float(rollout.last_layer.sum()) - 1.0) < 1e-5


def test_knock_out_changes_the_top_token_only_for_the_decisive_head():
    fake = engine()
    ids = fake.encode("a b c")
    nothing = fake.knock_out(ids, frozenset())
    assert nothing.kl_bits == 0.0 and nothing.top_before == nothing.top_after
    assert all(before == after for _, before, after in nothing.rows)
    decisive = fake.knock_out(ids, frozenset({fake.decisive_head}))
    assert decisive.top_after != decisive.top_before and decisive.kl_bits > 0
    other = fake.knock_out(ids, frozenset({(0, 0)}))
    assert other.top_after == other.top_before and other.kl_bits > 0


def test_token_pieces_carry_real_bytes_and_split_characters_beyond_ascii_into_bytes():
    fake = engine()
    text = "Hi 你好, naïve"
    pieces = fake.token_pieces(text)
    assert b"".join(p.data for p in pieces) == text.encode()
    chinese = [p for p in pieces if p.start == 3]
    assert [p.text for p in chinese] == ["<0xE4>", "<0xBD>", "<0xA0>"]
    assert all(text[p.start:p.end] == p.data.decode() for p in pieces if p.data.isascii())


def test_stream_records_the_heads_knocked_out():
    from chat_tui.engine.types import Message

    fake = FakeEngine("Hi there.")
    list(fake.stream([Message("user", "hello")], fake.default_params(), knock_out=frozenset({(0, 1)})))
    assert fake.records[-1].knock_out == frozenset({(0, 1)})
