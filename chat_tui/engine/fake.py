"""A deterministic engine for tests and benchmarks: scripted replies, no model, no torch.

It behaves like the real decode loop where the UI can tell: the first Step carries PromptInfo,
every token asks `resolve_params(params)` again (so a mid-reply edit applies at the next token and
is recorded in `Step.params` and `FakeEngine.params_seen`), `cancel` is honoured within one token
(the last Step then has finish_reason "cancelled"), stop strings never leak, max_new_tokens ends a
reply with "length", old turns are dropped to fit the context, and a conversation that ends with an
assistant message is continued rather than answered.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from chat_tui.engine.params import SamplingParams
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

# words with their leading blanks, single punctuation marks, runs of blanks, and newlines on their own
_TOKEN_RE = re.compile(r"\n|[^\S\n]*\w+|[^\S\n]*[^\w\s]|[^\S\n]+")

SPECIALS = ("<|pad|>", "<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
ROLE_TOKEN = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
_FILLER = (" the", " a", " and", " of", " to", " is", " in", " it", " you", " that", ".", ",", "\n",
           " I", " for", " on", " with", " as", " this", " be")

Script = str | Callable[[Conversation, SamplingParams], str]


@dataclass
class StreamRecord:
    """What one call of `stream` saw (for tests)."""

    conversation: list[Message]
    params: list[SamplingParams]
    inspect: bool
    finish_reason: str | None = None


def tokenize(text: str) -> list[str]:
    return _TOKEN_RE.findall(text)


class FakeEngine:
    """Replies from a script, one word-ish token at a time.

    `replies`: reply texts (or callables `(conversation, params) -> text`) used in turn, cycling.
    `finish_reasons`: for each reply, the reason its last token reports (default "eos"); the
    engine still reports "length", "stop", "context" and "cancelled" when those happen first.
    `fail_at`: raise EngineError when this token index is reached (tests of error handling).
    """

    backend = "fake"
    chat_format = "fake-chatml"
    attention_unavailable: str | None = None
    attention_note: str | None = None
    decode_note: str | None = None

    def __init__(
        self,
        replies: Sequence[Script] | Script = ("Hello! I am a **fake** model.",),
        *,
        token_delay: float = 0.0,
        prefill_delay: float = 0.0,
        finish_reasons: Sequence[str | None] | None = None,
        model_name: str = "fake-model",
        device: str = "cpu",
        context_length: int = 2048,
        n_layer: int = 2,
        n_head: int = 4,
        seed: int = 0,
        defaults: SamplingParams | None = None,
        fail_at: int | None = None,
        checkpoint_hash: str = "fake-0000000000000000",
    ) -> None:
        self.replies: list[Script] = [replies] if isinstance(replies, str) or callable(replies) else list(replies)
        if not self.replies:
            raise ValueError("FakeEngine needs at least one reply")
        self.token_delay = token_delay
        self.prefill_delay = prefill_delay
        self.finish_reasons = list(finish_reasons) if finish_reasons is not None else None
        self.model_name = model_name
        self.device = device
        self.context_length = context_length
        self.n_layer = n_layer
        self.n_head = n_head
        self.seed = seed
        self.fail_at = fail_at
        self.checkpoint_hash = checkpoint_hash
        self._defaults = defaults if defaults is not None else SamplingParams(temperature=0.8, top_p=0.95)
        self._vocab: list[str] = list(SPECIALS) + list(_FILLER)
        self._ids: dict[str, int] = {t: i for i, t in enumerate(self._vocab)}
        self._lock = threading.Lock()
        self.calls = 0
        self.records: list[StreamRecord] = []

    # ------------------------------------------------------------------ tokenizer

    @property
    def params_seen(self) -> list[SamplingParams]:
        """The settings each token of the latest stream was sampled with."""
        return self.records[-1].params if self.records else []

    def _id(self, piece: str) -> int:
        with self._lock:
            found = self._ids.get(piece)
            if found is None:
                found = len(self._vocab)
                self._vocab.append(piece)
                self._ids[piece] = found
            return found

    def encode(self, text: str) -> list[int]:
        return [self._id(piece) for piece in tokenize(text)]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self._vocab[i] if i >= len(SPECIALS) else "" for i in ids)

    def token_text(self, token_id: int) -> str:
        return self._vocab[token_id] if 0 <= token_id < len(self._vocab) else "\ufffd"

    def default_params(self) -> SamplingParams:
        return self._defaults

    def render(self, conversation: Conversation) -> tuple[list[int], list[MessageSpan]]:
        ids = [self._ids["<|bos|>"]]
        spans: list[MessageSpan] = []
        messages = list(conversation)
        for i, message in enumerate(messages):
            start = len(ids)
            ids.append(self._ids[ROLE_TOKEN[message.role]])
            ids += self.encode(message.content)
            open_reply = i == len(messages) - 1 and message.role == "assistant"
            if not open_reply:
                ids.append(self._ids["<|end|>"])
            spans.append(MessageSpan(i, message.role, start, len(ids)))
        if not messages or messages[-1].role != "assistant":
            spans.append(MessageSpan(-1, "assistant", len(ids), len(ids) + 1))
            ids.append(self._ids["<|assistant|>"])
        return ids, spans

    # ------------------------------------------------------------------ generation

    def _fit(self, conversation: list[Message], budget: int) -> tuple[list[int], list[MessageSpan], int, int]:
        if not conversation:
            raise EngineError("the conversation is empty: nothing to reply to")
        ids, spans = self.render(conversation)
        full = len(ids)
        kept = list(range(len(conversation)))
        dropped = 0
        while len(ids) > budget:
            droppable = [k for k in kept[:-1] if conversation[k].role != "system"]
            if not droppable:
                break
            kept.remove(droppable[0])
            dropped += 1
            ids, spans = self.render([conversation[k] for k in kept])
        if len(ids) > budget:  # only the newest message is left and it is too long: cut its start
            cut = len(ids) - budget
            ids = ids[:1] + ids[cut + 1 :]
            spans = [MessageSpan(-1 if s.message_index < 0 else kept[s.message_index], s.role,
                                 max(1, s.start - cut), s.end - cut)
                     for s in spans if s.end - cut > 1]
        else:
            spans = [MessageSpan(-1 if s.message_index < 0 else kept[s.message_index], s.role, s.start, s.end)
                     for s in spans]
        return ids, spans, dropped, full - len(ids)

    def _script(self, conversation: list[Message], params: SamplingParams) -> tuple[str, str]:
        index = self.calls % len(self.replies)
        self.calls += 1
        script = self.replies[index]
        text = script(conversation, params) if callable(script) else script
        reason = "eos"
        if self.finish_reasons is not None and index < len(self.finish_reasons):
            reason = self.finish_reasons[index] or "eos"
        if conversation and conversation[-1].role == "assistant":
            partial = conversation[-1].content
            text = text[len(partial):] if text.startswith(partial) else text
        return text, reason

    def _candidates(
        self, rng: np.random.Generator, chosen: int, params: SamplingParams
    ) -> tuple[float, float, list[Candidate], np.ndarray, np.ndarray]:
        n = max(params.top_candidates, 1)
        p_chosen = 1.0 if params.greedy else float(0.35 + 0.6 * rng.random())
        others = [i for i in rng.choice(len(self._vocab), size=min(n + 2, len(self._vocab)), replace=False)
                  if int(i) != chosen and int(i) >= len(SPECIALS)][: n - 1]
        rest = (1.0 - p_chosen) * 0.9 if not params.greedy else 0.0
        weights = np.sort(rng.dirichlet(np.ones(len(others))))[::-1] * rest if others else np.zeros(0)
        ids = [chosen] + [int(i) for i in others]
        probs = [p_chosen] + [float(w) for w in weights]
        order = sorted(range(len(ids)), key=lambda k: -probs[k])
        ids = [ids[k] for k in order]
        probs = [probs[k] for k in order]
        # the chain: temperature sharpens or flattens, top-k truncates, then renormalise
        if params.greedy:
            chain = [1.0 if k == 0 else 0.0 for k in range(len(ids))]
        else:
            raw = [p ** (1.0 / params.temperature) if p > 0 else 0.0 for p in probs]
            if params.top_k:
                raw = [r if k < params.top_k else 0.0 for k, r in enumerate(raw)]
            total = sum(raw) or 1.0
            chain = [r / total for r in raw]
        top = [Candidate(i, self.token_text(i), p, c) for i, p, c in zip(ids, probs, chain, strict=True)]
        chosen_at = ids.index(chosen)
        logsumexp = 3.0
        logits = np.array([np.log(max(p, 1e-12)) + logsumexp for p in probs], dtype=np.float32)
        return probs[chosen_at], chain[chosen_at], top, np.array(ids, dtype=np.int32), logits

    def _attention_row(self, rng: np.random.Generator, length: int) -> np.ndarray:
        row = rng.random((self.n_layer, self.n_head, length), dtype=np.float32) ** 3
        row /= row.sum(axis=-1, keepdims=True)
        return row.astype(np.float16)

    def stream(
        self,
        conversation: Conversation,
        params: ParamsSource,
        *,
        inspect: bool = False,
        cancel: threading.Event | None = None,
        candidates: bool = True,
    ) -> Iterator[Step]:
        started = time.perf_counter()
        messages = list(conversation)
        first = resolve_params(params)
        record = StreamRecord(messages, [], inspect)
        self.records.append(record)
        reserve = max(1, min(first.max_new_tokens, self.context_length // 2))
        ids, spans, dropped_messages, dropped_tokens = self._fit(messages, self.context_length - reserve)
        seed = first.seed if first.seed is not None else random.Random(self.seed + self.calls).randrange(2**31)
        text, scripted_reason = self._script(messages, first)
        pieces = tokenize(text)
        if self.prefill_delay and cancel is not None:
            cancel.wait(self.prefill_delay)
        elif self.prefill_delay:
            time.sleep(self.prefill_delay)
        prompt_attention = None
        if inspect:
            rng = np.random.default_rng([self.seed, seed, 0])
            p = len(ids)
            full = rng.random((self.n_layer, self.n_head, p, p), dtype=np.float32) ** 3
            full *= np.tril(np.ones((p, p), dtype=np.float32))
            full /= full.sum(axis=-1, keepdims=True)
            prompt_attention = full.astype(np.float16)
        prompt = PromptInfo(
            ids=list(ids),
            tokens=[self.token_text(i) for i in ids],
            spans=spans,
            dropped_messages=dropped_messages,
            dropped_tokens=dropped_tokens,
            seed=seed,
            prefill_s=time.perf_counter() - started,
            attention=prompt_attention,
        )
        stops = first.stop
        released_total = ""
        held = ""
        position = len(ids)
        last = time.perf_counter()
        index = 0
        eos_id = self._ids["<|end|>"]
        while True:
            if self.token_delay:
                if cancel is not None:
                    cancel.wait(self.token_delay)
                else:
                    time.sleep(self.token_delay)
            current = resolve_params(params)
            record.params.append(current)
            if self.fail_at is not None and index >= self.fail_at:
                raise EngineError(f"the fake engine failed on purpose at token {index}")
            if current.stop != stops:
                stops = current.stop
            at_end = index >= len(pieces)
            piece = "" if at_end else pieces[index]
            token_id = eos_id if at_end else self._id(piece)
            finish: str | None = None
            released = ""
            if at_end:
                finish = scripted_reason
                released, held = held, ""
            else:
                held += piece
                hit = _first_stop(released_total + held, stops, len(released_total))
                if hit is not None:
                    released = (released_total + held)[len(released_total):hit]
                    held = ""
                    finish = "stop"
                else:
                    keep = _stop_prefix_len(held, stops)
                    released, held = held[: len(held) - keep], held[len(held) - keep :]
            if finish is None and index + 1 >= current.max_new_tokens:
                finish = "length"
            if finish is None and position + 1 >= self.context_length:
                finish = "context"
            if finish is None and cancel is not None and cancel.is_set():
                finish = "cancelled"
            if finish is not None and finish != "stop":
                released += held
                held = ""
            released_total += released
            rng = np.random.default_rng([self.seed, seed, index + 1])
            prob, chain_prob, top, top_ids, top_logits = self._candidates(rng, token_id, current)
            now = time.perf_counter()
            yield Step(
                index=index,
                position=position,
                token_id=token_id,
                token=self.token_text(token_id),
                text=released,
                prob=prob,
                chain_prob=chain_prob,
                top=top,
                attention=self._attention_row(rng, position + 1) if inspect else None,
                top_ids=top_ids,
                top_logits=top_logits,
                logsumexp=3.0,
                step_s=now - last,
                elapsed_s=now - started,
                finish_reason=finish,  # type: ignore[arg-type]
                prompt=prompt if index == 0 else None,
                params=current,
            )
            last = time.perf_counter()
            if finish is not None:
                record.finish_reason = finish
                return
            index += 1
            position += 1


def _first_stop(text: str, stops: Sequence[str], search_from: int) -> int | None:
    """Where the earliest stop string begins in `text` (only matches that end after `search_from`)."""
    best: int | None = None
    for s in stops:
        at = text.find(s, max(0, search_from - len(s) + 1))
        if at != -1 and (best is None or at < best):
            best = at
    return best


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """The length of the longest end of `text` that could begin a stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                longest = max(longest, n)
                break
    return longest
