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


def test_delete_messages_from(tmp_path):
    store = Store(tmp_path / "c.db")
    cid = store.create_conversation()
    a = store.add_message(cid, "user", "a")
    b = store.add_message(cid, "assistant", "b")
    store.add_message(cid, "user", "c")
    assert store.delete_messages_from(cid, b) == 2
    assert [m.id for m in store.messages(cid)] == [a]


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
    assert data["system_prompt"] == "sys" and data["messages"][1]["params"] == {"temperature": 0.5, "top_k": 40}
    with pytest.raises(StoreError):
        store.export_json(999)


def test_in_memory_store(tmp_path):
    store = Store(":memory:")
    cid = store.create_conversation("t")
    store.add_message(cid, "user", "hi")
    assert store.latest_conversation_id() == cid
