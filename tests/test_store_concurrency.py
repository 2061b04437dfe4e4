"""Two chat-tui windows on one data folder, and a process killed while it saves: nothing is lost."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from chat_tui.store import MIGRATIONS, SCHEMA_VERSION, Store, _statements

ROOT = Path(__file__).resolve().parent.parent

WRITER = textwrap.dedent(
    """
    import sys, time
    from chat_tui.store import Store

    path, name, count, start_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    while time.time() < start_at:  # every writer opens the (fresh) database at the same moment
        time.sleep(0.001)
    store = Store(path)
    cid = store.create_conversation(f"{name}'s own")
    shared = int(sys.argv[5]) if len(sys.argv) > 5 else None
    for i in range(count):
        store.add_message(cid, "user", f"{name} {i}")
        if shared is not None:
            store.add_message(shared, "assistant", f"{name} says {i}", meta={"i": i})
        print(i, flush=True)
    """
)


def run_writers(path: Path, names: list[str], count: int, shared: int | None = None) -> list[str]:
    start_at = time.time() + 1.0
    args = [str(count), str(start_at)] + ([str(shared)] if shared is not None else [])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), name, *args], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name in names
    ]
    errors = []
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        if proc.returncode != 0:
            errors.append(err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}")
    return errors


def test_many_windows_opening_a_fresh_database_at_once_all_save(tmp_path):
    path = tmp_path / "data" / "conversations.db"
    names = [f"window{i}" for i in range(6)]
    assert run_writers(path, names, 5) == []
    store = Store(path)
    titles = sorted(c.title for c in store.list_conversations())
    assert titles == sorted(f"{name}'s own" for name in names)
    for conversation in store.list_conversations():
        assert len(store.messages(conversation.id)) == 5


def test_a_window_that_waited_for_another_to_create_the_database_uses_it(tmp_path):
    """The race above made deterministic: this window reads "no schema yet", then waits for the
    write lock while another window creates the tables."""
    path = tmp_path / "conversations.db"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("PRAGMA journal_mode = WAL")
    other.execute("BEGIN IMMEDIATE")  # the other window is creating the schema
    opened: list[Store | BaseException] = []

    def open_store() -> None:
        try:
            opened.append(Store(path))
        except BaseException as exc:
            opened.append(exc)

    thread = threading.Thread(target=open_store)
    thread.start()
    time.sleep(0.5)  # this window has read user_version 0 and waits on the lock (busy timeout 5 s)
    for migration in MIGRATIONS:
        for statement in _statements(migration):
            other.execute(statement)
    other.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    other.execute("COMMIT")
    thread.join(10)
    (store,) = opened
    assert isinstance(store, Store), store
    cid = store.create_conversation("works")
    assert store.get_conversation(cid).title == "works"


def test_two_windows_writing_one_conversation_interleaved_lose_nothing(tmp_path):
    path = tmp_path / "conversations.db"
    store = Store(path)
    shared = store.create_conversation("shared")
    assert run_writers(path, ["left", "right"], 40, shared) == []
    saved = store.messages(shared)
    for name in ("left", "right"):
        mine = [m.content for m in saved if m.content.startswith(f"{name} says")]
        assert mine == [f"{name} says {i}" for i in range(40)], "every message, in its window's order"
    assert len(saved) == 80
    assert store.schema_version >= 1


def test_a_process_killed_while_saving_leaves_every_committed_message(tmp_path):
    path = tmp_path / "conversations.db"
    store = Store(path)
    cid = store.create_conversation("killed")
    store.close()
    writer = textwrap.dedent(
        f"""
        import sys
        from chat_tui.store import Store
        store = Store({str(path)!r})
        big = "x" * 200_000  # long writes, so the kill lands inside one
        i = 0
        while True:
            mid = store.add_message({cid}, "assistant", f"{{i}} " + big[: 1000 + (i * 7919) % 199000])
            print(i, mid, flush=True)
            i += 1
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", writer], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdout=subprocess.PIPE, text=True)
    committed: dict[int, int] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        i, mid = map(int, line.split())
        committed[mid] = i
        if len(committed) >= 40:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    check.close()
    store = Store(path)
    assert store.recovered is None
    saved = {m.id: m for m in store.messages(cid)}
    for mid, i in committed.items():
        assert saved[mid].content.startswith(f"{i} x"), f"message {i} survived the kill"
    store.add_message(cid, "user", "after the kill")  # and the file takes new writes
    assert store.messages(cid)[-1].content == "after the kill"
