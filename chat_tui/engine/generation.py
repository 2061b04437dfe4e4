"""The decode loop every backend shares: prefill once, then one position per step through a KV cache.

A backend supplies a `Runner` (prefill the prompt, feed one token) and its tokenizer functions;
this module does the rest the same way for all of them: fitting the conversation into the
context, the sampling chain, streaming-safe text, stop strings, candidates, sliding the window
when the context fills, timing and cancel.

It works in numpy and never imports torch: a runner may hand back numpy arrays (the mini-GPT on
the CPU) or torch tensors (converted here); a torch runner's calls run under
`torch.inference_mode()` when torch is already loaded.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from chat_tui.engine.chat_formats import with_stops
from chat_tui.engine.sampling import apply_chain, draw, new_generator, picks_argmax, sample
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
# when the context is full, the window slides: the last SLIDE_KEEP of it are prefilled again, so the
# window fills (and slides) again only after another quarter of it has been generated
SLIDE_KEEP = 0.75

Array = Any  # a numpy array, or a torch tensor from a torch runner


class Runner(Protocol):
    """A model with a KV cache, as the loop drives it.

    `prefill` starts afresh (it is also how the window slides): whatever it cached before is gone.
    """

    def prefill(self, ids: Sequence[int], inspect: bool) -> tuple[Array, Array | None]:
        """Logits [V] after the last prompt token; attention (layers, heads, P, P) when inspecting."""
        ...

    def feed(self, token_id: int, inspect: bool) -> tuple[Array, Array | None]:
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


def _row(logits: Array) -> np.ndarray:
    """One row of logits as float32 numpy (shared, not copied, when it already is)."""
    if not isinstance(logits, np.ndarray):
        logits = logits.detach().float().cpu().numpy()
    return np.ascontiguousarray(logits, dtype=np.float32).reshape(-1)


def _nan_error(model_name: str | None) -> EngineError:
    where = f"{model_name}: " if model_name else ""
    return EngineError(f"{where}the model produced NaN; the checkpoint is broken")


def _check_nan(raw: np.ndarray, argmax: int | None, model_name: str | None) -> None:
    """NaN logits are an EngineError (without the log-sum-exp that finds them for free).

    `argmax`: the raw argmax when the loop took it; numpy's picks a NaN first, so its logit tells."""
    if np.isnan(raw[argmax] if argmax is not None else raw.max()):
        raise _nan_error(model_name)


def _logsumexp(raw: np.ndarray, model_name: str | None) -> float:
    """log Σ exp(logits), the normaliser of the raw probabilities; NaN logits are an EngineError."""
    peak = raw.max()  # NaN anywhere makes the max NaN: the check costs nothing
    if np.isnan(peak):
        raise _nan_error(model_name)
    if not np.isfinite(peak):  # every token masked (-inf) or an overflow (+inf)
        return float(peak)
    return float(peak + np.log(np.exp(raw - peak).sum(dtype=np.float64)))


def _attention16(matrix: Array | None) -> np.ndarray | None:
    if matrix is None:
        return None
    if not isinstance(matrix, np.ndarray):
        return matrix.detach().to("cpu").half().numpy()
    return matrix.astype(np.float16)


def _pad_keys(row: np.ndarray | None, length: int) -> np.ndarray | None:
    """(layers, heads, keys) left-padded with zeros to `length` keys (a slid window sees fewer)."""
    if row is None or row.shape[-1] >= length:
        return row
    padded = np.zeros((*row.shape[:-1], length), dtype=row.dtype)
    padded[..., length - row.shape[-1] :] = row
    return padded


def _torch_context(runner: Runner) -> Callable[[], contextlib.AbstractContextManager]:
    """What the runner's calls run under: `torch.inference_mode()` for a torch runner (torch is
    loaded then), nothing for one that says `uses_torch = False`."""
    torch = sys.modules.get("torch")
    if torch is None or not getattr(runner, "uses_torch", True):
        return contextlib.nullcontext
    return torch.inference_mode


class _History:
    """The ids so far (prompt and reply), grown by doubling; the penalties read them."""

    def __init__(self, ids: Sequence[int], capacity: int) -> None:
        self.ids = np.zeros(max(capacity, len(ids), 1), dtype=np.int64)
        self.ids[: len(ids)] = ids
        self.n = len(ids)

    def append(self, token: int) -> None:
        if self.n == self.ids.size:
            self.ids = np.concatenate([self.ids, np.zeros_like(self.ids)])
        self.ids[self.n] = token
        self.n += 1

    def view(self) -> np.ndarray:
        return self.ids[: self.n]


def _pick(raw: np.ndarray, history: _History, current, uniform: float) -> tuple[int, np.ndarray | None]:
    """The next token, and the chain's probabilities (None when the chain was skipped)."""
    if picks_argmax(current):  # the chain would change nothing: skip its copy of the vocabulary
        return int(raw.argmax()), None
    chain = apply_chain(raw, history.view(), current)
    return sample(chain, current, uniform), chain.probs


def _candidates(raw: np.ndarray, log_z: float, token: int, chain_probs: np.ndarray | None, n_top: int):
    """The candidates: one partial sort, then plain numpy/Python on 256 numbers."""
    k = min(RAW_LOGITS_KEPT, raw.size)
    top_ids = np.argpartition(raw, raw.size - k)[raw.size - k :] if k < raw.size else np.arange(raw.size)
    top_ids = top_ids[np.argsort(-raw[top_ids], kind="stable")]
    top_logits = raw[top_ids]
    n_top = min(n_top, k)
    top_ids_list = top_ids[:n_top].tolist()
    top_raw = np.exp(top_logits[:n_top] - log_z).tolist()
    if chain_probs is None:  # greedy: all of the chain's probability is on the argmax
        top_chain = [1.0 if i == token else 0.0 for i in top_ids_list]
        chain_prob = 1.0
    else:
        top_chain = chain_probs[top_ids[:n_top]].tolist()
        chain_prob = float(chain_probs[token])
    return top_ids, top_logits, top_ids_list, top_raw, top_chain, chain_prob


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
    model_name: str | None = None,
    candidates: bool = True,
    default_seed: int | None = None,
    knock_out: frozenset[tuple[int, int]] = frozenset(),
    prefix_ids: Sequence[int] = (),
    lens: bool = False,
) -> Iterator[Step]:
    """Generate a reply, one Step per token. See `chat_tui.engine.types.Step`.

    Without `candidates` (a plain streamed reply, which reads only the text) the Steps carry no
    candidates, top logits or probabilities (NaN): the log-sum-exp and the top-256 they need are
    a tenth of a small model's token.

    When the context is full the window slides (unless `params.slide_context` is off): the last
    SLIDE_KEEP of the sequence is prefilled again and the reply goes on, each Step's
    `window_start` telling the first position the model still sees.

    `default_seed`: the seed when `params.seed` is None (else a random one; a test fake passes its own).
    `knock_out`: the heads the runner has switched off, recorded in the PromptInfo (the runner does the switching).
    `prefix_ids`: the reply's first tokens, given as ids (a fork): prefilled after the rendered prompt exactly as
    they are (never tokenized again), the Steps being only the tokens after them; the PromptInfo's `ids` end with
    them and its `prefix_ids` names them.
    `lens`: each Step's `commit_layer`, from a runner that has `commit_layer` (else None).
    """
    started = time.perf_counter()
    first = resolve_params(params)
    reserve = max(1, min(first.max_new_tokens, context_length // 2))
    prefix = [int(i) for i in prefix_ids]
    budget = context_length - reserve - len(prefix)
    if prefix and budget < context_length // 4:  # a long prefix: the prompt keeps a quarter, the window slides
        budget = context_length // 4
    if len(prefix) + budget >= context_length:
        raise EngineError(f"the reply's first {len(prefix)} tokens leave too little of the model's "
                          f"{context_length}-token context for its prompt: fork it at an earlier token")
    fitted = fit_to_context(conversation, render, budget)
    if first.seed is not None:
        seed = first.seed
    else:
        seed = default_seed if default_seed is not None else secrets.randbits(63)
    generator = new_generator(seed)
    torch_context = _torch_context(runner)
    commit_of = getattr(runner, "commit_layer", None) if lens else None
    if commit_of is not None:
        runner.lens = True  # type: ignore[attr-defined]  # keep the residuals from the prefill on

    with torch_context():
        prefilled = [*fitted.ids, *prefix]
        logits, prompt_attention = runner.prefill(prefilled, inspect)
        prompt = PromptInfo(
            ids=prefilled,
            tokens=[token_text(i) for i in prefilled],
            spans=fitted.spans,
            dropped_messages=fitted.dropped_messages,
            dropped_tokens=fitted.dropped_tokens,
            seed=seed,
            prefill_s=time.perf_counter() - started,
            attention=_attention16(prompt_attention),
            knocked_out=frozenset(knock_out),
            prefix_ids=tuple(prefix),
        )
    history = _History(prefilled, context_length + 1)
    detok = IncrementalDetokenizer(decode)
    for prefix_id in prefix:  # the reply's text goes on from its prefix's (a word's leading space, a split character)
        detok.push(prefix_id)
    stops = StopStringFilter(first.stop)
    stop_strings = first.stop
    position = len(prefilled)
    window_start = 0  # the first position the model sees (moves when the window slides)
    keep_on_slide = max(1, int(context_length * SLIDE_KEEP))
    last_time = time.perf_counter()
    index = 0
    while True:
        current = resolve_params(params)
        if current.stop != stop_strings:  # new stop strings apply from here on
            released = stops.flush()
            stops, stop_strings = StopStringFilter(current.stop), current.stop
        else:
            released = ""
        raw = _row(logits)
        uniform = draw(generator)  # one per step, greedy or not: the same seed gives the same draws
        if candidates:
            log_z = _logsumexp(raw, model_name)
            token, chain_probs = _pick(raw, history, current, uniform)
            top_ids, top_logits, top_ids_list, top_raw, top_chain, chain_prob = _candidates(
                raw, log_z, token, chain_probs, current.top_candidates)
            prob = float(np.exp(float(raw[token]) - log_z))
        else:  # nobody reads them: no log-sum-exp, no top-256, no probabilities
            token, chain_probs = _pick(raw, history, current, uniform)
            _check_nan(raw, token if chain_probs is None else None, model_name)
            top_ids = top_logits = None
            top_ids_list, top_raw, top_chain = [], [], []
            log_z = prob = chain_prob = math.nan

        commit = commit_of(token, raw) if commit_of is not None else None  # before `feed` moves on

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
        if finish is None and not current.slide_context and position + 1 >= context_length:
            finish = "context"  # the next token would fall outside the window
        if finish is None and cancel is not None and cancel.is_set():
            finish = "cancelled"

        history.append(token)
        attention = None
        if finish is None or (inspect and position - window_start < context_length):
            # a finished reply is fed only for its attention row
            with torch_context():
                if position - window_start < context_length:
                    logits, row = runner.feed(token, inspect)
                    attention = _attention16(row)
                else:  # the window is full: slide it, prefilling the newest tokens again
                    window_start = position + 1 - keep_on_slide
                    logits, matrix = runner.prefill(history.view()[window_start:].tolist(), inspect)
                    matrix = _attention16(matrix)
                    attention = None if matrix is None else matrix[:, :, -1]
            attention = _pad_keys(attention, position + 1)
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
            window_start=window_start,
            commit_layer=commit,
        )
        last_time = time.perf_counter()
        if finish is not None:
            return
        index += 1
        position += 1


def stream_engine(
    engine: Any,
    runner: Runner,
    conversation: Conversation,
    params: ParamsSource,
    *,
    stops: tuple[str, ...],
    inspect: bool,
    cancel: threading.Event | None,
    candidates: bool,
    knock_out: frozenset[tuple[int, int]] = frozenset(),
    prefix_ids: Sequence[int] = (),
    lens: bool = False,
) -> Iterator[Step]:
    """`run_stream` for an engine that renders and decodes itself (the mini-GPT, Hugging Face models).

    Takes the engine's `render`, `decode`, `token_text`, `eos_ids`, `context_length` and
    `model_name`, and adds its chat format's `stops` to the sampling settings.
    """
    return run_stream(
        runner,
        conversation=conversation,
        render=engine.render,
        decode=engine.decode,
        token_text=engine.token_text,
        eos_ids=engine.eos_ids,
        context_length=engine.context_length,
        params=with_stops(params, stops),
        inspect=inspect,
        cancel=cancel,
        model_name=engine.model_name,
        candidates=candidates,
        knock_out=knock_out,
        prefix_ids=prefix_ids,
        lens=lens,
    )
