"""The compare logic the CLI and the app share: settings lines, figures, the divergence."""

from __future__ import annotations

import math

import pytest

from chat_tui.engine import Message, SamplingParams, collect
from chat_tui.engine.compare import (
    SettingsLineError,
    column_stats,
    find_divergence,
    parse_settings,
    settings_line,
    stream_columns,
)
from chat_tui.engine.fake import FakeEngine


def test_a_settings_line_reads_both_separators_and_both_spellings():
    base = SamplingParams(temperature=0.8, top_p=0.95, seed=4)
    params = parse_settings("temperature=0.7 top-p=0.9,min_p=0.05  slide_context=off", base)
    assert params == base.with_(temperature=0.7, top_p=0.9, min_p=0.05, slide_context=False)
    assert parse_settings("  ", base) == base
    assert parse_settings(settings_line(params, base), base) == params
    assert settings_line(base, base) == ""


@pytest.mark.parametrize("line", ["temperature", "temp=1", "seed=1", "=3"])
def test_a_bad_settings_line_says_which_part(line):
    with pytest.raises(SettingsLineError):
        parse_settings(line, SamplingParams())


def steps_of(text: str, params: SamplingParams | None = None):
    engine = FakeEngine([text])
    return collect(engine.stream([Message("user", "hi")], params or SamplingParams(seed=1))).steps


def test_the_divergence_waits_for_a_column_that_still_streams():
    same, longer = steps_of("a b c"), steps_of("a b c d")
    assert find_divergence([same, steps_of("a b c")]) is None
    # "a b c" ended (its <|end|> token) where "a b c d" goes on with " d"
    divergence = find_divergence([same, longer])
    assert divergence is not None and divergence.index == 3
    assert divergence.columns[0].token_id == same[3].token_id and divergence.columns[1].token == " d"
    assert find_divergence([same[:2], longer]) is None  # the first column has not reached token 2 yet


def test_column_stats_are_the_mean_raw_log_probability_and_its_perplexity():
    steps = steps_of("one two three four")
    stats = column_stats(steps)
    mean = sum(math.log(s.prob) for s in steps) / len(steps)
    assert stats.tokens == len(steps) == 5 and stats.stop_reason == "eos"
    assert stats.mean_logprob == pytest.approx(mean) and stats.perplexity == pytest.approx(math.exp(-mean))
    assert column_stats([]).tokens == 0


def test_columns_stream_a_token_of_each_in_turn_and_match_their_own_streams(tiny_engine):
    conversation = [Message("user", "Hello there!")]
    params = [SamplingParams(temperature=t, seed=4, max_new_tokens=12) for t in (0.0, 1.5, 1.5)]
    pairs = list(stream_columns(tiny_engine, conversation, params))
    # one token of each column in turn while all three stream
    shortest = min(sum(1 for c, _ in pairs if c == k) for k in range(3))
    assert [c for c, _ in pairs[: 3 * shortest]] == [0, 1, 2] * shortest
    for column, column_params in enumerate(params):
        alone = [s.token_id for s in tiny_engine.stream(conversation, column_params)]
        assert [s.token_id for c, s in pairs if c == column] == alone
    # the same settings, the same draws: the same reply
    assert [s.token_id for c, s in pairs if c == 1] == [s.token_id for c, s in pairs if c == 2]


def test_a_model_process_streams_the_columns_too(tiny_checkpoint, tiny_engine):
    from chat_tui.engine.process import ProcessEngine

    conversation = [Message("user", "Hello there!")]
    params = [SamplingParams(temperature=t, seed=4, max_new_tokens=10) for t in (0.0, 1.5)]
    engine = ProcessEngine.start(tiny_checkpoint, device="cpu")
    try:
        pairs = list(stream_columns(engine, conversation, params))
        # and an ordinary stream still works after it
        after = [s.token_id for s in engine.stream(conversation, params[1])]
    finally:
        engine.close()
    expected = [[s.token_id for s in tiny_engine.stream(conversation, p)] for p in params]
    assert [[s.token_id for c, s in pairs if c == k] for k in range(2)] == expected
    assert after == expected[1]


def test_columns_on_different_vocabularies_compare_tokens_by_text():
    first, second = FakeEngine(["a b c"]), FakeEngine(["a b d"])
    second.encode("zzz unrelated words")  # the same texts get other ids in the second vocabulary
    a = collect(first.stream([Message("user", "hi")], SamplingParams(seed=1))).steps
    b = collect(second.stream([Message("user", "hi")], SamplingParams(seed=1))).steps
    assert [s.token_id for s in a[:2]] != [s.token_id for s in b[:2]]
    divergence = find_divergence([a, b], [first.token_text, second.token_text])
    assert divergence is not None and divergence.index == 2
    (other,) = divergence.columns[0].others
    assert other.token == " d" and other.dropped_by == "another vocabulary"
