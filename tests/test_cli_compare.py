"""`chat-tui compare` on the bundled model: columns on the same random numbers, and where they diverge."""

from __future__ import annotations

import json

import pytest

from chat_tui.cli import main
from chat_tui.engine import Message, load_engine

PROMPT = "hello"


def compare(capsys, *args: str, prompt: str = PROMPT) -> tuple[int, list[dict], str]:
    code = main(["compare", prompt, *args, "--json"])
    captured = capsys.readouterr()
    return code, [json.loads(line) for line in captured.out.splitlines()], captured.err


def tokens_of(records: list[dict], column: int) -> list[int]:
    return [r["id"] for r in records if r.get("column") == column and "id" in r]


@pytest.fixture(scope="module")
def bundled():
    engine = load_engine(None, device="cpu")
    yield engine
    engine.close()


def test_identical_settings_give_identical_columns(capsys):
    code, records, err = compare(capsys, "--set", "temperature=1.2,top_p=0.95", "--set", "top_p=0.95 temperature=1.2",
                                 "--seed", "11", "--max-tokens", "24")
    assert code == 0, err
    first, second = tokens_of(records, 0), tokens_of(records, 1)
    assert first == second and len(first) > 3
    summaries = [r for r in records if r.get("done")]
    assert [s["column"] for s in summaries] == [0, 1]
    assert summaries[0]["mean_logprob"] == summaries[1]["mean_logprob"] < 0
    assert summaries[0]["perplexity"] > 1 and summaries[0]["stop_reason"] in ("eos", "length")
    assert records[-1] == {"divergence": None, "at_divergence": None}


def test_greedy_against_hot_marks_the_first_differing_token(capsys, bundled):
    prompt, seed = "what is ai", 2  # the replies share their first tokens
    greedy = [s.token_id for s in bundled.stream([Message("user", prompt)],
                                                  bundled.default_params().with_(temperature=0.0, seed=seed))]
    hot_params = bundled.default_params().with_(temperature=1.5, seed=seed, max_new_tokens=40)
    hot_steps = list(bundled.stream([Message("user", prompt)], hot_params))
    hot = [s.token_id for s in hot_steps]
    expected = next(i for i, (a, b) in enumerate(zip(greedy + [None] * 64, hot, strict=False)) if a != b)
    assert expected > 0

    code, records, err = compare(capsys, "--set", "temperature=0", "--set", "temperature=1.5", "--seed", str(seed),
                                 "--max-tokens", "40", prompt=prompt)
    assert code == 0, err
    assert tokens_of(records, 0) == greedy and tokens_of(records, 1) == hot
    last = records[-1]
    assert last["divergence"] == expected
    cold_at, hot_at = last["at_divergence"]
    assert cold_at["id"] == greedy[expected] and hot_at["id"] == hot[expected]
    # one model and one prefix up to the divergence: each column's raw probability of the other's token is
    # what the other column gave its own token; greedy gave the hot column's token nothing
    (cold_view,) = cold_at["others"]
    (hot_view,) = hot_at["others"]
    assert cold_view["id"] == hot[expected] and hot_view["id"] == greedy[expected]
    assert cold_view["prob"] == pytest.approx(hot_at["prob"], abs=1e-5)
    assert hot_view["prob"] == pytest.approx(cold_at["prob"], abs=1e-5)
    assert cold_view["chain_prob"] == 0.0 and cold_view["dropped_by"] in ("greedy", "top_p", "top_k", "min_p")
    assert 0.0 < hot_view["chain_prob"] < 1.0


def test_text_output_prints_the_columns_one_after_the_other(capsys):
    assert main(["compare", PROMPT, "--set", "temperature=0", "--set", "temperature=1.5", "--seed", "5",
                 "--max-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Same seed, same random draws: any difference between the columns comes from the "
                          "settings alone. (seed 5)")
    assert out.index("[A] temperature=0") < out.index("[B] temperature=1.5") < out.index("diverge at token")
    assert out.count("tokens/s · mean log-prob") == 2


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "temperature=-1", "--set", ""], "temperature = '-1' is invalid: allowed [0, 100]"),
    (["--set", "foo=1", "--set", ""], "--set: 'foo' is not a setting"),
    (["--set", "temperature", "--set", ""], "--set: 'temperature': write NAME=VALUE"),
    (["--set", "seed=3", "--set", ""], "--set: the seed is shared by every column"),
    (["--set", ""], "compare needs 2 to 4 columns, not 1"),
    (["--set", "", "--set", "", "--set", "", "--set", "", "--set", ""], "compare needs 2 to 4 columns, not 5"),
    (["--set", "", "--set", "", "--set", "", "--model", "a", "--model", "b"], "3 --set but 2 --model"),
])
def test_bad_columns_are_one_line_errors(capsys, args, message):
    assert main(["compare", PROMPT, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"chat-tui: error: {message}") and err.count("\n") == 1, err


def test_a_model_per_column(capsys, tiny_checkpoint):
    code, records, err = compare(capsys, "--model", str(tiny_checkpoint), "--model", str(tiny_checkpoint),
                                 "--seed", "2", "--max-tokens", "6")
    assert code == 0, err
    summaries = [r for r in records if r.get("done")]
    assert [s["model"] for s in summaries] == ["tiny", "tiny"]
    assert tokens_of(records, 0) == tokens_of(records, 1)
