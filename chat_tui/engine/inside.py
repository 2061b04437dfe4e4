"""What the inspector's "inside the next token" views are given (issue #14): plain values, no torch.

The engine computes them (the mini-GPT from `GPT.forward(capture=...)` or its decode buffers, a Hugging
Face model from hidden states, attentions and hooks); the UI draws them; the model's process pickles
them across. This module holds only the shapes and the capability check, so the UI and the tests can
build them without a model.

Conventions, the same for every method:
- `ids` is a context; the method looks at its LAST position. For "the token under the cursor" at
  position p of a reply whose tokens are `all_ids`: lens, attribution and knock-out are about the
  prediction of that token, so they take `ids = all_ids[:p]` and `token_id = all_ids[p]`; rollout
  and block are about the token's own row, so they take `ids = all_ids[: p + 1]`.
- Layers and heads are zero-based in fields and arguments (`layer`, `head`) and counted from 1 in
  names shown to people and in JSON (`"L1H2"`, `"L3 MLP"`): `head_name(0, 1) == "L1H2"`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

# the views, in the order the inspector cycles them
INSIDE_VIEWS: tuple[str, ...] = ("lens", "attribution", "rollout", "knockout", "tokens", "block")

Head = tuple[int, int]  # (layer, head), zero-based


def head_name(layer: int, head: int) -> str:
    """`L1H2` for (0, 1): the name people and `--knockout` use, counted from 1."""
    return f"L{layer + 1}H{head + 1}"


def parse_heads(text: str, n_layer: int, n_head: int) -> frozenset[Head]:
    """`"L1H2,L3H1"` -> {(0, 1), (2, 0)}; ValueError with a one-line reason on a bad or out-of-range name."""
    heads: set[Head] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        upper = part.upper()
        try:
            layer_text, head_text = upper[1:].split("H", 1)
            if not upper.startswith("L"):
                raise ValueError
            layer, head = int(layer_text) - 1, int(head_text) - 1
        except ValueError:
            raise ValueError(f"{part!r} is not a head: write it as L<layer>H<head>, counted from 1 (e.g. L1H2)") from None
        if not (0 <= layer < n_layer and 0 <= head < n_head):
            raise ValueError(f"{part} is outside this model ({n_layer} layers of {n_head} heads, counted from 1)")
        heads.add((layer, head))
    return frozenset(heads)


@dataclass(frozen=True)
class TopToken:
    id: int
    text: str  # the token's own text, unsafe (render it with chat_tui.textsafe)
    prob: float


@dataclass(frozen=True)
class LensLayer:
    layer: int  # zero-based: the residual stream after block `layer` (the last one is the model's own output)
    top: list[TopToken]  # the most likely next tokens through the final layer norm and the output head
    chosen_prob: float  # the probability this layer gives the token that was finally chosen
    chosen_rank: int  # its rank at this layer (0 = top-1)


@dataclass(frozen=True)
class Lens:
    """The logit lens of one prediction: what each layer would say the next token is."""

    token_id: int  # the token that was chosen (the cursor's token)
    layers: list[LensLayer]
    # the first layer from which `token_id` stays top-1 through the last layer (zero-based);
    # None when it is not top-1 at the last layer (sampling picked a less likely token)
    commit_layer: int | None
    surprisal_bits: float  # -log2 of the model's final probability of `token_id`


@dataclass(frozen=True)
class Component:
    name: str  # "embed", "L1H2", "L1 MLP", or "L1 attn bias" style names for what has no head
    layer: int | None  # zero-based; None for the embeddings
    head: int | None  # zero-based; None for an MLP or the embeddings
    value: float  # its contribution to the token's logit


@dataclass(frozen=True)
class Attribution:
    """Direct logit attribution: each component's output, through the final layer norm's scale frozen
    at this position, dotted with the token's unembedding. `sum(values) + bias == logit` to 1e-4."""

    token_id: int
    logit: float
    bias: float  # everything that is not a component: the layer norm's shift (and the head's bias, if any)
    components: list[Component]  # every component, in model order (embed, L1H1.., L1 MLP, L2H1..)

    @property
    def residual_error(self) -> float:
        return abs(sum(c.value for c in self.components) + self.bias - self.logit)


@dataclass(frozen=True)
class Rollout:
    """Attention rollout (Abnar & Zuidema, 2020) of the last position's row, next to the raw last layer."""

    rollout: np.ndarray  # float32 (len(ids),), sums to 1
    last_layer: np.ndarray  # float32 (len(ids),): the last layer's attention, heads averaged


@dataclass(frozen=True)
class KnockOut:
    """The next-token distribution with some heads' outputs zeroed, beside the original."""

    heads: frozenset[Head]
    # the union of both top lists, by the original probability: (token, prob before, prob after)
    rows: list[tuple[TopToken, float, float]]
    kl_bits: float  # KL(original || knocked out), in bits
    top_before: int  # the most likely token id before
    top_after: int  # and after


@dataclass(frozen=True)
class TokenPiece:
    id: int
    text: str  # the token's own text (may be part of a character: see `data`)
    data: bytes  # the bytes it stands for (byte-level BPE: a character can take two or three)
    start: int  # the characters of the input text it covers, [start, end); a token that ends
    end: int  # inside a character covers that character (the next one then starts at the same end)


@dataclass(frozen=True)
class BlockRow:
    name: str  # "token embedding", "position embedding", "layer norm 1", "q", "k", "v", "attention output",
    # "residual + attention", "layer norm 2", "MLP output", "residual + MLP"
    norm: float
    first: list[float] = field(default_factory=list)  # for q and k of the head in view: the first entries


@dataclass(frozen=True)
class BlockTrace:
    """One decoder block at one position, top to bottom, with the model's own numbers."""

    layer: int
    head: int
    rows: list[BlockRow]


@runtime_checkable
class Inside(Protocol):
    """An engine that can open up its next token. Ask `inside(engine)`, never `getattr`."""

    def inside_views(self) -> dict[str, str | None]:
        """Each of INSIDE_VIEWS -> None when this engine can show it, else the one-line reason why not."""
        ...

    def logit_lens(self, ids: Sequence[int], token_id: int, top: int = 3) -> Lens: ...

    def attribute(self, ids: Sequence[int], token_id: int) -> Attribution: ...

    def rollout(self, ids: Sequence[int]) -> Rollout: ...

    def knock_out(self, ids: Sequence[int], heads: frozenset[Head], top: int = 8) -> KnockOut: ...

    def token_pieces(self, text: str) -> list[TokenPiece]: ...

    def block_trace(self, ids: Sequence[int], layer: int, head: int) -> BlockTrace: ...


def inside(engine: object) -> Inside | None:
    """`engine` as an Inside when it has these methods, else None (then every view says why not)."""
    return engine if isinstance(engine, Inside) else None
