"""Where chat-tui keeps its files, the user's config file and the sampling presets.

Nothing here touches the disk at import time: folders are created when something is written.
`CHAT_TUI_HOME` redirects every folder (config, data, logs, cache) under one directory, for tests.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from chat_tui.engine.files import atomic_write_bytes
from chat_tui.engine.params import InvalidParameter, SamplingParams

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

APP_NAME = "chat-tui"
HOME_ENV = "CHAT_TUI_HOME"
SHIPPED_PRESETS = ("precise", "balanced", "creative", "greedy")
_PRESET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,39}$")
_DEVICE = re.compile(r"cpu|mps|cuda(:\d+)?")
MAX_SETTINGS_BYTES = 1 << 20  # a settings file is a few kB: more is a mistake (or /dev/zero)


@dataclass(frozen=True)
class Paths:
    """The folders chat-tui uses. Nothing is created until `ensure` is called."""

    config: Path
    data: Path
    log: Path
    cache: Path

    @property
    def config_file(self) -> Path:
        return self.config / "config.toml"

    @property
    def presets(self) -> Path:
        return self.config / "presets"

    @property
    def database(self) -> Path:
        return self.data / "conversations.db"

    @property
    def server_memory(self) -> Path:
        """What OpenAI-compatible servers rejected, per server and model (no keys)."""
        return self.data / "servers.json"

    @property
    def exports(self) -> Path:
        return self.data / "exports"

    @property
    def log_file(self) -> Path:
        return self.log / "chat-tui.log"

    @staticmethod
    def ensure(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def get_paths(environ: dict[str, str] | None = None) -> Paths:
    """The platformdirs folders, or all of them under `$CHAT_TUI_HOME` when it is set."""
    env = os.environ if environ is None else environ
    home = env.get(HOME_ENV, "").strip()
    if home:
        root = Path(home).expanduser()
        return Paths(config=root / "config", data=root / "data", log=root / "log", cache=root / "cache")
    import platformdirs

    return Paths(
        config=Path(platformdirs.user_config_dir(APP_NAME, appauthor=False)),
        data=Path(platformdirs.user_data_dir(APP_NAME, appauthor=False)),
        log=Path(platformdirs.user_log_dir(APP_NAME, appauthor=False)),
        cache=Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False)),
    )


# --------------------------------------------------------------------------- config file


PANE_WIDTHS = {"sampling": 28, "inspector": 44}  # 44: the explain view's columns fit
PANE_WIDTH_RANGE = (20, 400)


@dataclass
class Config:
    """The user's settings from `config.toml` (every key optional)."""

    theme: str | None = None
    keymap: dict[str, str] = field(default_factory=dict)  # binding id -> keys ("ctrl+s" or "f5,ctrl+s")
    model: str | None = None
    device: str | None = None
    preset: str | None = None  # loaded at start instead of the model's defaults
    show_sampling: bool = True
    show_inspector: bool = True
    # the side panes' widths in columns (grow_pane / shrink_pane change and save them)
    pane_widths: dict[str, int] = field(default_factory=lambda: dict(PANE_WIDTHS))
    markdown: bool = True
    model_process: bool = True  # run_app loads the model in a child process (chat_tui.engine.process)
    warnings: list[str] = field(default_factory=list)  # problems found while reading, for a notice


EXAMPLE_CONFIG = """\
# chat-tui settings. Every key is optional.
# theme = "textual-dark"
# model = "/path/to/a/checkpoint"   # default: the bundled mini-GPT
# device = "cpu"
# preset = "balanced"               # default: the model's own generation_config.json
# show_sampling = true
# show_inspector = true
# sampling_width = 28                # the side panes' widths in columns (F7 / F8 change them)
# inspector_width = 44
# markdown = true
# model_process = true               # the model runs in its own process, so the UI never slows it

[keymap]
# binding id = "keys"; press F1 in the app to see every id. Examples:
# send = "enter"
# newline = "ctrl+j,shift+enter"
# stop = "escape"
# regenerate = "ctrl+r"
"""


_FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a device"),
               (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"))


def _check_regular(path: Path, info: os.stat_result, limit: int) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(info.st_mode)), "not a regular file")
        raise ValueError(f"{path} is {kind}, not a file")
    if info.st_size > limit:
        raise ValueError(f"{path} is larger than {limit // 1024} kB")


def read_settings_file(path: Path, *, limit: int = MAX_SETTINGS_BYTES) -> bytes:
    """The bytes of a settings file, read only from a regular file of at most `limit` bytes.

    A named pipe would block the start and /dev/zero would fill the memory: anything else raises
    ValueError (a message fit to show). A missing file raises FileNotFoundError, other failures OSError.
    """
    _check_regular(path, os.stat(path), limit)  # before opening: opening a device can do things
    # O_NONBLOCK: if a pipe took the file's place since, opening it returns at once instead of waiting
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    with os.fdopen(fd, "rb") as file:
        _check_regular(path, os.fstat(fd), limit)
        data = file.read(limit + 1)
    if len(data) > limit:  # it grew while being read
        raise ValueError(f"{path} is larger than {limit // 1024} kB")
    return data


def load_config(paths: Paths | None = None) -> Config:
    """Read `config.toml`; a missing file gives the defaults, a broken one defaults plus a warning."""
    paths = paths or get_paths()
    config = Config()
    path = paths.config_file
    try:
        raw = read_settings_file(path)
    except FileNotFoundError:
        return config
    except OSError as exc:
        config.warnings.append(f"could not read {path}: {exc.strerror or exc}")
        return config
    except ValueError as exc:
        config.warnings.append(f"{exc}: its settings were ignored")
        return config
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        config.warnings.append(f"{path} is not valid TOML ({exc}); using the defaults")
        return config

    def text(key: str) -> str | None:
        value = data.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            config.warnings.append(f"{path}: {key} must be a string")
            return None
        return value

    def flag(key: str, default: bool) -> bool:
        value = data.get(key, default)
        if not isinstance(value, bool):
            config.warnings.append(f"{path}: {key} must be true or false")
            return default
        return value

    config.theme = text("theme")
    config.model = text("model")
    device = (text("device") or "").strip().lower()
    if _DEVICE.fullmatch(device):
        config.device = device
    elif device not in ("", "auto"):  # those two mean the best available, as when the key is left out
        config.warnings.append(f"{path}: device = {data['device']!r} is not a device (use cpu, cuda, cuda:N "
                               "or mps); using the best available")
    config.preset = text("preset")
    config.show_sampling = flag("show_sampling", True)
    config.show_inspector = flag("show_inspector", True)
    for pane in PANE_WIDTHS:
        key = f"{pane}_width"
        value = data.get(key)
        if value is None:
            continue
        low, high = PANE_WIDTH_RANGE
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            config.warnings.append(f"{path}: {key} must be a whole number of columns from {low} to {high}")
            continue
        config.pane_widths[pane] = value
    config.markdown = flag("markdown", True)
    config.model_process = flag("model_process", True)
    keymap = data.get("keymap", {})
    if not isinstance(keymap, dict):
        config.warnings.append(f"{path}: [keymap] must be a table of binding id = \"keys\"")
        keymap = {}
    for binding_id, keys in keymap.items():
        if isinstance(keys, list) and all(isinstance(k, str) for k in keys):
            keys = ",".join(keys)
        if not isinstance(keys, str) or not keys.strip():
            config.warnings.append(f"{path}: keymap.{binding_id} must be a key string such as \"ctrl+s\"")
            continue
        config.keymap[str(binding_id)] = ",".join(k.strip() for k in keys.split(",") if k.strip())
    return config


# --------------------------------------------------------------------------- TOML writing


def _toml_string(value: str) -> str:
    # JSON string escapes are valid TOML basic-string escapes; TOML also forbids a raw DEL.
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ValueError("TOML presets cannot hold nan or inf")
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


def dumps_toml(data: dict[str, Any]) -> str:
    """A small TOML writer for flat tables of scalars and lists (what presets hold). None is omitted."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    for key, value in data.items():
        if value is None:
            continue
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for name, table in tables:
        lines.append("")
        lines.append(f"[{_toml_key(name)}]")
        for key, value in table.items():
            if value is not None:
                lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def save_setting(key: str, value: str | int, paths: Paths | None = None) -> Path:
    """Set one top-level string (or whole-number) setting in `config.toml`, keeping every other line and comment.

    A missing file starts from the commented example. The result is parsed before it replaces the
    file (atomically), so a hand-edited config is never left broken. Raises OSError or ValueError.
    """
    paths = paths or get_paths()
    path = paths.config_file
    try:
        text = read_settings_file(path).decode("utf-8")
    except FileNotFoundError:
        text = EXAMPLE_CONFIG
    except ValueError as exc:  # not a file, too large, or not UTF-8: not ours to replace
        raise ValueError(f"{exc}; {key} was not saved") from None
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # being edited by hand, perhaps: leave it alone
        raise ValueError(f"{path} is not valid TOML ({exc}); {key} was not saved") from None
    line = f"{_toml_key(key)} = {_toml_value(value)}"
    lines = text.splitlines()
    own = re.compile(rf"\s*{re.escape(key)}\s*=")
    for i, old in enumerate(lines):
        if old.lstrip().startswith("["):  # a table: top-level keys end here
            lines.insert(i, line)
            break
        if own.match(old):
            lines[i] = line
            break
    else:
        lines.append(line)
    new_text = "\n".join(lines) + "\n"
    try:
        if tomllib.loads(new_text).get(key) != value:
            raise ValueError(f"{path}: could not set {key} without changing its meaning")
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path} is not valid TOML ({exc}); {key} was not saved") from None
    atomic_write_bytes(path, new_text.encode("utf-8"))
    return path


# --------------------------------------------------------------------------- presets


class PresetError(Exception):
    """A preset that cannot be read, written or deleted; the message is fit to show."""


@dataclass
class Preset:
    name: str
    params: dict[str, Any]  # SamplingParams fields present in the file (others keep their value)
    system_prompt: str | None = None
    description: str = ""
    shipped: bool = False
    path: Path | None = None

    def apply(self, base: SamplingParams) -> SamplingParams:
        """`base` with this preset's values (raises InvalidParameter on a bad value)."""
        merged = base.to_dict()
        merged.update(self.params)
        return SamplingParams.from_dict(merged)


def check_preset_name(name: str) -> str:
    name = name.strip()
    if not _PRESET_NAME.fullmatch(name):
        raise PresetError(
            "a preset name is 1-40 letters, digits, spaces, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def _parse_preset(name: str, text: str, *, shipped: bool, path: Path | None) -> Preset:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PresetError(f"preset {name!r} is not valid TOML: {exc}") from None
    sampling = data.get("sampling", {})
    if not isinstance(sampling, dict):
        raise PresetError(f"preset {name!r}: [sampling] must be a table")
    known = set(SamplingParams.neutral().to_dict())
    params = {k: v for k, v in sampling.items() if k in known}
    try:  # check every value now, so a broken preset is reported when it is loaded
        SamplingParams.neutral().with_(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
        )
    except (InvalidParameter, TypeError) as exc:
        raise PresetError(f"preset {name!r}: {exc}") from None
    system_prompt = data.get("system_prompt")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise PresetError(f"preset {name!r}: system_prompt must be a string")
    description = data.get("description", "")
    return Preset(
        name=name,
        params=params,
        system_prompt=system_prompt,
        description=description if isinstance(description, str) else "",
        shipped=shipped,
        path=path,
    )


def _shipped_text(name: str) -> str:
    return resources.files("chat_tui").joinpath("presets").joinpath(f"{name}.toml").read_text(encoding="utf-8")


def list_presets(paths: Paths | None = None) -> list[str]:
    """Preset names: the shipped ones first, then the user's (a user file may override a shipped one)."""
    paths = paths or get_paths()
    names = list(SHIPPED_PRESETS)
    try:
        user = sorted(p.stem for p in paths.presets.glob("*.toml") if p.is_file())
    except OSError:
        user = []
    names += [n for n in user if n not in names]
    return names


def load_preset(name: str, paths: Paths | None = None) -> Preset:
    paths = paths or get_paths()
    user_file = paths.presets / f"{name}.toml"
    if user_file.is_file():
        try:
            text = read_settings_file(user_file).decode("utf-8")
        except (OSError, ValueError) as exc:
            raise PresetError(f"could not read {user_file}: {exc}") from None
        return _parse_preset(name, text, shipped=False, path=user_file)
    if name in SHIPPED_PRESETS:
        return _parse_preset(name, _shipped_text(name), shipped=True, path=None)
    raise PresetError(f"no preset named {name!r}")


def save_preset(
    name: str,
    params: SamplingParams,
    *,
    system_prompt: str | None = None,
    description: str = "",
    paths: Paths | None = None,
) -> Path:
    """Write `presets/<name>.toml` in the config folder and return its path."""
    paths = paths or get_paths()
    name = check_preset_name(name)
    sampling = params.to_dict()
    data: dict[str, Any] = {"description": description or None, "system_prompt": system_prompt or None}
    data["sampling"] = sampling
    target = paths.presets / f"{name}.toml"
    try:
        atomic_write_bytes(target, ("# chat-tui sampling preset\n" + dumps_toml(data)).encode("utf-8"))
    except OSError as exc:
        raise PresetError(f"could not write {target}: {exc.strerror or exc}") from None
    return target


def delete_preset(name: str, paths: Paths | None = None) -> Path:
    paths = paths or get_paths()
    target = paths.presets / f"{name}.toml"
    if not target.is_file():
        if name in SHIPPED_PRESETS:
            raise PresetError(f"{name!r} ships with chat-tui and cannot be deleted")
        raise PresetError(f"no preset named {name!r}")
    try:
        target.unlink()
    except OSError as exc:
        raise PresetError(f"could not delete {target}: {exc.strerror or exc}") from None
    return target
