"""Shared helpers for the Pilot tests: an isolated CHAT_TUI_HOME and a FakeEngine-backed app."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from chat_tui.config import get_paths
from chat_tui.engine.fake import FakeEngine
from chat_tui.engine.params import SamplingParams
from chat_tui.ui.app import ChatApp

CODE_REPLY = (
    "Here is a function:\n\n```python\ndef add(a, b):\n    return a + b\n```\n\nIt adds **two** numbers."
)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CHAT_TUI_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def make_app(home) -> Callable[..., tuple[ChatApp, FakeEngine]]:
    def make(replies=(CODE_REPLY,), *, engine: FakeEngine | None = None, **kwargs):
        if engine is None:
            engine = FakeEngine(
                list(replies) if not isinstance(replies, str) else [replies],
                defaults=SamplingParams(temperature=0.8, top_p=0.95, seed=7),
                **{k: kwargs.pop(k) for k in list(kwargs) if k in ("token_delay", "fail_at", "context_length")},
            )
        app = ChatApp(engine_factory=lambda: engine, paths=get_paths(), **kwargs)
        return app, engine

    return make


async def wait_for(pilot, condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.02)


async def press_now(pilot, *keys: str) -> None:
    """Press keys without Pilot's wait-for-idle (which waits out a streaming reply)."""
    from textual import events
    from textual.keys import _character_to_key

    app = pilot.app
    for key in keys:
        char = key if len(key) == 1 else None
        if char is not None and not char.isalnum():
            key = _character_to_key(char)
        event = events.Key(key, char)
        event.set_sender(app)
        app._driver.send_message(event)
        await asyncio.sleep(0.005)


async def ready(pilot, app: ChatApp) -> None:
    await wait_for(pilot, lambda: app.engine is not None and app.conversation.is_mounted, what="the engine")


async def inspector_ready(pilot, app: ChatApp) -> None:
    """The inspector is mounted after the first frame: wait for it."""
    await wait_for(pilot, lambda: app._inspector_pane() is not None, what="the inspector")


async def send(pilot, app: ChatApp, text: str, *, wait: bool = True) -> None:
    before = len(app.conversation.items)
    app.prompt_input.focus()
    app.prompt_input.load_text(text)
    # Enter goes to the focused widget: after a resize or a dialog the focus can take a moment to land
    await wait_for(pilot, lambda: app.focused is app.prompt_input, what="the prompt to take the focus")
    if not wait:
        await press_now(pilot, "enter")
        await wait_for(pilot, lambda: app.job is not None, what="the reply to start")
        return
    await pilot.press("enter")
    if wait:
        await wait_for(
            pilot,
            lambda: len(app.conversation.items) >= before + 2 and app.job is None and app.settled,
            what="the reply",
        )
        await pilot.pause()
