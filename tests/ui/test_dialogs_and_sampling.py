"""Pilot tests of the dialogs (text editors, Load model, Screenshot) and of keys and pastes in the sampling pane."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual import events
from textual.widgets import Input, Static, TextArea

from chat_tui.config import get_paths
from chat_tui.engine import bundled_model_path
from chat_tui.engine.types import CheckpointError
from chat_tui.ui.app import ChatApp
from chat_tui.ui.sampling import SamplingTable
from chat_tui.ui.screens import InputScreen, TextEditScreen

from .conftest import ready, send, wait_for
from .test_app import notifications, row_index


def warnings_and_errors(app: ChatApp) -> list[str]:
    return [str(n.message) for n in app._notifications if n.severity != "information"]


async def focus_row(pilot, app: ChatApp, name: str) -> SamplingTable:
    await pilot.press("f5")
    table = app.query_one(SamplingTable)
    assert table.has_focus
    table.cursor = row_index(name)
    await pilot.pause()
    return table


# ------------------------------------------------------------------ the text editors


@pytest.mark.parametrize("row", ["system_prompt", "stop"])
async def test_esc_cancels_the_text_editor_and_tab_still_indents(make_app, row):
    app, _ = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        before = (app.system_prompt, app.params)
        await focus_row(pilot, app, row)
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, TextEditScreen), what="the editor")
        editor = app.screen.query_one(TextArea)
        await pilot.press("tab", "x")
        assert editor.text.endswith(" x"), "Tab indents inside the editor"
        await pilot.press("escape")
        await wait_for(pilot, lambda: not isinstance(app.screen, TextEditScreen), timeout=2, what="Esc to close")
        assert (app.system_prompt, app.params) == before, "Esc cancels: nothing typed is applied"


# ------------------------------------------------------------------ pasting into the sampling pane


async def test_a_paste_onto_a_setting_types_that_value(make_app):
    app, _ = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await focus_row(pilot, app, "temperature")
        app.post_message(events.Paste("0.5\n"))  # a bracketed paste, as a terminal sends it
        await pilot.pause()
        assert app.params.temperature == 0.5
        assert not warnings_and_errors(app)
        app.post_message(events.Paste("2x"))  # refused as typing "2x" and Enter would be
        await pilot.pause()
        assert app.params.temperature == 0.5
        help_text = str(app.query_one("#param-help", Static).render())
        assert "refused" in help_text and "[0, 100]" in help_text
        assert any("temperature = 2x refused" in n for n in warnings_and_errors(app))


async def test_a_paste_onto_the_logit_bias_row_sets_it_and_a_bad_one_is_refused(make_app):
    app, _ = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        table = await focus_row(pilot, app, "logit_bias")
        assert "logit bias" in str(table.render()) and "none" in str(table.render())
        app.post_message(events.Paste("7:2, 5:-100"))
        await pilot.pause()
        assert app.params.logit_bias == ((5, -100.0), (7, 2.0))
        assert "5:-100,7:2" in str(table.render()) and not warnings_and_errors(app)
        app.post_message(events.Paste("5:999"))
        await pilot.pause()
        assert app.params.logit_bias == ((5, -100.0), (7, 2.0))
        refused = [n for n in warnings_and_errors(app) if "logit_bias" in n]
        assert refused and "\n" not in refused[0] and "[-100, 100]" in refused[0]


async def test_a_paste_onto_the_system_prompt_opens_its_editor_with_the_text(make_app):
    app, _ = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await focus_row(pilot, app, "system_prompt")
        app.post_message(events.Paste("Answer in one line."))
        await wait_for(pilot, lambda: isinstance(app.screen, TextEditScreen), what="the editor")
        assert app.screen.query_one(TextArea).text == "Answer in one line."
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: not isinstance(app.screen, TextEditScreen), what="the editor to apply")
        assert app.system_prompt == "Answer in one line."


# ------------------------------------------------------------------ stray typing and resets


async def test_stray_text_typed_into_the_sampling_pane_changes_nothing(make_app):
    app, _ = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        table = await focus_row(pilot, app, "temperature")
        before = app.params
        await pilot.press(*"ROMEO:")
        await pilot.press("down", "up")  # leaving a row applies what was typed there: nothing
        assert app.params == before and table.editing is None
        assert not warnings_and_errors(app), "stray letters raise no error"
        assert not isinstance(app.screen, TextEditScreen | InputScreen), "and open nothing"
        # a number with an exponent is still typed as before
        table.cursor = row_index("min_p")
        await pilot.press(*"1e-3", "enter")
        assert app.params.min_p == pytest.approx(0.001)


async def test_a_reset_by_one_key_can_be_undone(make_app):
    app, engine = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await focus_row(pilot, app, "temperature")
        await pilot.press(*"1.5", "enter")
        edited = app.params
        assert edited.temperature == 1.5 and edited != engine.default_params()
        await pilot.press("d")
        assert app.params == engine.default_params()
        assert any("u undoes" in n for n in notifications(app))
        await pilot.press("u")
        assert app.params == edited
        assert "custom" in str(app.query_one("#sampling-title", Static).render())
        await pilot.press("n")
        assert app.params.temperature == 1.0 and app.params.top_p == 1.0
        await pilot.press("u")
        assert app.params == edited
        await pilot.press("u")  # one reset, one undo: a second u changes nothing
        assert app.params == edited


async def test_a_change_after_a_reset_is_not_undone(make_app):
    app, engine = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await focus_row(pilot, app, "temperature")
        await pilot.press("d")
        await pilot.press("right")  # a new change: the reset can no longer be undone over it
        changed = app.params
        await pilot.press("u")
        assert app.params == changed


# ------------------------------------------------------------------ screenshot


async def test_the_palette_screenshot_is_saved_with_the_exports(make_app, home, tmp_path, monkeypatch):
    user_home = tmp_path / "user"  # a HOME without ~/Downloads
    user_home.mkdir()
    monkeypatch.setenv("HOME", str(user_home))
    monkeypatch.delenv("XDG_DOWNLOAD_DIR", raising=False)
    exports = get_paths().exports
    app, _ = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        screenshot = next(c for c in app.get_system_commands(app.screen) if c.title == "Screenshot")
        screenshot.callback()
        await wait_for(pilot, lambda: any("creenshot" in n for n in notifications(app)), timeout=5,
                       what="the screenshot's notice")
        (saved,) = exports.glob("*.svg")
        assert "<svg" in saved.read_text(encoding="utf-8")
        assert f"Screenshot saved to {saved}" in notifications(app)
        assert not warnings_and_errors(app)


# ------------------------------------------------------------------ the Load model dialog (real loads)


def _bundled() -> Path | None:
    try:
        return bundled_model_path()
    except CheckpointError:
        return None


async def _load_through_the_dialog(pilot, app: ChatApp, text: str) -> None:
    app.action_load_model_dialog()
    await wait_for(pilot, lambda: isinstance(app.screen, InputScreen) and bool(app.screen.query(Input)),
                   what="the Load model dialog")
    hint = " ".join(str(s.render()) for s in app.screen.query(Static))
    assert "hub id" in hint and "mini-GPT checkpoint folder" not in hint
    app.screen.query_one(Input).value = text
    await pilot.press("enter")


async def test_the_load_dialog_takes_a_hub_id_as_model_does(home, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    app = ChatApp(str(tmp_path / "no-model-here"), paths=get_paths(), device="cpu")
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: app.state == "no model", timeout=120, what="the first load to fail")
        await _load_through_the_dialog(pilot, app, "microsoft/DialoGPT-medium")
        assert app.model_source == "microsoft/DialoGPT-medium"
        # the load itself looks the id up, and says it is not in the cache (no download in tests)
        await wait_for(pilot, lambda: any("not in the Hugging Face cache" in n for n in notifications(app)),
                       timeout=120, what="the load's answer")
        assert not any("Not a folder" in n for n in notifications(app))
        assert any("microsoft/DialoGPT-medium" in n and "Loading the model failed" in n
                   for n in warnings_and_errors(app))


@pytest.mark.skipif(_bundled() is None, reason="the bundled model (assets/minigpt) is not there")
async def test_the_load_dialog_left_empty_loads_the_bundled_model(home, tmp_path):
    app = ChatApp(str(tmp_path / "no-model-here"), paths=get_paths(), device="cpu")
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: app.state == "no model", timeout=120, what="the first load to fail")
        await _load_through_the_dialog(pilot, app, "  ")
        await wait_for(pilot, lambda: app.engine is not None, timeout=120, what="the bundled model")
        assert app.model_source is None and app.engine.model_name == bundled_model_path().name


async def test_the_load_dialog_refuses_a_mistyped_path_at_once_and_keeps_the_model(make_app, tmp_path):
    app, engine = make_app(["hi"])
    async with app.run_test() as pilot:
        await ready(pilot, app)
        await _load_through_the_dialog(pilot, app, str(tmp_path / "chekpoints" / "run1"))
        await pilot.pause()
        assert not app.loading, "no model load was started for a path that does not exist"
        assert app.engine is engine
        assert any("no such folder" in n for n in warnings_and_errors(app))
        await send(pilot, app, "still there?")
        assert app.conversation.items[-1].content == "hi"


# ------------------------------------------------------------------ the settings, told to the panes


async def test_each_change_of_the_settings_reaches_the_pane_and_the_inspector(make_app):
    app, engine = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        title = app.query_one("#sampling-title", Static)
        assert app.params == engine.default_params() and "model defaults" in str(title.render())
        assert app.inspector.params == app.params, "the inspector is handed the settings as it mounts"
        await focus_row(pilot, app, "temperature")
        await pilot.press(*"1.5", "enter")
        assert app.inspector.params.temperature == 1.5 and "custom" in str(title.render())
        app.load_preset("greedy")
        await pilot.pause()
        assert app.inspector.params == app.params and app.params.temperature == 0
        assert app.query_one(SamplingTable).params == app.params and "greedy" in str(title.render())


async def test_a_preset_named_in_the_config_file_is_in_force_from_the_start(make_app, home):
    config = home / "config"
    config.mkdir(parents=True)
    (config / "config.toml").write_text('preset = "greedy"\n', encoding="utf-8")
    app, _ = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        assert app.params.temperature == 0 and app.preset_name == "greedy", "the model's defaults do not replace it"
        assert "greedy" in str(app.query_one("#sampling-title", Static).render())
