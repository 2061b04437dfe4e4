"""What the inspector computes off the UI thread, and the messages that bring the results back.

The pane runs these in Textual thread workers (pane.py): explaining a head needs a forward pass of
the model, and either may be a round trip to the model's own process. No torch is imported here;
`chat_tui.engine.explain` imports it only where a computation needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from textual.message import Message

from chat_tui.engine.explain import ChainReplay, Explanation, replay_chain, vocab_size_of
from chat_tui.engine.inside import Head, Inside
from chat_tui.engine.params import SamplingParams
from chat_tui.engine.types import Engine, Step, explainer


@dataclass(frozen=True)
class Replay:
    """The candidates view's numbers for one step: the chain as sampled, again under the settings
    in force now (when they differ), and the candidates' texts."""

    as_sampled: ChainReplay
    now: ChainReplay | None
    texts: dict[int, str] | None


def replay(engine: Engine | None, step: Step, context: Sequence[int], now: SamplingParams | None) -> Replay:
    """Run `step`'s sampling chain again on its kept logits, as sampled and under `now`."""
    source = explainer(engine)

    def run(params: SamplingParams | None) -> ChainReplay:
        if source is not None:  # the engine replays it (where its model and vocabulary are)
            return source.replay_chain(step, context, params)
        # any backend that kept the step's logits can replay here: the chain is numpy
        return replay_chain(step, context, params, vocab_size=vocab_size_of(engine) if engine is not None else None)

    as_sampled = run(step.params)
    replay_now = run(now) if now is not None else None
    texts = None
    if engine is not None and step.top_ids is not None:
        texts = {int(i): engine.token_text(int(i)) for i in step.top_ids.tolist()}
    return Replay(as_sampled, replay_now, texts)


class ExplainReady(Message):
    """An explain worker finished: the Explanation for `key`, or the error to show in its place."""

    bubble = False  # the pane's own business

    def __init__(self, key: tuple, result: Explanation | Exception) -> None:
        super().__init__()
        self.key = key
        self.result = result


class ReplayReady(Message):
    """A replay worker finished: the Replay for `key`, or the error to show in its place."""

    bubble = False

    def __init__(self, key: tuple, result: Replay | Exception) -> None:
        super().__init__()
        self.key = key
        self.result = result


class ExportDone(Message):
    """The export worker finished: the files written, or the error (one line)."""

    bubble = False

    def __init__(self, paths: list[Path], error: str | None = None) -> None:
        super().__init__()
        self.paths = paths
        self.error = error


def inside_result(source: Inside, view: str, ids: list[int], token_id: int, layer: int, head: int,
                  heads: frozenset[Head], text: str) -> object:
    """What an inside view (issue #14) shows, asked of the engine: for the lens, attribution and
    knock-out the prediction of `token_id` after `ids`; for rollout and block the last of `ids`."""
    if view == "lens":
        return source.logit_lens(ids, token_id)
    if view == "attribution":
        return source.attribute(ids, token_id)
    if view == "rollout":
        return source.rollout(ids)
    if view == "knockout":
        return source.knock_out(ids, heads)
    if view == "tokens":
        return source.token_pieces(text)
    if view == "block":
        return source.block_trace(ids, layer, head)
    raise ValueError(view)


class InsideReady(Message):
    """An inside view's worker finished: its result for `key` (or the error to show), and the views
    the engine can show (asked once per engine)."""

    bubble = False

    def __init__(self, key: tuple, result: object, views: dict[str, str | None] | None) -> None:
        super().__init__()
        self.key = key
        self.result = result
        self.views = views
