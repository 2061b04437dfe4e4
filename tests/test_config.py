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
    params = SamplingParams(temperature=0.42, stop=("\n\nUser:",), seed=3, logit_bias="50256:-100,198:5")
    path = save_preset("mine", params, system_prompt="Be kind.", paths=paths)
    assert path.parent == paths.presets
    assert 'logit_bias = "198:5,50256:-100"' in path.read_text()  # the text form, as --logit-bias takes it
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


def load_config_in_a_child(home, then: str = "") -> dict:
    """load_config (and `then`) in a process of its own, with a time limit and a memory cap: a config
    file that blocks or never ends must fail the test, not hang it or fill the machine's memory."""
    code = (
        "import json, resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
        "from chat_tui.config import load_config, save_setting\n"
        "config = load_config()\n"
        "result = {'device': config.device, 'theme': config.theme, 'warnings': config.warnings}\n"
        f"{then}\n"
        "print(json.dumps(result))\n"
    )
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "CHAT_TUI_HOME": str(home)})
    assert child.returncode == 0, child.stderr
    return __import__("json").loads(child.stdout)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_config_that_is_a_named_pipe_is_ignored_and_said_so(paths):
    paths.config.mkdir(parents=True)
    os.mkfifo(paths.config_file)  # nothing ever writes to it: reading it would wait forever
    saving = (
        "try:\n    save_setting('theme', 'nord')\nexcept ValueError as exc:\n    result['save'] = str(exc)\n"
    )
    result = load_config_in_a_child(paths.config.parent, then=saving)
    assert result["theme"] is None and len(result["warnings"]) == 1
    warning = result["warnings"][0]
    assert str(paths.config_file) in warning and "named pipe" in warning and "ignored" in warning
    assert "not saved" in result["save"]  # the app's theme is not saved over the pipe either
    assert not paths.config_file.is_file()


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_a_config_linked_to_dev_zero_is_ignored_and_said_so(paths):
    paths.config.mkdir(parents=True)
    paths.config_file.symlink_to("/dev/zero")  # endless: reading it all would fill the memory
    result = load_config_in_a_child(paths.config.parent)
    assert result["theme"] is None and len(result["warnings"]) == 1
    assert str(paths.config_file) in result["warnings"][0] and "ignored" in result["warnings"][0]


def test_a_config_file_over_the_size_cap_is_ignored_and_said_so(paths):
    from chat_tui.config import MAX_SETTINGS_BYTES

    paths.config.mkdir(parents=True)
    paths.config_file.write_text('theme = "nord"\n' + "#" * MAX_SETTINGS_BYTES + "\n", encoding="utf-8")
    config = load_config(paths)
    assert config.theme is None and len(config.warnings) == 1
    assert str(paths.config_file) in config.warnings[0] and "larger than" in config.warnings[0]


def test_a_device_that_is_not_one_names_the_file_and_key_and_the_best_device_is_used(paths):
    paths.config.mkdir(parents=True)
    paths.config_file.write_text('device = "quantum"\ntheme = "nord"\n', encoding="utf-8")
    config = load_config(paths)
    assert config.device is None and config.theme == "nord"  # the rest of the file still counts
    assert len(config.warnings) == 1
    assert str(paths.config_file) in config.warnings[0] and "device" in config.warnings[0]
    assert "quantum" in config.warnings[0]
    for written, device in (("CUDA:1", "cuda:1"), (" cpu ", "cpu"), ("mps", "mps"), ("auto", None)):
        paths.config_file.write_text(f'device = "{written}"\n', encoding="utf-8")
        config = load_config(paths)
        assert (config.device, config.warnings) == (device, [])


async def test_the_app_loads_its_model_on_the_best_device_when_the_config_names_none(paths, tiny_checkpoint):
    import asyncio
    import time

    from chat_tui.ui.app import ChatApp

    paths.config.mkdir(parents=True)
    paths.config_file.write_text('device = "quantum"\n', encoding="utf-8")
    app = ChatApp(str(tiny_checkpoint), paths=paths)
    async with app.run_test():
        deadline = time.monotonic() + 60
        while app.engine is None and app.state != "no model" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        notices = [str(n.message) for n in app._notifications]
        assert app.engine is not None, notices  # a model is loaded
        assert any(str(paths.config_file) in n and "device" in n for n in notices), notices
