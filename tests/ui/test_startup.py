"""Start-up: the first frame before torch, and one end-to-end run on the bundled model."""

from __future__ import annotations

import ast
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chat_tui.config import get_paths
from chat_tui.engine import bundled_model_path
from chat_tui.engine.types import CheckpointError
from chat_tui.ui.app import ChatApp

from .conftest import send, wait_for

ROOT = Path(__file__).resolve().parents[2]

FIRST_FRAME_PROBE = """
import asyncio, sys
import chat_tui.engine as engine_pkg
from chat_tui.ui.app import ChatApp

seen = {"torch_at_import": "torch" in sys.modules}

def probe_load_engine(model, **kwargs):
    seen["torch_when_loading_starts"] = "torch" in sys.modules
    seen["first_frame_before_loading"] = app.first_frame_at is not None
    raise engine_pkg.EngineError("probe: not loading a model")

engine_pkg.load_engine = probe_load_engine
app = ChatApp()

async def main():
    async with app.run_test() as pilot:
        for _ in range(500):
            await pilot.pause(0.01)
            if "first_frame_before_loading" in seen:
                break
        seen["still_running"] = app.is_running

asyncio.run(main())
print(repr(seen))
"""


def test_first_frame_paints_before_the_model_and_torch_load(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", FIRST_FRAME_PROBE],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={"CHAT_TUI_HOME": str(tmp_path), "PATH": "", "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    seen = ast.literal_eval(result.stdout.strip().splitlines()[-1])
    assert seen == {
        "torch_at_import": False,
        "torch_when_loading_starts": False,
        "first_frame_before_loading": True,
        "still_running": True,
    }


def _bundled() -> Path | None:
    try:
        return bundled_model_path()
    except CheckpointError:
        return None


@pytest.mark.skipif(_bundled() is None, reason="the bundled model (assets/minigpt) is not there yet")
@pytest.mark.parametrize("model_process", [True, False], ids=["model-in-a-process", "model-in-the-app"])
async def test_end_to_end_with_the_bundled_model(home, model_process):
    app = ChatApp(paths=get_paths(), device="cpu", model_process=model_process)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: app.engine is not None or app.state == "no model", timeout=180,
                       what="the bundled model to load")
        assert app.engine is not None, app.load_note
        app.params = app.params.with_(max_new_tokens=24, seed=1)
        app.params_touched = True
        await send(pilot, app, "Hello! How are you?")
        reply = app.conversation.items[-1]
        assert reply.role == "assistant" and reply.status == "complete" and reply.tokens
        assert reply.seed == 1 and reply.meta["checkpoint_hash"] == app.engine.checkpoint_hash
        assert app.engine.backend in str(app.query_one("#status").render())
        pid = getattr(app.engine, "pid", None)
        assert (pid is not None) == model_process
    if pid is not None:  # the model's process goes with the app
        deadline = time.monotonic() + 30
        while _running(pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not _running(pid)


def _running(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it has exited (it is our child)
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


CRASH_PROBE = """
from chat_tui.engine.fake import FakeEngine
from chat_tui.ui.app import ChatApp

class Broken(ChatApp):
    def action_help(self):
        raise RuntimeError("a bug in a key handler")

async def auto_pilot(pilot):
    await pilot.pause(0.2)
    await pilot.press("f1")  # the app stops itself here

app = Broken(engine_factory=lambda: FakeEngine(["x"]))
app.run(headless=True, auto_pilot=auto_pilot)
raise SystemExit(app.return_code)
"""


def test_an_unexpected_error_exits_with_one_line_and_a_logged_traceback(tmp_path):
    probe = tmp_path / "crash_probe.py"
    probe.write_text(CRASH_PROBE, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(probe)],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
        env={"CHAT_TUI_HOME": str(tmp_path / "home"), "PATH": "", "PYTHONPATH": str(ROOT)},
    )
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 1
    assert "a bug in a key handler" in output and "Details in" in output
    assert "Traceback" not in output
    log = (tmp_path / "home" / "log" / "chat-tui.log").read_text()
    assert "Traceback" in log and "a bug in a key handler" in log


def test_run_app_refuses_bad_flags_before_starting(home, capsys):
    from chat_tui.store import Store
    from chat_tui.ui import run_app

    assert run_app(new=True, conversation_id=1) == 2
    assert run_app(conversation_id=42) == 2  # no database yet
    Store(get_paths().database).create_conversation("one")
    assert run_app(conversation_id=42) == 2
    err = capsys.readouterr().err
    assert "cannot be used together" in err and "no conversation 42" in err


async def test_model_device_and_load_options_reach_load_engine(home, monkeypatch):
    import chat_tui.engine as engine_pkg
    from chat_tui.engine.fake import FakeEngine

    calls = []

    def fake_load_engine(model, **kwargs):
        calls.append((model, kwargs))
        kwargs["progress"]("reading weights")
        return FakeEngine(["ok"])

    monkeypatch.setattr(engine_pkg, "load_engine", fake_load_engine)
    app = ChatApp("/models/x", device="cuda", load_options={"dtype": "float16"}, paths=get_paths())
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.engine is not None)
    (model, kwargs), = calls
    assert model == "/models/x" and kwargs["device"] == "cuda" and kwargs["dtype"] == "float16"


async def test_loading_another_model_stops_the_previous_model_process(home, tiny_checkpoint):
    app = ChatApp(str(tiny_checkpoint), paths=get_paths(), device="cpu", model_process=True)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: app.engine is not None or app.state == "no model", timeout=120,
                       what="the model to load")
        first = app.engine
        assert first is not None and first.pid is not None, app.load_note
        app.load_model(str(tiny_checkpoint))
        await wait_for(pilot, lambda: app.engine is not None and app.engine is not first, timeout=120,
                       what="the second model to load")
        second_pid = app.engine.pid
        deadline = time.monotonic() + 30
        while _running(first.pid) and time.monotonic() < deadline:
            await pilot.pause(0.05)
        assert not _running(first.pid) and second_pid != first.pid
        app.params = app.params.with_(max_new_tokens=5, seed=1)
        app.params_touched = True
        await send(pilot, app, "Hello!")
        reply = app.conversation.items[-1]
        assert reply.status == "complete" and reply.tokens


async def test_a_model_process_that_cannot_load_is_a_notice_and_the_app_goes_on(home, tmp_path):
    missing = tmp_path / "no-such-model"
    app = ChatApp(str(missing), paths=get_paths(), device="cpu", model_process=True)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.state == "no model", timeout=120, what="the load to fail")
        messages = [str(n.message) for n in app._notifications]
        assert any("Loading the model failed" in m and str(missing) in m and "Details in" in m for m in messages)
        assert not any("Traceback" in m for m in messages)
    log = get_paths().log_file.read_text(encoding="utf-8")
    assert "In the model's process" in log and "Traceback" in log  # the child's traceback, for whoever debugs


async def test_the_model_asked_for_last_wins_when_loads_overlap(home, tiny_checkpoint, tmp_path):
    second = tmp_path / "second-model"
    second.mkdir()
    for item in tiny_checkpoint.iterdir():
        (second / item.name).write_bytes(item.read_bytes())
    app = ChatApp(str(tiny_checkpoint), paths=get_paths(), device="cpu", model_process=True)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app._loads == 1, what="the first load to start")
        app.load_model(str(second))  # while the first is still loading
        await wait_for(pilot, lambda: app.engine is not None, timeout=120, what="a model to load")
        assert app.engine.model_name == "second-model"
        await pilot.pause(0.5)
        await wait_for(pilot, lambda: len(_model_processes()) <= 1, timeout=60, what="the first model's process to go")
        assert app.engine.model_name == "second-model"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
async def test_quitting_while_the_model_loads_leaves_no_model_process(home, tiny_checkpoint, tmp_path):
    from chat_tui.engine.export import export_hf

    # a Hugging Face folder: its process imports torch and transformers, seconds (a mini-GPT is ready at once)
    slow = export_hf(tiny_checkpoint, tmp_path / "hf")
    before = set(_model_processes())
    app = ChatApp(str(slow), paths=get_paths(), device="cpu", model_process=True)
    async with app.run_test() as pilot:
        deadline = time.monotonic() + 30
        while not set(_model_processes()) - before and time.monotonic() < deadline:
            await pilot.pause(0.05)
        assert set(_model_processes()) - before, "the model's process started"
        assert app.engine is None  # still loading
    deadline = time.monotonic() + 60
    while set(_model_processes()) - before and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not set(_model_processes()) - before


def _model_processes() -> list[int]:
    """This process's children that serve a model (ProcessEngine), reaped when they have exited."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == os.getpid() and b"chat_tui.engine.process" in cmdline and _running(int(entry.name)):
            pids.append(int(entry.name))
    return pids
