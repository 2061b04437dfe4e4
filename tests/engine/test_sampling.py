"""The sampling chain against Hugging Face's processors, OpenAI's penalty formula and its own promises."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from chat_tui.engine import sampling
from chat_tui.engine.params import STAGES, SamplingParams
from chat_tui.engine.sampling import STAGE_NAMES, ChainResult, draw, new_generator, token_counts

VOCAB = 1000
SEEDS = (0, 1, 2)


def apply_chain(logits, context, params, **kwargs) -> ChainResult:
    """The chain (numpy) on `logits`, its result as torch tensors to compare with Hugging Face's."""
    if isinstance(logits, torch.Tensor):
        logits = logits.numpy()
    result = sampling.apply_chain(logits, context, params, **kwargs)
    dropped = None if result.dropped_by is None else torch.from_numpy(result.dropped_by)
    return ChainResult(torch.from_numpy(result.logits), torch.from_numpy(result.probs), dropped)


def sample(result: ChainResult, params, uniform=None) -> int:
    return sampling.sample(ChainResult(result.logits.numpy(), result.probs.numpy()), params, uniform)


def random_logits(seed: int, vocab: int = VOCAB, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, generator=g) * scale


def random_context(seed: int, length: int = 80, vocab: int = VOCAB) -> list[int]:
    g = torch.Generator().manual_seed(1000 + seed)
    # a narrow range so that ids repeat
    return torch.randint(0, vocab // 10, (length,), generator=g).tolist()


def hf(processor, logits: torch.Tensor, context: list[int] | None = None) -> torch.Tensor:
    ids = torch.tensor([context if context else [0]], dtype=torch.long)
    return processor(ids, logits.clone()[None, :])[0]


def top_p_knife_edge(x: torch.Tensor, top_p: float, tol: float = 1e-6) -> torch.Tensor:
    """Tokens whose fate under top-p hangs on rounding: cumulative mass within `tol` of 1 - top_p."""
    values, order = torch.sort(x)
    cum = values.softmax(0).cumsum(0)
    edge = torch.zeros_like(x, dtype=torch.bool)
    edge[order] = (cum - (1 - top_p)).abs() < tol
    return edge


def assert_same(
    ours: ChainResult | torch.Tensor, reference: torch.Tensor, may_differ: torch.Tensor | None = None
) -> None:
    got = ours.logits if isinstance(ours, ChainResult) else ours
    kept, kept_ref = torch.isfinite(got), torch.isfinite(reference)
    if may_differ is not None and not torch.equal(kept, kept_ref):
        # a rounding knife edge: only the tokens on it may differ, the rest must agree
        differ = kept != kept_ref
        assert not (differ & ~may_differ).any(), f"{int((differ & ~may_differ).sum())} tokens differ off the edge"
        both = kept & kept_ref
        torch.testing.assert_close(got[both], reference[both], rtol=1e-5, atol=1e-5)
        return
    assert torch.equal(kept, kept_ref), (
        f"kept sets differ: {int(kept.sum())} vs {int(kept_ref.sum())} tokens, "
        f"{int((kept != kept_ref).sum())} disagree"
    )
    torch.testing.assert_close(got[kept], reference[kept], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.softmax(got, 0), torch.softmax(reference, 0), rtol=0, atol=1e-6)
    if isinstance(ours, ChainResult):
        torch.testing.assert_close(ours.probs, torch.softmax(reference, 0), rtol=0, atol=1e-6)


@pytest.fixture(params=["full", "prefix"])
def prefix_mode(request, monkeypatch):
    """Run top-p and typical-p both by sorting the whole vocabulary and by widening a small prefix."""
    if request.param == "prefix":
        monkeypatch.setattr(sampling, "_PREFIX_K", 4)
        monkeypatch.setattr(sampling, "_GROW", 2)
        monkeypatch.setattr(sampling, "_FULL_SORT_MAX", 0)
    return request.param


def test_stage_names_are_the_params_stages():
    assert STAGE_NAMES == STAGES


# --- each stage against its reference ----------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.5, 4.0])
def test_temperature_matches_hf(seed, temperature):
    x = random_logits(seed)
    ours = apply_chain(x, None, SamplingParams(temperature=temperature))
    assert_same(ours, hf(TemperatureLogitsWarper(temperature), x))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("top_k", [1, 2, 10, 50, 999, 1000, 5000])
def test_top_k_matches_hf(seed, top_k):
    x = random_logits(seed)
    ours = apply_chain(x, None, SamplingParams(top_k=top_k))
    assert_same(ours, hf(TopKLogitsWarper(top_k), x))
    assert int(torch.isfinite(ours.logits).sum()) == min(top_k, VOCAB)


def test_top_k_keeps_ties_like_hf():
    x = torch.tensor([1.0, 3.0, 2.0, 2.0, 2.0, 0.0])
    ours = apply_chain(x, None, SamplingParams(top_k=2))
    assert_same(ours, hf(TopKLogitsWarper(2), x))
    assert torch.isfinite(ours.logits).tolist() == [False, True, True, True, True, False]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("top_p", [1e-9, 0.01, 0.3, 0.5, 0.9, 0.95, 0.999])
@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_top_p_matches_hf(seed, top_p, scale, prefix_mode):
    x = random_logits(seed, scale=scale)
    ours = apply_chain(x, None, SamplingParams(top_p=top_p))
    reference = hf(TopPLogitsWarper(top_p), x)
    if prefix_mode == "full":
        assert_same(ours, reference)  # the same arithmetic as Hugging Face: exactly the same set
    else:
        assert_same(ours, reference, may_differ=top_p_knife_edge(x, top_p))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("min_p", [0.001, 0.05, 0.1, 0.5, 1.0])
def test_min_p_matches_hf(seed, min_p):
    x = random_logits(seed)
    assert_same(apply_chain(x, None, SamplingParams(min_p=min_p)), hf(MinPLogitsWarper(min_p), x))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("typical_p", [0.05, 0.2, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_typical_p_matches_hf(seed, typical_p, scale, prefix_mode):
    x = random_logits(seed, scale=scale)
    ours = apply_chain(x, None, SamplingParams(typical_p=typical_p))
    assert_same(ours, hf(TypicalLogitsWarper(typical_p), x))


def test_typical_p_can_drop_the_most_likely_token():
    # one very likely token and many alike: the typical set is the crowd, not the favourite
    x = torch.zeros(VOCAB)
    x[7] = 6.0  # p = 0.29 while the entropy is 5.5 nats: the crowd is the typical set
    ours = apply_chain(x, None, SamplingParams(typical_p=0.5))
    assert_same(ours, hf(TypicalLogitsWarper(0.5), x))
    assert not torch.isfinite(ours.logits[7])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("penalty", [0.5, 0.9, 1.2, 2.0])
def test_repetition_matches_hf(seed, penalty):
    x = random_logits(seed)
    context = random_context(seed)
    ours = apply_chain(x, context, SamplingParams(repetition_penalty=penalty))
    reference = hf(RepetitionPenaltyLogitsProcessor(penalty), x, context)
    assert_same(ours, reference)
    assert not torch.equal(ours.logits, x)
    # tokens outside the context are untouched
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[torch.tensor(context)] = False
    assert torch.equal(ours.logits[outside], x[outside])


@pytest.mark.parametrize("window", [1, 5, 30])
def test_repetition_window_looks_at_the_last_ids_only(window):
    x = random_logits(3)
    context = random_context(3)
    ours = apply_chain(x, context, SamplingParams(repetition_penalty=1.3, repetition_window=window))
    assert_same(ours, hf(RepetitionPenaltyLogitsProcessor(1.3), x, context[-window:]))
    # a tensor context gives the same result
    as_tensor = apply_chain(x, torch.tensor(context), SamplingParams(repetition_penalty=1.3, repetition_window=window))
    assert torch.equal(ours.logits, as_tensor.logits)


def test_repetition_ignores_ids_outside_the_vocabulary():
    x = random_logits(4)
    ours = apply_chain(x, [3, VOCAB, VOCAB + 5, 3, 9], SamplingParams(repetition_penalty=1.5))
    assert_same(ours, hf(RepetitionPenaltyLogitsProcessor(1.5), x, [3, 9]))


def presence_frequency_reference(logits, context, presence, frequency, window=0):
    x = logits.numpy().astype(np.float64)
    ids = np.asarray(context[-window:] if window else context, dtype=np.int64)
    counts = np.bincount(ids, minlength=len(x))[: len(x)].astype(np.float64)
    return x - (counts * frequency + (counts > 0) * presence)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("presence", "frequency"), [(0.5, 0.0), (0.0, 0.7), (1.2, 0.3), (-0.8, -1.5), (2.0, 2.0)])
@pytest.mark.parametrize("window", [0, 10])
def test_presence_frequency_matches_openai_formula(seed, presence, frequency, window):
    x = random_logits(seed)
    context = random_context(seed)
    params = SamplingParams(presence_penalty=presence, frequency_penalty=frequency, repetition_window=window)
    ours = apply_chain(x, context, params)
    reference = presence_frequency_reference(x, context, presence, frequency, window)
    np.testing.assert_allclose(ours.logits.numpy(), reference, rtol=1e-6, atol=1e-5)


def test_token_counts():
    ids, counts = token_counts([5, 1, 5, 5, 2, 1], vocab_size=10)
    assert dict(zip(ids.tolist(), counts.tolist(), strict=True)) == {1: 2, 2: 1, 5: 3}
    ids, counts = token_counts([5, 1, 5, 5, 2, 1], vocab_size=10, window=2)
    assert dict(zip(ids.tolist(), counts.tolist(), strict=True)) == {1: 1, 2: 1}
    assert token_counts([], vocab_size=10) is None
    assert token_counts(None, vocab_size=10) is None


@pytest.mark.parametrize("seed", SEEDS)
def test_whole_default_chain_matches_hf_generate_order(seed, prefix_mode):
    x = random_logits(seed)
    context = random_context(seed)
    params = SamplingParams(
        repetition_penalty=1.3, temperature=0.8, top_k=200, top_p=0.9, min_p=0.02, typical_p=0.95
    )
    reference = LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(1.3),
            TemperatureLogitsWarper(0.8),
            TopKLogitsWarper(200),
            TopPLogitsWarper(0.9),
            MinPLogitsWarper(0.02),
            TypicalLogitsWarper(0.95),
        ]
    )
    ids = torch.tensor([context])
    assert_same(apply_chain(x, context, params), reference(ids, x.clone()[None, :])[0])


def test_large_vocabulary_top_p_and_typical_match_hf():
    # the widening prefix (256, then 2048, ...) on a real-sized vocabulary, peaked and flat
    for scale in (6.0, 0.3):
        x = random_logits(9, vocab=32_000, scale=scale)
        assert_same(
            apply_chain(x, None, SamplingParams(top_p=0.9)),
            hf(TopPLogitsWarper(0.9), x),
            may_differ=top_p_knife_edge(x, 0.9),
        )
        assert_same(apply_chain(x, None, SamplingParams(typical_p=0.9)), hf(TypicalLogitsWarper(0.9), x))


# --- chain behaviour ------------------------------------------------------------------------------------


def test_neutral_params_change_nothing():
    x = random_logits(0)
    result = apply_chain(x, [1, 2, 3], SamplingParams())
    assert torch.equal(result.logits, x)
    torch.testing.assert_close(result.probs, torch.softmax(x, 0))
    assert result.dropped_by is None


def test_input_is_not_modified_and_half_precision_is_accepted():
    x = random_logits(0)
    original = x.clone()
    params = SamplingParams(repetition_penalty=1.5, presence_penalty=1.0, temperature=0.5, top_k=5)
    apply_chain(x, [1, 2, 3], params)
    assert torch.equal(x, original)
    half = apply_chain(x.half(), [1, 2, 3], params)
    assert half.logits.dtype == torch.float32 and half.probs.dtype == torch.float32
    batched = apply_chain(x[None, :], [1, 2, 3], params)
    assert torch.equal(batched.logits, apply_chain(x, [1, 2, 3], params).logits)
    with pytest.raises(ValueError):
        apply_chain(torch.zeros(2, VOCAB), None, params)


def test_order_matters_where_it_should():
    x = random_logits(5)
    base = SamplingParams(temperature=2.0, min_p=0.1)
    after = apply_chain(x, None, base)  # default: temperature, then min_p
    order = list(base.order)
    order.remove("min_p")
    order.insert(order.index("temperature"), "min_p")
    before = apply_chain(x, None, base.with_(order=tuple(order)))
    assert torch.isfinite(before.logits).sum() < torch.isfinite(after.logits).sum()
    # min_p before temperature is min_p of the raw distribution, then scaled
    reference = hf(TemperatureLogitsWarper(2.0), hf(MinPLogitsWarper(0.1), x))
    assert_same(before, reference)

    # presence penalties do not commute with temperature (they subtract, temperature divides)
    pf = SamplingParams(temperature=0.5, presence_penalty=1.0)
    swapped = list(pf.order)
    swapped.remove("presence_frequency")
    swapped.insert(swapped.index("temperature") + 1, "presence_frequency")
    a = apply_chain(x, [1, 2, 3], pf).logits
    b = apply_chain(x, [1, 2, 3], pf.with_(order=tuple(swapped))).logits
    assert not torch.allclose(a, b)

    # top_k before or after top_p is not the same either: top_p renormalises over what top_k kept
    kp = SamplingParams(top_k=20, top_p=0.5, temperature=1.0)
    kp_order = list(kp.order)
    kp_order.remove("top_k")
    kp_order.insert(kp_order.index("top_p") + 1, "top_k")
    flat = random_logits(5, scale=0.3)
    assert not torch.equal(
        torch.isfinite(apply_chain(flat, None, kp).logits),
        torch.isfinite(apply_chain(flat, None, kp.with_(order=tuple(kp_order))).logits),
    )

    # ...while top_k commutes with temperature (scaling keeps the ranking)
    tk = SamplingParams(temperature=0.5, top_k=30)
    tk_order = list(tk.order)
    tk_order.remove("top_k")
    tk_order.insert(0, "top_k")
    torch.testing.assert_close(apply_chain(x, None, tk).probs, apply_chain(x, None, tk.with_(order=tuple(tk_order))).probs)


def test_track_reports_the_stage_that_dropped_each_token():
    x = random_logits(6)
    params = SamplingParams(temperature=0.9, top_k=300, top_p=0.95, min_p=0.2)
    result = apply_chain(x, None, params, track=True)
    d = result.dropped_by
    assert d is not None and d.dtype == torch.int8 and d.shape == (VOCAB,)
    kept = torch.isfinite(result.logits)
    assert torch.equal(d == -1, kept)

    # replay the stages one by one with Hugging Face's processors
    scaled = hf(TemperatureLogitsWarper(0.9), x)
    after_k = hf(TopKLogitsWarper(300), scaled)
    after_p = hf(TopPLogitsWarper(0.95), after_k)
    after_min = hf(MinPLogitsWarper(0.2), after_p)
    order = params.order
    expected = torch.full((VOCAB,), -1, dtype=torch.int8)
    expected[torch.isfinite(scaled) & ~torch.isfinite(after_k)] = order.index("top_k")
    expected[torch.isfinite(after_k) & ~torch.isfinite(after_p)] = order.index("top_p")
    expected[torch.isfinite(after_p) & ~torch.isfinite(after_min)] = order.index("min_p")
    for stage in ("top_k", "top_p", "min_p"):
        assert (expected == order.index(stage)).any(), f"{stage} dropped nothing: a weak test"
    assert torch.equal(d, expected)


def test_track_follows_a_custom_order():
    x = random_logits(7)
    order = ("min_p", "top_k", "temperature", "repetition", "presence_frequency", "top_p", "typical_p")
    result = apply_chain(x, None, SamplingParams(min_p=0.01, top_k=3, order=order), track=True)
    d = result.dropped_by
    assert d is not None
    by_min_p = ~torch.isfinite(hf(MinPLogitsWarper(0.01), x))
    assert torch.equal(d == 0, by_min_p)
    assert int((d == -1).sum()) == 3
    assert torch.equal(d == 1, ~by_min_p & ~torch.isfinite(result.logits))
    assert by_min_p.any() and (d == 1).any()


def test_track_marks_tokens_masked_before_the_chain():
    x = random_logits(8)
    x[10] = float("-inf")
    d = apply_chain(x, None, SamplingParams(top_k=5), track=True).dropped_by
    assert d is not None
    assert int(d[10]) == sampling.MASKED_BEFORE
    assert int((d == SamplingParams().order.index("top_k")).sum()) == VOCAB - 5 - 1
    assert int((d == -1).sum()) == 5


# --- drawing ----------------------------------------------------------------------------------------------


def test_greedy_returns_argmax_of_processed_logits():
    x = random_logits(0)
    params = SamplingParams(temperature=0.0)
    result = apply_chain(x, None, params)
    best = int(torch.argmax(x))
    assert sample(result, params, None) == best
    expected = torch.zeros(VOCAB)
    expected[best] = 1.0
    assert torch.equal(result.probs, expected)
    assert torch.equal(result.logits, x)  # no division by zero

    # penalties apply in greedy too: penalise the favourite and the argmax moves
    penalised = apply_chain(x, [best], params.with_(presence_penalty=2.0, frequency_penalty=2.0))
    new_best = int(torch.argmax(penalised.logits))
    assert new_best != best
    assert sample(penalised, params, None) == new_best
    assert float(penalised.probs[new_best]) == 1.0 and float(penalised.probs.sum()) == 1.0


def test_greedy_ties_pick_the_lowest_id():
    x = torch.tensor([0.0, 2.0, 1.0, 2.0])
    params = SamplingParams(temperature=0)
    result = apply_chain(x, None, params)
    assert sample(result, params, None) == 1
    assert result.probs.tolist() == [0.0, 1.0, 0.0, 0.0]


def draws(result, params, seed, n=200):
    g = new_generator(seed)
    return [sample(result, params, draw(g)) for _ in range(n)]


def test_seeded_draws_repeat_and_different_seeds_differ():
    params = SamplingParams(temperature=1.0)
    result = apply_chain(random_logits(0, scale=1.0), None, params)
    assert draws(result, params, 42) == draws(result, params, 42)
    assert draws(result, params, 42) != draws(result, params, 43)


def test_draws_follow_the_distribution_and_never_pick_dropped_tokens():
    x = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4, 1e-3, 1e-3]))
    params = SamplingParams(top_k=4)
    result = apply_chain(x, None, params)
    got = np.bincount(draws(result, params, 0, n=20_000), minlength=6) / 20_000
    assert got[4] == 0 and got[5] == 0
    expected = result.probs.numpy()
    np.testing.assert_allclose(got, expected, atol=0.015)


def test_top_p_keeps_the_top_token_however_small_p_is():
    x = random_logits(0)
    kept = torch.isfinite(apply_chain(x, None, SamplingParams(top_p=1e-9)).logits)
    assert kept.tolist() == (torch.arange(VOCAB) == torch.argmax(x)).tolist()


@pytest.mark.parametrize("u", [0.0, 1.0 - 2**-53, 1.0])
def test_extreme_uniform_draws_never_pick_a_dropped_token(u):
    # the first and the last tokens are dropped; the draw must land on a kept one whatever u is
    x = torch.tensor([-50.0, 1.0, 2.0, 3.0, -50.0])
    params = SamplingParams(min_p=0.01)
    result = apply_chain(x, None, params)
    assert result.probs[0] == 0 and result.probs[-1] == 0

    assert sample(result, params, u) == (1 if u == 0.0 else 3)


@pytest.mark.parametrize(
    "changes",
    [
        dict(temperature=0.0),
        dict(temperature=0.0, top_k=3, top_p=0.3, min_p=0.2),
        dict(temperature=0.0, repetition_penalty=3.0),
        dict(temperature=0.0, presence_penalty=2.0),
        dict(temperature=0.0, typical_p=0.2),
        dict(temperature=0.7),
    ],
)
def test_the_decode_loop_skips_the_chain_only_when_it_would_pick_the_raw_argmax(changes):
    params = SamplingParams(**changes)
    generator = torch.Generator().manual_seed(0)
    changed_pick = False
    for _ in range(200):
        logits = torch.randn(50, generator=generator) * 3
        context = torch.argsort(logits, descending=True)[:2]  # the penalties hit the two most likely tokens
        chain = apply_chain(logits, context, params)
        pick = sample(chain, params, draw(new_generator(1)))
        if sampling.picks_argmax(params):
            assert pick == int(torch.argmax(logits))
            assert chain.probs[pick] == 1.0
        changed_pick |= pick != int(torch.argmax(logits))
    # where the loop must run the chain, the chain does change the pick for some rows
    assert changed_pick != sampling.picks_argmax(params)


# ----------------------------------------------------------------------------------------------------
# the logit bias: OpenAI's, on the raw logits before every stage


def test_a_logit_bias_gives_softmax_of_the_biased_logits():
    logits = random_logits(0)
    params = SamplingParams(temperature=0.7, logit_bias="3:2.5,10:-1,999:4")
    biased = logits.clone()
    biased[[3, 10, 999]] += torch.tensor([2.5, -1.0, 4.0])
    expected = torch.softmax(biased / 0.7, dim=-1)  # added before the temperature divides
    got = apply_chain(logits, None, params).probs
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert got[3] > torch.softmax(logits / 0.7, dim=-1)[3]  # a positive bias raises the token's chance


def test_a_token_biased_minus_100_is_never_drawn():
    logits = random_logits(1)
    favourite = int(torch.argmax(logits))
    params = SamplingParams(logit_bias={str(favourite): -100})
    chain = apply_chain(logits, None, params)
    generator = new_generator(0)
    assert all(sample(chain, params, draw(generator)) != favourite for _ in range(2000))
    greedy = params.with_(temperature=0.0)
    assert not sampling.picks_argmax(greedy)  # the decode loop must run the chain for it
    assert sample(apply_chain(logits, None, greedy), greedy) != favourite


def test_a_logit_bias_outside_the_vocabulary_is_ignored_and_drops_nothing():
    logits = random_logits(2)
    chain = apply_chain(logits, None, SamplingParams(logit_bias="5:-100,5000:50"), track=True)
    assert bool((chain.dropped_by == -1).all())  # a bias moves logits; it never drops a token
    assert chain.logits[5] == pytest.approx(float(logits[5]) - 100)


def _stored_step(logits: np.ndarray, stored: int, params: SamplingParams):
    from chat_tui.engine.types import Step

    order = np.argsort(-logits, kind="stable")[:stored]
    lse = float(np.log(np.exp(logits.astype(np.float64)).sum()))
    return Step(index=0, position=0, token_id=int(order[0]), token="", text="", prob=0.0, chain_prob=0.0,
                top=[], attention=None, top_ids=order, top_logits=logits[order], logsumexp=lse,
                step_s=0.0, elapsed_s=0.0, params=params)


def test_the_candidates_replay_applies_the_logit_bias_by_token_id():
    from chat_tui.engine.explain import replay_chain

    logits = random_logits(3, vocab=256).numpy()
    step = _stored_step(logits, 256, SamplingParams())
    ranked = np.argsort(-logits)
    params = SamplingParams(temperature=0.8, top_k=20, logit_bias={str(ranked[0]): -100, str(ranked[40]): 8})
    replay = replay_chain(step, [], params, vocab_size=256)
    full = sampling.apply_chain(logits, None, params, track=True)
    assert replay.exact
    np.testing.assert_allclose(replay.chain_probs, full.probs[replay.ids], atol=1e-6)
    assert int(ranked[0]) not in replay.kept_ids() and int(ranked[40]) in replay.kept_ids()
    # a bias on a token the step did not store cannot be replayed: said so, not claimed exact
    wide = random_logits(3, vocab=1000).numpy()
    unseen = int(np.argsort(-wide)[500])
    replay = replay_chain(_stored_step(wide, 256, SamplingParams()), [], SamplingParams(logit_bias={str(unseen): 50}),
                          vocab_size=1000)
    assert not replay.exact and any("logit bias" in note for note in replay.notes)
