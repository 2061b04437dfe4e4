"""A deterministic engine for tests and benchmarks: scripted replies, no model, no torch.

It drives the shared decode loop (`generation.run_stream`) with a runner whose logits make each
piece of the scripted reply certain, so it behaves like a real backend where the UI can tell: the
first Step carries PromptInfo, every token asks `resolve_params(params)` again (so a mid-reply edit
applies at the next token and is recorded in `Step.params` and `FakeEngine.params_seen`), `cancel`
is honoured within one token, stop strings never leak, max_new_tokens ends a reply with "length",
old turns are dropped to fit the context, and a conversation that ends with an assistant message is
continued rather than answered. The candidates and attention are made up, the same for the same seed.

It also opens up its "next token" (`chat_tui.engine.inside.Inside`) with small made-up numbers of the
right shapes, so the inspector's inside views are tested without a model: the lens commits at a
known layer (`fake_commit_layer`), the attribution's components and bias add up to the logit, the
rollout rows sum to 1, knocking out `decisive_head` changes the top token (any other head only
shifts the probabilities), and the tokenizer's pieces carry their real bytes (a character beyond
ASCII splits into one token per byte, as a byte-level BPE does with a character it has no merge for).
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from chat_tui.engine.generation import run_stream
from chat_tui.engine.inside import (
    INSIDE_VIEWS,
    Attribution,
    BlockRow,
    BlockTrace,
    Component,
    Head,
    KnockOut,
    Lens,
    LensLayer,
    Rollout,
    TokenPiece,
    TopToken,
    head_name,
)
from chat_tui.engine.params import SamplingParams
from chat_tui.engine.types import (
    Candidate,
    Conversation,
    EngineError,
    Message,
    MessageSpan,
    ParamsSource,
    Step,
    resolve_params,
)

# words with their leading blanks, single punctuation marks, runs of blanks, and newlines on their own
_TOKEN_RE = re.compile(r"\n|[^\S\n]*\w+|[^\S\n]*[^\w\s]|[^\S\n]+")

SPECIALS = ("<|pad|>", "<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
ROLE_TOKEN = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
_FILLER = (" the", " a", " and", " of", " to", " is", " in", " it", " you", " that", ".", ",", "\n",
           " I", " for", " on", " with", " as", " this", " be")
# the log-sum-exp the made-up candidates' logits are given against
FAKE_LOGSUMEXP = 3.0
# the logit of every token but the scripted one: no temperature or penalty lets it be drawn
UNCHOSEN_LOGIT = -1e9

Script = str | Callable[[Conversation, SamplingParams], str]


@dataclass
class StreamRecord:
    """What one call of `stream` saw (for tests)."""

    conversation: list[Message]
    params: list[SamplingParams]
    inspect: bool
    finish_reason: str | None = None
    knock_out: frozenset[Head] = field(default_factory=frozenset)  # the heads switched off
    prefix_ids: tuple[int, ...] = ()  # the reply's first tokens, given as ids (a fork)
    lens: bool = False  # the stream was asked for each token's commitment layer


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
    # not told: the vocabulary grows with every new word the fake reads
    vocab_size: int | None = None

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
        unavailable_views: dict[str, str] | None = None,
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
        # the inside views this fake says it cannot show, with the one-line reason (tests of the notes)
        self.unavailable_views = dict(unavailable_views or {})
        # the head whose knock-out changes the top token: the last layer's second head
        self.decisive_head: Head = (n_layer - 1, 1 % n_head)
        self._defaults = defaults if defaults is not None else SamplingParams(temperature=0.8, top_p=0.95)
        self._vocab: list[str] = list(SPECIALS) + list(_FILLER)
        self._ids: dict[str, int] = {t: i for i, t in enumerate(self._vocab)}
        self._lock = threading.Lock()
        self.calls = 0
        self.lens_calls = 0  # how often `logit_lens` was asked
        # True: a stream asked for the lens fills each Step's commit_layer, as the mini-GPT's decode loop
        # does; False: it leaves it None, as an engine whose loop cannot (the views are asked instead)
        self.lens_in_stream = False
        self.records: list[StreamRecord] = []
        # always, in this process; a test sets it False to play a model process that died
        self.alive = True

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

    def _script(self, conversation: list[Message], params: SamplingParams, prefix: str = "") -> tuple[str, str]:
        """The scripted reply's rest after what the reply already holds (an open message's text, then
        the text of its prefix ids), and its finish reason."""
        index = self.calls % len(self.replies)
        self.calls += 1
        script = self.replies[index]
        text = script(conversation, params) if callable(script) else script
        reason = "eos"
        if self.finish_reasons is not None and index < len(self.finish_reasons):
            reason = self.finish_reasons[index] or "eos"
        partial = (conversation[-1].content if conversation and conversation[-1].role == "assistant" else "") + prefix
        if partial:
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
        logits = np.array([np.log(max(p, 1e-12)) + FAKE_LOGSUMEXP for p in probs], dtype=np.float32)
        return probs[chosen_at], chain[chosen_at], top, np.array(ids, dtype=np.int32), logits

    def _attention_row(self, rng: np.random.Generator, length: int) -> np.ndarray:
        row = rng.random((self.n_layer, self.n_head, length), dtype=np.float32) ** 3
        row /= row.sum(axis=-1, keepdims=True)
        return row.astype(np.float16)

    def _prompt_attention(self, seed: int, length: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, seed, 0])
        full = rng.random((self.n_layer, self.n_head, length, length), dtype=np.float32) ** 3
        full *= np.tril(np.ones((length, length), dtype=np.float32))
        full /= full.sum(axis=-1, keepdims=True)
        return full.astype(np.float16)

    def _dress(self, step: Step, seed: int, inspect: bool, candidates: bool) -> None:
        """Give a Step of the scripted stream the made-up numbers a model would have given it: its
        candidates (when asked for) and attention (when inspecting), the same for the same seed."""
        if step.prompt is not None and inspect:
            step.prompt.attention = self._prompt_attention(seed, len(step.prompt.ids))
        if not (candidates or inspect):
            return
        rng = np.random.default_rng([self.seed, seed, step.index + 1])
        # drawn even when not kept, so that the attention rows do not depend on `candidates`
        drawn = self._candidates(rng, step.token_id, step.params or self._defaults)
        if candidates:
            step.prob, step.chain_prob, step.top, step.top_ids, step.top_logits = drawn
            step.logsumexp = FAKE_LOGSUMEXP
        if inspect:
            step.attention = self._attention_row(rng, step.position + 1)

    def stream(
        self,
        conversation: Conversation,
        params: ParamsSource,
        *,
        inspect: bool = False,
        cancel: threading.Event | None = None,
        candidates: bool = True,
        knock_out: frozenset[Head] = frozenset(),
        prefix_ids: Sequence[int] = (),
        lens: bool = False,  # commit_layer as `fake_commit_layer` says, with `lens_in_stream` (else None)
    ) -> Iterator[Step]:
        """The shared decode loop (`run_stream`) over the scripted reply, dressed with made-up numbers.
        `knock_out`: the heads to switch off, recorded (the script does not change); `prefix_ids`: the reply's
        first tokens, prefilled after the prompt and recorded (the script's tokens follow them)."""
        messages = list(conversation)
        first = resolve_params(params)
        record = StreamRecord(messages, [], inspect, knock_out=frozenset(knock_out),
                              prefix_ids=tuple(int(i) for i in prefix_ids), lens=lens)
        self.records.append(record)
        seed = first.seed if first.seed is not None else random.Random(self.seed + self.calls).randrange(2**31)
        prefix = self.decode(prefix_ids) if prefix_ids else ""
        runner = _ScriptRunner(self, lambda: self._script(messages, first, prefix), cancel)
        steps = run_stream(
            runner,
            conversation=messages,
            render=self.render,
            decode=self.decode,
            token_text=self.token_text,
            eos_ids={self._ids["<|end|>"]},
            context_length=self.context_length,
            params=params,
            inspect=inspect,
            cancel=cancel,
            model_name=self.model_name,
            candidates=False,  # the loop's would be those of the certain logits: `_dress` makes some up
            default_seed=seed,
            knock_out=knock_out,
            prefix_ids=prefix_ids,
        )
        context: list[int] = []  # the ids before the next token (the lens's context)
        while True:
            # the fake model's time for a token, spent before the loop picks it: Esc meanwhile cancels it
            _wait(self.token_delay, cancel)
            step = next(steps, None)
            if step is None:
                return
            record.params.append(step.params or first)
            if self.fail_at is not None and step.index >= self.fail_at:
                raise EngineError(f"the fake engine failed on purpose at token {step.index}")
            if step.finish_reason == "eos":
                step.finish_reason = runner.scripted_reason  # type: ignore[assignment]
            self._dress(step, seed, inspect, candidates)
            if step.prompt is not None:
                context = list(step.prompt.ids)
            if lens and self.lens_in_stream:
                step.commit_layer = self.fake_commit_layer(context)
            context.append(step.token_id)
            if step.finish_reason is not None:
                record.finish_reason = step.finish_reason
            yield step
            if step.finish_reason is not None:
                return

    # ------------------------------------------------------------------ inside the next token (made up)

    def inside_views(self) -> dict[str, str | None]:
        return {view: self.unavailable_views.get(view) for view in INSIDE_VIEWS}

    def fake_commit_layer(self, ids: Sequence[int]) -> int:
        """The layer the fake's lens commits at for the prediction after `ids`: known to the tests."""
        return len(ids) % self.n_layer

    def _others(self, token_id: int, count: int, salt: int) -> list[int]:
        """`count` filler token ids other than `token_id`, the same for the same arguments."""
        fillers = [self._ids[t] for t in _FILLER if self._ids[t] != token_id]
        start = (token_id + salt) % len(fillers)
        return [fillers[(start + k) % len(fillers)] for k in range(count)]

    def logit_lens(self, ids: Sequence[int], token_id: int, top: int = 3) -> Lens:
        self.lens_calls += 1
        commit = self.fake_commit_layer(ids)
        rival, *rest = self._others(token_id, max(top, 2), len(ids))
        layers = []
        for layer in range(self.n_layer):
            committed = layer >= commit
            # the chosen token grows surer layer by layer once committed; before, a rival leads
            p_chosen = 0.5 + 0.4 * (layer + 1) / self.n_layer if committed else 0.15
            p_rival = 0.6 if not committed else (1.0 - p_chosen) * 0.6
            remaining = max(0.0, 1.0 - p_chosen - p_rival)
            probs = {token_id: p_chosen, rival: p_rival}
            for k, other in enumerate(rest):
                probs[other] = remaining * 0.5 ** (k + 1)
            ranked = sorted(probs, key=lambda t: -probs[t])
            layers.append(LensLayer(
                layer=layer,
                top=[TopToken(t, self.token_text(t), probs[t]) for t in ranked[:top]],
                chosen_prob=p_chosen,
                chosen_rank=ranked.index(token_id),
            ))
        final = layers[-1].chosen_prob
        return Lens(token_id=token_id, layers=layers, commit_layer=commit,
                    surprisal_bits=float(-np.log2(final)))

    def attribute(self, ids: Sequence[int], token_id: int) -> Attribution:
        rng = np.random.default_rng([self.seed, len(ids), max(token_id, 0), 1])
        components = [Component("embed", None, None, float(rng.normal(0.0, 0.5)))]
        for layer in range(self.n_layer):
            for head in range(self.n_head):
                value = float(rng.normal(0.0, 0.4))
                if (layer, head) == self.decisive_head:
                    value = 3.0 + abs(value)  # the head that wrote the token
                components.append(Component(head_name(layer, head), layer, head, value))
            components.append(Component(f"L{layer + 1} MLP", layer, None, float(rng.normal(0.0, 0.8))))
        bias = float(rng.normal(0.0, 0.1))
        logit = float(sum(c.value for c in components) + bias)
        return Attribution(token_id=token_id, logit=logit, bias=bias, components=components)

    def _layer_attention(self, length: int) -> np.ndarray:
        """Made-up causal attention, heads averaged: (n_layer, length, length), rows summing to 1."""
        rng = np.random.default_rng([self.seed, length, 2])
        full = rng.random((self.n_layer, self.n_head, length, length)) ** 3
        full *= np.tril(np.ones((length, length)))
        full /= full.sum(axis=-1, keepdims=True)
        return full.mean(axis=1)

    def rollout(self, ids: Sequence[int]) -> Rollout:
        n = len(ids)
        attention = self._layer_attention(n)
        joint = np.eye(n)
        for layer in range(self.n_layer):
            mixed = 0.5 * attention[layer] + 0.5 * np.eye(n)
            mixed /= mixed.sum(axis=-1, keepdims=True)
            joint = mixed @ joint
        return Rollout(rollout=joint[-1].astype(np.float32), last_layer=attention[-1, -1].astype(np.float32))

    def _next_distribution(self, ids: Sequence[int], top: int) -> dict[int, float]:
        candidates = self._others(-1, top, len(ids))
        weights = [0.5 ** k for k in range(len(candidates))]
        total = sum(weights)
        return {t: w / total for t, w in zip(candidates, weights, strict=True)}

    def knock_out(self, ids: Sequence[int], heads: frozenset[Head], top: int = 8) -> KnockOut:
        before = self._next_distribution(ids, top)
        after = dict(before)
        ranked = list(before)
        if self.decisive_head in heads and len(ranked) > 1:  # the top two change places
            first, second = ranked[0], ranked[1]
            after[first], after[second] = before[second], before[first]
        others = len(heads - {self.decisive_head})
        if others:  # any other head only flattens the distribution a little
            flat = {t: p ** (1.0 - 0.05 * others) for t, p in after.items()}
            total = sum(flat.values())
            after = {t: p / total for t, p in flat.items()}
        kl = sum(p * np.log2(p / after[t]) for t, p in before.items() if p > 0)
        rows = [(TopToken(t, self.token_text(t), before[t]), before[t], after[t]) for t in ranked]
        return KnockOut(heads=frozenset(heads), rows=rows, kl_bits=float(kl),
                        top_before=ranked[0], top_after=max(after, key=lambda t: after[t]))

    def token_pieces(self, text: str) -> list[TokenPiece]:
        pieces: list[TokenPiece] = []
        at = 0
        for piece in tokenize(text):
            start = text.index(piece, at)
            at = start + len(piece)
            if piece.isascii():
                pieces.append(TokenPiece(self._id(piece), piece, piece.encode(), start, at))
                continue
            # beyond ASCII: ASCII runs stay whole, every other character is one token per byte
            run_start = start
            for offset, char in enumerate(piece + "\0"):
                index = start + offset
                if char.isascii() and offset < len(piece):
                    continue
                if index > run_start:
                    run = text[run_start:index]
                    pieces.append(TokenPiece(self._id(run), run, run.encode(), run_start, index))
                if offset < len(piece):
                    for byte in char.encode():
                        name = f"<0x{byte:02X}>"
                        pieces.append(TokenPiece(self._id(name), name, bytes([byte]), index, index + 1))
                run_start = index + 1
        return pieces

    def block_trace(self, ids: Sequence[int], layer: int, head: int) -> BlockTrace:
        rng = np.random.default_rng([self.seed, len(ids), layer, head, 3])
        names = ("token embedding", "position embedding", "layer norm 1", "q", "k", "v", "attention output",
                 "residual + attention", "layer norm 2", "MLP output", "residual + MLP")
        rows = []
        for name in names:
            first = [round(float(v), 4) for v in rng.normal(0.0, 1.0, 4)] if name in ("q", "k") else []
            rows.append(BlockRow(name, float(1.0 + 4.0 * rng.random()), first))
        return BlockTrace(layer=layer, head=head, rows=rows)

    # ------------------------------------------------------------------ the rest of the Engine protocol

    def close(self, *, wait: bool = True) -> None:
        """Nothing to free: the fake holds no model."""


class _ScriptRunner:
    """The fake's model, as `run_stream` drives it: logits that make the scripted reply's next piece
    certain whatever the sampling settings (every other token is far below it), then <|end|>."""

    uses_torch = False

    def __init__(self, engine: FakeEngine, script: Callable[[], tuple[str, str]],
                 cancel: threading.Event | None) -> None:
        self.engine = engine
        self.script = script
        self.cancel = cancel
        self.ids: list[int] | None = None  # the scripted reply's token ids, then <|end|>
        self.next = 0  # the index in `ids` of the token the next logits choose
        self.scripted_reason = "eos"

    def _logits(self) -> np.ndarray:
        assert self.ids is not None
        logits = np.full(len(self.engine._vocab), UNCHOSEN_LOGIT, dtype=np.float32)
        logits[self.ids[min(self.next, len(self.ids) - 1)]] = 0.0
        return logits

    def prefill(self, ids: Sequence[int], inspect: bool) -> tuple[np.ndarray, None]:
        if self.ids is None:  # the first prefill (a later one slides the window: the script goes on)
            text, self.scripted_reason = self.script()
            self.ids = [*self.engine.encode(text), self.engine._ids["<|end|>"]]
            _wait(self.engine.prefill_delay, self.cancel)
        else:
            self.next += 1
        return self._logits(), None

    def feed(self, token_id: int, inspect: bool) -> tuple[np.ndarray, None]:
        self.next += 1
        return self._logits(), None


def _wait(seconds: float, cancel: threading.Event | None) -> None:
    """Sleep, or less when `cancel` is set meanwhile."""
    if not seconds:
        return
    if cancel is not None:
        cancel.wait(seconds)
    else:
        time.sleep(seconds)
