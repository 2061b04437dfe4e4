"""A conversation's branches as the UI shows them, with no Textual: the path on screen as ChatItems,
where each message stands among its siblings, which branch a move to a sibling shows, and forks (a
reply restarted at one of its tokens with another candidate forced there).

The store keeps the tree (`Store.branch`, `Store.tree`); the app asks here what to mount.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from chat_tui.engine.types import Engine, Step
from chat_tui.store import Store, StoredMessage
from chat_tui.textsafe import clean_line
from chat_tui.ui.state import ChatItem, GenJob, stored_token_probs

if TYPE_CHECKING:
    from chat_tui.engine.explain import ChainReplay


def chat_item(message: StoredMessage) -> ChatItem:
    """A saved message as the UI keeps it (its colours once, as pairs: the store keeps its own)."""
    meta = dict(message.meta)
    probs = stored_token_probs(meta)
    meta.pop("token_probs", None)
    return ChatItem(
        role=message.role, content=message.content, status=message.status, db_id=message.id,  # type: ignore[arg-type]
        model=message.model, seed=message.seed, params=message.params, tokens=message.tokens,
        tokens_per_s=message.tokens_per_s, finish_reason=message.finish_reason, meta=meta, token_probs=probs,
    )


def sibling_positions(parents: dict[int, int | None]) -> dict[int, tuple[int, int]]:
    """Where each message stands among the messages with its parent: (which, of how many), from 1."""
    groups: dict[int | None, list[int]] = {}
    for message_id in sorted(parents):
        groups.setdefault(parents[message_id], []).append(message_id)
    return {mid: (i, len(ids)) for ids in groups.values() for i, mid in enumerate(ids, start=1)}


def load_branch(store: Store, conversation_id: int) -> list[ChatItem]:
    """The branch on screen, root first, each message knowing its place among its siblings."""
    items = [chat_item(m) for m in store.branch(conversation_id)]
    positions = sibling_positions(store.tree(conversation_id))  # one query, not one per message
    for item in items:
        item.siblings = positions.get(item.db_id, (1, 1)) if item.db_id is not None else (1, 1)
    return items


def place(store: Store, item: ChatItem) -> None:
    """Set where the saved `item` (one just added) stands among its siblings now."""
    if item.db_id is not None:
        siblings = store.siblings(item.db_id)
        if item.db_id in siblings:
            item.siblings = (siblings.index(item.db_id) + 1, len(siblings))


def path_ids(items: list[ChatItem], before: ChatItem | None = None) -> list[int]:
    """The saved messages of the path `items`, root first, up to `before` (not included) or all."""
    out: list[int] = []
    for item in items:
        if item is before:
            break
        if item.db_id is not None:
            out.append(item.db_id)
    return out


def new_sibling_position(store: Store, conversation_id: int, parent: int | None) -> tuple[int, int]:
    """Where a message about to be added under `parent` will stand: last of its siblings."""
    n = len(store.children(conversation_id, parent)) + 1
    return (n, n)


def deletion_note(item: ChatItem, below: int) -> str:
    """What deleting `item` deletes and keeps, for the question asked first."""
    others = item.siblings[1] - 1
    kept = f"its {others} other version{'s' if others != 1 else ''} stay." if others else "it has no other version."
    return f"It and what follows it in every branch are deleted ({below} on screen below it); {kept}"


def sibling_leaf(store: Store, message_id: int, delta: int) -> int | None:
    """The end of the branch through the sibling `delta` places from `message_id` (the branch last
    worked on below it), or None when there is no sibling there."""
    siblings = store.siblings(message_id)
    index = siblings.index(message_id) + delta if message_id in siblings else -1
    if not 0 <= index < len(siblings):
        return None
    return store.newest_leaf(siblings[index])


# ---------------------------------------------------------------------- forks


@dataclass(frozen=True)
class Fork:
    """A reply forked at one of its tokens: its tokens before `index` kept, `token` forced at it.

    `prob` is the token's raw probability; `dropped_by` the stage of the chain that dropped it (None
    when the chain kept it, DROPPED when the stage is not known, UNKNOWN when the chain itself is not: a
    server's own sampler chose); `instead_of` the token the reply had there; `prompt_ids` the prompt the
    reply answered (the app checks it is the one on screen).
    """

    index: int
    prefix_ids: tuple[int, ...]
    prefix_texts: tuple[str, ...]
    token_id: int
    token: str
    prob: float
    dropped_by: str | None
    instead_of: str
    prompt_ids: tuple[int, ...]

    def receipt(self) -> str:
        """"forked at token 3: ' x' (p = 0.4%, dropped by top-p) instead of ' y'" (counted from 1)."""
        return (f"forked at token {self.index + 1}: {clean_line(repr(self.token))} (p = {self.prob:.2%}, "
                f"{verdict(self.dropped_by)}) instead of {clean_line(repr(self.instead_of))}")

    def to_meta(self) -> dict[str, Any]:
        return {"at": self.index, "token": self.token, "token_id": self.token_id, "prob": round(self.prob, 6),
                "dropped_by": self.dropped_by, "instead_of": self.instead_of, "receipt": self.receipt()}


DROPPED = "dropped"  # a Fork's dropped_by when the chain dropped the token at a stage not known
UNKNOWN = ""  # ... when what the chain did is not known (a server's sampler chose)


def verdict(dropped_by: str | None) -> str:
    """What the chain did with a candidate, in words."""
    if dropped_by is None:
        return "kept by the chain"
    if dropped_by == UNKNOWN:
        return "the chain unknown"
    if dropped_by == DROPPED:
        return "dropped by the chain"
    return f"dropped by {dropped_by.replace('_', '-')}"


def fork_choices(step: Step, replay: ChainReplay | None, texts: dict[int, str] | None,
                 engine: Engine | None) -> list[tuple[int, str, float, str | None]]:
    """The candidates a reply can be forked to at `step`: (id, text, raw probability, dropping stage
    or None when kept), most likely first, the sampled token left out. Dropped ones are included."""
    out: list[tuple[int, str, float, str | None]] = []
    if replay is not None:
        for i, cid in enumerate(replay.ids.tolist()):
            if cid == step.token_id:
                continue
            text = (texts or {}).get(cid)
            if text is None:
                text = engine.token_text(cid) if engine is not None else f"#{cid}"
            out.append((int(cid), text, float(replay.raw_probs[i]), replay.stage(i)))
        return out
    for candidate in step.top:  # no replay: the chain's verdict is only "kept" or "dropped", if that
        if candidate.id == step.token_id and candidate.text == step.token:
            continue
        chain = candidate.chain_prob
        stage = UNKNOWN if math.isnan(chain) else (None if chain > 0 else DROPPED)
        out.append((candidate.id, candidate.text, candidate.prob, stage))
    return out


def fork_label(text: str, prob: float, stage: str | None) -> str:
    """One line of the fork picker."""
    return f"{clean_line(repr(text))}  {prob:.2%}  {verdict(stage)}"


def fork_text(fork: Fork, engine: Engine | None) -> str:
    """The forked reply's start: its kept tokens and the forced one, decoded together where the
    engine knows the ids (so a character split across tokens comes out whole), else their texts."""
    ids = [*fork.prefix_ids, fork.token_id]
    if engine is not None and all(i >= 0 for i in ids):
        return engine.decode(ids)
    return "".join(fork.prefix_texts) + fork.token


@dataclass(frozen=True)
class ForkOpening:
    """How a forked reply starts: `item` as it shows (the text before the fork and the forced token, their
    colours, the fork in its meta); `sent_text` the open reply the model is sent as text ("" for none) and
    `prefix_ids` the ids after it, prefilled as they are: the reply's tokens before the fork, then the
    forced one. Without ids (a server's tokens) `prefix_ids` is empty and `sent_text` holds the whole start."""

    item: ChatItem
    sent_text: str
    prefix_ids: tuple[int, ...]


def fork_opening(job: GenJob | None, fork: Fork, engine: Engine | None,
                 on_screen: list[ChatItem]) -> ForkOpening | None:
    """The start of the reply forked from `job`'s (see ForkOpening). None when `job` is not the reply the
    fork was picked in (the inspector holds another reply) or its reply is no longer on screen."""
    if job is None or job.prompt is None or tuple(job.prompt.ids) != fork.prompt_ids:
        return None
    item = job.item
    if not any(it is item for it in on_screen) or not 0 <= fork.index < job.count:
        return None
    before = len(item.token_probs) - job.count + fork.index  # a continued reply's earlier tokens too
    probs = [*item.token_probs[:before], (fork.token, fork.prob)]
    meta: dict[str, Any] = {"fork": {**fork.to_meta(), "token_index": before}}  # where the colour view marks it
    start = ChatItem("assistant", job.base_text + fork_text(fork, engine), status="waiting",
                     meta=meta, token_probs=probs)
    ids = (*job.prompt.prefix_ids, *fork.prefix_ids, fork.token_id)
    if engine is None or any(i < 0 for i in ids):  # no ids: the model goes on from the text, tokenized again
        meta["fork"]["continued_from_text"] = True
        return ForkOpening(start, start.content, ())
    # the reply's own ids, after the open text `job` was sent: exactly the reply up to the fork, then the token
    sent = job.conversation[-1].content if job.conversation and job.conversation[-1].role == "assistant" else ""
    return ForkOpening(start, sent, ids)
