"""Saved conversations: one SQLite file in the data folder (stdlib `sqlite3`, no ORM).

WAL mode and a busy timeout so two chat-tui windows can share it; `PRAGMA user_version` holds the
schema version and `MIGRATIONS` brings an older file up to date. A file SQLite calls corrupt is moved
aside with a timestamp and a fresh one is started (`Store.recovered` says what happened).

Each assistant message records what is needed to replay it exactly: model, checkpoint hash, every
sampling setting, the seed actually used, and any settings changed in the middle of the reply.

A conversation is a tree: each message has a `parent_id` (NULL for a first message), so a regenerate
or an edited message is a sibling of the one it replaces, and nothing is deleted but on request. The
conversation's `leaf_id` is the last message of the branch on screen.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chat_tui.engine.params import settings_summary

BUSY_TIMEOUT_MS = 5000

# a conversation's row with its message count (n) and its number of branches: the messages that are
# no one's parent (read from the index messages_by_parent alone)
_CONVERSATION_COLUMNS = (
    "c.*, (SELECT count(*) FROM messages m WHERE m.conversation_id = c.id) AS n, "
    "(SELECT count(DISTINCT m.parent_id) FROM messages m WHERE m.conversation_id = c.id) AS parents, "
    "(SELECT substr(m.content, 1, 200) FROM messages m WHERE m.conversation_id = c.id "
    "ORDER BY m.id DESC LIMIT 1) AS preview "
    "FROM conversations c"
)
# the ids of a message and all its descendants (parameters: the message, its conversation)
_SUBTREE = (
    "WITH RECURSIVE sub(id) AS (SELECT ? UNION ALL "
    "SELECT m.id FROM messages m JOIN sub ON m.conversation_id = ? AND m.parent_id = sub.id) "
)
# the ids from a message up to its root, the message first
_ANCESTORS = (
    "WITH RECURSIVE up(id, parent_id, depth) AS (SELECT id, parent_id, 0 FROM messages WHERE id = ? "
    "UNION ALL SELECT m.id, m.parent_id, up.depth + 1 FROM messages m JOIN up ON m.id = up.parent_id) "
)
_NEWEST = object()  # add_message's default parent: the end of the branch on screen

MIGRATIONS: tuple[str, ...] = (
    # version 1
    """
    CREATE TABLE conversations (
        id INTEGER PRIMARY KEY,
        title TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        model TEXT,
        system_prompt TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX conversations_by_update ON conversations(updated_at DESC, id DESC);
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
        content TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'complete',
        created_at REAL NOT NULL,
        model TEXT,
        backend TEXT,
        checkpoint_hash TEXT,
        params TEXT,
        seed INTEGER,
        finish_reason TEXT,
        tokens INTEGER,
        tokens_per_s REAL,
        meta TEXT
    );
    CREATE INDEX messages_by_conversation ON messages(conversation_id, id);
    """,
    # version 2: a conversation is a tree. Every message's parent is the message before it in its
    # conversation, so a linear conversation stays one branch; the branch on screen ends at leaf_id.
    # No foreign key on parent_id: a cascade would recurse once per message of a long branch.
    """
    ALTER TABLE messages ADD COLUMN parent_id INTEGER;
    UPDATE messages SET parent_id = (
        SELECT max(p.id) FROM messages p WHERE p.conversation_id = messages.conversation_id AND p.id < messages.id
    );
    CREATE INDEX messages_by_parent ON messages(conversation_id, parent_id);
    ALTER TABLE conversations ADD COLUMN leaf_id INTEGER;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

STATUSES = ("complete", "stopped", "error")


class StoreError(Exception):
    """A problem with the conversation database; the message is fit to show."""


@dataclass
class ConversationInfo:
    id: int
    title: str
    created_at: float
    updated_at: float
    model: str | None = None
    system_prompt: str = ""
    messages: int = 0
    branches: int = 1  # leaves of the tree: 1 for a linear conversation
    preview: str = ""  # the start of the newest message (the conversation list shows it)


@dataclass
class StoredMessage:
    id: int
    conversation_id: int
    role: str
    content: str
    parent_id: int | None = None
    status: str = "complete"
    created_at: float = 0.0
    model: str | None = None
    backend: str | None = None
    checkpoint_hash: str | None = None
    params: dict[str, Any] | None = None
    seed: int | None = None
    finish_reason: str | None = None
    tokens: int | None = None
    tokens_per_s: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "parent": self.parent_id,
            "role": self.role,
            "content": self.content,
            "status": self.status,
            "created": self.created_at,
            "model": self.model,
            "backend": self.backend,
            "checkpoint_hash": self.checkpoint_hash,
            "settings": self.params,
            "seed": self.seed,
            "finish_reason": self.finish_reason,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens_per_s,
            "meta": self.meta,
        }


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
        return True
    text = str(exc).lower()
    return "not a database" in text or "malformed" in text or "disk image" in text


def _title_from(text: str, limit: int = 60) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


class Store:
    """The conversation database. Use from one thread (the UI's); `:memory:` works for tests."""

    def __init__(self, path: str | Path, *, now: Any = time.time) -> None:
        self.path = Path(path) if str(path) != ":memory:" else None
        self._now = now
        self.recovered: tuple[Path, str] | None = None  # (where the corrupt file went, why)
        try:
            self._conn = self._open()
        except sqlite3.DatabaseError as exc:
            if self.path is None or not _is_corruption(exc):
                raise StoreError(f"cannot open the conversation database {self.path}: {exc}") from None
            moved = self._move_aside()
            self.recovered = (moved, str(exc))
            try:
                self._conn = self._open()
            except sqlite3.DatabaseError as exc2:
                raise StoreError(f"cannot create a fresh database at {self.path}: {exc2}") from None

    # ------------------------------------------------------------------ opening

    def _open(self) -> sqlite3.Connection:
        """Open, retrying while another window holds the lock: SQLite answers some of the first
        statements (switching a fresh file to WAL) with "database is locked" at once, without waiting."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        delay = 0.01
        while True:
            try:
                return self._open_once()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def _open_once(self) -> sqlite3.Connection:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            str(self.path) if self.path else ":memory:",
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,  # autocommit; explicit BEGIN where several statements go together
            check_same_thread=False,
        )
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if self.path is not None:
                conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA synchronous = NORMAL")
            # Touch the schema so a file that is not a database fails here, not later.
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        version = Store._checked_version(conn)
        if version == SCHEMA_VERSION:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            # read again under the write lock: another window opening the same fresh file at the
            # same moment may have migrated it while this one waited for the lock
            version = Store._checked_version(conn)
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _statements(MIGRATIONS[target - 1]):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {target}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @staticmethod
    def _checked_version(conn: sqlite3.Connection) -> int:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the conversation database has schema version {version}, newer than this chat-tui "
                f"understands ({SCHEMA_VERSION}); upgrade chat-tui"
            )
        return version

    def _move_aside(self) -> Path:
        assert self.path is not None
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self._now()))
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        # not files.free_path: that numbers before the last suffix (c.db-2.corrupt-…); these number after it
        n = 1
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        os.replace(self.path, target)
        for suffix in ("-wal", "-shm"):
            side = Path(str(self.path) + suffix)
            if side.exists():
                os.replace(side, Path(str(target) + suffix))
        return target

    def close(self) -> None:
        self._conn.close()

    @property
    def schema_version(self) -> int:
        return self._conn.execute("PRAGMA user_version").fetchone()[0]

    # ------------------------------------------------------------------ conversations

    def create_conversation(self, title: str = "", *, model: str | None = None, system_prompt: str = "") -> int:
        now = self._now()
        cur = self._conn.execute(
            "INSERT INTO conversations (title, created_at, updated_at, model, system_prompt) VALUES (?, ?, ?, ?, ?)",
            (_title_from(title) if title else "", now, now, model, system_prompt),
        )
        return int(cur.lastrowid)

    def get_conversation(self, conversation_id: int) -> ConversationInfo | None:
        row = self._conn.execute(f"SELECT {_CONVERSATION_COLUMNS} WHERE c.id = ?", (conversation_id,)).fetchone()
        return None if row is None else self._conversation(row)

    @staticmethod
    def _conversation(row: sqlite3.Row) -> ConversationInfo:
        return ConversationInfo(
            id=row["id"],
            title=row["title"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            model=row["model"],
            system_prompt=row["system_prompt"],
            messages=row["n"],
            branches=max(row["n"] - row["parents"], 1),
            preview=(row["preview"] or "") if "preview" in row.keys() else "",
        )

    def list_conversations(
        self, limit: int = 50, *, before: tuple[float, int] | None = None, search: str = ""
    ) -> list[ConversationInfo]:
        """One page, newest first. Pass the (updated_at, id) of the last row seen to get the next page;
        `search`: only conversations whose title or a message holds it (any case).

        Keyset pagination on an index: the cost of a page does not grow with the history.
        """
        sql = f"SELECT {_CONVERSATION_COLUMNS}"
        args: list[Any] = []
        where = []
        if before is not None:
            where.append("((c.updated_at < ?) OR (c.updated_at = ? AND c.id < ?))")
            args += [before[0], before[0], before[1]]
        if search.strip():
            pattern = "%" + search.strip().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            where.append("(c.title LIKE ? ESCAPE '\\' OR EXISTS (SELECT 1 FROM messages m WHERE "
                         "m.conversation_id = c.id AND m.content LIKE ? ESCAPE '\\'))")
            args += [pattern, pattern]
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY c.updated_at DESC, c.id DESC LIMIT ?"
        args.append(limit)
        return [self._conversation(r) for r in self._conn.execute(sql, args)]

    def latest_conversation_id(self) -> int | None:
        row = self._conn.execute("SELECT id FROM conversations ORDER BY updated_at DESC, id DESC LIMIT 1").fetchone()
        return None if row is None else int(row[0])

    def rename_conversation(self, conversation_id: int, title: str) -> None:
        self._conn.execute(
            "UPDATE conversations SET title = ? WHERE id = ?", (_title_from(title, 120), conversation_id)
        )

    def set_system_prompt(self, conversation_id: int, system_prompt: str) -> None:
        self._conn.execute(
            "UPDATE conversations SET system_prompt = ? WHERE id = ?", (system_prompt, conversation_id)
        )

    def delete_conversation(self, conversation_id: int) -> None:
        self._conn.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    def count_conversations(self) -> int:
        return int(self._conn.execute("SELECT count(*) FROM conversations").fetchone()[0])

    def _touch(self, conversation_id: int, model: str | None = None) -> None:
        if model:
            self._conn.execute(
                "UPDATE conversations SET updated_at = ?, model = ? WHERE id = ?", (self._now(), model, conversation_id)
            )
        else:
            self._conn.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (self._now(), conversation_id))

    # ------------------------------------------------------------------ messages

    def add_message(
        self,
        conversation_id: int,
        role: str,
        content: str,
        *,
        parent: int | None | object = _NEWEST,
        status: str = "complete",
        model: str | None = None,
        backend: str | None = None,
        checkpoint_hash: str | None = None,
        params: dict[str, Any] | None = None,
        seed: int | None = None,
        finish_reason: str | None = None,
        tokens: int | None = None,
        tokens_per_s: float | None = None,
        meta: dict[str, Any] | None = None,
    ) -> int:
        """Add a message under `parent` (None: a first message; by default the end of the branch on
        screen, so callers that know no tree append); it becomes the end of the branch on screen."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}")
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            if parent is _NEWEST:
                parent = self._leaf(conversation_id)
            cur = self._conn.execute(
                "INSERT INTO messages (conversation_id, parent_id, role, content, status, created_at, model, "
                "backend, checkpoint_hash, params, seed, finish_reason, tokens, tokens_per_s, meta) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    conversation_id,
                    parent,
                    role,
                    content,
                    status,
                    self._now(),
                    model,
                    backend,
                    checkpoint_hash,
                    None if params is None else json.dumps(params),
                    seed,
                    finish_reason,
                    tokens,
                    tokens_per_s,
                    json.dumps(meta or {}),
                ),
            )
            title_row = self._conn.execute(
                "SELECT title FROM conversations WHERE id = ?", (conversation_id,)
            ).fetchone()
            if title_row is None:
                raise StoreError(f"no conversation with id {conversation_id}")
            if role == "user" and not title_row[0]:
                self._conn.execute(
                    "UPDATE conversations SET title = ? WHERE id = ?", (_title_from(content), conversation_id)
                )
            self._conn.execute("UPDATE conversations SET leaf_id = ? WHERE id = ?", (cur.lastrowid, conversation_id))
            self._touch(conversation_id, model)
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        return int(cur.lastrowid)

    def update_message(self, message_id: int, **changes: Any) -> None:
        allowed = {"content", "status", "finish_reason", "tokens", "tokens_per_s", "seed", "params", "meta"}
        unknown = set(changes) - allowed
        if unknown:
            raise ValueError(f"cannot update {', '.join(sorted(unknown))}")
        if not changes:
            return
        values = [json.dumps(v) if k in ("params", "meta") else v for k, v in changes.items()]
        sets = ", ".join(f"{k} = ?" for k in changes)
        self._conn.execute(f"UPDATE messages SET {sets} WHERE id = ?", [*values, message_id])

    # ------------------------------------------------------------------ the tree

    def _leaf(self, conversation_id: int) -> int | None:
        """The last message of the branch on screen (the newest message when none was chosen)."""
        row = self._conn.execute(
            "SELECT coalesce(c.leaf_id, (SELECT max(id) FROM messages m WHERE m.conversation_id = c.id)) "
            "FROM conversations c WHERE c.id = ?",
            (conversation_id,),
        ).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def branch(self, conversation_id: int, leaf: int | None = None) -> list[StoredMessage]:
        """The messages from the root to `leaf` (by default the end of the branch on screen)."""
        leaf = self._leaf(conversation_id) if leaf is None else leaf
        if leaf is None:
            return []
        rows = self._conn.execute(
            f"{_ANCESTORS}SELECT m.* FROM up JOIN messages m ON m.id = up.id "
            "WHERE m.conversation_id = ? ORDER BY up.depth DESC",
            (leaf, conversation_id),
        )
        return [self._message(r) for r in rows]

    def set_leaf(self, conversation_id: int, leaf: int) -> None:
        """Show the branch that ends at `leaf` (any message: its branch ends there)."""
        self._conn.execute("UPDATE conversations SET leaf_id = ? WHERE id = ?", (leaf, conversation_id))

    def siblings(self, message_id: int) -> list[int]:
        """The ids of `message_id` and the other messages with its parent, oldest first."""
        return [int(r[0]) for r in self._conn.execute(
            "SELECT s.id FROM messages m JOIN messages s ON s.conversation_id = m.conversation_id "
            "AND s.parent_id IS m.parent_id WHERE m.id = ? ORDER BY s.id",
            (message_id,),
        )]

    def children(self, conversation_id: int, parent: int | None) -> list[int]:
        """The ids of the messages under `parent` (None: the first messages), oldest first."""
        return [int(r[0]) for r in self._conn.execute(
            "SELECT id FROM messages WHERE conversation_id = ? AND parent_id IS ? ORDER BY id",
            (conversation_id, parent),
        )]

    def tree(self, conversation_id: int) -> dict[int, int | None]:
        """Every message's parent (id → parent id), without their text: the shape of the tree."""
        return {int(r[0]): r[1] for r in self._conn.execute(
            "SELECT id, parent_id FROM messages WHERE conversation_id = ?", (conversation_id,)
        )}

    def newest_leaf(self, message_id: int) -> int:
        """The end of the branch last worked on below `message_id`: its newest descendant (a child
        is always newer than its parent, so the newest descendant has no child)."""
        row = self._conn.execute(
            f"{_SUBTREE}SELECT max(id) FROM sub", (message_id, self._conversation_of(message_id))
        ).fetchone()
        return int(row[0])

    def _conversation_of(self, message_id: int) -> int | None:
        row = self._conn.execute("SELECT conversation_id FROM messages WHERE id = ?", (message_id,)).fetchone()
        return None if row is None else int(row[0])

    def delete_branch(self, message_id: int) -> int:
        """Delete a message and its descendants (its siblings and ancestors stay); how many went.
        When the branch on screen went with them, the one beside it is shown."""
        row = self._conn.execute(
            "SELECT conversation_id, parent_id FROM messages WHERE id = ?", (message_id,)
        ).fetchone()
        if row is None:
            return 0
        conversation_id, parent = row
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            before = self._conn.total_changes  # (a cursor's rowcount is -1 for a statement that starts WITH)
            self._conn.execute(f"{_SUBTREE}DELETE FROM messages WHERE id IN sub", (message_id, conversation_id))
            deleted = self._conn.total_changes - before
            leaf = self._conn.execute("SELECT leaf_id FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
            gone = leaf is not None and leaf[0] is not None and self._conn.execute(
                "SELECT 1 FROM messages WHERE id = ?", (leaf[0],)
            ).fetchone() is None
            if gone:
                left = self.children(conversation_id, parent)
                new_leaf = self.newest_leaf(left[-1]) if left else parent
                self._conn.execute("UPDATE conversations SET leaf_id = ? WHERE id = ?", (new_leaf, conversation_id))
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        return deleted

    @staticmethod
    def _message(row: sqlite3.Row) -> StoredMessage:
        return StoredMessage(
            id=row["id"],
            conversation_id=row["conversation_id"],
            role=row["role"],
            content=row["content"],
            parent_id=row["parent_id"],
            status=row["status"],
            created_at=row["created_at"],
            model=row["model"],
            backend=row["backend"],
            checkpoint_hash=row["checkpoint_hash"],
            params=None if row["params"] is None else json.loads(row["params"]),
            seed=row["seed"],
            finish_reason=row["finish_reason"],
            tokens=row["tokens"],
            tokens_per_s=row["tokens_per_s"],
            meta=json.loads(row["meta"] or "{}"),
        )

    def messages(self, conversation_id: int) -> list[StoredMessage]:
        """Every message of the conversation, every branch, oldest first (`branch` gives one path)."""
        rows = self._conn.execute(
            "SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,)
        )
        return [self._message(r) for r in rows]

    def add_messages(self, conversation_id: int, items: Iterable[tuple[str, str]]) -> None:
        """Bulk insert (role, content) pairs in one transaction (imports, tests, benchmarks), each the
        child of the one before, after the end of the branch on screen."""
        now = self._now()
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            parent = self._leaf(conversation_id)
            for role, content in items:
                parent = self._conn.execute(
                    "INSERT INTO messages (conversation_id, parent_id, role, content, created_at, meta) "
                    "VALUES (?, ?, ?, ?, ?, '{}')",
                    (conversation_id, parent, role, content, now),
                ).lastrowid
            self._conn.execute("UPDATE conversations SET leaf_id = ? WHERE id = ?", (parent, conversation_id))
            self._touch(conversation_id)
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------------ export

    def export_json(self, conversation_id: int) -> str:
        info = self.get_conversation(conversation_id)
        if info is None:
            raise StoreError(f"no conversation with id {conversation_id}")
        data = {
            "format": "chat-tui-conversation",
            "version": 2,
            "id": info.id,
            "title": info.title,
            "created_at": info.created_at,
            "updated_at": info.updated_at,
            "model": info.model,
            "system_prompt": info.system_prompt,
            "leaf": self._leaf(conversation_id),  # the last message of the branch on screen
            "messages": [m.to_dict() for m in self.messages(conversation_id)],  # the whole tree
        }
        return json.dumps(data, ensure_ascii=False, indent=2) + "\n"

    def export_markdown(self, conversation_id: int) -> str:
        """The branch on screen, as a document."""
        info = self.get_conversation(conversation_id)
        if info is None:
            raise StoreError(f"no conversation with id {conversation_id}")
        out = [f"# {info.title or 'Conversation'}", ""]
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.created_at))
        out += [f"*chat-tui conversation {info.id}, started {created}*", ""]
        if info.system_prompt:
            out += ["## System", "", info.system_prompt, ""]
        for m in self.branch(conversation_id):
            heading = {"user": "You", "assistant": "Assistant", "system": "System"}.get(m.role, m.role)
            out += [f"## {heading}", "", m.content, ""]
            if m.role == "assistant":
                # the reply's receipt: the model, its checkpoint, every setting that is not neutral, the seed
                details = [m.model or "", f"checkpoint {m.checkpoint_hash[:12]}" if m.checkpoint_hash else "",
                           settings_summary(m.params), f"seed {m.seed}" if m.seed is not None else ""]
                if m.status != "complete":
                    details.append(m.status)
                note = ", ".join(d for d in details if d)
                if note:
                    out += [f"*{note}*", ""]
        return "\n".join(out)


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
