"""The sampling chain shared by every backend: penalties, temperature and truncations, then a draw.

Each stage follows a reference implementation exactly:

- ``repetition``: Hugging Face ``RepetitionPenaltyLogitsProcessor`` (logit < 0: × penalty, else ÷ penalty,
  once per distinct token in the window);
- ``presence_frequency``: OpenAI's formula ``logit -= count × frequency + (count > 0) × presence``;
- ``temperature``: ``logit / T``; T = 0 means greedy (no division, the draw is the argmax);
- ``top_k``, ``top_p``, ``min_p``, ``typical_p``: Hugging Face's ``TopKLogitsWarper``,
  ``TopPLogitsWarper``, ``MinPLogitsWarper`` and ``TypicalLogitsWarper`` with ``min_tokens_to_keep=1``.

The stages run in ``params.order``; a stage at its neutral value is skipped and costs nothing.
Everything works on one 1-D row of logits; no Python loop ever walks the vocabulary, and the
truncations that need an ordering (top-p, typical) sort only a prefix of the vocabulary when that
prefix already holds the mass they keep.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

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

    logits: torch.Tensor  # float32 [V]; a dropped token is -inf
    probs: torch.Tensor  # float32 [V]; softmax of `logits` (one-hot on the argmax when greedy)
    # int8 [V] when tracking: -1 kept, else the index into params.order of the stage that dropped it
    # (MASKED_BEFORE = -2 for a token that was -inf before the chain started)
    dropped_by: torch.Tensor | None = None


def context_tensor(
    context_ids: torch.Tensor | Sequence[int] | None, window: int, vocab_size: int, device: torch.device
) -> torch.Tensor | None:
    """The ids the penalties look at (the last `window` ids, all when 0) as int64, out-of-vocab ids dropped."""
    if context_ids is None:
        return None
    if isinstance(context_ids, torch.Tensor):
        ids = context_ids.reshape(-1)
        if window > 0:
            ids = ids[-window:]
        ids = ids.to(device=device, dtype=torch.long)
    else:
        seq = context_ids
        if window > 0:
            try:
                seq = seq[-window:]
            except TypeError:  # a sequence without slicing (deque)
                seq = list(seq)[-window:]
        if len(seq) == 0:
            return None
        ids = torch.as_tensor(seq, dtype=torch.long, device=device).reshape(-1)
    if ids.numel() == 0:
        return None
    # like Hugging Face, ids the output layer cannot produce are not penalised
    inside = (ids >= 0) & (ids < vocab_size)
    if not bool(inside.all()):
        ids = ids[inside]
        if ids.numel() == 0:
            return None
    return ids


def token_counts(
    context_ids: torch.Tensor | Sequence[int] | None,
    vocab_size: int,
    window: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(distinct ids, how often each occurs) in the last `window` context ids (all when 0); None if empty."""
    ids = context_tensor(context_ids, window, vocab_size, torch.device(device))
    if ids is None:
        return None
    unique, counts = torch.unique(ids, return_counts=True)
    return unique, counts


# ----------------------------------------------------------------------------------------------------
# The stages. Each works in place on a float32 row `x` that apply_chain owns.


def _repetition(x: torch.Tensor, ids: torch.Tensor, penalty: float) -> None:
    score = x.index_select(0, ids)
    x.index_copy_(0, ids, torch.where(score < 0, score * penalty, score / penalty))


def _presence_frequency(
    x: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float
) -> None:
    x.index_add_(0, ids, counts.to(x.dtype) * -frequency - presence)


def _top_k(x: torch.Tensor, k: int) -> None:
    if k >= x.numel():
        return
    # the k-th largest value; ties with it are kept, as in Hugging Face
    kth = torch.topk(x, k, sorted=False).values.min()
    x.masked_fill_(x < kth, NEG_INF)


def _top_p(x: torch.Tensor, top_p: float) -> None:
    # Hugging Face sorts ascending and drops token i when the cumulative mass up to and including it
    # is <= 1 - top_p (the most likely token always stays). Only the kept tokens matter, and they are
    # the most likely ones: look at a descending prefix, and widen it until it holds at least top_p.
    vocab = x.numel()
    probs = torch.softmax(x, dim=0)
    k = vocab if vocab <= _FULL_SORT_MAX else _PREFIX_K
    while True:
        values, idx = torch.topk(x, k)  # descending
        p = probs.index_select(0, idx)
        tail = None
        if k < vocab and not bool(values[-1] == NEG_INF):  # tokens of some mass lie below the prefix
            tail = 1.0 - p.sum()
            if float(tail) > 1.0 - top_p:  # one of them would be kept: widen
                k = min(vocab, k * _GROW)
                continue
        cum = p.flip(0).cumsum(0).flip(0)  # Hugging Face's ascending cumulative mass, read top-down
        if tail is not None:
            # exact up to rounding: on a knife edge (within ~1e-7 of 1 - top_p) the boundary
            # token may differ from Hugging Face's full sort, which sums the tail in another order
            cum = cum + tail
        keep_sorted = cum > 1.0 - top_p
        keep_sorted[0] = True
        keep = torch.zeros(vocab, dtype=torch.bool, device=x.device)
        keep.index_fill_(0, idx[keep_sorted], True)
        x.masked_fill_(~keep, NEG_INF)
        return


def _min_p(x: torch.Tensor, min_p: float) -> None:
    probs = torch.softmax(x, dim=0)
    # the top token always passes (min_p <= 1), which is Hugging Face's min_tokens_to_keep=1
    x.masked_fill_(probs < min_p * probs.max(), NEG_INF)


def _typical_p(x: torch.Tensor, mass: float) -> None:
    # Hugging Face: rank tokens by |-log p - H| (ascending), accumulate their mass in that order, find
    # the first rank where it reaches `mass`, and keep every token whose distance is <= that rank's.
    vocab = x.numel()
    logp = torch.log_softmax(x, dim=0)
    probs = torch.exp(logp)
    entropy = -(logp * probs).nansum()
    shifted = (-logp - entropy).abs()
    k = vocab if vocab <= _FULL_SORT_MAX else _PREFIX_K
    while True:
        dist, idx = torch.topk(shifted, k, largest=False)  # ascending distance
        cum = probs.index_select(0, idx).cumsum(0)
        below = int((cum < mass).sum())
        if below >= k and k < vocab:  # the mass is reached beyond the prefix: widen
            k = min(vocab, k * _GROW)
            continue
        threshold = dist[min(below, k - 1)]
        remove = shifted > threshold
        remove[idx[0]] = False
        x.masked_fill_(remove, NEG_INF)
        return


# ----------------------------------------------------------------------------------------------------


def apply_chain(
    logits: torch.Tensor,
    context_ids: torch.Tensor | Sequence[int] | None,
    params: SamplingParams,
    *,
    track: bool = False,
) -> ChainResult:
    """Run the sampling chain on one row of logits ([V], or [1, V]) in `params.order`.

    `context_ids` are the ids the penalties look at (prompt + reply so far); only the last
    `params.repetition_window` of them when that is > 0. The input tensor is never modified.
    With `track`, `dropped_by` says which stage (index into `params.order`) removed each token.
    When greedy (temperature 0) every other stage still runs, and the draw is the argmax of what
    they leave (only typical-p can drop the most likely token).
    """
    if logits.dim() != 1:
        if logits.dim() == 2 and logits.shape[0] == 1:
            logits = logits[0]
        else:
            raise ValueError(f"apply_chain takes one row of logits, not shape {tuple(logits.shape)}")
    x = logits.detach().to(dtype=torch.float32, copy=True)
    vocab = x.numel()
    greedy = params.greedy

    dropped_by: torch.Tensor | None = None
    if track:
        dropped_by = torch.full((vocab,), -1, dtype=torch.int8, device=x.device)
        dropped_by.masked_fill_(x == NEG_INF, MASKED_BEFORE)

    penalties = params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
    counted: tuple[torch.Tensor, torch.Tensor] | None = None
    if penalties:
        ids = context_tensor(context_ids, params.repetition_window, vocab, x.device)
        if ids is not None:
            counted = torch.unique(ids, return_counts=True)

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
            x.div_(params.temperature)
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
            newly = (x == NEG_INF) & (dropped_by == -1)
            dropped_by.masked_fill_(newly, position)

    if greedy:
        probs = torch.zeros_like(x)
        probs.index_fill_(0, torch.argmax(x).reshape(1), 1.0)
    else:
        probs = torch.softmax(x, dim=0)
    return ChainResult(logits=x, probs=probs, dropped_by=dropped_by)


def picks_argmax(params: SamplingParams) -> bool:
    """True when the chain can only ever pick the raw argmax, so the decode loop may skip it.

    Greedy decoding takes the argmax of what the stages leave; top-k, top-p and min-p always keep
    the most likely token, so only the penalties (which move logits) and typical-p (which can drop
    the most likely token) can change the pick.
    """
    return (
        params.greedy
        and params.repetition_penalty == 1.0
        and params.presence_penalty == 0.0
        and params.frequency_penalty == 0.0
        and params.typical_p >= 1.0
    )


def sample(result: ChainResult, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """Draw the next token: the argmax when greedy, else one draw from `result.probs`.

    The draw inverts the cumulative distribution with one uniform number from `generator`, so a
    seeded generator gives the same tokens again (and it is some 20 times faster than
    torch.multinomial on a large vocabulary). A token of probability 0 is never drawn.
    """
    if params.greedy:
        return int(torch.argmax(result.logits))
    probs = result.probs
    dtype = torch.float32 if probs.device.type == "mps" else torch.float64  # MPS has no float64
    cdf = probs.to(dtype).cumsum(0)
    u = torch.rand(1, generator=generator, dtype=dtype, device=probs.device) * cdf[-1]
    index = int(torch.searchsorted(cdf, u, right=True))
    if index >= probs.numel():  # u rounded up to the total: take the last token that can be drawn
        index = int(torch.nonzero(probs > 0)[-1])
    return index
