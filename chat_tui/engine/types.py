"""The engine's typed interface: what every backend takes and yields.

Pure Python plus numpy (no torch, no Textual), so the UI and the tests can build these
values without loading a model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from chat_tui.engine.params import SamplingParams
from chat_tui.errors import CheckpointError, EngineError  # noqa: F401 - engine code imports them from here

if TYPE_CHECKING:
    import numpy as np

    from chat_tui.engine.explain import ChainReplay, Explanation

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")

FinishReason = Literal["eos", "stop", "length", "context", "cancelled"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {self.role!r}")
        if not isinstance(self.content, str):
            raise TypeError("message content must be a string")


Conversation = Sequence[Message]


@dataclass(frozen=True)
class Candidate:
    """One possible next token."""

    id: int
    text: str  # the token's own text (may be part of a multi-byte character: shown with U+FFFD)
    prob: float  # softmax of the raw logits (temperature 1, no penalties)
    chain_prob: float  # probability after the whole sampling chain; 0.0 if a stage dropped it


@dataclass(frozen=True)
class MessageSpan:
    """Which prompt positions [start, end) hold which message (index into the conversation)."""

    message_index: int  # -1 for the generation prompt (e.g. the `<|assistant|>` header)
    role: str
    start: int
    end: int


@dataclass
class PromptInfo:
    """What was prefilled: carried by the first Step of a stream."""

    ids: list[int]
    tokens: list[str]  # each token's own text, for labels
    spans: list[MessageSpan]
    dropped_messages: int  # whole old turns left out to fit the context
    dropped_tokens: int  # tokens left out in all (whole turns and a cut prompt)
    seed: int  # the seed actually used (chosen at random when params.seed is None)
    prefill_s: float
    # float16 (layers, heads, P, P) when inspecting and the backend can provide it
    attention: np.ndarray | None = None
    # a model on a server: the request's fields exactly as sent (no messages, no key), and what had to
    # change to send it (a setting the server rejected and that was left out); None for a local model
    sent: dict | None = None
    note: str | None = None
    # a model on a server: the request fields it has rejected so far, left out of every request
    unsupported: tuple[str, ...] = ()
    # the heads (layer, head), zero-based, whose outputs were zeroed for the whole reply (`stream(knock_out=...)`)
    knocked_out: frozenset[tuple[int, int]] = frozenset()
    # the reply's first tokens, given as ids (`stream(prefix_ids=...)`, a fork): the last of `ids`
    prefix_ids: tuple[int, ...] = ()


@dataclass
class Step:
    """One generated token."""

    index: int  # 0 for the first token of the reply
    position: int  # the token's position in the context window
    token_id: int
    token: str  # the token's own text (for labels; a part of a character shows as its bytes, `<0xE4>`)
    text: str  # text released to the stream by this step: never half a character, never part of a stop string
    # The candidates' fields (prob, chain_prob, top, top_ids, top_logits, logsumexp) are filled only when
    # the stream was asked for them (`stream(..., candidates=True)`, the default); else NaN, [] or None.
    prob: float  # raw probability of the chosen token
    chain_prob: float  # its probability after the sampling chain
    top: list[Candidate]  # the top candidates by raw probability (params.top_candidates of them)
    # float16 (layers, heads, position + 1): this token's query row, when inspecting
    attention: np.ndarray | None
    # the raw logits of the most likely tokens (ids, float32 logits) and the log of the softmax normaliser,
    # so a view can replay the sampling chain with other settings without the whole vocabulary
    top_ids: np.ndarray | None
    top_logits: np.ndarray | None
    logsumexp: float
    step_s: float  # wall time from the previous step (or from the end of the prefill)
    elapsed_s: float  # wall time since stream() was called
    finish_reason: FinishReason | None = None  # set on the last step of the stream
    prompt: PromptInfo | None = None  # set on the first step only
    params: SamplingParams | None = None  # the settings this token was sampled with
    # the first position the model sees: 0 until the context fills and the window slides (then the
    # model sees only the last position + 1 - window_start tokens; attention rows are 0 before it)
    window_start: int = 0
    # with `stream(..., lens=True)`, from an engine that reads the logit lens in its decode loop (the
    # mini-GPT's numpy kernel): the first layer from which this token stays the lens's top-1 (zero-based),
    # NO_COMMIT if it is not top-1 at the end; None when not computed (ask the Inside views instead)
    commit_layer: int | None = None


NO_COMMIT = -1  # Step.commit_layer: the token is not the model's own top-1

ParamsSource = SamplingParams | Callable[[], SamplingParams]


def resolve_params(source: ParamsSource) -> SamplingParams:
    """The current settings: a callable is asked again at every token, so edits apply mid-reply."""
    return source() if callable(source) else source


@runtime_checkable
class Engine(Protocol):
    """What the UI and the CLI need from a backend (mini-GPT, Hugging Face, a test fake)."""

    backend: str  # "minigpt", "hf", "fake"
    model_name: str
    device: str
    context_length: int
    n_layer: int
    n_head: int
    chat_format: str
    checkpoint_hash: str
    # None when attention can be captured, else the reason it cannot (shown by the inspector)
    attention_unavailable: str | None
    # which layers have no attention weights to show, when some do (shown by the inspector)
    attention_note: str | None
    # how this model decodes when that matters to the user (e.g. no KV cache: each step recomputes
    # the whole sequence), else None (shown in the status bar and in `ask --json`)
    decode_note: str | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_text(self, token_id: int) -> str: ...

    def default_params(self) -> SamplingParams: ...

    def render(self, conversation: Conversation) -> tuple[list[int], list[MessageSpan]]: ...

    def stream(
        self,
        conversation: Conversation,
        params: ParamsSource,
        *,
        inspect: bool = False,
        cancel: threading.Event | None = None,
        candidates: bool = True,
        knock_out: frozenset[tuple[int, int]] = frozenset(),
        prefix_ids: Sequence[int] = (),
        lens: bool = False,
    ) -> Iterator[Step]:
        """One Step per token. `knock_out`: heads (layer, head), zero-based, whose outputs are zeroed for the
        whole reply (an engine that cannot raises EngineError); the first Step's PromptInfo names them.
        `prefix_ids`: the reply's first tokens as ids, prefilled after the rendered prompt as they are (not
        tokenized again); the Steps are the tokens after them. Pass it only when non-empty: an engine
        that cannot (a server) raises EngineError. `lens`: fill each Step's `commit_layer` where the decode
        loop can do so cheaply (a wish: an engine that cannot leaves it None)."""
        ...

    # How many tokens the model can emit (None when the backend does not say); the candidates
    # view uses it to bound the tail of the distribution it did not keep.
    vocab_size: int | None

    @property
    def alive(self) -> bool:
        """False once the model's process has died (in-process engines: always True)."""
        ...

    def close(self, *, wait: bool = True) -> None:
        """Free the model (a no-op for an engine that holds nothing outside Python's memory); `wait`:
        until it is freed (a model process has exited), else in the background."""
        ...


@runtime_checkable
class Explainer(Protocol):
    """What the inspector asks of an engine beyond streaming: an engine that can answer has these
    methods and says `explains = True`. Ask `explainer(engine)`, never `getattr`."""

    explains: bool

    def explain_attention(self, ids: Sequence[int], query_position: int, layer: int, head: int) -> Explanation:
        """q·k, the scaled scores, softmax and value sizes for one query of one head."""
        ...

    def replay_chain(self, step: Step, context_ids: Sequence[int] | None,
                     params: SamplingParams | None) -> ChainReplay:
        """The sampling chain run again on `step`'s kept logits under `params` (None: its own)."""
        ...


def explainer(engine: object) -> Explainer | None:
    """`engine` as an Explainer when it can explain (its model is reachable), else None."""
    if isinstance(engine, Explainer) and engine.explains:
        return engine
    return None


@dataclass
class Reply:
    """A finished generation, as the CLI and tests collect it."""

    text: str = ""
    steps: list[Step] = field(default_factory=list)
    finish_reason: str | None = None
    prompt: PromptInfo | None = None

    @property
    def tokens(self) -> int:
        return len(self.steps)


def collect(steps: Iterator[Step]) -> Reply:
    reply = Reply()
    for step in steps:
        if step.prompt is not None:
            reply.prompt = step.prompt
        reply.steps.append(step)
        reply.text += step.text
        if step.finish_reason is not None:
            reply.finish_reason = step.finish_reason
    return reply
