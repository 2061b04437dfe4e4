"""The sampling chain shared by every backend: penalties, temperature and truncations, then a draw.

Each stage follows a reference implementation exactly:

- ``logit_bias`` (always first, outside ``params.order``): OpenAI's, each bias added to its token's raw
  logit (ids outside the vocabulary are ignored); it moves logits and never drops a token;
- ``repetition``: Hugging Face ``RepetitionPenaltyLogitsProcessor`` (logit < 0: × penalty, else ÷ penalty,
  once per distinct token in the window);
- ``presence_frequency``: OpenAI's formula ``logit -= count × frequency + (count > 0) × presence``;
- ``temperature``: ``logit / T``; T = 0 means greedy (no division, the draw is the argmax);
- ``top_k``, ``top_p``, ``min_p``, ``typical_p``: Hugging Face's ``TopKLogitsWarper``,
  ``TopPLogitsWarper``, ``MinPLogitsWarper`` and ``TypicalLogitsWarper`` with ``min_tokens_to_keep=1``.

The stages run in ``params.order``; a stage at its neutral value is skipped and costs nothing.
Everything works on one 1-D numpy row of logits (no torch: the mini-GPT's CPU decoder never loads
it); no Python loop ever walks the vocabulary, and the truncations that need an ordering (top-p,
typical) sort only a prefix of the vocabulary when that prefix already holds the mass they keep.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from chat_tui.engine import params as _params
from chat_tui.engine.params import SamplingParams

STAGE_NAMES = _params.STAGES

NEG_INF = float("-inf")

MASKED_BEFORE = _params.MASKED_BEFORE

# top-p and typical-p first look at this many candidates and widen (× _GROW) only when the mass they
# must keep lies beyond them; vocabularies up to _FULL_SORT_MAX are simply sorted whole.
_PREFIX_K = 256
_GROW = 8
_FULL_SORT_MAX = 4 * _PREFIX_K


@dataclass
class ChainResult:
    """The logits after the chain, their distribution and (optionally) which stage dropped what."""

    logits: np.ndarray  # float32 [V]; a dropped token is -inf
    probs: np.ndarray  # float32 [V]; softmax of `logits` (one-hot on the argmax when greedy)
    # int8 [V] when tracking: -1 kept, else the index into params.order of the stage that dropped it
    # (MASKED_BEFORE = -2 for a token that was -inf before the chain started)
    dropped_by: np.ndarray | None = None


def as_row(logits: Any) -> np.ndarray:
    """One row of logits as a float32 numpy array (a copy); a torch tensor is converted without
    this module importing torch."""
    if not isinstance(logits, np.ndarray):
        logits = logits.detach().float().cpu().numpy()
    if logits.ndim != 1:
        if logits.ndim == 2 and logits.shape[0] == 1:
            logits = logits[0]
        else:
            raise ValueError(f"apply_chain takes one row of logits, not shape {tuple(logits.shape)}")
    return np.array(logits, dtype=np.float32, copy=True)


def context_array(context_ids: Any, window: int, vocab_size: int) -> np.ndarray | None:
    """The ids the penalties look at (the last `window` ids, all when 0) as int64, out-of-vocab ids dropped."""
    if context_ids is None:
        return None
    if not isinstance(context_ids, np.ndarray) and hasattr(context_ids, "detach"):  # a torch tensor
        context_ids = context_ids.detach().cpu().numpy()
    ids = np.asarray(context_ids if isinstance(context_ids, (np.ndarray, Sequence)) else list(context_ids),
                     dtype=np.int64).reshape(-1)
    if window > 0:
        ids = ids[-window:]
    if ids.size == 0:
        return None
    # like Hugging Face, ids the output layer cannot produce are not penalised
    inside = (ids >= 0) & (ids < vocab_size)
    if not inside.all():
        ids = ids[inside]
        if ids.size == 0:
            return None
    return ids


def token_counts(context_ids: Any, vocab_size: int, window: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
    """(distinct ids, how often each occurs) in the last `window` context ids (all when 0); None if empty."""
    ids = context_array(context_ids, window, vocab_size)
    if ids is None:
        return None
    unique, counts = np.unique(ids, return_counts=True)
    return unique, counts


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _top_indices(values: np.ndarray, k: int, largest: bool = True) -> np.ndarray:
    """Indices of the k largest (or smallest) values, in that order."""
    keyed = -values if largest else values
    if k < values.size:
        part = np.argpartition(keyed, k - 1)[:k]
        return part[np.argsort(keyed[part], kind="stable")]
    return np.argsort(keyed, kind="stable")


# ----------------------------------------------------------------------------------------------------
# The stages. Each works in place on a float32 row `x` that apply_chain owns.


def _repetition(x: np.ndarray, ids: np.ndarray, penalty: float) -> None:
    score = x[ids]
    x[ids] = np.where(score < 0, score * np.float32(penalty), score / np.float32(penalty))


def _presence_frequency(x: np.ndarray, ids: np.ndarray, counts: np.ndarray, presence: float, frequency: float) -> None:
    x[ids] += (counts.astype(np.float32) * np.float32(-frequency) - np.float32(presence))  # ids are distinct


def _logit_bias(x: np.ndarray, pairs: tuple[tuple[int, float], ...]) -> None:
    ids = np.fromiter((token for token, _ in pairs), dtype=np.int64, count=len(pairs))
    biases = np.fromiter((bias for _, bias in pairs), dtype=np.float32, count=len(pairs))
    inside = ids < x.size
    x[ids[inside]] += biases[inside]  # the ids are distinct


def _top_k(x: np.ndarray, k: int) -> None:
    if k >= x.size:
        return
    # the k-th largest value; ties with it are kept, as in Hugging Face
    kth = np.partition(x, x.size - k)[x.size - k]
    x[x < kth] = NEG_INF


def _top_p(x: np.ndarray, top_p: float) -> None:
    # Hugging Face sorts ascending and drops token i when the cumulative mass up to and including it
    # is <= 1 - top_p (the most likely token always stays). Only the kept tokens matter, and they are
    # the most likely ones: look at a descending prefix, and widen it until it holds at least top_p.
    vocab = x.size
    probs = _softmax(x)
    k = vocab if vocab <= _FULL_SORT_MAX else _PREFIX_K
    while True:
        idx = _top_indices(x, k)  # descending
        p = probs[idx]
        tail = None
        if k < vocab and x[idx[-1]] != NEG_INF:  # tokens of some mass lie below the prefix
            tail = np.float32(1.0) - p.sum(dtype=np.float32)
            if float(tail) > 1.0 - top_p:  # one of them would be kept: widen
                k = min(vocab, k * _GROW)
                continue
        # Hugging Face's ascending cumulative mass, read top-down (torch's CPU cumsum adds in float64)
        cum = np.cumsum(p[::-1], dtype=np.float64).astype(np.float32)[::-1]
        if tail is not None:
            # exact up to rounding: on a knife edge (within ~1e-7 of 1 - top_p) the boundary
            # token may differ from Hugging Face's full sort, which sums the tail in another order
            cum = cum + tail
        keep_sorted = cum > np.float32(1.0 - top_p)
        keep_sorted[0] = True
        keep = np.zeros(vocab, dtype=bool)
        keep[idx[keep_sorted]] = True
        x[~keep] = NEG_INF
        return


def _min_p(x: np.ndarray, min_p: float) -> None:
    probs = _softmax(x)
    # the top token always passes (min_p <= 1), which is Hugging Face's min_tokens_to_keep=1
    x[probs < np.float32(min_p) * probs.max()] = NEG_INF


def _typical_p(x: np.ndarray, mass: float) -> None:
    # Hugging Face: rank tokens by |-log p - H| (ascending), accumulate their mass in that order, find
    # the first rank where it reaches `mass`, and keep every token whose distance is <= that rank's.
    vocab = x.size
    shifted_x = x - x.max()
    logp = shifted_x - np.log(np.exp(shifted_x).sum())
    probs = np.exp(logp)
    with np.errstate(invalid="ignore"):  # -inf × 0 for a dropped token: nansum skips it, as torch's
        entropy = -np.nansum(logp * probs)
    shifted = np.abs(-logp - entropy)
    k = vocab if vocab <= _FULL_SORT_MAX else _PREFIX_K
    while True:
        idx = _top_indices(shifted, k, largest=False)  # ascending distance
        cum = np.cumsum(probs[idx], dtype=np.float64).astype(np.float32)
        below = int((cum < mass).sum())
        if below >= k and k < vocab:  # the mass is reached beyond the prefix: widen
            k = min(vocab, k * _GROW)
            continue
        threshold = shifted[idx[min(below, k - 1)]]
        remove = shifted > threshold
        remove[idx[0]] = False
        x[remove] = NEG_INF
        return


# ----------------------------------------------------------------------------------------------------


def apply_chain(
    logits: Any,
    context_ids: Any,
    params: SamplingParams,
    *,
    track: bool = False,
) -> ChainResult:
    """Run the sampling chain on one row of logits ([V], or [1, V]): the logit bias, then `params.order`.

    `logits` is a numpy array (or a torch tensor, converted). `context_ids` are the ids the
    penalties look at (prompt + reply so far); only the last `params.repetition_window` of them
    when that is > 0. The input is never modified.
    With `track`, `dropped_by` says which stage (index into `params.order`) removed each token.
    When greedy (temperature 0) every other stage still runs, and the draw is the argmax of what
    they leave (only typical-p can drop the most likely token).
    """
    x = as_row(logits)
    vocab = x.size
    greedy = params.greedy

    dropped_by: np.ndarray | None = None
    if track:
        dropped_by = np.full(vocab, -1, dtype=np.int8)
        dropped_by[x == NEG_INF] = MASKED_BEFORE

    if params.logit_bias:  # on the raw logits, as OpenAI defines it
        _logit_bias(x, params.logit_bias)

    penalties = params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
    counted: tuple[np.ndarray, np.ndarray] | None = None
    if penalties:
        counted = token_counts(context_ids, vocab, params.repetition_window)

    for position, stage in enumerate(params.order):
        if stage == "repetition":
            if params.repetition_penalty == 1.0 or counted is None:
                continue
            _repetition(x, counted[0], params.repetition_penalty)
        elif stage == "presence_frequency":
            if (params.presence_penalty == 0.0 and params.frequency_penalty == 0.0) or counted is None:
                continue
            _presence_frequency(x, counted[0], counted[1], params.presence_penalty, params.frequency_penalty)
        elif stage == "temperature":
            if greedy or params.temperature == 1.0:
                continue
            x /= np.float32(params.temperature)
        elif stage == "top_k":
            if params.top_k <= 0:
                continue
            _top_k(x, params.top_k)
        elif stage == "top_p":
            if params.top_p >= 1.0:
                continue
            _top_p(x, params.top_p)
        elif stage == "min_p":
            if params.min_p <= 0.0:
                continue
            _min_p(x, params.min_p)
        elif stage == "typical_p":
            if params.typical_p >= 1.0:
                continue
            _typical_p(x, params.typical_p)
        else:  # pragma: no cover - SamplingParams validates the order
            raise ValueError(f"unknown sampling stage {stage!r}")
        if dropped_by is not None:
            dropped_by[(x == NEG_INF) & (dropped_by == -1)] = position

    if greedy:
        probs = np.zeros_like(x)
        probs[int(np.argmax(x))] = 1.0
    else:
        probs = _softmax(x)
    return ChainResult(logits=x, probs=probs, dropped_by=dropped_by)


def picks_argmax(params: SamplingParams) -> bool:
    """True when the chain can only ever pick the raw argmax, so the decode loop may skip it.

    Greedy decoding takes the argmax of what the stages leave; top-k, top-p and min-p always keep
    the most likely token, so only the logit bias and the penalties (which move logits) and typical-p
    (which can drop the most likely token) can change the pick.
    """
    return (
        params.greedy
        and not params.logit_bias
        and params.repetition_penalty == 1.0
        and params.presence_penalty == 0.0
        and params.frequency_penalty == 0.0
        and params.typical_p >= 1.0
    )


def new_generator(seed: int) -> np.random.Generator:
    """The draws' random source: the same seed gives the same draws, on every backend."""
    return np.random.Generator(np.random.PCG64(seed))


def draw(generator: np.random.Generator) -> float:
    """The one uniform number in [0, 1) a decode step takes from its generator, whatever its settings.

    Common random numbers: a greedy step draws too, so two streams with one seed read the same number at
    every step, and a difference between their replies comes from their settings alone."""
    return float(generator.random())


def sample(result: ChainResult, params: SamplingParams, uniform: float | None = None) -> int:
    """The next token: the argmax when greedy, else the kept token where `uniform` falls in the
    cumulative distribution (inverse CDF).

    The kept tokens are summed in a canonical order (by token id), so two chains that keep the same
    tokens with the same probabilities pick the same token for the same `uniform`, whatever stages got
    them there. `uniform` in [0, 1) comes from `draw` (None: a fresh unseeded one). A token of
    probability 0 is never drawn.
    """
    if params.greedy:
        return int(np.argmax(result.logits))
    probs = result.probs
    # in token-id order; a dropped token adds exactly 0.0, so the sums are those over the kept tokens alone
    cdf = np.cumsum(probs, dtype=np.float64)
    if uniform is None:
        uniform = draw(np.random.default_rng())
    u = uniform * cdf[-1]
    index = int(np.searchsorted(cdf, u, side="right"))
    if index >= probs.size:  # u rounded up to the total: take the last token that can be drawn
        index = int(np.flatnonzero(probs > 0)[-1])
    return index
