"""The numbers behind the attention inspector, computed from the model itself (no Textual here).

- `explain_attention`: for one query token, layer and head of the mini-GPT, the query · key score
  of every context token, the scaled score (÷ √d), the softmax weight and the size of each token's
  weighted value ‖wⱼ vⱼ‖, by a forward pass through the model's own modules up to that layer.
- `attention_matrix`: the full (layers, heads, N, N) weights of a direct forward pass (what the
  inspector's rows must equal).
- `replay_chain`: the sampling chain run again on a Step's stored top-256 raw logits under other
  settings: which of them it keeps, their probabilities and, for each dropped one, the stage that
  dropped it. No regeneration and no forward pass, and no torch: the chain is numpy.

The tokens outside the stored 256 are known only through the softmax normaliser (their total
probability, each no more likely than the 256th). `replay_chain` runs the chain on two extreme
shapes of that unseen tail (all of its mass in as few tokens as possible, or spread evenly over the
rest of the vocabulary) and calls the result exact when both give the same kept set and the same
probabilities; that is the case whenever a top-k ≤ 256, a min-p, or a top-p at temperature 1 cuts
the tail away, which the usual settings do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from chat_tui.engine.params import MASKED_BEFORE, SamplingParams
from chat_tui.engine.types import Engine, EngineError, Step, explainer

if TYPE_CHECKING:
    import torch

# torch loads inside the functions that compute with the model: the app unpickles an Explanation or
# a ChainReplay made in the model's process without importing torch (the sampling chain is numpy)

# replay_chain never builds a tail model of more pseudo-tokens than this
MAX_TAIL_TOKENS = 1 << 18
# two tail models "agree" on a probability when they differ by less than this
AGREE_ATOL = 1e-5


class ExplainUnavailable(EngineError):
    """This backend cannot give the numbers asked for (the message says why)."""


def _model_of(engine_or_model: Any):
    from chat_tui.engine.model import GPT

    if isinstance(engine_or_model, GPT):
        return engine_or_model
    model = getattr(engine_or_model, "model", None)
    if isinstance(model, GPT):
        return model
    backend = getattr(engine_or_model, "backend", type(engine_or_model).__name__)
    raise ExplainUnavailable(
        f"the {backend} backend does not expose its queries, keys and values: "
        "q·k, the scaled scores and the value sizes are shown for the mini-GPT and for GPT-2, Llama, Mistral, "
        "Qwen and Gemma models only"
    )


def can_explain(engine: Any) -> bool:
    """Whether the inspector should ask `explain_attention` for `engine` (decided without torch).

    `explainer(engine)` is the rule; an in-process engine that has a model but explains nothing
    (Hugging Face) is asked too, and its ExplainUnavailable says why. Kept for the inspector until it
    asks `explainer()` itself.
    """
    return explainer(engine) is not None or getattr(engine, "model", None) is not None


def vocab_size_of(engine_or_model: Any) -> int | None:
    """The size of the output vocabulary: the Engine's `vocab_size`, or a bare model's config's."""
    if isinstance(engine_or_model, Engine):
        return engine_or_model.vocab_size
    model = getattr(engine_or_model, "model", engine_or_model)  # an engine without the whole protocol yet
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, int) else None


@dataclass
class Explanation:
    """One head's attention computation for one query token, with the model's real numbers."""

    layer: int
    head: int
    query_position: int
    head_dim: int
    scale: float  # 1 / √head_dim
    qk: np.ndarray  # float64 (query_position + 1,): q · kⱼ
    scaled: np.ndarray  # qk × scale: the pre-softmax scores the model uses
    weights: np.ndarray  # softmax(scaled)
    value_norms: np.ndarray  # ‖wⱼ vⱼ‖: how much each token's weighted value adds to the output
    output_norm: float  # ‖Σⱼ wⱼ vⱼ‖: this head's output for the query (before the output projection)
    query_norm: float
    key_norms: np.ndarray


def explain_attention(engine_or_model: Any, ids: Sequence[int], query_position: int, layer: int, head: int) -> Explanation:
    """The attention of token `query_position` of `ids` in `layer`, `head`, computed step by step.

    Exact for the mini-GPT: the queries, keys and values are those of the model's own forward pass
    (`capture=True`; only the tokens up to the query are fed, which causal attention makes equivalent).
    Raises ExplainUnavailable for a backend without the model's modules. An Explainer engine
    answers itself (a ProcessEngine computes it in the model's process).
    """
    explaining = explainer(engine_or_model)
    if explaining is not None:
        return explaining.explain_attention(ids, query_position, layer, head)
    import torch

    model = _model_of(engine_or_model)
    if not 0 <= query_position < len(ids):
        raise ValueError(f"query position {query_position} outside 0..{len(ids) - 1}")
    config = model.config
    if not 0 <= layer < config.n_layer:
        raise ValueError(f"layer {layer} outside 0..{config.n_layer - 1}")
    if not 0 <= head < config.n_head:
        raise ValueError(f"head {head} outside 0..{config.n_head - 1}")
    if query_position + 1 > config.block_size:
        raise ValueError(f"{query_position + 1} tokens are more than the context ({config.block_size})")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            x = torch.tensor([list(ids[: query_position + 1])], dtype=torch.long, device=device)
            _, _, attention = model(x, capture=True, last_only=True)
            q, k, v = attention[layer].q, attention[layer].k, attention[layer].v  # (1, heads, T, head_dim)
            head_dim = q.size(-1)
            scale = 1.0 / math.sqrt(head_dim)
            qh = q[0, head, -1].float()  # (hd,)
            kh = k[0, head].float()  # (T, hd)
            vh = v[0, head].float()
            # the model's inspecting path: (q @ kᵀ) × scale, then softmax
            qk = kh @ qh
            scaled = (q[0, head, -1:].float() @ kh.transpose(0, 1))[0] * scale
            weights = torch.softmax(scaled, dim=-1)
            weighted = weights[:, None] * vh
            out = weighted.sum(0)
            return Explanation(
                layer=layer,
                head=head,
                query_position=query_position,
                head_dim=head_dim,
                scale=scale,
                qk=qk.double().cpu().numpy(),
                scaled=scaled.double().cpu().numpy(),
                weights=weights.double().cpu().numpy(),
                value_norms=weighted.norm(dim=-1).double().cpu().numpy(),
                output_norm=float(out.norm()),
                query_norm=float(qh.norm()),
                key_norms=kh.norm(dim=-1).double().cpu().numpy(),
            )
    finally:
        model.train(was_training)


def attention_matrix(engine_or_model: Any, ids: Sequence[int]) -> np.ndarray:
    """float32 (layers, heads, N, N): the softmax weights of one direct forward pass over `ids`."""
    import torch

    model = _model_of(engine_or_model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            x = torch.tensor([list(ids)], dtype=torch.long, device=device)
            _, _, attention = model(x, capture=True)
            return torch.stack([layer.weights[0] for layer in attention]).float().cpu().numpy()
    finally:
        model.train(was_training)


def full_logits(engine_or_model: Any, ids: Sequence[int]) -> torch.Tensor:
    """float32 [V]: the raw next-token logits after `ids` (one direct forward pass)."""
    import torch

    model = _model_of(engine_or_model)
    device = next(model.parameters()).device
    with torch.inference_mode():
        x = torch.tensor([list(ids)], dtype=torch.long, device=device)
        logits, _, _ = model(x, last_only=True)
        return logits[0, -1].float().cpu()


# ----------------------------------------------------------------------------------------------------
# Replaying the sampling chain on stored logits


@dataclass
class ChainReplay:
    """The sampling chain on one step's stored candidates, under `params`."""

    params: SamplingParams
    ids: np.ndarray  # int64 (k,): the stored candidates, most likely first
    raw_probs: np.ndarray  # float64 (k,): softmax of the raw logits (exact: the normaliser is stored)
    chain_probs: np.ndarray  # float64 (k,): probability after the chain (0 for a dropped candidate)
    dropped_by: np.ndarray  # int8 (k,): -1 kept, else index into params.order (-2 masked before the chain)
    chosen: int  # the token the step actually produced
    tail_mass: float  # raw probability of every token outside the stored ones
    tail_kept: bool  # some token outside the stored ones would be kept (its share is not shown)
    exact: bool  # the kept set and the probabilities do not depend on the unseen tail
    notes: list[str] = field(default_factory=list)

    @property
    def kept(self) -> np.ndarray:
        return self.dropped_by == -1

    def kept_ids(self) -> set[int]:
        return {int(i) for i in self.ids[self.kept]}

    def stage(self, i: int) -> str | None:
        """The name of the stage that dropped candidate `i` (None when kept)."""
        code = int(self.dropped_by[i])
        if code == -1:
            return None
        if code == MASKED_BEFORE:
            return "masked"
        return self.params.order[code]


def _tail_models(top_logits: np.ndarray, logsumexp: float, tail_mass: float, tail_count: int | None):
    """Logits of pseudo-tokens standing for the unseen tail: (concentrated, spread), either may be None."""
    if tail_mass <= 0.0 or (tail_count is not None and tail_count <= 0):
        return None, None
    # every unseen token is at most as likely as the least likely stored one; a hair below it, so
    # that top-k's "ties with the k-th value are kept" never keeps a pseudo-token
    l_min = float(np.nextafter(np.float32(top_logits.min()), np.float32(-np.inf)))
    p_min = math.exp(l_min - logsumexp)
    concentrated = None
    if p_min > 0.0:
        whole = int(min(math.floor(tail_mass / p_min), MAX_TAIL_TOKENS))
        rest = tail_mass - whole * p_min
        values = [l_min] * whole
        if rest > 1e-12 and whole < MAX_TAIL_TOKENS:
            values.append(math.log(rest) + logsumexp)
        if values:
            concentrated = np.asarray(values, dtype=np.float64)
    spread = None
    if tail_count is not None:
        n = min(tail_count, MAX_TAIL_TOKENS)
        spread = np.full(n, math.log(tail_mass / n) + logsumexp, dtype=np.float64)
    return concentrated, spread


def _run(top_logits: np.ndarray, tail: np.ndarray | None, local_context: list[int], params: SamplingParams):
    from chat_tui.engine.sampling import apply_chain

    k = top_logits.size
    values = top_logits.astype(np.float64) if tail is None else np.concatenate([top_logits.astype(np.float64), tail])
    result = apply_chain(values.astype(np.float32), local_context, params, track=True)
    dropped = result.dropped_by
    probs = result.probs.astype(np.float64)
    tail_kept = bool((dropped[k:] == -1).any()) if tail is not None else False
    return probs[:k], dropped[:k].copy(), tail_kept


def replay_for(engine: Engine | None, step: Step, context_ids: Sequence[int] | None,
               params: SamplingParams | None) -> ChainReplay:
    """`replay_chain` for any engine's Step: an Explainer replays it itself (a ProcessEngine in the
    model's process); for others the chain runs here, on the stored logits, with their vocabulary size."""
    explaining = explainer(engine)
    if explaining is not None:
        return explaining.replay_chain(step, context_ids, params)
    return replay_chain(step, context_ids, params, vocab_size=vocab_size_of(engine) if engine is not None else None)


def replay_chain(
    step: Step,
    context_ids: Sequence[int] | None,
    params: SamplingParams | None = None,
    *,
    vocab_size: int | None = None,
) -> ChainReplay:
    """Run the sampling chain again on `step`'s stored raw logits under `params` (default: the step's own).

    `context_ids` are the ids before the step (prompt + reply so far), for the penalties;
    `vocab_size` (when known) lets the unseen tail be bounded from both sides.
    """
    if step.top_ids is None or step.top_logits is None:
        raise ExplainUnavailable("this step carries no stored logits: the chain cannot be replayed")
    params = params if params is not None else (step.params or SamplingParams())
    ids = np.asarray(step.top_ids, dtype=np.int64)
    top_logits = np.asarray(step.top_logits, dtype=np.float64)
    lse = float(step.logsumexp)
    raw = np.exp(top_logits - lse)
    finite = np.isfinite(top_logits)
    tail_mass = max(0.0, 1.0 - float(raw[finite].sum()))
    if tail_mass < 1e-9:
        tail_mass = 0.0
    k = ids.size
    tail_count = None if vocab_size is None else max(0, vocab_size - k)
    if tail_count == 0:
        tail_mass = 0.0
    notes: list[str] = []

    # the penalties look at the last `window` ids; ids outside the stored set are the unseen tail
    context = list(context_ids) if context_ids is not None else []
    if params.repetition_window > 0:
        context = context[-params.repetition_window :]
    where = {int(t): i for i, t in enumerate(ids.tolist())}
    local = [where[t] for t in context if t in where]
    # the chain's row here is the stored candidates: a logit bias moves them by their position in it
    local_bias = tuple((where[t], bias) for t, bias in params.logit_bias if t in where)
    local_params = params.with_(repetition_window=0, logit_bias=local_bias)
    raising = (
        (params.repetition_penalty < 1.0 or params.presence_penalty < 0.0 or params.frequency_penalty < 0.0)
        and len(local) < len(context)
        and tail_mass > 0.0
    )
    if raising:
        notes.append("a penalty below neutral could lift unseen tokens that occur in the context")
    biased_unseen = len(local_bias) < len(params.logit_bias) and tail_mass > 0.0
    if biased_unseen:
        notes.append("a logit bias on tokens outside the stored candidates is not replayed")

    concentrated, spread = (
        _tail_models(top_logits[finite], lse, tail_mass, tail_count) if tail_mass > 0 else (None, None)
    )
    if tail_mass > 0 and concentrated is None and spread is None:
        notes.append("the unseen tail could not be modelled")
    models = [m for m in (concentrated, spread) if m is not None] or [None]
    runs = [_run(top_logits, tail, local, local_params) for tail in models]
    probs, dropped, tail_kept = runs[0]
    exact = not raising and not biased_unseen and (tail_mass == 0.0 or concentrated is not None)
    for other_probs, other_dropped, other_tail in runs[1:]:
        if (
            other_tail != tail_kept
            or not np.array_equal(other_dropped == -1, dropped == -1)
            or not np.allclose(other_probs, probs, rtol=0, atol=AGREE_ATOL)
        ):
            exact = False
    if tail_mass > 0 and spread is None and tail_kept:
        exact = False  # without the vocabulary size the tail is bounded from one side only
    if not exact and not notes:
        notes.append(
            f"approximate: the {tail_mass:.1%} of probability outside the stored {k} candidates "
            "changes what these settings keep"
        )
    elif tail_kept:
        notes.append(f"tokens outside the stored {k} candidates are kept too")
    return ChainReplay(
        params=params,
        ids=ids,
        raw_probs=raw,
        chain_probs=probs,
        dropped_by=dropped.astype(np.int8),
        chosen=int(step.token_id),
        tail_mass=tail_mass,
        tail_kept=tail_kept,
        exact=exact,
        notes=notes,
    )
