"""A conversation's branches as the UI shows them, with no Textual: the path on screen as ChatItems,
where each message stands among its siblings, and which branch a move to a sibling shows.

The store keeps the tree (`Store.branch`, `Store.tree`); the app asks here what to mount.
"""

from __future__ import annotations

from chat_tui.store import Store, StoredMessage
from chat_tui.ui.state import ChatItem, stored_token_probs


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
    place(store, conversation_id, items)
    return items


def place(store: Store, conversation_id: int, items: list[ChatItem]) -> None:
    """Set where each saved item of `items` stands among its siblings now."""
    positions = sibling_positions(store.tree(conversation_id))
    for item in items:
        if item.db_id is not None and item.db_id in positions:
            item.siblings = positions[item.db_id]


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


def sibling_leaf(store: Store, message_id: int, delta: int) -> int | None:
    """The end of the branch through the sibling `delta` places from `message_id` (the branch last
    worked on below it), or None when there is no sibling there."""
    siblings = store.siblings(message_id)
    index = siblings.index(message_id) + delta if message_id in siblings else -1
    if not 0 <= index < len(siblings):
        return None
    return store.newest_leaf(siblings[index])
