"""The app's memory over a long session: RSS after 20, 100 and 240 replies in one conversation.

Each reply is a FakeEngine reply of about 80 tokens (lines, a list and a code block) sent through
the prompt as a user sends it, at 120x40. The model's own memory is not in the figure: `chat-tui`
runs the model in a process of its own, and the FakeEngine's record of each stream (for tests) is
dropped after every reply. The inspector is closed unless --inspector: its attention store is
capped per reply, and the FakeEngine's made-up prompt attention (a P x P array a reply, built in
this process) would swamp the figure. Target: the growth levels off: what a reply leaves behind
(mounted messages and their rendered lines, per-token records) is bounded.

"after trim" is the RSS once glibc has handed back the heap pages it keeps free; "Python blocks"
counts the interpreter's small objects and "pymalloc free" the free space inside its arenas (memory
the interpreter holds but does not use: fragmentation); "messages mounted" and "widgets" what the
screen holds, "render caches" the live Textual StylesCache objects (more than widgets means removed
widgets are kept alive). The verdict compares the growth a reply between the last two points
against LEVEL_KB: a conversation keeps its own messages (text and per-token records, about 15 KB a
reply), so a bounded app still grows by that much.

    PYTHONPATH=. python benchmarks/bench_memory.py [--replies 240] [--at 20 100 240] [--tokens 80]
                                                   [--inspector] [--engine-turns N]
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LEVEL_KB = 64  # growth a reply (between the last two points) under which the RSS has levelled off


def rss_mb() -> float:
    """Resident set size of this process in MB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def trimmed_rss_mb() -> float:
    """RSS after asking glibc to hand freed heap pages back (what is left is memory in use)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        return float("nan")
    return rss_mb()


def pymalloc_free_mb() -> float:
    """Free bytes inside pymalloc's arenas (sys._debugmallocstats writes them to the C stderr)."""
    read, write = os.pipe()
    saved = os.dup(2)
    try:
        os.dup2(write, 2)
        os.close(write)
        sys._debugmallocstats()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    with os.fdopen(read, "rb") as pipe:
        report = pipe.read().decode(errors="replace")
    for line in report.splitlines():
        if line.startswith("# bytes in available blocks"):
            return int(line.split("=")[1].replace(",", "")) / 1024 / 1024
    return float("nan")


def reply_text(tokens: int) -> str:
    from chat_tui.engine.fake import tokenize

    words = " ".join(f"word{i}" for i in range(tokens))
    text = (f"A reply with **bold** text.\nA second line.\n\n- one\n- two\n\n```python\nprint('hi')\n```\n\n{words}")
    while len(tokenize(text)) > tokens:
        text = text.rsplit(" ", 1)[0]
    return text


async def measure(replies: int, at: set[int], tokens: int, inspector: bool, engine_turns: int) -> list[dict]:
    from textual._styles_cache import StylesCache

    from chat_tui.config import get_paths
    from chat_tui.engine.fake import FakeEngine
    from chat_tui.engine.params import SamplingParams
    from chat_tui.ui.app import ChatApp
    from chat_tui.ui.conversation import MessageView

    engine = FakeEngine([reply_text(tokens)])
    if engine_turns:  # the FakeEngine's own work (and garbage) grows with the conversation: keep it flat
        stream = engine.stream
        engine.stream = lambda conversation, *args, **kwargs: stream(conversation[-engine_turns:], *args, **kwargs)
    app = ChatApp(engine_factory=lambda: engine, paths=get_paths(), new=True)
    app.tune_runtime = True  # as run_app does
    rows = []
    async with app.run_test(size=(120, 40)) as pilot:
        while app.engine is None:
            await pilot.pause(0.01)
        app.params = SamplingParams(max_new_tokens=tokens + 10, seed=1)
        app.params_touched = True
        if not inspector and app.query_one("#inspector").display:
            app.action_toggle_pane("inspector")
        for n in range(1, replies + 1):
            app.last_job = None
            app.prompt_input.load_text(f"prompt number {n}")
            app.prompt_input.action_submit()
            while app.last_job is None or not app.settled:
                await asyncio.sleep(0.002)
            engine.records.clear()  # the fake engine's own test log, not the app's
            if n in at:
                await pilot.pause(0.05)
                started = time.perf_counter()
                gc.collect()
                collect_ms = (time.perf_counter() - started) * 1000
                rows.append({
                    "collect_ms": collect_ms,
                    "replies": n,
                    "rss_mb": rss_mb(),
                    "trimmed_mb": trimmed_rss_mb(),
                    "blocks": sys.getallocatedblocks(),
                    "free_mb": pymalloc_free_mb(),
                    "caches": sum(1 for o in gc.get_objects() if isinstance(o, StylesCache)),
                    "mounted": len(list(app.conversation.query(MessageView))),
                    "widgets": sum(1 for _ in app.screen.walk_children()),
                })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replies", type=int, default=240)
    parser.add_argument("--at", type=int, nargs="*", default=[20, 100, 240])
    parser.add_argument("--tokens", type=int, default=80, help="tokens per reply")
    parser.add_argument("--inspector", action="store_true", help="keep the attention inspector open")
    parser.add_argument("--engine-turns", type=int, default=0,
                        help="give the FakeEngine only the newest N messages (0: all, as the app sends them)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        os.environ["CHAT_TUI_HOME"] = home
        rows = asyncio.run(measure(args.replies, set(args.at), args.tokens, args.inspector, args.engine_turns))
    pane = "open" if args.inspector else "closed"
    seen = f"the newest {args.engine_turns} messages" if args.engine_turns else "the whole conversation"
    print(f"memory of the app over one conversation ({args.tokens}-token replies, FakeEngine given {seen}, "
          f"120x40, inspector {pane})")
    print(f"{'replies':>8} {'RSS MB':>8} {'after trim':>11} {'Python blocks':>14} {'pymalloc free MB':>17} "
          f"{'messages mounted':>17} {'widgets':>8} {'render caches':>14} {'full gc ms':>11}")
    for row in rows:
        print(f"{row['replies']:>8} {row['rss_mb']:>8.1f} {row['trimmed_mb']:>11.1f} {row['blocks']:>14,} "
              f"{row['free_mb']:>17.1f} {row['mounted']:>17} {row['widgets']:>8} {row['caches']:>14} "
              f"{row['collect_ms']:>11.0f}")
    if len(rows) >= 2:
        first, before, last = rows[0], rows[-2], rows[-1]
        per = (last["rss_mb"] - first["rss_mb"]) / max(last["replies"] - first["replies"], 1) * 1024
        slope = (last["rss_mb"] - before["rss_mb"]) / max(last["replies"] - before["replies"], 1) * 1024
        print(f"growth from reply {first['replies']} to {last['replies']}: {per:.0f} KB a reply; "
              f"from {before['replies']} to {last['replies']}: {slope:.0f} KB a reply")
        verdict = "levels off" if slope < LEVEL_KB else "still growing"
        print(f"verdict: {verdict} (under {LEVEL_KB} KB a reply between the last two points is level)")


if __name__ == "__main__":
    main()
