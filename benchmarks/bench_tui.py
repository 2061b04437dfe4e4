"""How the Textual UI performs, three ways.

1. First frame: wall time from process start to the first frame on a real pseudo-terminal, for
   `chat-tui --new` (the command's own entry point, with the real model loader) and for a bare
   Textual app showing one Static.
   Target: app / bare <= 1.5.
2. Tokens per second that reach the screen in the app, against the same engine headless
   (iterating `Engine.stream` with nothing else, on the same conversation and with the same
   attention flag as the app's measured reply: its second, with the inspector open as the app
   opens at 120x40). Target: app / headless >= 0.9. The app runs the bundled model as `chat-tui`
   does, in a process of its own (ProcessEngine); the headless runs load it in this process.
3. Responsiveness: a 1,000-message conversation is open and a reply streams; keys are pressed and
   the time until each is handled is measured. Target: every key under 100 ms.
4. Compare: two columns (the chat's settings and the "creative" preset) stream at once on one model; the
   tokens per second on screen, both columns together, against the same two replies made one after the
   other headless (twice one column). Target: ratio >= 0.9. Then keys are typed into a column's settings
   line while both columns stream. Target: every key under 100 ms.

    python benchmarks/bench_tui.py [--runs 5] [--tokens 400] [--delay 0.002] [--engine fake|bundled]
                                   [--skip frame tokens keys compare]

`--engine fake` (default) uses the deterministic FakeEngine with a per-token delay that stands in
for a model; `--engine bundled` streams from the bundled mini-GPT for parts 2 and 3.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import pty
import re
import select
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BARE_APP = """
from textual.app import App
from textual.widgets import Static

class Bare(App):
    def compose(self):
        yield Static("FIRST-FRAME-MARKER")

Bare().run()
"""

CHAT_APP = """
import sys
from chat_tui.cli import main  # what the chat-tui command runs
sys.exit(main(["--new"]))
"""
CHAT_MARKER = "Sampling"  # the title of the sampling pane, painted in the first frame

ANSI = re.compile(r"\x1b\[[0-9;?<>=$]*[A-Za-z]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()][A-Za-z0-9]|\x1b[=>78]")


def first_frame_seconds(code: str, marker: str, home: str, size=(120, 40), timeout: float = 60.0) -> float:
    """Spawn `python -c code` on a pty and time until `marker` is painted."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", size[1], size[0], 0, 0))
    env = dict(os.environ, TERM="xterm-256color", COLORTERM="truecolor", CHAT_TUI_HOME=home,
               PYTHONPATH=str(ROOT), COLUMNS=str(size[0]), LINES=str(size[1]))
    env.pop("TEXTUAL", None)
    # byte-code as an installed package has it (pip compiles it): the warm-up run writes the cache
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=slave, stdout=slave, stderr=slave,
                            env=env, start_new_session=True, close_fds=True)
    os.close(slave)
    seen = ""
    try:
        while True:
            remaining = timeout - (time.perf_counter() - start)
            if remaining <= 0:
                raise TimeoutError(f"no first frame within {timeout}s: {ANSI.sub('', seen)[-500:]!r}")
            ready, _, _ = select.select([master], [], [], remaining)
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536).decode("utf-8", "replace")
            except OSError:
                raise RuntimeError(f"the app exited before painting: {ANSI.sub('', seen)[-800:]!r}") from None
            seen += chunk
            if marker in ANSI.sub("", seen):
                return time.perf_counter() - start
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        os.close(master)


def bench_first_frame(runs: int) -> dict[str, float]:
    bare, app = [], []
    with tempfile.TemporaryDirectory() as home:
        first_frame_seconds(BARE_APP, "FIRST-FRAME-MARKER", home)  # warm the file cache for both
        first_frame_seconds(CHAT_APP, CHAT_MARKER, home)
        for _ in range(runs):  # interleaved, so background load hits both alike
            bare.append(first_frame_seconds(BARE_APP, "FIRST-FRAME-MARKER", home))
            app.append(first_frame_seconds(CHAT_APP, CHAT_MARKER, home))
    b, a = statistics.median(bare), statistics.median(app)
    # each pair ran back to back, so it saw the same machine: the median of the pairs' ratios is the
    # figure (this machine's speed drifts by a third within minutes, which a ratio of medians mixes in)
    return {"bare_s": b, "app_s": a, "ratio": statistics.median(x / y for x, y in zip(app, bare, strict=True))}


def long_replies(engine) -> None:
    """The bundled model ends most replies within a few tokens: end-of-text off, to measure long ones.
    Also runs in the model's process (ProcessEngine's setup), which imports it from this module by name."""
    engine.eos_ids = set()


def make_engine(kind: str, reply_tokens: int, delay: float):
    """The engine as the headless runs (and, for the fake engine, the app) use it, in this process."""
    if kind == "bundled":
        from chat_tui.engine import load_engine

        engine = load_engine(None, device="cpu")
        long_replies(engine)
        return engine
    from chat_tui.engine.fake import FakeEngine, tokenize

    # paragraphs of ~60 tokens and a code block, like a real reply
    words = [f"word{i}" for i in range(reply_tokens)]
    paragraphs = [" ".join(words[i : i + 60]) for i in range(0, len(words), 60)]
    text = "\n\n".join(paragraphs[:2] + ["```python\nprint('hello')\n```"] + paragraphs[2:])
    while len(tokenize(text)) > reply_tokens:
        text = text.rsplit(" ", 1)[0]
    return FakeEngine([text], token_delay=delay)


def app_engine_factory(kind: str, reply_tokens: int, delay: float):
    """How the app gets its engine: the bundled model as `chat-tui` runs it, in a process of its own
    (ProcessEngine, what run_app does); the fake engine in the app's process, as tests use it."""
    if kind == "bundled":
        import importlib

        from chat_tui.engine.process import ProcessEngine

        setup = importlib.import_module("bench_tui").long_replies  # by module name: the child imports it
        return lambda: ProcessEngine.start(None, device="cpu", setup=setup)
    engine = make_engine(kind, reply_tokens, delay)
    return lambda: engine


def bench_params(kind: str, tokens: int):
    from chat_tui.engine.params import SamplingParams

    if kind == "bundled":  # greedy, and long_replies turns end-of-text off: every reply makes all its tokens
        return SamplingParams(temperature=0.0, max_new_tokens=tokens, seed=1)
    return SamplingParams(max_new_tokens=tokens + 10, seed=1)


PROMPT = "Tell me a long story about a lighthouse keeper."


def headless_rate(engine, params, conversation, inspect: bool) -> tuple[int, float]:
    """The same request the app made (its conversation, its attention flag), with nothing else running."""
    start = time.perf_counter()
    count = 0
    for _ in engine.stream(conversation, params, inspect=inspect):
        count += 1
    return count, count / (time.perf_counter() - start)


async def key_latency(app, char: str, shown: Callable[[], str]) -> float:
    """Seconds from a key reaching the app (as the terminal driver delivers it) until `shown()` changes."""
    from textual import events

    before = shown()
    event = events.Key(char, char)
    event.set_sender(app)
    start = time.perf_counter()
    app._driver.send_message(event)
    while shown() == before:
        await asyncio.sleep(0.0005)
    return time.perf_counter() - start


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux /proc), or None where that cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured_app(**kwargs):
    """The chat app, counting what reaches the screen: the tokens handed to the conversation view and,
    per reply, when it last got some (counters for the benchmark, not fields of the app)."""
    from chat_tui.ui.app import ChatApp

    class MeasuredApp(ChatApp):
        def __init__(self) -> None:
            super().__init__(**kwargs)
            self.tokens_on_screen = 0
            self.shown_at: dict[int, float] = {}  # job id -> when its view last got new tokens

        def reply_text(self, job, text, probs) -> None:
            super().reply_text(job, text, probs)
            self.tokens_on_screen += len(probs)
            self.shown_at[job.id] = time.perf_counter()

    return MeasuredApp()


async def app_rate(factory, params, home: str) -> dict:
    from chat_tui.config import get_paths

    os.environ["CHAT_TUI_HOME"] = home
    app = measured_app(engine_factory=factory, paths=get_paths(), new=True)
    app.tune_runtime = True  # as run_app does
    async with app.run_test(size=(120, 40)) as pilot:
        while app.engine is None:
            await pilot.pause(0.01)
        app.params = params
        app.params_touched = True
        pid = getattr(app.engine, "pid", None)  # a model in its own process
        # warm up once (lazy imports such as the code highlighter), then measure a second reply
        for _ in range(2):
            app.last_job = None
            model_cpu = process_cpu_seconds(pid) if pid else None
            ui_cpu, wall = time.thread_time(), time.perf_counter()  # this thread runs the app's event loop
            app.prompt_input.load_text(PROMPT)
            app.prompt_input.action_submit()
            while app.last_job is None:
                await asyncio.sleep(0.005)
            job = app.last_job
            ui_cpu, wall = time.thread_time() - ui_cpu, time.perf_counter() - wall
            if model_cpu is not None:
                end = process_cpu_seconds(pid)
                model_cpu = end - model_cpu if end is not None else None
            while not app.settled:
                await asyncio.sleep(0.005)
        engine = app.engine
    if pid:  # the app told its model's process to go: wait until it has, before the headless run
        engine.close()
    return {"count": job.count, "rate": job.count / (app.shown_at[job.id] - job.created), "shown": job.shown_count,
                "conversation": list(job.conversation), "inspect": app.inspect_attention,
                "ui_share": ui_cpu / wall, "model_ms": 1000 * model_cpu / job.count if model_cpu else None,
                "model_share": model_cpu / wall if model_cpu else None}


class CPUAccount:
    """Wraps `engine.stream` to note, per reply, (tokens, CPU seconds of the generating thread, wall
    seconds), in the list named by `into` at the time the reply starts."""

    def __init__(self, engine) -> None:
        self.rows: dict[str, list[tuple[int, float, float]]] = {"app": [], "headless": []}
        self.into = "app"
        stream = engine.stream

        def accounted(*args, **kwargs):
            rows = self.rows[self.into]
            cpu, wall, count = time.thread_time(), time.perf_counter(), 0
            try:
                for step in stream(*args, **kwargs):
                    count += 1
                    yield step
            finally:  # the app stops iterating at the last step
                rows.append((count, time.thread_time() - cpu, time.perf_counter() - wall))

        engine.stream = accounted


def per_token(rows: list[tuple[int, float, float]]) -> tuple[float, float]:
    """Median CPU milliseconds a token, and median share of the wall time the thread ran."""
    rows = [r for r in rows if r[0] and r[2] > 0]
    return statistics.median(1000 * c / n for n, c, _ in rows), statistics.median(c / w for _, c, w in rows)


def bench_throughput(kind: str, tokens: int, delay: float, runs: int) -> dict:
    from chat_tui.ui.app import tune_runtime

    tune_runtime()  # what run_app does, for the headless runs too, so both see the same interpreter
    headless, shown, ui_shares, model_rows = [], [], [], []
    accounts: list[CPUAccount] = []
    engine = None
    with tempfile.TemporaryDirectory() as home:
        for _ in range(runs):
            params = bench_params(kind, tokens)
            factory = app_engine_factory(kind, tokens, delay)
            if kind == "fake":  # the app's engine is in this process: account for its generating thread
                app_engine = factory()
                account = CPUAccount(app_engine)
                accounts.append(account)
                factory = lambda engine=app_engine: engine  # noqa: E731
            r = asyncio.run(app_rate(factory, params, home))
            assert r["shown"] == r["count"], f"{r['shown']} of {r['count']} tokens reached the screen"
            ui_shares.append(r["ui_share"])
            if r["model_ms"] is not None:
                model_rows.append((r["model_ms"], r["model_share"]))
            if engine is None or kind == "fake":  # a fresh fake engine replays the same script
                engine = make_engine(kind, tokens, delay)
            account = CPUAccount(engine)
            accounts.append(account)
            account.into = "headless"
            count_h, rate_h = headless_rate(engine, params, r["conversation"], r["inspect"])
            assert count_h == r["count"], f"headless made {count_h} tokens, the app {r['count']}"
            headless.append(rate_h)
            shown.append(r["rate"])
    h, a = statistics.median(headless), statistics.median(shown)
    ratio = statistics.median(x / y for x, y in zip(shown, headless, strict=True))  # pairs, as for the first frame
    measured = [acc.rows["app"][-1] for acc in accounts if acc.rows["app"]]  # each run's second, measured reply
    return {"tokens": r["count"], "headless_tok_s": h, "app_tok_s": a, "ratio": ratio, "inspect": r["inspect"],
            "prompt_messages": len(r["conversation"]), "ui_share": statistics.median(ui_shares),
            "cpu_app": per_token(measured) if measured else None,
            "cpu_model_process": (statistics.median(m for m, _ in model_rows),
                                  statistics.median(s for _, s in model_rows)) if model_rows else None,
            "cpu_headless": per_token([r for acc in accounts for r in acc.rows["headless"]])}


async def responsiveness(kind: str, delay: float, samples: int, home: str) -> dict[str, float]:

    from chat_tui.config import get_paths
    from chat_tui.store import Store

    os.environ["CHAT_TUI_HOME"] = home
    paths = get_paths()
    store = Store(paths.database)
    cid = store.create_conversation("a long conversation")
    paragraph = "Some **markdown** with `code` and a list:\n\n- one\n- two\n\n```python\nprint('x')\n```"
    store.add_messages(cid, [("user", f"question {i}") if i % 2 == 0 else ("assistant", paragraph)
                             for i in range(1000)])
    store.close()
    app = measured_app(engine_factory=app_engine_factory(kind, 4000, delay), paths=paths, conversation_id=cid)
    app.tune_runtime = True  # as run_app does
    latencies: list[float] = []
    async with app.run_test(size=(120, 40)) as pilot:
        while app.engine is None or len(app.conversation.items) < 1000:
            await pilot.pause(0.01)
        app.params = bench_params(kind, 4000)
        app.params_touched = True
        prompt = app.prompt_input
        replies = 0

        async def ask() -> None:  # a reply, streaming, and the focus back in the prompt
            nonlocal replies
            replies += 1
            prompt.load_text("keep going")
            prompt.action_submit()
            while app.job is None or app.job.count < 20:
                await asyncio.sleep(0.01)
            prompt.focus()
            await asyncio.sleep(0.05)

        await ask()
        for i in range(samples):
            if app.job is None:  # that reply ended (at the context's end): keys count only while one streams
                await ask()
            latencies.append(await key_latency(app, "abcdefghij"[i % 10], lambda: prompt.text))
            await asyncio.sleep(0.03)
        streamed = app.tokens_on_screen
        if app.job is not None:
            app.job.cancel.set()
    return {
        "samples": len(latencies),
        "median_ms": statistics.median(latencies) * 1000,
        "p95_ms": sorted(latencies)[int(0.95 * (len(latencies) - 1))] * 1000,
        "max_ms": max(latencies) * 1000,
        "tokens_streamed_meanwhile": streamed,
        "replies": replies,
    }


async def compare_screen(kind: str, tokens: int, delay: float, samples: int, runs: int, home: str) -> dict:
    """Two columns on the compare screen: their tokens per second on screen, then key latency meanwhile."""

    from chat_tui.config import get_paths
    from chat_tui.ui.compare import CompareScreen

    os.environ["CHAT_TUI_HOME"] = home
    app = measured_app(engine_factory=app_engine_factory(kind, tokens, delay), paths=get_paths(), new=True)
    app.tune_runtime = True  # as run_app does
    rates, latencies = [], []
    async with app.run_test(size=(120, 40)) as pilot:
        while app.engine is None:
            await pilot.pause(0.01)
        app.params_touched = True

        async def open_screen(max_tokens: int) -> CompareScreen:
            app.params = bench_params(kind, max_tokens)
            app.prompt_input.load_text(PROMPT)
            app.action_compare()
            while not isinstance(app.screen, CompareScreen) or len(app.screen.runs) < 2:
                await asyncio.sleep(0.002)
            return app.screen

        async def close(screen: CompareScreen) -> None:
            screen.dismiss()
            while isinstance(app.screen, CompareScreen):
                await asyncio.sleep(0.005)

        for run in range(runs + 1):  # the first one warms up
            start = time.perf_counter()
            screen = await open_screen(tokens)
            while screen.streaming or not all(r.steps for r in screen.runs):
                await asyncio.sleep(0.002)
            wall = time.perf_counter() - start
            shown = sum(len(r.widget.steps) for r in screen.runs)
            columns = [(list(screen.conversation), r.params, len(r.steps)) for r in screen.runs]
            if run:
                rates.append((shown, wall, columns))
            await close(screen)

        screen = await open_screen(4000)  # long replies: both columns stream while the keys are typed
        await pilot.pause(0.2)
        screen.runs[0].widget.query_one(".column-settings").focus()
        field = screen.runs[0].widget.query_one(".column-settings")
        for i in range(samples):
            if not all(r.job is not None and not r.job.done and r.steps for r in screen.runs):
                break  # keys count only while both columns stream
            latencies.append(await key_latency(app, "abcdefghij"[i % 10], lambda: field.value))
            await asyncio.sleep(0.03)
        streamed = [len(r.steps) for r in screen.runs]
        await close(screen)
        engine = app.engine
    if getattr(engine, "pid", None):
        engine.close()
    return {"runs": rates, "latencies": latencies, "streamed_meanwhile": streamed}


def bench_compare(kind: str, tokens: int, delay: float, samples: int, runs: int) -> dict:
    with tempfile.TemporaryDirectory() as home:
        r = asyncio.run(compare_screen(kind, tokens, delay, samples, runs, home))
    engine = make_engine(kind, tokens, delay)
    ratios, screen_rates, headless_rates = [], [], []
    for shown, wall, columns in r["runs"]:
        count, seconds = 0, 0.0
        for conversation, params, made in columns:  # the same replies, one after the other, headless
            start = time.perf_counter()
            n = sum(1 for _ in engine.stream(conversation, params))
            seconds += time.perf_counter() - start
            assert n == made, f"headless made {n} tokens, the column {made}"
            count += n
        screen_rates.append(shown / wall)
        headless_rates.append(count / seconds)
        ratios.append(screen_rates[-1] / headless_rates[-1])
    latencies = r["latencies"]
    return {"tokens": shown, "screen_tok_s": statistics.median(screen_rates),
            "headless_tok_s": statistics.median(headless_rates), "ratio": statistics.median(ratios),
            "samples": len(latencies), "median_ms": statistics.median(latencies) * 1000,
            "p95_ms": sorted(latencies)[int(0.95 * (len(latencies) - 1))] * 1000, "max_ms": max(latencies) * 1000,
            "streamed_meanwhile": r["streamed_meanwhile"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--delay", type=float, default=0.002, help="FakeEngine seconds per token")
    parser.add_argument("--engine", choices=("fake", "bundled"), default="fake")
    parser.add_argument("--keys", type=int, default=40, help="key presses for the responsiveness test")
    parser.add_argument("--skip", nargs="*", default=(), choices=("frame", "tokens", "keys", "compare"))
    args = parser.parse_args()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {os.cpu_count()} CPUs, load average {load} (figures need a quiet machine)")

    if "frame" not in args.skip:
        r = bench_first_frame(args.runs)
        print(f"first frame: bare Textual {r['bare_s'] * 1000:.0f} ms, chat-tui {r['app_s'] * 1000:.0f} ms (medians), "
              f"ratio {r['ratio']:.2f}x (median of {args.runs} back-to-back pairs; target <= 1.5x)  [120x40 pty]")
    if "tokens" not in args.skip:
        r = bench_throughput(args.engine, args.tokens, args.delay, max(1, args.runs // 2))
        print(f"tokens/s to screen ({args.engine}, {r['tokens']} tokens, a {r['prompt_messages']}-message conversation, "
              f"attention {'captured' if r['inspect'] else 'off'} in both): headless {r['headless_tok_s']:.0f}, "
              f"app {r['app_tok_s']:.0f} (medians), ratio {r['ratio']:.2f} (median of the pairs' ratios; target >= 0.9)")
        head_ms, head_share = r["cpu_headless"]
        if r["cpu_app"] is not None:
            app_ms, app_share = r["cpu_app"]
            print(f"  the generating thread: {app_ms:.2f} ms of CPU a token, running {app_share:.0%} of the time in "
                  f"the app; {head_ms:.2f} ms, {head_share:.0%} headless (the rest it waits: for the interpreter "
                  f"lock, or in the FakeEngine's sleep)")
        if r["cpu_model_process"] is not None:
            model_ms, model_share = r["cpu_model_process"]
            print(f"  the model's process: {model_ms:.2f} ms of CPU a token, busy {model_share:.0%} of the reply; "
                  f"headless {head_ms:.2f} ms, {head_share:.0%}")
        print(f"  the app's UI thread used {r['ui_share']:.0%} of a core while the reply streamed")
    if "keys" not in args.skip:
        with tempfile.TemporaryDirectory() as home:
            r = asyncio.run(responsiveness(args.engine, args.delay, args.keys, home))
        print(f"key latency while streaming with 1,000 messages open: median {r['median_ms']:.1f} ms, "
              f"p95 {r['p95_ms']:.1f} ms, max {r['max_ms']:.1f} ms over {r['samples']} keys "
              f"({r['tokens_streamed_meanwhile']} tokens streamed in {r['replies']} replies) (target < 100 ms)")
    if "compare" not in args.skip:
        r = bench_compare(args.engine, args.tokens, args.delay, args.keys, max(1, args.runs // 2))
        print(f"compare, two columns on one model ({args.engine}, {r['tokens']} tokens in all): "
              f"{r['screen_tok_s']:.0f} tokens/s on screen, the same two replies one after the other headless "
              f"{r['headless_tok_s']:.0f} (medians), ratio {r['ratio']:.2f} (target >= 0.9)")
        print(f"  key latency while both columns stream: median {r['median_ms']:.1f} ms, p95 {r['p95_ms']:.1f} ms, "
              f"max {r['max_ms']:.1f} ms over {r['samples']} keys ({r['streamed_meanwhile']} tokens per column "
              f"meanwhile) (target < 100 ms)")


if __name__ == "__main__":
    main()
