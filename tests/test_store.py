"""The SQLite conversation store: schema, WAL, migrations, pagination, corruption, export."""

from __future__ import annotations

import json
import sqlite3

import pytest

from chat_tui.store import BUSY_TIMEOUT_MS, MIGRATIONS, SCHEMA_VERSION, Store, StoreError


class Clock:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        self.t += 1
        return self.t


def test_fresh_database_uses_wal_busy_timeout_and_the_current_schema(tmp_path):
    store = Store(tmp_path / "c.db")
    assert store.schema_version == SCHEMA_VERSION == len(MIGRATIONS)
    assert store._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._conn.execute("PRAGMA busy_timeout").fetchone()[0] == BUSY_TIMEOUT_MS
    assert store.recovered is None


def test_messages_round_trip_with_replay_metadata(tmp_path):
    store = Store(tmp_path / "c.db")
    cid = store.create_conversation(system_prompt="Be brief.")
    store.add_message(cid, "user", "  What is\n2+2?  ")
    params = {"temperature": 0.7, "top_p": 0.9, "stop": ["\n\n"], "seed": None}
    mid = store.add_message(
        cid, "assistant", "4", model="minigpt", backend="minigpt", checkpoint_hash="abc123", params=params,
        seed=1234, finish_reason="eos", tokens=2, tokens_per_s=10.5, meta={"param_changes": [[1, {"temperature": 0.2}]]},
    )
    info = store.get_conversation(cid)
    assert info.title == "What is 2+2?" and info.messages == 2 and info.system_prompt == "Be brief."
    user, reply = store.messages(cid)
    assert user.content == "  What is\n2+2?  "
    assert reply.id == mid and reply.params == params and reply.seed == 1234
    assert reply.checkpoint_hash == "abc123" and reply.meta["param_changes"][0][1]["temperature"] == 0.2
    store.update_message(mid, content="4.", status="stopped")
    assert store.messages(cid)[1].content == "4." and store.messages(cid)[1].status == "stopped"
    with pytest.raises(ValueError):
        store.update_message(mid, role="user")
    with pytest.raises(ValueError):
        store.add_message(cid, "assistant", "x", status="weird")


def test_list_is_newest_first_and_paged_by_keyset(tmp_path):
    store = Store(tmp_path / "c.db", now=Clock())
    ids = [store.create_conversation(f"c{i}") for i in range(25)]
    store.add_message(ids[3], "user", "bump")  # touching a conversation moves it to the top
    first = store.list_conversations(10)
    assert first[0].id == ids[3] and first[1].id == ids[24]
    seen = [c.id for c in first]
    last = first[-1]
    while True:
        page = store.list_conversations(10, before=(last.updated_at, last.id))
        if not page:
            break
        seen += [c.id for c in page]
        last = page[-1]
    assert sorted(seen) == sorted(ids) and len(seen) == len(set(seen))
    # the query uses the index, not a scan of every conversation
    plan = " ".join(
        str(row[-1]) for row in store._conn.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM conversations ORDER BY updated_at DESC, id DESC LIMIT 10"
        )
    )
    assert "conversations_by_update" in plan


def test_rename_delete_and_cascade(tmp_path):
    store = Store(tmp_path / "c.db")
    cid = store.create_conversation("old")
    store.add_message(cid, "user", "hi")
    store.rename_conversation(cid, "new\ntitle")
    assert store.get_conversation(cid).title == "new title"
    store.delete_conversation(cid)
    assert store.get_conversation(cid) is None
    assert store._conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 0


def tree(store):
    """A conversation with two answers to its question, the second continued, and an edited question:

    q1 ─┬─ a1
        └─ a2 ── q2 ── a3
    q1' ── a4
    """
    cid = store.create_conversation()
    q1 = store.add_message(cid, "user", "q1")
    a1 = store.add_message(cid, "assistant", "a1", parent=q1)
    a2 = store.add_message(cid, "assistant", "a2", parent=q1, seed=2, params={"temperature": 0.5})
    q2 = store.add_message(cid, "user", "q2", parent=a2)
    a3 = store.add_message(cid, "assistant", "a3", parent=q2, meta={"branch": [q1, a2, q2]})
    q1b = store.add_message(cid, "user", "q1'", parent=None)
    a4 = store.add_message(cid, "assistant", "a4", parent=q1b)
    return cid, dict(q1=q1, a1=a1, a2=a2, q2=q2, a3=a3, q1b=q1b, a4=a4)


def test_messages_form_a_tree_and_the_branch_on_screen_is_a_path(tmp_path):
    store = Store(tmp_path / "c.db")
    cid, m = tree(store)
    assert [x.content for x in store.branch(cid)] == ["q1'", "a4"]  # the newest message ends the branch
    assert [x.content for x in store.branch(cid, m["a3"])] == ["q1", "a2", "q2", "a3"]
    assert store.siblings(m["a2"]) == [m["a1"], m["a2"]] and store.siblings(m["q1"]) == [m["q1"], m["q1b"]]
    assert store.children(cid, None) == [m["q1"], m["q1b"]]
    assert store.newest_leaf(m["q1"]) == m["a3"]
    store.set_leaf(cid, m["a1"])
    assert [x.content for x in store.branch(cid)] == ["q1", "a1"]
    store.add_message(cid, "user", "after a1")  # no parent given: the end of the branch on screen
    assert [x.content for x in store.branch(cid)] == ["q1", "a1", "after a1"]
    info = store.get_conversation(cid)
    assert info.messages == 8 and info.branches == 3
    assert store.list_conversations()[0].branches == 3


def test_deleting_a_branch_removes_its_descendants_only(tmp_path):
    store = Store(tmp_path / "c.db")
    cid, m = tree(store)
    store.set_leaf(cid, m["a3"])
    assert store.delete_branch(m["a2"]) == 3  # a2, q2, a3
    left = {x.content for x in store.messages(cid)}
    assert left == {"q1", "a1", "q1'", "a4"}
    assert [x.content for x in store.branch(cid)] == ["q1", "a1"]  # the branch on screen went: its sibling shows
    assert store.get_conversation(cid).branches == 2
    assert store.delete_branch(m["a2"]) == 0


def test_json_export_carries_the_whole_tree_and_markdown_the_branch_on_screen(tmp_path):
    store = Store(tmp_path / "c.db")
    cid, m = tree(store)
    store.set_leaf(cid, m["a3"])
    data = json.loads(store.export_json(cid))
    rows = {r["id"]: r for r in data["messages"]}
    assert len(rows) == 7 and data["leaf"] == m["a3"]
    for key in ("id", "parent", "role", "content", "created", "model", "settings", "seed"):
        assert key in rows[m["a2"]]
    assert rows[m["a2"]]["settings"] == {"temperature": 0.5} and rows[m["a2"]]["seed"] == 2

    def path(leaf):  # the tree rebuilt from the export alone
        out = []
        while leaf is not None:
            out.append(rows[leaf]["content"])
            leaf = rows[leaf]["parent"]
        return out[::-1]

    for leaf in (m["a1"], m["a3"], m["a4"]):
        assert path(leaf) == [x.content for x in store.branch(cid, leaf)]
    assert rows[m["a3"]]["meta"]["branch"] == [m["q1"], m["a2"], m["q2"]]
    md = store.export_markdown(cid)
    assert "q2" in md and "a3" in md and "a1" not in md and "a4" not in md


def test_a_database_of_the_linear_schema_migrates_to_one_branch_per_conversation(tmp_path):
    path = tmp_path / "c.db"
    conn = sqlite3.connect(path)
    conn.executescript(VERSION_1_SCHEMA)  # as chat-tui wrote it before conversations were trees
    conn.execute("INSERT INTO conversations (id, title, created_at, updated_at) VALUES (1, 'a', 1, 1), "
                 "(2, 'b', 1, 1)")
    for i, (cid, role) in enumerate([(1, "user"), (2, "user"), (1, "assistant"), (2, "assistant"),
                                     (1, "user"), (1, "assistant")], start=1):
        conn.execute("INSERT INTO messages (id, conversation_id, role, content, created_at) VALUES (?, ?, ?, ?, 1)",
                     (i, cid, role, f"m{i}"))
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    store = Store(path)
    assert store.schema_version == SCHEMA_VERSION
    assert [(x.id, x.parent_id) for x in store.messages(1)] == [(1, None), (3, 1), (5, 3), (6, 5)]
    assert [(x.id, x.parent_id) for x in store.messages(2)] == [(2, None), (4, 2)]
    assert [x.content for x in store.branch(1)] == ["m1", "m3", "m5", "m6"]
    assert store.get_conversation(1).branches == 1 and store.get_conversation(2).branches == 1
    store.add_message(1, "user", "next")  # a linear conversation goes on where it ended
    assert store.branch(1)[-1].parent_id == 6


# the schema of version 1, as `git show main:chat_tui/store.py` has it
VERSION_1_SCHEMA = """
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
"""


def test_corrupt_file_is_moved_aside_with_a_timestamp(tmp_path):
    path = tmp_path / "c.db"
    path.write_bytes(b"garbage, not sqlite" * 50)
    store = Store(path, now=lambda: 1_700_000_000.0)
    moved, why = store.recovered
    assert moved.name.startswith("c.db.corrupt-2023") and moved.read_bytes().startswith(b"garbage")
    assert "not a database" in why
    assert store.create_conversation("fresh") == 1


def test_damaged_pages_are_detected(tmp_path):
    path = tmp_path / "c.db"
    store = Store(path)
    cid = store.create_conversation("x")
    store.add_messages(cid, [("user", "y" * 500)] * 50)
    store._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    data = bytearray(path.read_bytes())
    data[0:16] = b"definitely wrong"  # the header magic
    path.write_bytes(bytes(data))
    store = Store(path)
    assert store.recovered is not None and store.count_conversations() == 0


def test_migrations_from_an_older_version_and_refusal_of_a_newer_one(tmp_path):
    path = tmp_path / "c.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 0")
    conn.close()
    assert Store(path).schema_version == SCHEMA_VERSION
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        Store(path)


def test_two_connections_share_the_file(tmp_path):
    a = Store(tmp_path / "c.db")
    b = Store(tmp_path / "c.db")
    cid = a.create_conversation("shared")
    b.add_message(cid, "user", "from b")
    assert [m.content for m in a.messages(cid)] == ["from b"]


def test_export_markdown_and_json(tmp_path):
    store = Store(tmp_path / "c.db")
    cid = store.create_conversation("Export [me]", system_prompt="sys")
    store.add_message(cid, "user", "question")
    store.add_message(cid, "assistant", "answer", model="m", seed=5, params={"temperature": 0.5, "top_k": 40},
                      status="stopped", checkpoint_hash="0123456789abcdef")
    md = store.export_markdown(cid)
    assert "checkpoint 0123456789ab" in md and "T 0.5 top-k 40" in md  # the receipt
    assert md.startswith("# Export [me]") and "## You" in md and "answer" in md and "seed 5" in md and "stopped" in md
    data = json.loads(store.export_json(cid))
    assert data["system_prompt"] == "sys" and data["messages"][1]["settings"] == {"temperature": 0.5, "top_k": 40}
    with pytest.raises(StoreError):
        store.export_json(999)


def test_in_memory_store(tmp_path):
    store = Store(":memory:")
    cid = store.create_conversation("t")
    store.add_message(cid, "user", "hi")
    assert store.latest_conversation_id() == cid
