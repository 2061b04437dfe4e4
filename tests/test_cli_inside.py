"""`chat-tui ask --trace/--knockout` and `chat-tui tokens` (issue #14), on the bundled model."""

from __future__ import annotations

import json

import pytest

from tests.test_cli import run

GREEDY = ("--temperature", "0", "--max-new-tokens", "4")


def lines(result) -> list[dict]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_ask_trace_adds_each_tokens_lens_and_attribution():
    from chat_tui.engine import load_engine

    n_layer = load_engine(None, device="cpu").n_layer
    records = lines(run("ask", "Hello", "--json", "--trace", "lens,attribution", *GREEDY))
    tokens, done = records[:-1], records[-1]
    assert done["done"] is True and "knocked_out" not in done
    for record in tokens:
        assert [layer["layer"] for layer in record["lens"]] == list(range(1, n_layer + 1))
        assert all(set(t) == {"token", "id", "prob"} for layer in record["lens"] for t in layer["top"])
        assert record["lens"][-1]["top"][0]["id"] == record["id"]  # greedy: the last layer's first is the token
        assert 1 <= record["commit_layer"] <= n_layer
        attribution = record["attribution"]
        names = [c["name"] for c in attribution["components"]]
        assert names[:3] == ["embed", "L1H1", "L1H2"] and "L1 MLP" in names
        total = sum(c["value"] for c in attribution["components"]) + attribution["bias"]
        assert total == pytest.approx(attribution["logit"], abs=1e-4)


def test_ask_knockout_generates_with_the_heads_off_and_says_so():
    from chat_tui.engine import Message, SamplingParams, collect, load_engine

    records = lines(run("ask", "Hello", "--json", "--knockout", "L3H1,l1h2", *GREEDY))
    assert records[-1]["knocked_out"] == ["L1H2", "L3H1"]
    engine = load_engine(None, device="cpu")
    params = engine.default_params().with_(temperature=0, max_new_tokens=4)
    reply = collect(engine.stream([Message("user", "Hello")], params, knock_out=frozenset({(0, 1), (2, 0)})))
    assert [r["id"] for r in records[:-1]] == [s.token_id for s in reply.steps]
    assert isinstance(params, SamplingParams)
    text = run("ask", "Hello", "--knockout", "L1H2", *GREEDY)
    assert text.returncode == 0 and "generated with L1H2 switched off" in text.stderr


@pytest.mark.parametrize(("flags", "message"), [
    (("--knockout", "L9H1"), "--knockout: L9H1 is outside this model (4 layers of 4 heads"),
    (("--knockout", "head2"), "--knockout: 'head2' is not a head"),
    (("--trace", "lens"), "--trace adds to each token's JSON object: use it with --json"),
    (("--json", "--trace", "lens,logits"), "--trace 'lens,logits': choose from lens, attribution"),
])
def test_bad_inside_flags_are_one_line(flags, message):
    result = run("ask", "Hello", *flags)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr


def test_tokens_prints_each_token_with_its_id_and_bytes_and_the_count():
    from chat_tui.engine import load_engine

    text = "你好 龍 world"
    engine = load_engine(None, device="cpu")
    record = lines(run("tokens", text, "--json"))[0]
    assert record["count"] == len(engine.encode(text)) == len(record["tokens"])
    assert [t["id"] for t in record["tokens"]] == engine.encode(text)
    assert b"".join(bytes.fromhex(t["bytes"]) for t in record["tokens"]) == text.encode("utf-8")
    assert record["context_length"] == engine.context_length
    plain = run("tokens", text)
    assert plain.returncode == 0
    out = plain.stdout.splitlines()
    assert out[-1] == f"{record['count']} tokens of a {engine.context_length}-token context"
    assert out[0].split()[0] == str(record["tokens"][0]["id"])
    assert "e4 bd a0" in plain.stdout  # 你, byte by byte
