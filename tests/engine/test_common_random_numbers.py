"""Common random numbers: with one seed every decode step draws the same uniform number, so two streams
whose chains keep the same tokens with the same probabilities pick the same token."""

from __future__ import annotations

import random

import numpy as np

from chat_tui.engine.generation import run_stream
from chat_tui.engine.params import SamplingParams
from chat_tui.engine.sampling import apply_chain, draw, new_generator, sample
from chat_tui.engine.types import Message, MessageSpan

VOCAB = 40

# a small grid, so that two random settings often keep the same tokens by different routes
GRID = {
    "temperature": (0.0, 0.7, 1.0, 1.0, 1.3),
    "top_k": (0, 0, 1, 2, 3, 5, 40),
    "top_p": (1.0, 1.0, 0.3, 0.6, 0.9, 0.999),
    "min_p": (0.0, 0.0, 0.05, 0.2, 0.6),
    "typical_p": (1.0, 1.0, 1.0, 0.9),
    "repetition_penalty": (1.0, 1.0, 1.0, 1.3),
}


def random_settings(rng: random.Random) -> SamplingParams:
    return SamplingParams(**{name: rng.choice(values) for name, values in GRID.items()})


def test_chains_that_keep_the_same_tokens_with_the_same_probabilities_pick_the_same_token():
    """The property, over many random settings pairs (a seeded loop: hypothesis is not installed)."""
    rng = random.Random(0)
    numbers = np.random.default_rng(0)
    same_chain = differing_settings = 0
    for _ in range(3000):
        # steep logits: a few tokens hold the mass, so truncations of different kinds agree often
        logits = numbers.standard_normal(VOCAB).astype(np.float32) * 4.0
        context = numbers.integers(0, VOCAB, size=6).tolist()
        a, b = random_settings(rng), random_settings(rng)
        chain_a, chain_b = apply_chain(logits, context, a), apply_chain(logits, context, b)
        if not np.array_equal(chain_a.probs, chain_b.probs):
            continue
        same_chain += 1
        differing_settings += a != b
        for _ in range(5):
            uniform = draw(numbers)
            assert sample(chain_a, a, uniform) == sample(chain_b, b, uniform), (a, b, uniform)
    # the loop did test the property, mostly on settings that differ
    assert same_chain > 300 and differing_settings > 200, (same_chain, differing_settings)


def test_greedy_stays_the_argmax_whatever_the_draw():
    logits = np.random.default_rng(1).standard_normal(VOCAB).astype(np.float32)
    greedy = SamplingParams(temperature=0)
    chain = apply_chain(logits, None, greedy)
    assert {sample(chain, greedy, u) for u in (0.0, 0.3, 0.999)} == {int(np.argmax(logits))}


class BigramRunner:
    """A numpy model whose next logits depend on the last token only; the prompt's logits make token 7
    certain, so any settings pick it first."""

    uses_torch = False

    def __init__(self) -> None:
        self.table = np.random.default_rng(3).standard_normal((VOCAB, VOCAB)).astype(np.float32)

    def prefill(self, ids, inspect):
        certain = np.full(VOCAB, -1e9, dtype=np.float32)
        certain[7] = 0.0
        return certain, None

    def feed(self, token_id, inspect):
        return self.table[token_id].copy(), None


def stream_ids(params) -> list[int]:
    def render(conversation):
        return [1, 2], [MessageSpan(0, "user", 0, 2)]

    steps = run_stream(
        BigramRunner(), conversation=[Message("user", "hi")], render=render,
        decode=lambda ids: "".join(chr(65 + i) for i in ids), token_text=lambda i: chr(65 + i), eos_ids={0},
        context_length=256, params=params, inspect=False, cancel=None)
    return [step.token_id for step in steps]


def test_a_greedy_step_draws_too_so_later_steps_read_the_same_numbers():
    sampled = SamplingParams(temperature=1.0, seed=11, max_new_tokens=40)
    calls = {"n": 0}

    def greedy_first():  # asked once before the first token, then once per token
        calls["n"] += 1
        return sampled.with_(temperature=0.0) if calls["n"] <= 2 else sampled

    reference = stream_ids(sampled)
    switched = stream_ids(greedy_first)
    # both pick the certain token 7 first (one greedily), then sample the same distributions with the
    # same numbers: the replies are the same token for token
    assert reference[0] == switched[0] == 7
    assert switched == reference
    assert len(set(reference)) > 5  # they did sample: a reply of many different tokens


def test_one_seed_gives_the_same_numbers_as_its_generator():
    generator = new_generator(5)
    expected = np.random.Generator(np.random.PCG64(5)).random(3).tolist()
    assert [draw(generator) for _ in range(3)] == expected
