"""Paths (CHAT_TUI_HOME), config.toml, TOML writing and presets."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from chat_tui.config import (
    SHIPPED_PRESETS,
    PresetError,
    delete_preset,
    dumps_toml,
    get_paths,
    list_presets,
    load_config,
    load_preset,
    save_preset,
    tomllib,
)
from chat_tui.engine.params import SamplingParams


@pytest.fixture
def paths(tmp_path):
    return get_paths({"CHAT_TUI_HOME": str(tmp_path / "home")})


def test_home_redirects_every_folder(tmp_path):
    p = get_paths({"CHAT_TUI_HOME": str(tmp_path)})
    for folder in (p.config, p.data, p.log, p.cache):
        assert folder.is_relative_to(tmp_path)
    assert p.database.parent == p.data and p.presets.parent == p.config and p.log_file.parent == p.log


def test_platformdirs_without_the_override():
    p = get_paths({})
    assert "chat-tui" in str(p.config) and "chat-tui" in str(p.data)


def test_importing_creates_nothing_and_needs_no_torch(tmp_path):
    home = tmp_path / "home"
    code = (
        "import sys, chat_tui, chat_tui.config, chat_tui.store, chat_tui.ui, chat_tui.ui.app, chat_tui.engine.fake;"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import';"
        "chat_tui.config.get_paths(); chat_tui.config.load_config()"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"CHAT_TUI_HOME": str(home), "PATH": ""},
                   cwd=str(__import__("pathlib").Path(__file__).parent.parent))
    assert not home.exists()


def test_config_file(paths):
    paths.config.mkdir(parents=True)
    paths.config_file.write_text(
        'theme = "nord"\nshow_inspector = false\npreset = "greedy"\n'
        '[keymap]\nsend = "ctrl+s"\nstop = ["escape", "ctrl+c"]\nbad = 3\n',
        encoding="utf-8",
    )
    config = load_config(paths)
    assert config.theme == "nord" and config.show_inspector is False and config.preset == "greedy"
    assert config.keymap == {"send": "ctrl+s", "stop": "escape,ctrl+c"}
    assert any("keymap.bad" in w for w in config.warnings)


def test_the_model_runs_in_its_own_process_unless_the_config_says_no(paths):
    from chat_tui.ui.app import ChatApp

    assert load_config(paths).model_process is True
    assert ChatApp(paths=paths, model_process=True).model_process is (os.name == "posix")
    assert ChatApp(paths=paths).model_process is False  # tests and embedders: in this process
    paths.config.mkdir(parents=True)
    paths.config_file.write_text("model_process = false\n", encoding="utf-8")
    assert ChatApp(paths=paths, model_process=True).model_process is False
    paths.config_file.write_text('model_process = "no"\n', encoding="utf-8")
    config = load_config(paths)
    assert config.model_process is True and any("model_process must be true or false" in w for w in config.warnings)


def test_missing_and_broken_config(paths):
    assert load_config(paths).keymap == {}
    paths.config.mkdir(parents=True)
    paths.config_file.write_text("theme = = broken", encoding="utf-8")
    config = load_config(paths)
    assert config.theme is None and "not valid TOML" in config.warnings[0]


def test_dumps_toml_round_trips_awkward_strings():
    data = {
        "name": 'quote " backslash \\ newline \n tab \t del \x7f bell \x07 emoji 🙂',
        "n": 3,
        "x": 0.1,
        "flag": True,
        "skip": None,
        "table": {"stop": ["\n\n", "User:"], "k": 5, "none": None},
    }
    back = tomllib.loads(dumps_toml(data))
    assert back["name"] == data["name"] and back["n"] == 3 and back["x"] == 0.1 and back["flag"] is True
    assert "skip" not in back and back["table"] == {"stop": ["\n\n", "User:"], "k": 5}


def test_shipped_presets_load_and_are_sensible(paths):
    assert list_presets(paths)[:4] == list(SHIPPED_PRESETS)
    greedy = load_preset("greedy", paths).apply(SamplingParams(max_new_tokens=99))
    assert greedy.temperature == 0.0 and greedy.max_new_tokens == 99
    for name in SHIPPED_PRESETS:
        preset = load_preset(name, paths)
        assert preset.shipped and preset.description
        preset.apply(SamplingParams())


def test_save_load_delete_preset(paths):
    params = SamplingParams(temperature=0.42, stop=("\n\nUser:",), seed=3)
    path = save_preset("mine", params, system_prompt="Be kind.", paths=paths)
    assert path.parent == paths.presets
    assert "mine" in list_presets(paths)
    preset = load_preset("mine", paths)
    assert preset.apply(SamplingParams()) == params and preset.system_prompt == "Be kind."
    delete_preset("mine", paths)
    assert "mine" not in list_presets(paths)
    with pytest.raises(PresetError):
        load_preset("mine", paths)
    with pytest.raises(PresetError, match="cannot be deleted"):
        delete_preset("greedy", paths)
    with pytest.raises(PresetError):
        save_preset("../escape", params, paths=paths)


def test_user_preset_overrides_and_bad_values_are_reported(paths):
    paths.presets.mkdir(parents=True)
    (paths.presets / "greedy.toml").write_text("[sampling]\ntemperature = 0.1\n", encoding="utf-8")
    assert load_preset("greedy", paths).apply(SamplingParams()).temperature == 0.1
    (paths.presets / "broken.toml").write_text("[sampling]\ntop_p = 7\n", encoding="utf-8")
    with pytest.raises(PresetError, match="top_p"):
        load_preset("broken", paths)


def test_save_setting_keeps_the_rest_of_the_file(paths):
    from chat_tui.config import save_setting

    save_setting("theme", "nord", paths)  # no file yet: the example, with the setting
    first = load_config(paths)
    assert first.theme == "nord" and not first.warnings
    assert "[keymap]" in paths.config_file.read_text()
    paths.config_file.write_text('theme = "x"  # old\nmodel = "/m"\n[keymap]\nsend = "f5"\n', encoding="utf-8")
    save_setting("theme", 'gruvbox "dark"', paths)
    config = load_config(paths)
    assert (config.theme, config.model, config.keymap) == ('gruvbox "dark"', "/m", {"send": "f5"})
    assert paths.config_file.read_text().count("theme") == 1
    paths.config_file.write_text("theme = [broken\n", encoding="utf-8")
    with pytest.raises(ValueError):
        save_setting("theme", "nord", paths)
    assert paths.config_file.read_text() == "theme = [broken\n"  # a broken file is left as it was
