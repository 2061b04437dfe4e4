"""What a long session leaves behind stays bounded: counts after N replies, not timings
(benchmarks/bench_memory.py measures the RSS)."""

from __future__ import annotations

import asyncio
import gc
import threading

from textual._styles_cache import StylesCache
from textual.widget import Widget

from chat_tui.ui.conversation import MessageView
from tests.ui.conftest import ready


async def _reply(pilot, app, n: int) -> None:
    app.last_job = None
    app.prompt_input.load_text(f"prompt number {n}")
    app.prompt_input.action_submit()
    while app.last_job is None or not app.settled:
        await asyncio.sleep(0.005)


def _alive(kind: type) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, kind))


async def test_removed_messages_leave_nothing_behind(make_app):
    app, engine = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        app.conversation.page, app.conversation.max_mounted = 2, 4  # a small window: many removals soon
        counts = []
        floor = threading.active_count()
        for n in range(1, 31):
            await _reply(pilot, app, n)
            engine.records.clear()  # the fake engine's own test log
            if n in (6, 30):
                await pilot.pause(0.05)
                # the reply's thread can outlive its last message by a moment on a busy machine
                for _ in range(250):
                    if not app.workers and threading.active_count() <= floor:
                        break
                    await pilot.pause(0.02)
                # a thread of an earlier test that ended meanwhile lowers the floor for the next count
                floor = min(floor, threading.active_count())
                counts.append((_alive(StylesCache), _alive(Widget), _alive(MessageView),
                               threading.active_count(), len(app.workers)))
        (caches_6, widgets_6, views_6, threads_6, workers_6), (caches_30, widgets_30, views_30, threads_30,
                                                             workers_30) = counts
        assert len(app.conversation.items) == 60
        # no render cache outlives its widget, and removed messages do not pile up (the one removed
        # last may still be referenced by Textual until its next refresh)
        assert caches_30 <= widgets_30, (caches_30, widgets_30)
        assert views_30 <= len(list(app.conversation.query(MessageView))) + 1 <= 5
        # 24 more replies add nothing that lives on but the conversation's own records
        assert caches_30 <= caches_6 + 5, (caches_6, caches_30)
        assert widgets_30 <= widgets_6 + 5, (widgets_6, widgets_30)
        assert views_30 <= views_6
        assert threads_30 <= threads_6 and workers_30 <= workers_6 == 0


async def test_removed_messages_are_freed_when_the_reply_ends(make_app):
    """The app's tuned collector runs its full pass rarely (tune_runtime); removed messages are
    reference cycles, so they must be freed at the reply's end, not pile up until that pass."""
    app, engine = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        app.conversation.page, app.conversation.max_mounted = 2, 4
        gc.collect()
        gc.disable()  # the rarest collector: only what the app collects itself is freed
        try:
            for n in range(1, 13):
                await _reply(pilot, app, n)
            await pilot.pause(0.05)
            views = sum(1 for o in gc.get_objects() if isinstance(o, MessageView))
        finally:
            gc.enable()
        assert len(app.conversation.items) == 24
        assert views <= len(list(app.conversation.query(MessageView))) + 2, views
