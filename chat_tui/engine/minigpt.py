"""The mini-GPT backend: our own model and tokenizer behind the Engine protocol."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from chat_tui.engine.checkpoint import checkpoint_hash, load_model
from chat_tui.engine.generation import run_stream
from chat_tui.engine.model import GPT, KVCache
from chat_tui.engine.params import SamplingParams
from chat_tui.engine.tokenizer import ASSISTANT, BOS, END, SYSTEM, USER, ChatTokenizer
from chat_tui.engine.types import Conversation, EngineError, MessageSpan, ParamsSource, Step


def best_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class MiniGPTRunner:
    """Drives the model through a preallocated KV cache."""

    def __init__(self, model: GPT, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.cache = KVCache(model.config, device=device, dtype=next(model.parameters()).dtype)

    def prefill(self, ids: Sequence[int], inspect: bool):
        self.cache.reset()
        x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        logits, _, attention = self.model(x, cache=self.cache, capture=inspect, last_only=True)
        matrix = None
        if attention is not None:
            matrix = torch.stack([weights[0] for _, weights in attention])  # (layers, heads, P, P)
        return logits[0, -1], matrix

    def feed(self, token_id: int, inspect: bool):
        x = torch.tensor([[token_id]], dtype=torch.long, device=self.device)
        logits, _, attention = self.model(x, cache=self.cache, capture=inspect)
        row = None
        if attention is not None:
            row = torch.stack([weights[0, :, 0] for _, weights in attention])  # (layers, heads, position + 1)
        return logits[0, -1], row


class MiniGPTEngine:
    backend = "minigpt"
    chat_format = "minigpt"
    attention_unavailable: str | None = None

    def __init__(
        self, model: GPT, tokenizer: ChatTokenizer, defaults: SamplingParams, *, name: str, path: Path | None = None
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self._defaults = defaults
        self.model_name = name
        self.path = path
        self.device = str(next(model.parameters()).device)
        self.context_length = model.config.block_size
        self.n_layer = model.config.n_layer
        self.n_head = model.config.n_head
        self.checkpoint_hash = checkpoint_hash(path) if path is not None else "in-memory"
        # A reply ends at <|end|>; any other header means the model began a new turn itself.
        self.eos_ids = {tokenizer.special_ids[t] for t in (END, BOS, SYSTEM, USER, ASSISTANT)}
        self._lock = threading.Lock()  # one generation at a time per model

    @classmethod
    def load(
        cls, path: str | Path, *, device: str | None = None, progress: Callable[[str], None] | None = None
    ) -> MiniGPTEngine:
        path = Path(path)
        device = device or best_device()
        if progress:
            progress(f"loading {path.name}")
        try:
            torch_device = torch.device(device)
        except RuntimeError:
            raise EngineError(f"unknown device {device!r} (use cpu, cuda or mps)") from None
        model, tokenizer, defaults = load_model(path, device=torch_device)
        return cls(model, tokenizer, defaults, name=path.name, path=path)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.token_text(token_id)

    def default_params(self) -> SamplingParams:
        return self._defaults

    def render(self, conversation: Conversation) -> tuple[list[int], list[MessageSpan]]:
        return self.tokenizer.render_prompt(conversation)

    def stream(
        self,
        conversation: Conversation,
        params: ParamsSource,
        *,
        inspect: bool = False,
        cancel: threading.Event | None = None,
    ) -> Iterator[Step]:
        with self._lock:
            runner = MiniGPTRunner(self.model, next(self.model.parameters()).device)
            yield from run_stream(
                runner,
                conversation=conversation,
                render=self.render,
                decode=self.decode,
                token_text=self.token_text,
                eos_ids=self.eos_ids,
                context_length=self.context_length,
                params=params,
                inspect=inspect,
                cancel=cancel,
            )
