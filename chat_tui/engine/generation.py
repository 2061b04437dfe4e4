"""The decode loop every backend shares: prefill once, then one position per step through a KV cache.

A backend supplies a `Runner` (prefill the prompt, feed one token) and its tokenizer functions;
this module does the rest the same way for all of them: fitting the conversation into the
context, the sampling chain, streaming-safe text, stop strings, candidates, timing and cancel.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from chat_tui.engine.sampling import apply_chain, picks_argmax, sample
from chat_tui.engine.stopping import StopStringFilter
from chat_tui.engine.types import (
    Candidate,
    Conversation,
    EngineError,
    Message,
    MessageSpan,
    ParamsSource,
    PromptInfo,
    Step,
    resolve_params,
)

RAW_LOGITS_KEPT = 256  # per step, for replaying the sampling chain with other settings


class Runner(Protocol):
    """A model with a KV cache, as the loop drives it."""

    def prefill(self, ids: Sequence[int], inspect: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [V] after the last prompt token; attention (layers, heads, P, P) when inspecting."""
        ...

    def feed(self, token_id: int, inspect: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Append one token: the next logits [V] and its attention row (layers, heads, position + 1)."""
        ...


Render = Callable[[Conversation], tuple[list[int], list[MessageSpan]]]


@dataclass
class FittedPrompt:
    ids: list[int]
    spans: list[MessageSpan]
    dropped_messages: int
    dropped_tokens: int


def fit_to_context(conversation: Conversation, render: Render, budget: int) -> FittedPrompt:
    """Render the conversation in at most `budget` tokens.

    The oldest turns go first (system messages stay); if the newest message alone is still too
    long, its beginning is cut. The caller is told how much was left out.
    """
    messages = list(conversation)
    if not messages:
        raise EngineError("the conversation is empty: nothing to reply to")
    kept = list(range(len(messages)))  # indices into the caller's conversation

    def rendered() -> tuple[list[int], list[MessageSpan]]:
        ids, spans = render([messages[i] for i in kept])
        # spans count the kept messages: map them back to the caller's indices
        return ids, [
            MessageSpan(kept[s.message_index] if s.message_index >= 0 else -1, s.role, s.start, s.end) for s in spans
        ]

    ids, spans = rendered()
    full_length = len(ids)
    while len(ids) > budget:
        droppable = [i for i in kept[:-1] if messages[i].role != "system"]
        if not droppable:
            break
        kept.remove(droppable[0])
        ids, spans = rendered()
    last = kept[-1]
    content = messages[last].content
    for _ in range(64):  # only the system prompt and the newest message are left: cut the newest's start
        excess = len(ids) - budget
        if excess <= 0 or not content:
            break
        chars_per_token = max(len(content) / max(len(ids), 1), 0.25)
        content = content[max(1, int(excess * chars_per_token)) :]
        messages[last] = Message(messages[last].role, content)
        ids, spans = rendered()
    if len(ids) > budget:
        raise EngineError(f"the prompt needs {len(ids)} tokens but the context holds {budget}: shorten the system prompt")
    return FittedPrompt(ids, spans, len(conversation) - len(kept), full_length - len(ids))


class IncrementalDetokenizer:
    """Turns a growing list of ids into text deltas that never end in half a character.

    Decodes a short window (as text-generation-inference does), so each step costs O(1).
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self.decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self.decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """What is still held (an incomplete character at the very end shows as U+FFFD)."""
        prefix_text = self.decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self.decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""


def _logsumexp(raw: torch.Tensor, raw_np: np.ndarray) -> float:
    """log Σ exp(logits), the normaliser of the raw probabilities."""
    if raw_np.size <= 32768:  # numpy is faster up to about this size, torch beyond it
        peak = raw_np.max()
        if np.isfinite(peak):
            return float(peak + np.log(np.exp(raw_np - peak).sum(dtype=np.float64)))
    return float(torch.logsumexp(raw, dim=-1))


def _to_numpy16(t: torch.Tensor | None):
    return None if t is None else t.detach().to("cpu", torch.float16).numpy()


def run_stream(
    runner: Runner,
    *,
    conversation: Conversation,
    render: Render,
    decode: Callable[[Sequence[int]], str],
    token_text: Callable[[int], str],
    eos_ids: set[int],
    context_length: int,
    params: ParamsSource,
    inspect: bool,
    cancel: threading.Event | None,
) -> Iterator[Step]:
    """Generate a reply, one Step per token. See `chat_tui.engine.types.Step`."""
    started = time.perf_counter()
    first = resolve_params(params)
    reserve = max(1, min(first.max_new_tokens, context_length // 2))
    fitted = fit_to_context(conversation, render, context_length - reserve)
    seed = first.seed if first.seed is not None else secrets.randbits(63)
    generator = torch.Generator().manual_seed(seed)

    with torch.inference_mode():
        logits, prompt_attention = runner.prefill(fitted.ids, inspect)
        prompt = PromptInfo(
            ids=list(fitted.ids),
            tokens=[token_text(i) for i in fitted.ids],
            spans=fitted.spans,
            dropped_messages=fitted.dropped_messages,
            dropped_tokens=fitted.dropped_tokens,
            seed=seed,
            prefill_s=time.perf_counter() - started,
            attention=_to_numpy16(prompt_attention),
        )
        history = torch.empty(context_length + 1, dtype=torch.long)
        history[: len(fitted.ids)] = torch.tensor(fitted.ids, dtype=torch.long)
        n_history = len(fitted.ids)
        detok = IncrementalDetokenizer(decode)
        stops = StopStringFilter(first.stop)
        stop_strings = first.stop
        position = len(fitted.ids)
        last_time = time.perf_counter()
        index = 0
        while True:
            current = resolve_params(params)
            if current.stop != stop_strings:  # new stop strings apply from here on
                released = stops.flush()
                stops, stop_strings = StopStringFilter(current.stop), current.stop
            else:
                released = ""
            # sampling runs on the CPU: the generator is a CPU one, and the token id is needed here anyway
            raw = logits.detach().to("cpu", torch.float32).contiguous()
            raw_np = raw.numpy()  # shares memory: numpy is cheaper than torch on one small row
            chain_probs: torch.Tensor | None = None
            if picks_argmax(current):  # the chain would change nothing: skip its copy of the vocabulary
                token = int(raw_np.argmax())
            else:
                chain = apply_chain(raw, history[:n_history], current)
                token = sample(chain, current, generator)
                chain_probs = chain.probs

            # The candidates: one top-k, then plain numpy/Python on 256 numbers.
            log_z = _logsumexp(raw, raw_np)
            k = min(RAW_LOGITS_KEPT, raw_np.size)
            top_logits_t, top_ids_t = torch.topk(raw, k)
            top_logits, top_ids = top_logits_t.numpy(), top_ids_t.numpy()
            n_top = min(current.top_candidates, k)
            top_ids_list = top_ids[:n_top].tolist()
            top_raw = np.exp(top_logits[:n_top] - log_z).tolist()
            if chain_probs is None:  # greedy: all of the chain's probability is on the argmax
                top_chain = [1.0 if i == token else 0.0 for i in top_ids_list]
                chain_prob = 1.0
            else:
                top_chain = chain_probs[top_ids_t[:n_top]].tolist()
                chain_prob = float(chain_probs[token])
            prob = float(np.exp(float(raw_np[token]) - log_z))

            finish: str | None = None
            if token in eos_ids:
                finish = "eos"
            else:
                delta = detok.push(token)
                text, stopped = stops.feed(delta)
                released += text
                if stopped:
                    finish = "stop"
            if finish is None and index + 1 >= current.max_new_tokens:
                finish = "length"
            if finish is None and position + 1 >= context_length:
                finish = "context"  # the next token would fall outside the window
            if finish is None and cancel is not None and cancel.is_set():
                finish = "cancelled"

            history[n_history] = token
            n_history += 1
            attention = None
            if finish is None or inspect:  # a finished reply is fed only for its attention row
                logits, row = runner.feed(token, inspect)
                attention = _to_numpy16(row)
            if finish is not None and finish != "stop":
                released += stops.feed(detok.flush())[0] + stops.flush()

            now = time.perf_counter()
            yield Step(
                index=index,
                position=position,
                token_id=token,
                token=token_text(token),
                text=released,
                prob=prob,
                chain_prob=chain_prob,
                top=[
                    Candidate(i, token_text(i), p, c)
                    for i, p, c in zip(top_ids_list, top_raw, top_chain, strict=True)
                ],
                attention=attention,
                top_ids=top_ids,
                top_logits=top_logits,
                logsumexp=log_z,
                step_s=now - last_time,
                elapsed_s=now - started,
                finish_reason=finish,  # type: ignore[arg-type]
                prompt=prompt if index == 0 else None,
                params=current,
            )
            last_time = time.perf_counter()
            if finish is not None:
                return
            index += 1
            position += 1

