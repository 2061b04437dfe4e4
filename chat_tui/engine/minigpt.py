"""The mini-GPT backend: our own model and tokenizer behind the Engine protocol."""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.nn import functional as F

from chat_tui.engine.chat_formats import PLAIN_STOP, TEXT_FORMATS, render_text, with_stops
from chat_tui.engine.checkpoint import checkpoint_hash, load_model
from chat_tui.engine.generation import run_stream
from chat_tui.engine.model import GPT, KVCache
from chat_tui.engine.params import SamplingParams
from chat_tui.engine.tokenizer import ASSISTANT, BOS, END, SYSTEM, USER, ChatTokenizer
from chat_tui.engine.types import Conversation, EngineError, Message, MessageSpan, ParamsSource, Step


def best_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


@dataclass
class DecodeLayer:
    ln_1: tuple[torch.Tensor, torch.Tensor]
    attn: tuple[torch.Tensor, torch.Tensor]  # (in, out) weight, bias
    attn_proj: tuple[torch.Tensor, torch.Tensor]
    ln_2: tuple[torch.Tensor, torch.Tensor]
    fc: tuple[torch.Tensor, torch.Tensor]
    fc_proj: tuple[torch.Tensor, torch.Tensor]


@dataclass
class DecodeWeights:
    """The model's weights laid out for one-token decoding.

    One query makes every projection a matrix-vector product, and the CPU BLAS runs that about
    twice as fast on an (in, out) matrix (GPT-2's Conv1D layout, `addmm`) as on nn.Linear's
    (out, in). So decoding keeps transposed copies, made once per engine.
    """

    layers: list[DecodeLayer]
    ln_f: tuple[torch.Tensor, torch.Tensor]
    lm_head: torch.Tensor  # (n_embd, vocab)
    wte: torch.Tensor
    wpe: torch.Tensor
    scale: float  # 1 / sqrt(head_dim)
    approximate: str  # the GELU's
    _numpy: DecodeWeights | None = None

    def numpy(self) -> DecodeWeights:
        """The same weights as numpy arrays sharing their memory (CPU only), made once."""
        if self._numpy is None:
            def n(pair):
                return tuple(t.numpy() for t in pair)

            layers = [
                DecodeLayer(*(n(p) for p in (y.ln_1, y.attn, y.attn_proj, y.ln_2, y.fc, y.fc_proj)))
                for y in self.layers
            ]
            self._numpy = DecodeWeights(layers, n(self.ln_f), self.lm_head.numpy(), self.wte.numpy(),
                                        self.wpe.numpy(), self.scale, self.approximate)
        return self._numpy

    @classmethod
    def from_model(cls, model: GPT) -> DecodeWeights:
        def t(linear: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
            return linear.weight.detach().t().contiguous(), linear.bias.detach()

        def ln(norm: torch.nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
            return norm.weight.detach(), norm.bias.detach()

        layers = [
            DecodeLayer(ln(b.ln_1), t(b.attn.c_attn), t(b.attn.c_proj), ln(b.ln_2), t(b.mlp.c_fc), t(b.mlp.c_proj))
            for b in model.transformer.h
        ]
        cfg = model.config
        return cls(
            layers,
            ln(model.transformer.ln_f),
            model.lm_head.weight.detach().t().contiguous(),
            model.transformer.wte.weight.detach(),
            model.transformer.wpe.weight.detach(),
            1.0 / math.sqrt(cfg.n_embd // cfg.n_head),
            model.transformer.h[0].mlp.approximate,
        )


class MiniGPTRunner:
    """Drives the model through a preallocated KV cache."""

    def __init__(self, model: GPT, device: torch.device, weights: DecodeWeights | None = None) -> None:
        self.model = model
        self.device = device
        self.weights = weights if weights is not None else DecodeWeights.from_model(model)
        dtype = next(model.parameters()).dtype
        self.cache = KVCache(model.config, device=device, dtype=dtype)
        # On the CPU in float32, numpy's BLAS does these matrix-vector products near memory speed
        # (about 1.8x torch's addmm here) and its small ops cost a microsecond, not five.
        self.numpy_path = device.type == "cpu" and dtype == torch.float32

    def prefill(self, ids: Sequence[int], inspect: bool):
        self.cache.reset()
        x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        logits, _, attention = self.model(x, cache=self.cache, capture=inspect, last_only=True)
        matrix = None
        if attention is not None:
            matrix = torch.stack([weights[0] for _, weights in attention])  # (layers, heads, P, P)
        return logits[0, -1], matrix

    def feed(self, token_id: int, inspect: bool):
        """One token through the cache: the next logits [V] and, when inspecting, its attention row."""
        block_size = self.model.config.block_size
        if self.cache.length >= block_size:
            raise ValueError(f"sequence of {self.cache.length + 1} tokens is longer than the context ({block_size})")
        if self.numpy_path:
            return self._feed_numpy(token_id, inspect)
        return self._feed_torch(token_id, inspect)

    def _feed_torch(self, token_id: int, inspect: bool):
        """One token through the cache: the model's own math, written for a single query.

        At this size decoding is bound by per-operation overhead and matrix-vector speed, not
        arithmetic, so this path calls the functional ops directly on `DecodeWeights` (no module
        calls, no dropout, no mask) and computes the one query's attention explicitly: the softmax
        weights it needs anyway are the inspector's row, so capturing attention costs almost
        nothing. Tested equal to `GPT.forward` with the cache (tests/test_engine.py).
        """
        cache, w = self.cache, self.weights
        cfg = self.model.config
        C, nh, eps = cfg.n_embd, cfg.n_head, cfg.layer_norm_epsilon
        hd = C // nh
        pos = cache.length
        S = pos + 1
        x = (w.wte[token_id] + w.wpe[pos]).view(1, C)
        rows = []
        for i, layer in enumerate(w.layers):
            h = F.layer_norm(x, (C,), *layer.ln_1, eps)
            q, k, v = torch.addmm(layer.attn[1], h, layer.attn[0]).view(3, nh, 1, hd).unbind(0)
            keys, values = cache.kv[i, 0, 0], cache.kv[i, 1, 0]  # (heads, context, head_dim)
            keys[:, pos : pos + 1] = k
            values[:, pos : pos + 1] = v
            scores = torch.matmul(q, keys[:, :S].transpose(1, 2)).mul_(w.scale)  # (heads, 1, S)
            weights = torch.softmax(scores, dim=-1)
            if inspect:
                rows.append(weights[:, 0])
            y = torch.matmul(weights, values[:, :S]).view(1, C)
            x = x + torch.addmm(layer.attn_proj[1], y, layer.attn_proj[0])
            h = F.layer_norm(x, (C,), *layer.ln_2, eps)
            h = F.gelu(torch.addmm(layer.fc[1], h, layer.fc[0]), approximate=w.approximate)
            x = x + torch.addmm(layer.fc_proj[1], h, layer.fc_proj[0])
        cache.length = S
        x = F.layer_norm(x, (C,), *w.ln_f, eps)
        logits = torch.mm(x, w.lm_head)[0]
        return logits, (torch.stack(rows) if inspect else None)  # row: (layers, heads, position + 1)

    def _feed_numpy(self, token_id: int, inspect: bool):
        """`_feed_torch` in numpy, on the same weights and cache (views, no copies)."""
        w = self.weights.numpy()
        cfg = self.model.config
        C, nh = cfg.n_embd, cfg.n_head
        hd = C // nh
        pos = self.cache.length
        S = pos + 1
        kv = self.cache.kv.numpy()
        x = w.wte[token_id] + w.wpe[pos]
        rows = []
        for i, layer in enumerate(w.layers):
            h = _layer_norm(x, *layer.ln_1, cfg.layer_norm_epsilon)
            q, k, v = (h @ layer.attn[0] + layer.attn[1]).reshape(3, nh, hd)
            keys, values = kv[i, 0, 0], kv[i, 1, 0]  # (heads, context, head_dim)
            keys[:, pos] = k
            values[:, pos] = v
            scores = np.matmul(keys[:, :S], q[:, :, None])[:, :, 0] * w.scale  # (heads, S)
            scores -= scores.max(axis=-1, keepdims=True)
            weights = np.exp(scores)
            weights /= weights.sum(axis=-1, keepdims=True)
            if inspect:
                rows.append(weights)
            y = np.matmul(weights[:, None, :], values[:, :S])[:, 0].reshape(C)
            x = x + (y @ layer.attn_proj[0] + layer.attn_proj[1])
            h = _layer_norm(x, *layer.ln_2, cfg.layer_norm_epsilon)
            h = h @ layer.fc[0] + layer.fc[1]
            h = F.gelu(torch.from_numpy(h), approximate=w.approximate).numpy()
            x = x + (h @ layer.fc_proj[0] + layer.fc_proj[1])
        self.cache.length = S
        x = _layer_norm(x, *w.ln_f, cfg.layer_norm_epsilon)
        logits = torch.from_numpy(x @ w.lm_head)
        return logits, (torch.from_numpy(np.stack(rows)) if inspect else None)


def single_threaded_blas():
    """numpy's BLAS on one thread while decoding: between our tiny matrix-vector products its idle
    threads spin and fight torch's for the cores (measured 8x slower on 2 cores)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    centred = x - x.mean()
    return centred / np.sqrt((centred * centred).mean() + eps) * weight + bias


NATIVE_FORMAT = "minigpt"  # the checkpoint's own chat tokens: <|bos|><|user|>…<|end|><|assistant|>
UNTRAINED_KEY = "untrained_token_ids"  # config.json: special tokens the weights never learned (an import's)


def untrained_token_ids(folder: Path | None) -> frozenset[int]:
    """The ids config.json lists under `untrained_token_ids` (none for a checkpoint trained here)."""
    if folder is None:
        return frozenset()
    try:
        ids = json.loads((folder / "config.json").read_text(encoding="utf-8")).get(UNTRAINED_KEY) or ()
        return frozenset(int(i) for i in ids)
    except (OSError, ValueError, AttributeError, TypeError):
        return frozenset()  # load_model has read this file already: a damaged list means none


def choose_format(override: str | None, untrained: frozenset[int], tokenizer: ChatTokenizer) -> str:
    """The format asked for (`template` is the checkpoint's own chat tokens), else the native one,
    or `raw` for a base model whose chat tokens were never trained (an imported nanoGPT)."""
    if override in ("template", NATIVE_FORMAT):
        return NATIVE_FORMAT
    if override in TEXT_FORMATS:
        return override
    if override is not None:
        raise EngineError(f"chat format {override!r} does not fit a mini-GPT checkpoint (use template, plain or raw)")
    chat_tokens = {tokenizer.special_ids[t] for t in (USER, ASSISTANT, END)}
    return "raw" if untrained & chat_tokens else NATIVE_FORMAT


class MiniGPTEngine:
    backend = "minigpt"
    attention_unavailable: str | None = None

    def __init__(
        self, model: GPT, tokenizer: ChatTokenizer, defaults: SamplingParams, *, name: str, path: Path | None = None,
        chat_format: str | None = None,
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
        self._decode_weights: DecodeWeights | None = None  # made at the first reply
        self.chat_format = choose_format(chat_format, untrained_token_ids(path), tokenizer)
        self._format_stops = (PLAIN_STOP,) if self.chat_format == "plain" else ()
        # raw keeps special-token strings you type as the tokens (you write the format by hand), as for
        # Hugging Face models; a copy, because the shared tokenizer keeps them plain text everywhere else
        self._raw_tokenizer = Tokenizer.from_str(tokenizer.tokenizer.to_str()) if self.chat_format == "raw" else None

    @classmethod
    def load(
        cls, path: str | Path, *, device: str | None = None, progress: Callable[[str], None] | None = None,
        chat_format: str | None = None,
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
        return cls(model, tokenizer, defaults, name=path.name, path=path, chat_format=chat_format)

    def decode_weights(self) -> DecodeWeights:
        """The weights laid out for decoding, made at the first reply and kept."""
        if self._decode_weights is None:
            self._decode_weights = DecodeWeights.from_model(self.model)
        return self._decode_weights

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.token_text(token_id)

    def default_params(self) -> SamplingParams:
        return self._defaults

    def render(self, conversation: Conversation) -> tuple[list[int], list[MessageSpan]]:
        if self.chat_format == NATIVE_FORMAT:
            return self.tokenizer.render_prompt(conversation)
        return self._render_text(list(conversation))

    def _render_text(self, messages: list[Message]) -> tuple[list[int], list[MessageSpan]]:
        """The plain and raw formats: the text encoded as a whole, as the model would read it."""
        text, ends, _ = render_text(messages, plain=self.chat_format == "plain")
        encoding = (self._raw_tokenizer or self.tokenizer.tokenizer).encode(text, add_special_tokens=False)
        starts = [start for start, _ in encoding.offsets]
        cuts = [bisect.bisect_left(starts, c) for c in (0, *ends)] + [len(encoding.ids)]
        spans = [MessageSpan(i, m.role, cuts[i], cuts[i + 1]) for i, m in enumerate(messages)]
        if cuts[-1] > cuts[-2]:  # plain's open "Assistant:" line
            spans.append(MessageSpan(-1, "assistant", cuts[-2], cuts[-1]))
        return list(encoding.ids), spans

    def stream(
        self,
        conversation: Conversation,
        params: ParamsSource,
        *,
        inspect: bool = False,
        cancel: threading.Event | None = None,
    ) -> Iterator[Step]:
        with self._lock:
            runner = MiniGPTRunner(self.model, next(self.model.parameters()).device, self.decode_weights())
            with single_threaded_blas() if runner.numpy_path else contextlib.nullcontext():
                yield from run_stream(
                    runner,
                    conversation=conversation,
                    render=self.render,
                    decode=self.decode,
                    token_text=self.token_text,
                    eos_ids=self.eos_ids,
                    context_length=self.context_length,
                    params=with_stops(params, self._format_stops),
                    inspect=inspect,
                    cancel=cancel,
                )
