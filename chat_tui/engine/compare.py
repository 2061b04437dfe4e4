"""Compare: several settings (or models) answering one conversation on the same random numbers.

With one seed every decode step draws the same uniform number (common random numbers, see
`sampling.draw`), so two columns with the same settings give the same reply token for token, and a
difference between the columns comes from their settings alone. What `chat-tui compare` and the app's
compare screen share lives here: a column's settings line, its figures, and the first token where the
columns diverge, with the probability each column gave the token another one chose.
"""

from __future__ import annotations

import math
import re
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from chat_tui.engine.params import FLAGS, SPECS, InvalidParameter, SamplingParams
from chat_tui.engine.types import Conversation, EngineError, ParamsSource, Step

SAME_DRAWS_LINE = "Same seed, same random draws: any difference between the columns comes from the settings alone."
MIN_COLUMNS, MAX_COLUMNS = 2, 4
# what a settings line may set: every sampling setting but the seed, which all columns share
SETTING_NAMES = tuple(name for name in (*SPECS, *FLAGS) if name != "seed")
# OtherChoice.dropped_by for a token another model chose that this one's vocabulary spells differently
ANOTHER_VOCABULARY = "another vocabulary"


class SettingsLineError(ValueError):
    """A settings line that is not NAME=VALUE pairs of known settings (the message says which part)."""


def parse_settings(text: str, base: SamplingParams) -> SamplingParams:
    """`base` with the changes of a compact settings line: "temperature=0.7 top_p=0.9" (or comma-separated;
    top-p and top_p both work). Raises SettingsLineError or InvalidParameter, with one line that says why."""
    changes: dict[str, str] = {}
    for item in re.split(r"[,\s]+", text.strip()):
        if not item:
            continue
        name, equals, value = item.partition("=")
        key = name.strip().lower().replace("-", "_")
        if key == "seed":
            raise SettingsLineError("the seed is shared by every column (that is the point): set it once")
        if key not in SETTING_NAMES:
            raise SettingsLineError(f"{name!r} is not a setting; the settings are {', '.join(SETTING_NAMES)}")
        if not equals or not value:
            raise SettingsLineError(f"{item!r}: write NAME=VALUE, e.g. temperature=0.7")
        changes[key] = value
    return base.with_(**changes)


def settings_line(params: SamplingParams, base: SamplingParams) -> str:
    """The settings line that turns `base` into `params` (what parse_settings reads back), "" when equal."""
    parts = []
    for name in SETTING_NAMES:
        value = getattr(params, name)
        if value != getattr(base, name):
            text = ("on" if value else "off") if isinstance(value, bool) else f"{value:g}"
            parts.append(f"{name}={text}")
    return " ".join(parts)


def shared_seed(seed: int | None) -> int:
    """The seed every column uses: the one given, else a random one (shown, so a run can be repeated)."""
    return seed if seed is not None else secrets.randbits(63)


def stream_columns(engine: Any, conversation: Conversation, params: Sequence[ParamsSource], *,
                   cancel: threading.Event | None = None, candidates: bool = True) -> Iterator[tuple[int, Step]]:
    """Each of `params` answering `conversation` on one engine, a token of each column in turn: (column, step).

    One model in memory streams every column at once: an engine that holds its model for one stream at a
    time (the mini-GPT, Hugging Face, a model process) says `stream_columns` itself and decodes each column
    with a KV cache of its own; for any other, their streams are simply taken in turn."""
    own = getattr(engine, "stream_columns", None)
    if own is not None:
        return own(conversation, params, cancel=cancel, candidates=candidates)
    return interleave([engine.stream(conversation, p, cancel=cancel, candidates=candidates) for p in params])


def interleave(streams: Sequence[Iterator[Step]]) -> Iterator[tuple[int, Step]]:
    """A step of each stream in turn, as (its index, the step), until every one has ended."""
    live = list(enumerate(streams))
    try:
        while live:
            for entry in list(live):
                column, stream = entry
                step = next(stream, None)
                if step is not None:
                    yield column, step
                if step is None or step.finish_reason is not None:
                    live.remove(entry)
                    close = getattr(stream, "close", None)
                    if close is not None:
                        close()
    finally:
        for _, stream in live:  # the caller stopped early: end the others too
            close = getattr(stream, "close", None)
            if close is not None:
                close()


@dataclass(frozen=True)
class ColumnStats:
    """A column's figures so far."""

    tokens: int
    tokens_per_s: float
    # the mean natural-log probability of the reply's tokens under the raw distribution (temperature 1, no
    # truncation: what the model itself thought of them), and its perplexity exp(-mean); None without
    # probabilities
    mean_logprob: float | None
    perplexity: float | None
    stop_reason: str | None  # None while the reply streams


def column_stats(steps: Sequence[Step]) -> ColumnStats:
    if not steps:
        return ColumnStats(0, 0.0, None, None, None)
    prefill = steps[0].prompt.prefill_s if steps[0].prompt is not None else 0.0
    decode_s = steps[-1].elapsed_s - prefill
    logprobs = [math.log(step.prob) if step.prob > 0 else -math.inf for step in steps if not math.isnan(step.prob)]
    mean = sum(logprobs) / len(logprobs) if logprobs and len(logprobs) == len(steps) else None
    return ColumnStats(
        tokens=len(steps),
        tokens_per_s=len(steps) / decode_s if decode_s > 0 else 0.0,
        mean_logprob=mean,
        perplexity=math.exp(-mean) if mean is not None and mean > -700 else (math.inf if mean is not None else None),
        stop_reason=steps[-1].finish_reason,
    )


@dataclass(frozen=True)
class OtherChoice:
    """What a column thought, at the divergence, of the token another column chose there."""

    column: int  # the column that chose it
    token_id: int
    token: str
    prob: float | None  # its raw probability in this column (None: not among the stored candidates)
    chain_prob: float | None  # its probability after this column's sampling chain (0: dropped)
    dropped_by: str | None  # the stage of this column's chain that dropped it, if one did


@dataclass(frozen=True)
class ColumnAtDivergence:
    token_id: int | None  # None: this column's reply had already ended
    token: str
    prob: float | None  # the raw and the chain probability of its own token
    chain_prob: float | None
    others: tuple[OtherChoice, ...]


@dataclass(frozen=True)
class Divergence:
    index: int  # the reply's token index where the columns first differ
    columns: tuple[ColumnAtDivergence, ...]


def find_divergence(columns: Sequence[Sequence[Step]],
                    token_text: Sequence[Callable[[int], str]] | None = None) -> Divergence | None:
    """The first token index where the columns' replies differ, or None while they agree (a column still
    streaming is waited for; a column that has ended differs from one that goes on).

    `token_text`: each column's model's `token_text`, when the columns run on different models: tokens are
    then compared by their text, and another column's token is looked up in a column only where its id
    means the same text in that column's vocabulary."""
    longest = max((len(steps) for steps in columns), default=0)
    for index in range(longest):
        chosen: list[int | None] = []
        keys: list[object] = []
        for steps in columns:
            if index < len(steps):
                chosen.append(steps[index].token_id)
                keys.append(steps[index].token_id if token_text is None else steps[index].token)
            elif steps and steps[-1].finish_reason is not None:
                chosen.append(None)
                keys.append(None)
            else:
                return None  # not known yet
        if len(set(keys)) > 1:
            return Divergence(index, tuple(_at_divergence(columns, c, index, chosen, token_text)
                                           for c in range(len(columns))))
    return None


def _at_divergence(columns: Sequence[Sequence[Step]], column: int, index: int, chosen: list[int | None],
                   token_text: Sequence[Callable[[int], str]] | None) -> ColumnAtDivergence:
    steps = columns[column]
    if index >= len(steps):
        return ColumnAtDivergence(None, "", None, None, ())
    step = steps[index]
    others = []
    seen = {step.token}
    for other, token_id in enumerate(chosen):
        if token_id is None:
            continue
        text = columns[other][index].token
        if text in seen:
            continue
        seen.add(text)
        if token_text is not None and token_text[column](token_id) != text:
            others.append(OtherChoice(other, token_id, text, None, None, ANOTHER_VOCABULARY))
            continue
        prob, chain_prob, stage = probability_of(steps, index, token_id)
        others.append(OtherChoice(other, token_id, text, prob, chain_prob, stage))
    return ColumnAtDivergence(step.token_id, step.token, _number(step.prob), _number(step.chain_prob), tuple(others))


def _number(p: float) -> float | None:
    return None if p != p else p  # NaN: the backend gave none


def probability_of(steps: Sequence[Step], index: int, token_id: int) -> tuple[float | None, float | None, str | None]:
    """(raw probability, probability after the chain, the stage that dropped it) that the column whose
    reply is `steps` gave `token_id` at `index`; the chain is replayed on the step's stored logits."""
    step = steps[index]
    if token_id == step.token_id:
        return _number(step.prob), _number(step.chain_prob), None
    if step.top_ids is None or step.top_logits is None:
        return None, None, None
    from chat_tui.engine.explain import replay_chain

    prompt = steps[0].prompt
    context = (list(prompt.ids) if prompt is not None else []) + [s.token_id for s in steps[:index]]
    try:
        replay = replay_chain(step, context, step.params)
    except EngineError:
        return None, None, None
    where = [i for i, t in enumerate(replay.ids.tolist()) if t == token_id]
    if not where:  # below the stored candidates: rarer than all of them
        return None, None, None
    i = where[0]
    stage = replay.stage(i)
    if stage is None and replay.chain_probs[i] == 0.0 and replay.params.greedy:
        stage = "greedy"  # kept by every stage, but not the argmax
    return float(replay.raw_probs[i]), float(replay.chain_probs[i]), stage


def describe_divergence(divergence: Divergence | None, labels: Sequence[str], token_label) -> str:
    """One line: where the columns diverge and what each thought of the other's token.

    `token_label(text)`: how a token's text is shown (quoted, made safe)."""
    if divergence is None:
        return "the columns agree token for token"
    parts = []
    for column, at in enumerate(divergence.columns):
        if at.token_id is None:
            parts.append(f"{labels[column]} had ended")
            continue
        views = []
        for other in at.others:
            views.append(f"{labels[column]} gave {labels[other.column]}'s {token_label(other.token)} "
                         + choice_probability(other.prob, other.chain_prob, other.dropped_by))
        parts.append(f"{labels[column]} chose {token_label(at.token)}"
                     + (f" ({'; '.join(views)})" if views else ""))
    return f"diverge at token {divergence.index}: " + " · ".join(parts)


def choice_probability(prob: float | None, chain_prob: float | None, dropped_by: str | None) -> str:
    """"p 0.120 → 0.000, dropped by top_p": the raw probability and the one after the chain."""
    if prob is None and chain_prob is None:
        return "not a token of this model's vocabulary" if dropped_by == ANOTHER_VOCABULARY else \
            "p < every stored candidate's"
    raw = "?" if prob is None else f"{prob:.3f}"
    after = "?" if chain_prob is None else f"{chain_prob:.3f}"
    return f"p {raw} → {after}" + (f", dropped by {dropped_by}" if dropped_by else "")


def check_columns(count: int) -> None:
    if not MIN_COLUMNS <= count <= MAX_COLUMNS:
        raise InvalidParameter("columns", count, f"{MIN_COLUMNS} to {MAX_COLUMNS}")
