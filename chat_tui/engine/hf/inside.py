"""The inspector's inside views (issue #14) and Explain for a transformers model, read with hooks.

Every number comes from one forward pass of the model itself: forward hooks keep what the views need
(the residual stream into each block and into the final norm, each head's output at the input of
the attention's output projection, each MLP's output, the queries and keys after the rotary
embedding), and a forward pre-hook on the output projection zeroes a head's slice to knock it out.
The hooks act only in the thread that set them, so a reply streaming in another thread meanwhile
is untouched.

- lens, rollout, tokens and knock-out: any architecture whose decoder layers, final norm and
  attention output projections can be found (and, for rollout, that returns attention weights);
- attribution, block and Explain: GPT-2 and the Llama, Mistral, Qwen2/Qwen3 and Gemma families,
  whose blocks are a plain pre-norm residual sum (others: "not available for this architecture").
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from chat_tui.engine import inside_maths
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

if TYPE_CHECKING:
    from chat_tui.engine.explain import Explanation
    from chat_tui.engine.hf.engine import HFEngine

# the families whose blocks are x + attn(norm(x)) then x + mlp(norm(x)), and where their parts are
ATTRIBUTION_FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma")
NOT_FOR_ARCHITECTURE = "{view} is not available for this architecture ({model_type})"
_ROTARY_PATCH = threading.Lock()
ROLLOUT_WAIT_S = 0.5  # how long rollout waits for a reply that runs without attention weights

_LAYER_LISTS = ("layers", "h", "blocks", "layer")
_FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")
_ATTENTIONS = ("self_attn", "attn", "attention", "self_attention")
_OUT_PROJECTIONS = ("o_proj", "c_proj", "out_proj", "dense", "wo")


@dataclass
class DecoderParts:
    """Where a decoder's parts are (None: not found)."""

    layers: Any
    final_norm: Any
    head: Any  # the output head
    attentions: list[Any]
    out_projections: list[Any] | None
    head_dim: int | None


def find_parts(model: Any, n_layer: int, n_head: int) -> DecoderParts:
    base = getattr(model, "base_model", model)
    layers = next((getattr(base, name) for name in _LAYER_LISTS
                   if isinstance(getattr(base, name, None), torch.nn.ModuleList)), None)
    if layers is None or len(layers) != n_layer:
        layers = next((m for m in base.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n_layer), None)
    holders = [base, getattr(base, "decoder", None)]  # OPT keeps its layers and final norm in a decoder
    final_norm = next((getattr(holder, name) for holder in holders for name in _FINAL_NORMS
                       if isinstance(getattr(holder, name, None), torch.nn.Module)), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    attentions: list[Any] = []
    projections: list[Any] | None = []
    head_dim = None
    for layer in layers if layers is not None else []:
        attention = next((getattr(layer, name) for name in _ATTENTIONS if hasattr(layer, name)), None)
        projection = next((getattr(attention, name) for name in _OUT_PROJECTIONS if hasattr(attention, name)), None)
        width = _in_features(projection)
        if attention is None or width is None or n_head <= 0 or width % n_head:
            projections = None
            break
        attentions.append(attention)
        projections.append(projection)
        head_dim = width // n_head
    return DecoderParts(layers, final_norm, head, attentions, projections, head_dim)


def _in_features(module: Any) -> int | None:
    if module is None:
        return None
    features = getattr(module, "in_features", None)
    if isinstance(features, int):
        return features
    weight = getattr(module, "weight", None)  # GPT-2's Conv1D: (in, out)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    return None


def _first(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value


@dataclass
class _Kept:
    """What one hooked forward pass kept, per layer (each (T, width) of the one sequence)."""

    resid_pre: dict[int, torch.Tensor] = field(default_factory=dict)
    heads: dict[int, torch.Tensor] = field(default_factory=dict)  # the output projection's input
    attn_out: dict[int, torch.Tensor] = field(default_factory=dict)
    mlp_out: dict[int, torch.Tensor] = field(default_factory=dict)
    ln_1: dict[int, torch.Tensor] = field(default_factory=dict)
    ln_2: dict[int, torch.Tensor] = field(default_factory=dict)
    resid_post: dict[int, torch.Tensor] = field(default_factory=dict)
    qkv: dict[int, torch.Tensor] = field(default_factory=dict)  # GPT-2's c_attn output
    q: dict[int, torch.Tensor] = field(default_factory=dict)  # (heads, T, head_dim), after the rotary embedding
    k: dict[int, torch.Tensor] = field(default_factory=dict)  # (kv heads, T, head_dim)
    v: dict[int, torch.Tensor] = field(default_factory=dict)  # (T, kv width)
    final: torch.Tensor | None = None  # the residual stream into the final norm


class HFInside:
    """The inside views of one HFEngine's model."""

    def __init__(self, engine: HFEngine) -> None:
        self.engine = engine
        self.parts = find_parts(engine.model, engine.n_layer, engine.n_head)
        self.family = engine.model_type if engine.model_type in ATTRIBUTION_FAMILIES else None
        # knock-out's last context: its original logits, and each block's whole output on it when the pass
        # that made them ran every position (None when it reused the views' cache)
        self._before: tuple[tuple[int, ...], torch.Tensor, list[Any] | None] | None = None
        self._cache: tuple[tuple[int, ...], Any] | None = None  # the last reused context and its KV cache
        self._cache_lock = threading.Lock()

    # ------------------------------------------------------------------ what can be shown

    def views(self) -> dict[str, str | None]:
        engine, parts = self.engine, self.parts
        reasons: dict[str, str | None] = dict.fromkeys(INSIDE_VIEWS)

        def why(view: str) -> str:
            return NOT_FOR_ARCHITECTURE.format(view=view, model_type=engine.model_type)

        if parts.layers is None or parts.final_norm is None or not callable(parts.head):
            reasons["lens"] = why("the logit lens")
        if engine.attention_unavailable is not None:
            reasons["rollout"] = engine.attention_unavailable
        if parts.out_projections is None:
            reasons["knockout"] = why("knock-out")
        if getattr(engine.tokenizer, "backend_tokenizer", None) is None:
            reasons["tokens"] = "the tokens view needs a fast (tokenizers) tokenizer; this model has a slow one"
        if self.family is None or parts.out_projections is None or reasons["lens"] is not None:
            reasons["attribution"] = why("attribution")
            reasons["block"] = why("the block view")
        elif not isinstance(getattr(parts.head, "weight", None), torch.Tensor):
            reasons["attribution"] = "attribution needs the output head's weights (not with --quantize int8)"
        return reasons

    def explains(self) -> bool:
        return self.views()["block"] is None

    def _require(self, view: str) -> None:
        reason = self.views()[view]
        if reason is not None:
            from chat_tui.engine.explain import ExplainUnavailable

            raise ExplainUnavailable(reason)

    # ------------------------------------------------------------------ one hooked pass

    @contextlib.contextmanager
    def hooks(self, kept: _Kept | None, heads_off: frozenset[Head] = frozenset(), *,
              qkv: bool = False) -> Iterator[None]:
        """Hooks that keep what a view needs in `kept` and zero the heads in `heads_off`, in this thread
        only (a reply generated with heads off runs its loop in the thread that entered them)."""
        parts = self.parts
        owner = threading.get_ident()
        handles = []
        patched: list[tuple[Any, Any]] = []

        def mine() -> bool:
            return threading.get_ident() == owner

        def keep(store: dict[int, torch.Tensor], i: int, value: Any) -> None:
            store[i] = _first(value)[0].detach()

        by_layer: dict[int, list[int]] = {}
        for layer, head in heads_off:
            by_layer.setdefault(layer, []).append(head)
        if qkv:  # the rotary embedding is patched in its module: one view thread at a time restores it right
            _ROTARY_PATCH.acquire()
        try:
            for i, layer in enumerate(parts.layers or []):
                projection = parts.out_projections[i] if parts.out_projections else None
                off = by_layer.get(i)
                if projection is not None and (off or kept is not None):
                    handles.append(projection.register_forward_pre_hook(
                        self._projection_hook(i, off, kept, mine)))
                if kept is None:
                    continue

                def layer_pre(module, args, kwargs, i=i):
                    if mine():
                        keep(kept.resid_pre, i, args[0] if args else kwargs["hidden_states"])

                def layer_post(module, args, output, i=i):
                    if mine():
                        keep(kept.resid_post, i, output)

                handles.append(layer.register_forward_pre_hook(layer_pre, with_kwargs=True))
                handles.append(layer.register_forward_hook(layer_post))
                for name, store in (("attention", kept.attn_out), ("mlp", kept.mlp_out), ("norm1", kept.ln_1),
                                    ("norm2", kept.ln_2)):
                    module = self._part(i, name)
                    if module is not None:
                        handles.append(module.register_forward_hook(
                            lambda m, a, out, store=store, i=i: keep(store, i, out) if mine() else None))
                if qkv:
                    handles += self._qkv_hooks(i, kept, mine, patched)
            if kept is not None and parts.final_norm is not None:
                def final_pre(module, args):
                    if mine():
                        kept.final = args[0][0].detach()

                handles.append(parts.final_norm.register_forward_pre_hook(final_pre))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for module, original in patched:
                module.apply_rotary_pos_emb = original
            if qkv:
                _ROTARY_PATCH.release()

    def _projection_hook(self, i: int, off: list[int] | None, kept: _Kept | None, mine):
        head_dim = self.parts.head_dim or 0

        def pre(module, args):
            if not mine():
                return None
            y = args[0]
            if off:
                y = y.clone()
                view = y.view(*y.shape[:-1], -1, head_dim)
                view[..., off, :] = 0
            if kept is not None:
                kept.heads[i] = y[0].detach()
            return (y, *args[1:]) if off else None

        return pre

    def _part(self, i: int, name: str) -> Any:
        layer = self.parts.layers[i]
        names = {"attention": _ATTENTIONS, "mlp": ("mlp", "feed_forward"),
                 "norm1": ("ln_1", "input_layernorm"), "norm2": ("ln_2", "post_attention_layernorm")}[name]
        return next((getattr(layer, n) for n in names if isinstance(getattr(layer, n, None), torch.nn.Module)), None)

    def _qkv_hooks(self, i: int, kept: _Kept, mine, patched: list) -> list:
        attention = self.parts.attentions[i]
        handles = []
        if self.family == "gpt2":
            handles.append(attention.c_attn.register_forward_hook(
                lambda m, a, out, i=i: kept.qkv.__setitem__(i, out[0].detach()) if mine() else None))
            return handles
        handles.append(attention.v_proj.register_forward_hook(
            lambda m, a, out, i=i: kept.v.__setitem__(i, out[0].detach()) if mine() else None))
        module = sys.modules[type(attention).__module__]
        if i == 0 and hasattr(module, "apply_rotary_pos_emb"):
            original = module.apply_rotary_pos_emb
            order: list[int] = []

            def rotary(q, k, *args, **kwargs):
                out = original(q, k, *args, **kwargs)
                if mine():  # the layers call it in order: the n-th call is layer n
                    layer = len(order)
                    order.append(layer)
                    kept.q[layer], kept.k[layer] = out[0][0].detach(), out[1][0].detach()
                return out

            module.apply_rotary_pos_emb = rotary
            patched.append((module, original))
        return handles

    def _forward(self, ids: Sequence[int], *, attentions: bool = False, reuse: bool = False):
        """The model over `ids`. With `reuse` (views that read only the last position), the tokens it shares
        with the last context reused are not run again: their KV cache is kept (cut back to what they
        share), and only the rest, at least the last token, goes through the model. The inspector
        following a reply asks one token further each time, and its views of one token ask alike."""
        engine = self.engine
        inside_maths.check_context(ids, engine.context_length)
        x = torch.tensor([list(ids)], dtype=torch.long, device=engine.input_device)
        kwargs: dict[str, Any] = {"use_cache": False}
        if attentions:
            kwargs["output_attentions"] = True
        if engine.logits_to_keep:
            kwargs["logits_to_keep"] = 1
        if not reuse or engine.decode_mode != "cache":
            return engine.model(input_ids=x, **kwargs)
        with self._cache_lock:
            cached, self._cache = self._cache, None  # a pass that fails leaves no half-filled cache behind
            start = 0
            kwargs["use_cache"] = True
            if cached is not None:
                start = inside_maths.shared_prefix(cached[0], ids, len(ids) - 1)
                if start and _crop(cached[1], len(cached[0]) - start):
                    kwargs[engine.cache_kwarg] = cached[1]
                else:
                    start = 0
            if engine.takes_position_ids:
                kwargs["position_ids"] = torch.arange(start, len(ids), device=engine.input_device).unsqueeze(0)
            out = engine.model(input_ids=x[:, start:], **kwargs)
            cache = getattr(out, "cache", None)
            if cache is None:
                cache = getattr(out, "past_key_values", None)
            if cache is not None:
                self._cache = (tuple(ids), cache)
            return out

    def _logits(self, out: Any) -> torch.Tensor:
        return out.logits[0, -1].float().cpu()

    # ------------------------------------------------------------------ the views

    def lens(self, ids: Sequence[int], token_id: int, top: int) -> Lens:
        self._require("lens")
        kept = _Kept()
        with torch.inference_mode(), self.hooks(kept):
            logits = self._logits(self._forward(ids, reuse=True))
            parts = self.parts
            n = len(parts.layers)
            # every layer's row through the head at once: the head is read from memory once, not once a layer
            residuals = torch.cat([kept.resid_post[i][-1:] for i in range(n - 1)]) if n > 1 else None
            rows = parts.head(parts.final_norm(residuals)).float().cpu() if residuals is not None else logits[:0]
        return inside_maths.lens(torch.cat([rows, logits[None]]), token_id, top, self.engine.token_text)

    def rollout(self, ids: Sequence[int]) -> Rollout:
        self._require("rollout")
        engine = self.engine
        # eager attention returns the weights; the switch waits for a reply streaming with the fast one, a
        # little: the model's process answers its Esc on the thread that asks this
        with contextlib.ExitStack() as stack:
            if engine._current_attention != "eager":
                if not engine._lock.acquire(timeout=ROLLOUT_WAIT_S):
                    raise inside_maths_unavailable("rollout needs the attention weights: it shows once the reply "
                                                   "streaming without them has ended")
                stack.callback(engine._lock.release)
                if not engine.attention_mode(True):
                    raise inside_maths_unavailable(engine.attention_unavailable or "no attention weights")
                stack.callback(engine.attention_mode, False)
            with torch.inference_mode():
                out = self._forward(ids, attentions=True)
            layers = engine.layer_weights(getattr(out, "attentions", None), len(ids), first=True)
            if layers is None:
                raise inside_maths_unavailable(engine.attention_unavailable or "no attention weights")
            return inside_maths.rollout([a[0] for a in layers])

    def knock_out(self, ids: Sequence[int], heads: frozenset[Head], top: int) -> KnockOut:
        self._require("knockout")
        engine = self.engine
        inside_maths.check_heads(heads, engine.n_layer, engine.n_head)
        with torch.inference_mode():
            key = tuple(ids)
            if self._before is not None and self._before[0] == key:  # knocking out heads again on one prefix
                _, before, outputs = self._before
            elif self._shares_most_of_the_cache(ids):  # the views' cache holds most of it: run the rest only
                before, outputs = self._logits(self._forward(ids, reuse=True)), None
            else:  # cold: one whole pass, keeping each block's output for the pass with heads off
                before, outputs = self._whole_pass_keeping_outputs(ids)
            self._before = (key, before, outputs)
            if heads:
                # the blocks below the first head off compute what they did before: with their outputs
                # kept, they are not run again
                skip = min(layer for layer, _ in heads) if outputs is not None else 0
                with self.hooks(None, frozenset(heads)), self._replaying(outputs, skip):
                    after = self._logits(self._forward(ids))
            else:
                after = before
        return inside_maths.knock_out(frozenset(heads), before, after, top, engine.token_text)

    def _shares_most_of_the_cache(self, ids: Sequence[int]) -> bool:
        cached = self._cache
        return (cached is not None and self.engine.decode_mode == "cache"
                and 2 * inside_maths.shared_prefix(cached[0], ids, len(ids) - 1) >= len(ids))

    def _whole_pass_keeping_outputs(self, ids: Sequence[int]) -> tuple[torch.Tensor, list[Any] | None]:
        """The model over all of `ids` (no cache): its last logits and each block's output as it returned it."""
        layers = list(self.parts.layers or [])
        outputs: list[Any] = [None] * len(layers)
        owner = threading.get_ident()

        def keep(i: int):
            def hook(module, args, output):
                if threading.get_ident() == owner:
                    outputs[i] = output
            return hook

        handles = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(layers)]
        try:
            logits = self._logits(self._forward(ids))
        finally:
            for handle in handles:
                handle.remove()
        return logits, (outputs if layers and all(o is not None for o in outputs) else None)

    @contextlib.contextmanager
    def _replaying(self, outputs: list[Any] | None, count: int) -> Iterator[None]:
        """The first `count` blocks answer with their kept `outputs` instead of computing them (in this
        thread only: a reply streaming meanwhile runs them as usual)."""
        layers = list(self.parts.layers or [])[:count] if outputs is not None else []
        owner = threading.get_ident()
        patched = []  # (layer, its own instance `forward` if it had one: accelerate's hooks set one)
        for i, layer in enumerate(layers):
            compute = layer.forward
            patched.append((layer, layer.__dict__.get("forward")))

            def forward(*args, _i=i, _compute=compute, **kwargs):
                if threading.get_ident() == owner:
                    return outputs[_i]
                return _compute(*args, **kwargs)

            layer.forward = forward
        try:
            yield
        finally:
            for layer, own in patched:
                if own is None:
                    del layer.forward  # the class's forward again
                else:
                    layer.forward = own

    def token_pieces(self, text: str) -> list[TokenPiece]:
        self._require("tokens")
        return inside_maths.token_pieces(self.engine.tokenizer.backend_tokenizer, text, self.engine.token_text)

    def attribute(self, ids: Sequence[int], token_id: int) -> Attribution:
        self._require("attribution")
        parts = self.parts
        kept = _Kept()
        with torch.inference_mode():
            with self.hooks(kept):
                logits = self._logits(self._forward(ids, reuse=True))
            components = [(inside_maths.EMBED, kept.resid_pre[0][-1])]
            biases = []
            for i in range(len(parts.layers)):
                heads = kept.heads[i][-1].view(-1, parts.head_dim)
                shares, bias = inside_maths.head_parts(i, heads, parts.out_projections[i])
                components += shares
                biases.append(bias)
                mlp_bias = self._mlp_bias(i, kept.mlp_out[i][-1])
                biases.append(mlp_bias)
                components.append((inside_maths.mlp_component(i), kept.mlp_out[i][-1] - mlp_bias))
            norm = self._frozen_norm()
            head = parts.head
            head_bias = float(head.bias[token_id]) if getattr(head, "bias", None) is not None else 0.0
            return inside_maths.attribute(token_id, float(logits[token_id]), kept.final[-1], components, biases, norm,
                                          head.weight[token_id], head_bias)

    def _mlp_bias(self, i: int, like: torch.Tensor) -> torch.Tensor:
        mlp = self._part(i, "mlp")
        down = getattr(mlp, "c_proj", None) or getattr(mlp, "down_proj", None)
        bias = getattr(down, "bias", None)
        return bias.detach().to(like.dtype) if isinstance(bias, torch.Tensor) else torch.zeros_like(like)

    def _frozen_norm(self) -> inside_maths.FrozenNorm:
        norm = self.parts.final_norm
        if isinstance(norm, torch.nn.LayerNorm):
            return inside_maths.FrozenNorm(norm.weight, norm.bias, norm.eps, centre=True)
        eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        weight = norm.weight.float()
        if self.family == "gemma":  # Gemma's RMSNorm scales by 1 + weight
            weight = 1.0 + weight
        return inside_maths.FrozenNorm(weight, None, eps, centre=False)

    def _qkv(self, ids: Sequence[int], layer: int, *, last_only: bool = False,
             ) -> tuple[_Kept, torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """One hooked pass: what it kept, and layer `layer`'s q (heads, T, hd), k and v (kv heads, T, hd), scale
        (`last_only`: T may hold only the new positions of a reused context, the last one among them)."""
        engine, parts = self.engine, self.parts
        inside_maths.check_heads(frozenset({(layer, 0)}), engine.n_layer, engine.n_head)
        kept = _Kept()
        with self.hooks(kept, qkv=True):
            self._forward(ids, reuse=last_only)
        attention = parts.attentions[layer]
        hd = parts.head_dim
        T = kept.resid_pre[layer].shape[0]
        if self.family == "gpt2":
            q, k, v = kept.qkv[layer].split(attention.split_size, dim=-1)
            q, k, v = (t.view(T, -1, hd).transpose(0, 1) for t in (q, k, v))
        else:
            q, k = kept.q[layer], kept.k[layer]
            v = kept.v[layer].view(T, -1, hd).transpose(0, 1)
        scale = float(getattr(attention, "scaling", 1.0 / math.sqrt(hd)))
        return kept, q, k, v, scale

    def block_trace(self, ids: Sequence[int], layer: int, head: int) -> BlockTrace:
        self._require("block")
        engine = self.engine
        inside_maths.check_heads(frozenset({(layer, head)}), engine.n_layer, engine.n_head)
        with torch.inference_mode():
            kept, q, k, v, _ = self._qkv(ids, layer, last_only=True)
            kv_head = head // max(1, q.shape[0] // k.shape[0])
            base = engine.model.base_model
            embed = engine.model.get_input_embeddings()
            rows = [BlockRow("token embedding", inside_maths.block_norm(embed.weight[ids[-1]]))]
            wpe = getattr(base, "wpe", None)
            if wpe is not None:
                rows.append(BlockRow("position embedding", inside_maths.block_norm(wpe.weight[len(ids) - 1])))
            if layer > 0 or wpe is None:
                rows.append(BlockRow("residual in", inside_maths.block_norm(kept.resid_pre[layer][-1])))
            rows.append(BlockRow("layer norm 1", inside_maths.block_norm(kept.ln_1[layer][-1])))
            qh, kh, vh = q[head, -1], k[kv_head, -1], v[kv_head, -1]
            rows += [BlockRow("q", inside_maths.block_norm(qh), inside_maths.block_first(qh)), BlockRow("k", inside_maths.block_norm(kh), inside_maths.block_first(kh)),
                     BlockRow("v", inside_maths.block_norm(vh))]
            attn_out = kept.attn_out[layer][-1]
            mid = kept.resid_pre[layer][-1] + attn_out
            rows += [BlockRow("attention output", inside_maths.block_norm(attn_out)), BlockRow("residual + attention", inside_maths.block_norm(mid)),
                     BlockRow("layer norm 2", inside_maths.block_norm(kept.ln_2[layer][-1])),
                     BlockRow("MLP output", inside_maths.block_norm(kept.mlp_out[layer][-1])),
                     BlockRow("residual + MLP", inside_maths.block_norm(kept.resid_post[layer][-1]))]
        return BlockTrace(layer=layer, head=head, rows=rows)

    def explain(self, ids: Sequence[int], query_position: int, layer: int, head: int) -> Explanation:
        """Explain (q·k ÷ √d) for one query of one head, from the queries and keys of the model's own pass."""
        from chat_tui.engine.explain import Explanation

        self._require("block")
        if not 0 <= query_position < len(ids):
            raise ValueError(f"query position {query_position} outside 0..{len(ids) - 1}")
        inside_maths.check_heads(frozenset({(layer, head)}), self.engine.n_layer, self.engine.n_head)
        with torch.inference_mode():
            _, q, k, v, scale = self._qkv(list(ids[: query_position + 1]), layer)
            kv_head = head // max(1, q.shape[0] // k.shape[0])
            qh = q[head, -1].double()
            kh, vh = k[kv_head].double(), v[kv_head].double()
            qk = kh @ qh
            scaled = qk * scale
            weights = torch.softmax(scaled, dim=-1)
            weighted = weights[:, None] * vh
            return Explanation(
                layer=layer, head=head, query_position=query_position, head_dim=int(q.shape[-1]), scale=scale,
                qk=qk.cpu().numpy(), scaled=scaled.cpu().numpy(), weights=weights.cpu().numpy(),
                value_norms=weighted.norm(dim=-1).cpu().numpy(), output_norm=float(weighted.sum(0).norm()),
                query_norm=float(qh.norm()), key_norms=kh.norm(dim=-1).cpu().numpy(),
            )


def _crop(cache: Any, remove: int) -> bool:
    """Drop the last `remove` positions of a KV cache in place; False when it cannot be cut back
    (a sliding window or a recurrent state: the context then runs whole)."""
    layers = getattr(cache, "layers", None)
    if not hasattr(cache, "crop") or layers is None or not all(getattr(lay, "is_croppable", False) for lay in layers):
        return False
    if remove:
        try:
            cache.crop(-remove)
        except Exception:  # noqa: BLE001 - a cache of another kind: run the context whole
            return False
    return True


def inside_maths_unavailable(reason: str) -> Exception:
    from chat_tui.engine.explain import ExplainUnavailable

    return ExplainUnavailable(reason)
