"""The runner the shared decode loop drives: a transformers model stepped through its KV cache (or
whatever else it carries its past in), with the attention weights taken when the inspector asks."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from chat_tui.engine.hf.engine import HFEngine

NO_ATTENTION = "{} has no attention layers (its layers return no attention weights)"


class HFRunner:
    """Drives a transformers model step by step, as `model.generate` would.

    How a model carries what it has read from one step to the next is learnt on its first prefill
    and kept on the engine (`HFEngine.decode_mode`):

    - ``cache``: the KV cache the model returns (most models);
    - ``own-cache``: a cache handed to the model, which fills it in place and returns none
      (RecurrentGemma: its attention layers' keys there, its recurrent state in its layers);
    - ``state``: the model's own recurrent state (RWKV's ``state``);
    - ``recompute``: no cache at all (GPT-1, XLM, Reformer): every step runs the whole sequence
      again, with the inputs the model's `prepare_inputs_for_generation` builds (XLM appends its
      mask token), so each step costs as much as a prefill.
    """

    def __init__(self, engine: HFEngine) -> None:
        self.engine = engine
        self.model = engine.model
        self.device = engine.input_device
        self.cache: Any = None
        self.state: Any = None
        self.tokens: list[int] = []
        self.length = 0
        self.capture = False

    def _forward(self, ids: list[int], capture: bool, first: bool, mode: str):
        engine = self.engine
        if mode == "recompute":
            return self._recompute(capture)
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        kwargs: dict[str, Any] = {"use_cache": True}
        if mode == "state":
            if not first:
                kwargs["state"] = self.state
        elif not first or self.cache is not None:
            kwargs[engine.cache_kwarg] = self.cache
        if engine.takes_position_ids:  # as generate passes them: some models count positions wrongly without
            start = 0 if first else self.length
            kwargs["position_ids"] = torch.arange(start, start + len(ids), device=self.device).unsqueeze(0)
        if capture:
            kwargs["output_attentions"] = True
        if first and engine.logits_to_keep:
            kwargs["logits_to_keep"] = 1  # the prompt's other positions need no logits
        out = self.model(input_ids=x, **kwargs)
        if mode == "state":
            self.state = getattr(out, "state", None)
        else:
            cache = getattr(out, "cache", None)
            if cache is None:
                cache = getattr(out, "past_key_values", None)
            self.cache = cache if cache is not None else self.cache
        return out

    def _recompute(self, capture: bool):
        x = torch.tensor([self.tokens], dtype=torch.long, device=self.device)
        inputs = dict(self.engine.generation_inputs(x))
        inputs["use_cache"] = False
        if capture:
            inputs["output_attentions"] = True
        return self.model(**inputs)

    def _learn_mode(self, ids: list[int]):
        """The first prefill of this model: find how it decodes, and return that prefill's output."""
        engine = self.engine
        try:
            out = self._forward(ids, self.capture, first=True, mode="cache")
        except Exception:  # noqa: BLE001 - a model that takes no step-by-step inputs at all (Reformer)
            out = None
        if out is not None and dataclasses.is_dataclass(out) and "attentions" not in {f.name for f in dataclasses.fields(out)}:
            engine.attention_unavailable = engine.attention_unavailable or NO_ATTENTION.format(engine.model_type)
        if out is not None and self.cache is not None:
            engine.decode_mode = "cache"
            return out
        if out is not None and getattr(out, "state", None) is not None and "state" in engine.forward_parameters:
            engine.decode_mode = "state"
            self.state = out.state
            return out
        own = engine.own_cache() if out is not None else None
        if own is not None:  # a model that fills a cache it is given but returns none (RecurrentGemma)
            self.cache = own
            out = self._forward(ids, self.capture, first=True, mode="cache")
            if own.get_seq_length() == len(ids):
                engine.decode_mode = "own-cache"
                return out
            self.cache = None
        out = self._recompute(self.capture)
        engine.decode_mode = "recompute"
        engine.decode_note = "no KV cache: recomputing the whole sequence each step (slower)"
        return out

    def prefill(self, ids: Sequence[int], inspect: bool):
        engine = self.engine
        self.capture = engine.attention_mode(inspect)
        ids = list(ids)
        self.tokens = list(ids)
        self.length = len(ids)
        if engine.decode_mode is None:
            out = self._learn_mode(ids)
        else:
            if engine.decode_mode == "own-cache":
                self.cache = engine.own_cache()
            out = self._forward(ids, self.capture, first=True, mode=engine.decode_mode)
        matrix = None
        if self.capture:
            layers = engine.layer_weights(getattr(out, "attentions", None), self.length, first=True)
            if layers is None:
                self.capture = False
            else:  # (layers, heads, P, P); a recomputing model may have read a token more (XLM's mask)
                matrix = torch.stack([_pad_keys(a[0, :, : self.length, : self.length], self.length) for a in layers])
        return engine.logits_out(out.logits[0, -1]), matrix

    def feed(self, token_id: int, inspect: bool):
        engine = self.engine
        self.tokens.append(token_id)
        out = self._forward([token_id], self.capture, first=False, mode=engine.decode_mode or "cache")
        self.length += 1
        row = None
        if self.capture:
            layers = engine.layer_weights(getattr(out, "attentions", None), self.length, first=False)
            if layers is None:
                self.capture = False
            else:
                last = self.length - 1  # the new token's row (the last one, unless the whole sequence was run)
                row = torch.stack([_pad_keys(a[0, :, -1] if a.shape[-2] == 1 else a[0, :, last, : self.length], self.length)
                                   for a in layers])
        return engine.logits_out(out.logits[0, -1]), row


def backend_decode(tokenizer: Any) -> Callable[..., str] | None:
    """The `tokenizers` decoder itself, when the transformers tokenizer adds nothing to it.

    The loop decodes twice per token; transformers' own `decode` wraps the same call in some
    20 µs of argument handling, a tenth of a small model's step.
    """
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:  # pragma: no cover - transformers is how this backend loads at all
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(tokenizer)._decode is not PreTrainedTokenizerFast._decode:
        return None  # a tokenizer class with its own decoding rules: keep them
    return backend.decode


def _pad_keys(weights: torch.Tensor, length: int) -> torch.Tensor:
    """(heads, queries, keys) with keys left-padded by zeros to `length` (a sliding window sees fewer)."""
    keys = weights.shape[-1]
    if keys == length:
        return weights
    if keys > length:
        return weights[..., -length:]
    return torch.nn.functional.pad(weights, (length - keys, 0))
