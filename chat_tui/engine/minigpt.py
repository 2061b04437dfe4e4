"""The mini-GPT backend: our own model and tokenizer behind the Engine protocol.

On the CPU (the default) the model runs in numpy on the checkpoint's arrays, read with
`safetensors.numpy`: answering a prompt never imports torch, which takes longer to import than the
bundled model takes to load and reply. torch drives it on a GPU, and builds the `GPT` module only
when something needs it (the attention inspector's explanations, training, export).
"""

from __future__ import annotations

import bisect
import contextlib
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import Tokenizer

from chat_tui.engine.chat_formats import PLAIN_STOP, TEXT_FORMATS, render_text
from chat_tui.engine.checkpoint import TIED, checkpoint_hash, model_from_arrays, read_checkpoint
from chat_tui.engine.generation import stream_engine
from chat_tui.engine.gptconfig import ACTIVATIONS, GPTConfig
from chat_tui.engine.inside import (
    INSIDE_VIEWS,
    Attribution,
    BlockRow,
    BlockTrace,
    Head,
    KnockOut,
    Lens,
    Rollout,
    TokenPiece,
)
from chat_tui.engine.inside_maths import block_first, block_norm
from chat_tui.engine.params import SamplingParams
from chat_tui.engine.tokenizer import ASSISTANT, BOS, END, SYSTEM, USER, ChatTokenizer
from chat_tui.engine.types import (
    NO_COMMIT,
    Conversation,
    EngineError,
    Message,
    MessageSpan,
    ParamsSource,
    Step,
)

if TYPE_CHECKING:
    from chat_tui.engine.explain import ChainReplay, Explanation
    from chat_tui.engine.model import GPT


@dataclass
class DecodeLayer:
    ln_1: tuple[Any, Any]
    attn: tuple[Any, Any]  # (in, out) weight, bias
    attn_proj: tuple[Any, Any]
    ln_2: tuple[Any, Any]
    fc: tuple[Any, Any]
    fc_proj: tuple[Any, Any]


@dataclass
class DecodeWeights:
    """The model's weights laid out for decoding: numpy arrays on the CPU, torch tensors on a GPU.

    One query makes every projection a matrix-vector product, and the CPU BLAS runs that about
    twice as fast on an (in, out) matrix (GPT-2's Conv1D layout) as on nn.Linear's (out, in).
    So decoding keeps transposed copies, made once per engine.
    """

    layers: list[DecodeLayer]
    ln_f: tuple[Any, Any]
    lm_head: Any  # (n_embd, vocab)
    wte: Any
    wpe: Any
    scale: float  # 1 / sqrt(head_dim)
    approximate: str  # the GELU's: "tanh" or "none" (exact)
    # numpy layout only: per layer, its four products' (in + 1, out) matrices with the bias as the
    # last row, so one product of the input with a 1 appended adds the bias (the layers' (weight,
    # bias) pairs are views of them)
    biased: list[tuple[np.ndarray, ...]] | None = None

    @classmethod
    def from_arrays(cls, config: GPTConfig, arrays: dict[str, np.ndarray]) -> DecodeWeights:
        """The numpy layout, from a state dict of float32 arrays (GPT's names)."""

        def t(name: str) -> tuple[np.ndarray, np.ndarray]:
            weight, bias = arrays[name + ".weight"], arrays[name + ".bias"]
            biased = np.empty((weight.shape[1] + 1, weight.shape[0]), dtype=np.float32)
            biased[:-1] = weight.T
            biased[-1] = bias
            products.append(biased)
            return biased[:-1], biased[-1]

        def ln(name: str) -> tuple[np.ndarray, np.ndarray]:
            return arrays[name + ".weight"], arrays[name + ".bias"]

        layers = []
        products: list[np.ndarray] = []  # t's (in + 1, out) matrices, four a layer
        for i in range(config.n_layer):
            b = f"transformer.h.{i}."
            layers.append(DecodeLayer(ln(b + "ln_1"), t(b + "attn.c_attn"), t(b + "attn.c_proj"), ln(b + "ln_2"),
                                      t(b + "mlp.c_fc"), t(b + "mlp.c_proj")))
        wte = arrays["transformer.wte.weight"]
        return cls(layers, ln("transformer.ln_f"), np.ascontiguousarray(wte.T), wte, arrays["transformer.wpe.weight"],
                   1.0 / math.sqrt(config.n_embd // config.n_head), ACTIVATIONS[config.activation],
                   [tuple(products[i : i + 4]) for i in range(0, len(products), 4)])

    def arrays(self) -> dict[str, np.ndarray]:
        """The numpy layout back as a state dict (GPT's names and shapes; views, no copies)."""
        state = {"transformer.wte.weight": self.wte, "transformer.wpe.weight": self.wpe,
                 "transformer.ln_f.weight": self.ln_f[0], "transformer.ln_f.bias": self.ln_f[1]}
        for i, y in enumerate(self.layers):
            b = f"transformer.h.{i}."
            for name, (weight, bias) in (("ln_1", y.ln_1), ("ln_2", y.ln_2)):
                state[b + name + ".weight"], state[b + name + ".bias"] = weight, bias
            for name, (weight, bias) in (("attn.c_attn", y.attn), ("attn.c_proj", y.attn_proj),
                                         ("mlp.c_fc", y.fc), ("mlp.c_proj", y.fc_proj)):
                state[b + name + ".weight"], state[b + name + ".bias"] = weight.T, bias
        return state

    @classmethod
    def from_model(cls, model: GPT) -> DecodeWeights:
        """The torch layout, sharing the model's device and dtype."""

        def t(linear) -> tuple[Any, Any]:
            return linear.weight.detach().t().contiguous(), linear.bias.detach()

        def ln(norm) -> tuple[Any, Any]:
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


LENS_RIVALS = 16  # the model's top tokens `commit_layer` asks first whether they lead a layer's lens


class MiniGPTRunner:
    """Drives the model through a preallocated KV cache: in numpy (`weights` in the numpy layout,
    no `model`), or in torch (`model` given: a GPU, or a dtype other than float32).

    `masked_ids` (tokens the checkpoint never learned) get logit -inf in every row it returns.
    `knock_out` (the torch path only): heads (layer, head) whose outputs are zeroed.
    `lens` (set before `prefill`; the numpy path only): keep the residual stream after each block of the
    position last fed, so `commit_layer` can read the logit lens from it without another pass.
    """

    def __init__(self, config: GPTConfig, weights: DecodeWeights, *, model: GPT | None = None,
                 masked_ids: Sequence[int] = (), knock_out: frozenset[Head] = frozenset()) -> None:
        self.config = config
        self.weights = weights
        self.model = model
        # On the CPU in float32, numpy's BLAS does these matrix-vector products near memory speed
        # (about 1.8x torch's addmm here) and its small ops cost a microsecond, not five.
        self.numpy_path = model is None
        self.uses_torch = model is not None  # the decode loop enters torch.inference_mode for it
        self.masked = np.asarray(sorted(masked_ids), dtype=np.int64)
        self.lens = False
        self._last_fed = 0  # the token whose residuals the buffers hold (a likely rival in the lens)
        head_dim = config.n_embd // config.n_head
        if self.numpy_path:
            # one preallocated cache per layer (kv[i]: keys and values, each (heads, context, head_dim))
            self.kv = np.zeros((config.n_layer, 2, config.n_head, config.block_size, head_dim), dtype=np.float32)
            self.length = 0
            self._buffers = _FeedBuffers(config, weights, self.kv)
        else:
            from chat_tui.engine.inside_maths import head_mask
            from chat_tui.engine.model import KVCache

            parameter = next(model.parameters())
            self.cache = KVCache(config, device=parameter.device, dtype=parameter.dtype)
            self.head_mask = head_mask(knock_out, config.n_layer, config.n_head, parameter)
        if knock_out and self.numpy_path:
            raise ValueError("heads can be knocked out on the torch path only")

    def prefill(self, ids: Sequence[int], inspect: bool):
        """Start afresh with `ids`: the logits [V] after the last one and, when inspecting, the
        attention (layers, heads, P, P)."""
        if len(ids) > self.config.block_size:
            raise ValueError(f"sequence of {len(ids)} tokens is longer than the context ({self.config.block_size})")
        if self.numpy_path:
            self._last_fed = int(ids[-1]) if len(ids) else 0
            logits, matrix = self._prefill_numpy(ids, inspect)
        else:
            import torch

            self.cache.reset()
            x = torch.tensor([list(ids)], dtype=torch.long, device=self.cache.kv.device)
            out, _, attention = self.model(x, cache=self.cache, capture=inspect, last_only=True,
                                           head_mask=self.head_mask)
            logits = out[0, -1]
            matrix = None
            if attention is not None:
                matrix = torch.stack([layer.weights[0] for layer in attention])  # (layers, heads, P, P)
        return self._out(logits), matrix

    def feed(self, token_id: int, inspect: bool):
        """One token through the cache: the next logits [V] and, when inspecting, its attention row."""
        length = self.length if self.numpy_path else self.cache.length
        if length >= self.config.block_size:
            raise ValueError(f"sequence of {length + 1} tokens is longer than the context ({self.config.block_size})")
        if self.numpy_path:
            self._last_fed = int(token_id)
            logits, row = self._feed_numpy(token_id, inspect)
        else:
            logits, row = self._feed_torch(token_id, inspect)
        return self._out(logits), row

    def commit_layer(self, token_id: int, logits: np.ndarray) -> int | None:
        """The logit lens's commitment layer of `token_id` chosen from `logits` (the runner's last): the first
        layer from which it stays the lens's top-1 (zero-based, the last layer being the model's own
        logits), -1 if it is not top-1 at the end. None without `lens` (or on the torch path).

        `chat_tui.engine.inside_maths.lens`'s rule, read from the decode kernel's own residuals: from the
        layer before the last down, while the token stays top-1. Each layer's question is first put to a
        few likely rivals (the model's own top tokens and the token just read, which early layers often
        predict): one of them ahead ends the walk for the price of a tiny product; only a token still
        ahead of them all needs the whole projection through the output head (its 4 MB read)."""
        if not (self.lens and self.numpy_path):
            return None
        if logits[token_id] < logits.max():
            return NO_COMMIT
        w, b = self.weights, self._buffers
        commit = self.config.n_layer - 1
        if commit == 0:
            return commit
        k = min(LENS_RIVALS, logits.size)
        rivals = np.append(np.argpartition(logits, logits.size - k)[logits.size - k:], self._last_fed)
        rivals = rivals[(rivals != token_id) & ~np.isin(rivals, self.masked)]
        columns = w.lm_head[:, np.append(rivals, token_id)]  # (n_embd, rivals + the token)
        normed, row = b.lens_normed, b.lens_logits
        for layer in range(commit - 1, -1, -1):
            _layer_norm_into(b.residuals[layer], *w.ln_f, b.eps, normed)
            scores = normed @ columns
            if rivals.size and scores[:-1].max() > scores[-1]:
                break  # a rival is ahead: not top-1 here
            np.matmul(normed, w.lm_head, out=row)
            if self.masked.size:
                row[self.masked] = -np.inf
            if row[token_id] < row.max():
                break
            commit = layer
        return commit

    def _out(self, logits) -> np.ndarray:
        """float32 numpy logits with the never-learned tokens masked."""
        if not isinstance(logits, np.ndarray):
            logits = logits.detach().float().cpu().numpy()
        if self.masked.size:
            logits = logits.copy() if not logits.flags.writeable else logits
            logits[self.masked] = -np.inf
        return logits

    def _feed_torch(self, token_id: int, inspect: bool):
        """A copy of `GPT.forward` with the cache, kept because per-call overhead rules a GPU's decoding and it has far less.

        One token through the cache: the model's own math, written for a single query.

        At this size decoding is bound by per-operation overhead and matrix-vector speed, not
        arithmetic, so this path calls the functional ops directly on `DecodeWeights` (no module
        calls, no dropout, no mask) and computes the one query's attention explicitly: the softmax
        weights it needs anyway are the inspector's row, so capturing attention costs almost
        nothing. Tested equal to `GPT.forward` with the cache (tests/test_engine.py).
        """
        import torch
        from torch.nn import functional as F

        cache, w = self.cache, self.weights
        cfg = self.config
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
            y = torch.matmul(weights, values[:, :S])  # (heads, 1, head_dim)
            if self.head_mask is not None:
                y = y * self.head_mask[i].view(nh, 1, 1)
            y = y.view(1, C)
            x = x + torch.addmm(layer.attn_proj[1], y, layer.attn_proj[0])
            h = F.layer_norm(x, (C,), *layer.ln_2, eps)
            h = F.gelu(torch.addmm(layer.fc[1], h, layer.fc[0]), approximate=w.approximate)
            x = x + torch.addmm(layer.fc_proj[1], h, layer.fc_proj[0])
        cache.length = S
        x = F.layer_norm(x, (C,), *w.ln_f, eps)
        logits = torch.mm(x, w.lm_head)[0]
        return logits, (torch.stack(rows) if inspect else None)  # row: (layers, heads, position + 1)

    def _prefill_numpy(self, ids: Sequence[int], inspect: bool):
        """A numpy copy of `GPT.forward`: on the CPU numpy decodes faster than torch and starts without importing it.

        The whole prompt at once, filling the cache (tested equal to `GPT.forward`, tests/test_engine.py)."""
        w, cfg = self.weights, self.config
        C, nh, eps = cfg.n_embd, cfg.n_head, cfg.layer_norm_epsilon
        hd = C // nh
        T = len(ids)
        x = w.wte[np.asarray(ids, dtype=np.int64)] + w.wpe[:T]  # (T, C)
        future = np.triu(np.ones((T, T), dtype=bool), 1)  # key j after query i
        maps = []
        for i, layer in enumerate(w.layers):
            h = _layer_norm(x, *layer.ln_1, eps)
            q, k, v = (h @ layer.attn[0] + layer.attn[1]).reshape(T, 3, nh, hd).transpose(1, 2, 0, 3)
            self.kv[i, 0, :, :T] = k  # (heads, T, head_dim)
            self.kv[i, 1, :, :T] = v
            scores = np.matmul(q, k.transpose(0, 2, 1)) * np.float32(w.scale)  # (heads, T, T)
            scores[:, future] = -np.inf
            weights = _softmax_rows(scores)
            if inspect:
                maps.append(weights)
            y = np.matmul(weights, v).transpose(1, 0, 2).reshape(T, C)
            x = x + (y @ layer.attn_proj[0] + layer.attn_proj[1])
            h = _layer_norm(x, *layer.ln_2, eps)
            h = _gelu(h @ layer.fc[0] + layer.fc[1], w.approximate)
            x = x + (h @ layer.fc_proj[0] + layer.fc_proj[1])
            if self.lens:
                self._buffers.residuals[i] = x[-1]
        self.length = T
        last = _layer_norm(x[-1], *w.ln_f, eps)
        return last @ w.lm_head, (np.stack(maps) if inspect else None)

    def _feed_numpy(self, token_id: int, inspect: bool):
        """The numpy decoder's one-token step (see `_prefill_numpy` for why numpy), written for speed.

        A token of the bundled model reads its 17 MB of weights once, about twenty products that
        stream them from memory; the rest is some hundred small numpy calls, each about a
        microsecond. So every product writes into the runner's preallocated buffers (`out=`) and
        adds its bias itself (the input carries a trailing 1, the matrix the bias as its last row),
        the heads' attention is one batched product each way, and nothing is allocated per token.

        The logits and the attention row returned are views of those buffers: valid until the next
        `feed` or `prefill`.
        """
        w, b = self.weights, self._buffers
        pos = self.length
        S = pos + 1
        x, normed, h, qkv, y, proj, wide, gelu_in, tmp = b.x, b.normed, b.h, b.qkv, b.y, b.proj, b.wide, b.gelu_in, b.tmp
        eps, scale, tanh_gelu = b.eps, b.scale, w.approximate == "tanh"
        residuals = b.residuals if self.lens else None
        np.add(w.wte[token_id], w.wpe[pos], out=x)
        for i, (layer, (attn, attn_proj, fc, fc_proj), keys, values, weights) in enumerate(zip(
                w.layers, w.biased, b.keys, b.values, b.attention, strict=True)):
            _layer_norm_into(x, *layer.ln_1, eps, normed)
            np.matmul(h, attn, out=qkv)
            keys[:, pos] = b.k
            values[:, pos] = b.v
            scores = weights[:, :S]  # (heads, S): the scores, then the softmax in place
            np.matmul(keys[:, :S], b.q, out=scores[:, :, None])
            scores *= scale
            _softmax_rows_into(scores, b.head_column)
            np.matmul(scores[:, None, :], values[:, :S], out=b.y_heads)
            np.matmul(y, attn_proj, out=proj)
            x += proj
            _layer_norm_into(x, *layer.ln_2, eps, normed)
            np.matmul(h, fc, out=gelu_in)
            if tanh_gelu:
                _gelu_tanh_into(gelu_in, tmp)
            else:
                gelu_in[:] = _gelu(gelu_in, w.approximate)  # the exact form: only imported checkpoints use it
            np.matmul(wide, fc_proj, out=proj)
            x += proj
            if residuals is not None:
                residuals[i] = x
        self.length = S
        _layer_norm_into(x, *w.ln_f, eps, normed)
        np.matmul(normed, w.lm_head, out=b.logits)
        return b.logits, (b.attention[:, :, :S] if inspect else None)  # row: (layers, heads, position + 1)


class _FeedBuffers:
    """Everything one numpy `feed` writes, allocated once per runner, and the views it reads through."""

    def __init__(self, config: GPTConfig, weights: DecodeWeights, kv: np.ndarray) -> None:
        C, nh = config.n_embd, config.n_head
        hd = C // nh
        f32 = np.float32
        self.eps, self.scale = config.layer_norm_epsilon, f32(weights.scale)
        self.x = np.empty(C, f32)  # the residual stream
        self.h = np.ones(C + 1, f32)  # a layer norm's output, then a 1 (the products add their bias)
        self.normed = self.h[:C]
        self.qkv = np.empty(3 * C, f32)
        self.q = self.qkv[:C].reshape(nh, hd, 1)  # views into qkv, per head
        self.k = self.qkv[C : 2 * C].reshape(nh, hd)
        self.v = self.qkv[2 * C :].reshape(nh, hd)
        self.y = np.ones(C + 1, f32)  # the heads' outputs side by side, then a 1
        self.y_heads = self.y[:C].reshape(nh, 1, hd)
        self.proj = np.empty(C, f32)
        hidden = weights.layers[0].fc[0].shape[1] if weights.layers else 4 * C
        self.wide = np.ones(hidden + 1, f32)  # the MLP's hidden layer, then a 1
        self.gelu_in = self.wide[:hidden]
        self.tmp = np.empty(hidden, f32)
        self.head_column = np.empty((nh, 1), f32)  # a per-head max, then sum
        self.attention = np.zeros((config.n_layer, nh, config.block_size), f32)  # softmax weights, per layer
        self.keys, self.values = list(kv[:, 0]), list(kv[:, 1])  # per layer: (heads, context, head_dim)
        self.logits = np.empty(config.vocab_size, f32)
        self.residuals = np.empty((config.n_layer, C), f32)  # after each block (`lens`), and the lens's own
        self.lens_normed = np.empty(C, f32)
        self.lens_logits = np.empty(config.vocab_size, f32)


def single_threaded_blas():
    """numpy's BLAS on one thread while decoding: between our tiny matrix-vector products its idle
    threads spin and fight torch's for the cores (measured 8x slower on 2 cores)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    centred = x - x.mean(axis=-1, keepdims=True)
    return centred / np.sqrt((centred * centred).mean(axis=-1, keepdims=True) + eps) * weight + bias


def _layer_norm_into(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float, out: np.ndarray) -> None:
    """`_layer_norm` of one vector, into `out` (no allocation but scalars)."""
    n = x.shape[0]
    # the scalars in Python floats: numpy's own scalars cost a microsecond an operation
    np.subtract(x, float(np.add.reduce(x)) / n, out=out)
    out *= 1.0 / math.sqrt(float(np.dot(out, out)) / n + eps)
    out *= weight
    out += bias


def _softmax_rows_into(scores: np.ndarray, column: np.ndarray) -> None:
    """`_softmax_rows` in place; `column` is a (rows, 1) scratch buffer."""
    np.maximum.reduce(scores, axis=-1, keepdims=True, out=column)
    scores -= column
    np.exp(scores, out=scores)
    np.add.reduce(scores, axis=-1, keepdims=True, out=column)
    scores /= column


def _softmax_rows(scores: np.ndarray) -> np.ndarray:
    scores = scores - scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    return weights


_TANH_SCALE = np.float32(math.sqrt(2.0 / math.pi))


def _gelu(x: np.ndarray, approximate: str) -> np.ndarray:
    """torch's F.gelu in numpy: the tanh approximation, or the exact erf form."""
    if approximate == "tanh":
        return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(_TANH_SCALE * (x + np.float32(0.044715) * x * x * x)))
    return (0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))).astype(np.float32)


def _gelu_tanh_into(x: np.ndarray, tmp: np.ndarray) -> None:
    """`_gelu` (the tanh form) in place; `tmp` is scratch of x's shape. Its tanh's argument as
    x (s + 0.044715 s x^2): a product fewer than s (x + 0.044715 x^3), equal up to rounding."""
    np.multiply(x, x, out=tmp)
    tmp *= _TANH_SCALE * np.float32(0.044715)
    tmp += _TANH_SCALE
    tmp *= x
    np.tanh(tmp, out=tmp)
    tmp += np.float32(1.0)
    x *= tmp
    x *= np.float32(0.5)


def _erf(x: np.ndarray) -> np.ndarray:
    """erf in float64 (Abramowitz & Stegun 7.1.26, error below 1.5e-7): numpy has none."""
    z = np.abs(x.astype(np.float64))
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = ((((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t
    return np.sign(x) * (1.0 - poly * np.exp(-z * z))


NATIVE_FORMAT = "minigpt"  # the checkpoint's own chat tokens: <|bos|><|user|>…<|end|><|assistant|>


def choose_format(override: str | None, untrained: Sequence[int], tokenizer: ChatTokenizer) -> str:
    """The format asked for (`template` is the checkpoint's own chat tokens), else the native one,
    or `raw` for a base model whose chat tokens were never trained (an imported nanoGPT)."""
    if override in ("template", NATIVE_FORMAT):
        return NATIVE_FORMAT
    if override in TEXT_FORMATS:
        return override
    if override is not None:
        raise EngineError(f"chat format {override!r} does not fit a mini-GPT checkpoint (use template, plain or raw)")
    chat_tokens = {tokenizer.special_ids[t] for t in (USER, ASSISTANT, END)}
    return "raw" if set(untrained) & chat_tokens else NATIVE_FORMAT


class MiniGPTEngine:
    backend = "minigpt"
    attention_unavailable: str | None = None
    attention_note: str | None = None
    decode_note: str | None = None

    def __init__(
        self,
        model: GPT | None,
        tokenizer: ChatTokenizer,
        defaults: SamplingParams,
        *,
        name: str,
        path: Path | None = None,
        weights: DecodeWeights | None = None,
        config: GPTConfig | None = None,
        untrained_token_ids: Sequence[int] = (),
        chat_format: str | None = None,
    ) -> None:
        """Either a torch `model`, or (torch-free, on the CPU) its numpy `weights` and `config`."""
        self.tokenizer = tokenizer
        self._defaults = defaults
        self.model_name = name
        self.path = path
        self._model = model
        if model is not None:
            config = model.config
            parameter = next(model.parameters())
            self.device = str(parameter.device)
            if parameter.device.type == "cpu" and str(parameter.dtype) == "torch.float32":
                # numpy decodes on the CPU: views of the model's own tensors
                weights = DecodeWeights.from_arrays(
                    config, {k: v.detach().numpy() for k, v in model.state_dict().items() if k != TIED})
        else:
            if weights is None or config is None:
                raise TypeError("MiniGPTEngine needs a model, or numpy weights and their config")
            self.device = "cpu"
        assert config is not None
        self.config = config
        self._numpy_weights = weights  # None: torch decodes (a GPU, or another dtype)
        self._torch_weights: DecodeWeights | None = None  # made at the first reply
        self.context_length = config.block_size
        self.n_layer = config.n_layer
        self.n_head = config.n_head
        self.vocab_size = config.vocab_size
        self.untrained_token_ids = tuple(untrained_token_ids)
        self.checkpoint_hash = checkpoint_hash(path) if path is not None else "in-memory"
        # A reply ends at <|end|>; any other header means the model began a new turn itself.
        self.eos_ids = {tokenizer.special_ids[t] for t in (END, BOS, SYSTEM, USER, ASSISTANT)}
        self._lock = threading.Lock()  # one generation at a time per model
        self.chat_format = choose_format(chat_format, self.untrained_token_ids, tokenizer)
        self._format_stops = (PLAIN_STOP,) if self.chat_format == "plain" else ()
        # raw keeps special-token strings you type as the tokens (you write the format by hand), as for
        # Hugging Face models; a copy, because the shared tokenizer keeps them plain text everywhere else
        self._raw_tokenizer = Tokenizer.from_str(tokenizer.tokenizer.to_str()) if self.chat_format == "raw" else None
        # the last GPT.forward(capture=True) of the inside views, kept for the next view of the same token,
        # and their KV cache with the ids in it (see `_trace`)
        self._last_trace: tuple[Any, bool, Any] | None = None
        self._views_cache: tuple[Any, tuple[int, ...]] | None = None
        self._views_lock = threading.Lock()

    # explain_attention works here (it builds the torch model on first use)
    explains = True

    @property
    def model(self) -> GPT:
        """The torch model, built from the numpy weights on first use (this imports torch)."""
        if self._model is None:
            assert self._numpy_weights is not None
            self._model = model_from_arrays(self.config, self._numpy_weights.arrays(), "cpu")
        return self._model

    @classmethod
    def load(
        cls, path: str | Path, *, device: str | None = None, progress: Callable[[str], None] | None = None,
        chat_format: str | None = None,
    ) -> MiniGPTEngine:
        """Load a checkpoint folder: on the CPU (the default) in numpy without torch, else with torch."""
        path = Path(path)
        if progress:
            progress(f"loading {path.name}")
        on_cpu = device is None or device.split(":")[0] == "cpu"
        if not on_cpu:
            from chat_tui.engine.devices import resolve_device

            torch_device = resolve_device(device)  # raises DeviceError, one line
            on_cpu = torch_device.type == "cpu"  # "auto" without a GPU: numpy, as for "cpu"
        checkpoint = read_checkpoint(path)
        common = dict(name=path.name, path=path, untrained_token_ids=checkpoint.untrained_token_ids,
                      chat_format=chat_format)
        if on_cpu:
            weights = DecodeWeights.from_arrays(checkpoint.config, checkpoint.arrays)
            return cls(None, checkpoint.tokenizer, checkpoint.defaults, weights=weights, config=checkpoint.config,
                       **common)
        model = model_from_arrays(checkpoint.config, checkpoint.arrays, torch_device)
        return cls(model, checkpoint.tokenizer, checkpoint.defaults, **common)

    def runner(self, knock_out: frozenset[Head] = frozenset()) -> MiniGPTRunner:
        """A fresh runner (its own KV cache) over this engine's weights. With heads to `knock_out` it runs
        the torch path, whose head mask switches them off (the numpy kernel has none)."""
        if self._numpy_weights is not None and not knock_out:
            return MiniGPTRunner(self.config, self._numpy_weights, masked_ids=self.untrained_token_ids)
        if self._torch_weights is None:
            self._torch_weights = DecodeWeights.from_model(self.model)
        return MiniGPTRunner(self.config, self._torch_weights, model=self.model, masked_ids=self.untrained_token_ids,
                             knock_out=knock_out)

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
        candidates: bool = True,
        knock_out: frozenset[tuple[int, int]] = frozenset(),
        prefix_ids: Sequence[int] = (),
        lens: bool = False,
    ) -> Iterator[Step]:
        heads = frozenset(knock_out)
        if heads:
            from chat_tui.engine.inside_maths import check_heads_or_fail

            check_heads_or_fail(heads, self.n_layer, self.n_head)
        with self._lock:
            runner = self.runner(heads)
            with single_threaded_blas() if runner.numpy_path else contextlib.nullcontext():
                yield from stream_engine(self, runner, conversation, params, stops=self._format_stops,
                                         inspect=inspect, cancel=cancel, candidates=candidates, knock_out=heads,
                                         prefix_ids=prefix_ids, lens=lens)

    def stream_columns(self, conversation: Conversation, params: Sequence[ParamsSource], *,
                       cancel: threading.Event | None = None, candidates: bool = True) -> Iterator[tuple[int, Step]]:
        """Several settings answering one conversation, a token of each in turn, each with a KV cache of its
        own (the compare screen: `chat_tui.engine.compare.stream_columns`)."""
        from chat_tui.engine.compare import interleave

        with self._lock:
            runners = [self.runner() for _ in params]
            numpy_path = bool(runners) and runners[0].numpy_path
            with single_threaded_blas() if numpy_path else contextlib.nullcontext():
                yield from interleave([
                    stream_engine(self, runner, conversation, column_params, stops=self._format_stops,
                                  inspect=False, cancel=cancel, candidates=candidates)
                    for runner, column_params in zip(runners, params, strict=True)])

    # ------------------------------------------------------------------ the Engine protocol's rest, and Explainer

    @property
    def alive(self) -> bool:
        return True  # in this process: there while the app is

    def close(self, *, wait: bool = True) -> None:
        """Nothing to stop: the weights go with the engine (`wait` is for an engine in its own process)."""

    def explain_attention(self, ids: Sequence[int], query_position: int, layer: int, head: int) -> Explanation:
        from chat_tui.engine.explain import explain_attention

        return explain_attention(self.model, ids, query_position, layer, head)

    def replay_chain(self, step: Step, context_ids: Sequence[int] | None,
                     params: SamplingParams | None) -> ChainReplay:
        from chat_tui.engine.explain import replay_chain

        return replay_chain(step, context_ids, params, vocab_size=self.vocab_size)

    # ------------------------------------------------------------------ Inside: the issue #14 views

    def inside_views(self) -> dict[str, str | None]:
        return dict.fromkeys(INSIDE_VIEWS)

    def _trace(self, ids: Sequence[int], heads: frozenset[Head] = frozenset(), *, whole: bool = False):
        """One pass of `GPT.forward(capture=True)` over `ids`: (the last position's logits (V,), the
        per-layer captures), the never-learned tokens masked as in decoding.

        Without heads off, the tokens `ids` shares with the last such pass keep their place in the views'
        KV cache and only the rest (at least the last token) runs: the captures then hold the new
        positions only (keys and values: every position), which is all the views of the last token
        read. `whole`: every position's captures (rollout reads every row of attention)."""
        import torch

        from chat_tui.engine.inside_maths import check_context, check_heads, head_mask, shared_prefix
        from chat_tui.engine.model import KVCache

        check_context(ids, self.context_length)
        check_heads(heads, self.n_layer, self.n_head)
        key = (tuple(ids), frozenset(heads))
        last = self._last_trace
        if last is not None and last[0] == key and (last[1] or not whole):  # the views of one token ask alike
            return last[2]
        model = self.model
        parameter = next(model.parameters())
        with torch.inference_mode(), self._views_lock:
            x = torch.tensor([list(ids)], dtype=torch.long, device=parameter.device)
            if heads or whole:
                mask = head_mask(heads, self.n_layer, self.n_head, parameter)
                logits, _, capture = model(x, capture=True, last_only=True, head_mask=mask)
            else:
                if self._views_cache is None:
                    self._views_cache = (KVCache(self.config, device=parameter.device, dtype=parameter.dtype), ())
                cache, cached = self._views_cache
                self._views_cache = None  # a pass that fails leaves no half-written cache behind
                cache.length = start = shared_prefix(cached, ids, len(ids) - 1)
                logits, _, capture = model(x[:, start:], cache=cache, capture=True, last_only=True)
                self._views_cache = (cache, key[0])
            result = self._masked(logits[0, -1].float()), capture
            if not heads:  # knocking heads out again and again keeps the original pass
                self._last_trace = (key, whole, result)
        return result

    def _masked(self, logits):
        if self.untrained_token_ids:
            logits = logits.clone()
            logits[list(self.untrained_token_ids)] = float("-inf")
        return logits

    def logit_lens(self, ids: Sequence[int], token_id: int, top: int = 3) -> Lens:
        import torch

        from chat_tui.engine import inside_maths

        logits, capture = self._trace(ids)
        model = self.model
        with torch.inference_mode():
            residuals = torch.stack([layer.resid_post[0, -1] for layer in capture[:-1]])
            layer_logits = model.lm_head(model.transformer.ln_f(residuals)).float() if len(capture) > 1 else None
            rows = [self._masked(row) for row in layer_logits] if layer_logits is not None else []
            return inside_maths.lens(torch.stack([*rows, logits]), token_id, top, self.token_text)

    def attribute(self, ids: Sequence[int], token_id: int) -> Attribution:
        import torch

        from chat_tui.engine import inside_maths

        logits, capture = self._trace(ids)
        model = self.model
        ln_f = model.transformer.ln_f
        with torch.inference_mode():
            parts = [(inside_maths.EMBED, capture[0].resid_pre[0, -1])]
            biases = []
            for i, (layer, block) in enumerate(zip(capture, model.transformer.h, strict=True)):
                heads, bias = inside_maths.head_parts(i, layer.heads[0, :, -1], block.attn.c_proj)
                parts += heads
                biases += [bias, block.mlp.c_proj.bias]
                parts.append((inside_maths.mlp_component(i), layer.mlp_out[0, -1] - block.mlp.c_proj.bias))
            norm = inside_maths.FrozenNorm(ln_f.weight, ln_f.bias, ln_f.eps, centre=True)
            return inside_maths.attribute(token_id, float(logits[token_id]), capture[-1].resid_post[0, -1], parts,
                                          biases, norm, model.lm_head.weight[token_id])

    def rollout(self, ids: Sequence[int]) -> Rollout:
        from chat_tui.engine import inside_maths

        _, capture = self._trace(ids, whole=True)
        return inside_maths.rollout([layer.weights[0] for layer in capture])

    def knock_out(self, ids: Sequence[int], heads: frozenset[Head], top: int = 8) -> KnockOut:
        from chat_tui.engine import inside_maths

        before, _ = self._trace(ids)
        after, _ = self._trace(ids, frozenset(heads)) if heads else (before, None)
        return inside_maths.knock_out(frozenset(heads), before, after, top, self.token_text)

    def token_pieces(self, text: str) -> list[TokenPiece]:
        from chat_tui.engine.inside_maths import token_pieces

        return token_pieces(self.tokenizer.tokenizer, text, self.token_text)

    def block_trace(self, ids: Sequence[int], layer: int, head: int) -> BlockTrace:
        import torch

        from chat_tui.engine.inside_maths import check_heads

        check_heads(frozenset({(layer, head)}), self.n_layer, self.n_head)
        _, capture = self._trace(ids)
        model = self.model
        c = capture[layer]
        with torch.inference_mode():
            position = len(ids) - 1
            rows = [BlockRow("token embedding", block_norm(model.transformer.wte.weight[ids[-1]])),
                    BlockRow("position embedding", block_norm(model.transformer.wpe.weight[position]))]
            if layer > 0:
                rows.append(BlockRow("residual in", block_norm(c.resid_pre[0, -1])))
            rows.append(BlockRow("layer norm 1", block_norm(c.ln_1[0, -1])))
            q, k, v = c.q[0, head, -1], c.k[0, head, position], c.v[0, head, position]
            rows += [BlockRow("q", block_norm(q), block_first(q)), BlockRow("k", block_norm(k), block_first(k)), BlockRow("v", block_norm(v))]
            rows += [BlockRow(name, block_norm(value[0, -1])) for name, value in (
                ("attention output", c.attn_out), ("residual + attention", c.resid_mid), ("layer norm 2", c.ln_2),
                ("MLP output", c.mlp_out), ("residual + MLP", c.resid_post))]
        return BlockTrace(layer=layer, head=head, rows=rows)
