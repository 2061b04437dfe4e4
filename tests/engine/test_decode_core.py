"""The decode core (`generation.run_stream`) runs without torch, and computes the candidates (the
top-256 raw logits and the log-sum-exp) only for a consumer that asked for them."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from chat_tui.engine import Message, SamplingParams, collect, generation
from chat_tui.engine.fake import FakeEngine

HELLO = [Message("user", "Hello there! How are you today?")]

TORCH_FREE = """
import sys
import numpy as np
from chat_tui.engine.generation import run_stream
from chat_tui.engine.types import Message, MessageSpan, collect
from chat_tui.engine.params import SamplingParams

class CountingRunner:
    uses_torch = False
    def __init__(self):
        self.position = 0
    def logits(self):
        out = np.zeros(16, dtype=np.float32)
        out[4 + self.position % 10] = 5.0
        return out
    def prefill(self, ids, inspect):
        self.position = len(ids)
        return self.logits(), None
    def feed(self, token_id, inspect):
        self.position += 1
        return self.logits(), None

def render(conversation):
    ids = [1] + [2] * len(conversation)
    return ids, [MessageSpan(i, m.role, 1 + i, 2 + i) for i, m in enumerate(conversation)]

reply = collect(run_stream(
    CountingRunner(), conversation=[Message("user", "hi")], render=render,
    decode=lambda ids: "".join(chr(96 + i) for i in ids), token_text=lambda i: chr(96 + i), eos_ids={0},
    context_length=64, params=SamplingParams(temperature=0.7, seed=1, max_new_tokens=5), inspect=False,
    cancel=None))
assert reply.finish_reason == "length" and reply.tokens == 5, reply
from chat_tui.engine.fake import FakeEngine
assert collect(FakeEngine(["a b c"]).stream([Message("user", "hi")], SamplingParams(seed=1))).text == "a b c"
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "textual"))
assert not heavy, heavy
print("ok", reply.text)
"""


def test_the_decode_loop_runs_without_importing_torch():
    done = subprocess.run([sys.executable, "-c", TORCH_FREE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok ")


@pytest.fixture
def candidate_work(monkeypatch) -> dict[str, int]:
    """How often the loop computed the top-256 and the log-sum-exp (the real functions still run)."""
    counts = {"top": 0, "logsumexp": 0}
    top, logsumexp = generation._candidates, generation._logsumexp

    def counted_top(*args, **kwargs):
        counts["top"] += 1
        return top(*args, **kwargs)

    def counted_logsumexp(*args, **kwargs):
        counts["logsumexp"] += 1
        return logsumexp(*args, **kwargs)

    monkeypatch.setattr(generation, "_candidates", counted_top)
    monkeypatch.setattr(generation, "_logsumexp", counted_logsumexp)
    return counts


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.8, seed=2, max_new_tokens=8),
                                    SamplingParams(temperature=0, max_new_tokens=8)], ids=["sampled", "greedy"])
def test_a_plain_reply_skips_the_candidates(tiny_engine, candidate_work, params):
    plain = collect(tiny_engine.stream(HELLO, params, candidates=False))
    assert candidate_work == {"top": 0, "logsumexp": 0}
    assert all(s.top == [] and s.top_ids is None and s.top_logits is None for s in plain.steps)
    assert all(math.isnan(s.logsumexp) and math.isnan(s.prob) for s in plain.steps)
    full = collect(tiny_engine.stream(HELLO, params))  # the inspector's: candidates=True by default
    assert candidate_work == {"top": full.tokens, "logsumexp": full.tokens}
    assert [s.token_id for s in plain.steps] == [s.token_id for s in full.steps], "the same reply either way"
    assert all(s.top and s.top_ids is not None and math.isfinite(s.logsumexp) for s in full.steps)


def test_ask_computes_candidates_for_json_only(tiny_checkpoint, candidate_work, capsys):
    from chat_tui.cli import main

    base = ["ask", "Hello", "--model", str(tiny_checkpoint), "--seed", "3", "--max-new-tokens", "6"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    assert plain.strip() and candidate_work == {"top": 0, "logsumexp": 0}
    assert main([*base, "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    tokens = records[-1]["tokens"]
    assert candidate_work == {"top": tokens, "logsumexp": tokens}
    assert all(record["top"] and 0 < record["prob"] <= 1 for record in records[:-1])
    assert "".join(record["token"] for record in records[:-1]) == plain.rstrip("\n")


def test_the_fake_drives_the_shared_loop(candidate_work):
    engine = FakeEngine(["one two three four five six"])
    reply = collect(engine.stream(HELLO, SamplingParams(seed=1, max_new_tokens=3), candidates=False))
    assert reply.text == "one two three" and reply.finish_reason == "length"
    assert all(s.top == [] and math.isnan(s.prob) for s in reply.steps)
    assert candidate_work == {"top": 0, "logsumexp": 0}
    # stop strings, cancel and the context come from run_stream too: a stop string never leaks
    reply = collect(engine.stream(HELLO, SamplingParams(seed=1, stop=("ee f",))))
    assert reply.text == "one two thr" and reply.finish_reason == "stop"
    assert all(s.top for s in reply.steps)  # the made-up candidates, when asked for
