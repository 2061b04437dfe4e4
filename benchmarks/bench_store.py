"""The conversation store as a tree: what the branches cost.

    python benchmarks/bench_store.py [--conversations 200] [--messages 500]

Builds a database of the linear schema (version 1) with N conversations of M messages, then times
the migration to the tree schema, a page of the conversation list (with each conversation's branch
count) and loading the branch on screen, against reading the conversation's messages in id order
(what opening a conversation read before conversations were trees). Best of --runs.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path

from chat_tui.store import MIGRATIONS, Store, _statements


def linear_database(path: Path, conversations: int, messages: int) -> None:
    conn = sqlite3.connect(path)
    for statement in _statements(MIGRATIONS[0]):
        conn.execute(statement)
    conn.executemany("INSERT INTO conversations (id, title, created_at, updated_at) VALUES (?, 't', 1, ?)",
                     [(c, c) for c in range(1, conversations + 1)])
    conn.executemany(
        "INSERT INTO messages (conversation_id, role, content, created_at) VALUES (?, ?, ?, 1)",
        ((c, "user" if i % 2 == 0 else "assistant", "x" * 300)
         for i in range(messages) for c in range(1, conversations + 1)),
    )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()


def best(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "conversations.db"
        linear_database(path, args.conversations, args.messages)
        start = time.perf_counter()
        store = Store(path)
        migrated = time.perf_counter() - start
        total = args.conversations * args.messages
        cid = args.conversations // 2
        print(f"migrate {total:,} messages to the tree schema: {migrated:.2f} s")
        print(f"a page of 50 conversations, with branch counts: {best(lambda: store.list_conversations(50), args.runs) * 1e3:.1f} ms")
        print(f"the branch on screen ({args.messages} messages): {best(lambda: store.branch(cid), args.runs) * 1e3:.1f} ms")
        print(f"  its tree's shape (siblings of each): {best(lambda: store.tree(cid), args.runs) * 1e3:.1f} ms")
        print(f"  reference, the messages in id order: {best(lambda: store.messages(cid), args.runs) * 1e3:.1f} ms")
        store.close()


if __name__ == "__main__":
    main()
