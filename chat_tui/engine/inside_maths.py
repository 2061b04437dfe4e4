"""The computations behind the inspector's inside views (issue #14), shared by every backend.

Each backend runs its own model once and hands over what it kept (the residual stream per layer,
each head's output before the output projection, the MLPs' outputs, the attention weights); these
functions turn that into the `chat_tui.engine.inside` values. They never run a model's maths
themselves: the final layer norm, the output head and the output projections are the model's own
modules, passed in as callables.

torch is imported inside the functions (as in `explain`): importing this module costs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from chat_tui.engine.inside import (
    INSIDE_VIEWS,
    Attribution,
    Component,
    Head,
    KnockOut,
    Lens,
    LensLayer,
    Rollout,
    TokenPiece,
    TopToken,
    head_name,
    inside,
)
from chat_tui.engine.token_bytes import is_byte_level, piece_bytes

if TYPE_CHECKING:
    import torch

TokenText = Callable[[int], str]
LOG2 = math.log(2.0)


def inside_views_of(engine: Any) -> dict[str, str | None]:
    """What each inside view can show for `engine`: its own answer, or for an engine that cannot open
    up its model at all, the one-line reason on every view."""
    opened = inside(engine)
    if opened is not None:
        return opened.inside_views()
    backend = getattr(engine, "backend", type(engine).__name__)
    return dict.fromkeys(INSIDE_VIEWS, f"the {backend} backend does not open up its model")


def head_mask(heads: frozenset[Head], n_layer: int, n_head: int, like: torch.Tensor) -> torch.Tensor | None:
    """(layers, heads) of ones with zeros at `heads` (None when there are none: the model's own path)."""
    if not heads:
        return None
    import torch

    mask = torch.ones(n_layer, n_head, dtype=like.dtype, device=like.device)
    for layer, head in heads:
        mask[layer, head] = 0
    return mask


def check_heads(heads: frozenset[Head], n_layer: int, n_head: int) -> None:
    """ValueError naming the first head outside the model."""
    for layer, head in sorted(heads):
        if not (0 <= layer < n_layer and 0 <= head < n_head):
            raise ValueError(f"{head_name(layer, head)} is outside this model ({n_layer} layers of {n_head} heads)")


def check_heads_or_fail(heads: frozenset[Head], n_layer: int, n_head: int) -> None:
    """`check_heads` for a reply: its error is an EngineError (a stream's errors are)."""
    from chat_tui.errors import EngineError

    try:
        check_heads(heads, n_layer, n_head)
    except ValueError as exc:
        raise EngineError(str(exc)) from None


def shared_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """How many leading ids `a` and `b` share, at most `limit` (a view reruns at least the last token)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if n >= limit or x != y:
            break
        n += 1
    return n


def check_context(ids: Sequence[int], context_length: int, *, empty_ok: bool = False) -> None:
    if not ids and not empty_ok:
        raise ValueError("no context: the view needs at least one token before the one it explains")
    if len(ids) > context_length:
        raise ValueError(f"{len(ids)} tokens are more than the context ({context_length})")


# ---------------------------------------------------------------------------------------------- lens


def lens(layer_logits: torch.Tensor, token_id: int, top: int, token_text: TokenText) -> Lens:
    """The logit lens from (layers, vocab) logits: row i is the residual after block i through the final
    layer norm and the output head (the last row: the model's own logits)."""
    import torch

    probs = torch.softmax(layer_logits.double(), dim=-1)
    top_p, top_i = probs.topk(min(top, probs.size(-1)), dim=-1)
    chosen = probs[:, token_id]
    ranks = (probs > chosen[:, None]).sum(-1)
    layers = [
        LensLayer(layer=i, top=[TopToken(int(t), token_text(int(t)), float(p)) for t, p in zip(ti, tp, strict=True)],
                  chosen_prob=float(chosen[i]), chosen_rank=int(ranks[i]))
        for i, (ti, tp) in enumerate(zip(top_i.tolist(), top_p.tolist(), strict=True))
    ]
    commit: int | None = None
    for i in range(len(layers) - 1, -1, -1):
        if layers[i].chosen_rank != 0:
            break
        commit = i
    final = float(chosen[-1])
    return Lens(token_id=token_id, layers=layers, commit_layer=commit,
                surprisal_bits=-math.log2(final) if final > 0 else math.inf)


# ---------------------------------------------------------------------------------------------- attribution


@dataclass(frozen=True)
class FrozenNorm:
    """The final layer norm at one position, its scale frozen: a linear map of each component.

    LayerNorm: weight ⊙ (c − mean c) / σ, and `shift` (its bias); RMSNorm: weight ⊙ c / rms
    (`centre` False, no shift). σ is that of the whole residual stream at this position."""

    weight: torch.Tensor  # the effective per-channel gain (Gemma's 1 + weight)
    shift: torch.Tensor | None
    eps: float
    centre: bool


def attribute(
    token_id: int,
    logit: float,
    residual: torch.Tensor,
    parts: Sequence[tuple[Component, torch.Tensor]],
    biases: Sequence[torch.Tensor],
    norm: FrozenNorm,
    unembed: torch.Tensor,
    head_bias: float = 0.0,
) -> Attribution:
    """Direct logit attribution of `token_id` at one position.

    `residual` (C,): the stream going into the final norm, which is the sum of the `parts` (each
    component's (C,) output) and the `biases` (the output projections' and MLPs' biases);
    `unembed` (C,): the token's row of the output head; `head_bias`: the output head's bias for it.
    `logit` is the model's own; `components + bias = logit` holds to float rounding."""
    import torch

    x = residual.double()
    if norm.centre:
        sigma = torch.sqrt(x.var(unbiased=False) + norm.eps)
    else:
        sigma = torch.sqrt((x * x).mean() + norm.eps)
    gain = norm.weight.double() * unembed.double() / sigma  # u ⊙ γ / σ: each channel's weight in the logit

    def through(rows: torch.Tensor) -> torch.Tensor:
        rows = rows.double()
        if norm.centre:
            rows = rows - rows.mean(-1, keepdim=True)
        return rows @ gain

    values = through(torch.stack([vector for _, vector in parts])).tolist() if parts else []
    bias = head_bias
    if biases:
        bias += float(through(torch.stack(list(biases))).sum())
    if norm.shift is not None:
        bias += float(norm.shift.double() @ unembed.double())
    components = [Component(c.name, c.layer, c.head, v) for (c, _), v in zip(parts, values, strict=True)]
    return Attribution(token_id=token_id, logit=logit, bias=bias, components=components)


def head_parts(layer: int, heads: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor],
               ) -> tuple[list[tuple[Component, torch.Tensor]], torch.Tensor]:
    """Each head's write to the residual stream, through the model's own output projection.

    `heads` (n_head, head_dim): the heads' outputs at one position, side by side before the
    projection. Returns each head's share (the projection of its slice alone, the bias taken
    away) and the projection's bias (its output for zeros)."""
    import torch

    n_head, head_dim = heads.shape
    rows = torch.zeros(n_head + 1, n_head * head_dim, dtype=heads.dtype, device=heads.device)
    for h in range(n_head):
        rows[h, h * head_dim : (h + 1) * head_dim] = heads[h]
    out = project(rows)  # the last row: zeros in, the bias out
    bias = out[-1]
    return [(Component(head_name(layer, h), layer, h, 0.0), out[h] - bias) for h in range(n_head)], bias


def mlp_component(layer: int) -> Component:
    return Component(f"L{layer + 1} MLP", layer, None, 0.0)


EMBED = Component("embed", None, None, 0.0)


# ---------------------------------------------------------------------------------------------- rollout


def rollout(weights: Sequence[Any]) -> Rollout:
    """Attention rollout of the last position: the product over layers of 0.5·A + 0.5·I, with A a
    layer's (heads, T, T) weights averaged over heads, rows renormalised; beside the last layer's row.

    Only the last row of the product is needed, so it is carried down from the last layer as a row
    times each layer's matrix: O(layers · T²), not the T³ of the whole product."""
    mixed = []
    last = None
    for layer in weights:
        a = np.asarray(_numpy(layer), dtype=np.float64).mean(0)
        last = a
        m = 0.5 * a
        m[np.diag_indices_from(m)] += 0.5
        m /= m.sum(-1, keepdims=True)
        mixed.append(m)
    if last is None:
        raise ValueError("no attention weights to roll out")
    row = mixed[-1][-1]
    for m in reversed(mixed[:-1]):
        row = row @ m
    return Rollout(rollout=row.astype(np.float32), last_layer=last[-1].astype(np.float32))


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    return value.detach().float().cpu().numpy()


# ---------------------------------------------------------------------------------------------- knock-out


def knock_out(heads: frozenset[Head], before: torch.Tensor, after: torch.Tensor, top: int,
              token_text: TokenText) -> KnockOut:
    """The next-token distributions from the logits (V,) before and after, side by side; KL in bits."""
    import torch

    p = torch.softmax(before.double(), -1)
    q = torch.softmax(after.double(), -1)
    seen = p > 0
    kl = float((p[seen] * (p[seen].log() - q[seen].log())).sum()) / LOG2
    k = min(top, p.numel())
    ids = sorted(set(p.topk(k).indices.tolist()) | set(q.topk(k).indices.tolist()), key=lambda i: (-float(p[i]), i))
    rows = [(TopToken(i, token_text(i), float(p[i])), float(p[i]), float(q[i])) for i in ids]
    return KnockOut(heads=frozenset(heads), rows=rows, kl_bits=max(kl, 0.0), top_before=int(p.argmax()),
                    top_after=int(q.argmax()))


# ---------------------------------------------------------------------------------------------- block

BLOCK_FIRST = 6  # the entries of q and k the block view shows


def block_norm(vector: torch.Tensor) -> float:
    """A block row's length, ‖x‖ (in float32 whatever the model's dtype)."""
    return float(vector.float().norm())


def block_first(vector: torch.Tensor) -> list[float]:
    """The first BLOCK_FIRST entries of a vector (q or k of the head in view)."""
    return [float(v) for v in vector[:BLOCK_FIRST].float().tolist()]


# ---------------------------------------------------------------------------------------------- tokens


def token_pieces(tokenizer: Any, text: str, token_text: TokenText) -> list[TokenPiece]:
    """`text` as the model reads it: a `tokenizers.Tokenizer`'s pieces with their ids, bytes and the
    characters each covers."""
    if not text:
        return []
    encoding = tokenizer.encode(text, add_special_tokens=False)
    byte_level = is_byte_level(tokenizer)
    return [
        TokenPiece(id=i, text=token_text(i), data=piece_bytes(piece, byte_level), start=start, end=end)
        for i, piece, (start, end) in zip(encoding.ids, encoding.tokens, encoding.offsets, strict=True)
    ]
