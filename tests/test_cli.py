"""The headless CLI: `chat-tui ask`, --json, --version, and one-line errors."""

import json
import subprocess
import sys

import pytest

from chat_tui import __version__


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chat_tui", *args], capture_output=True, text=True, timeout=timeout
    )


def test_version_and_help():
    result = run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"chat-tui {__version__}"
    result = run("--help")
    assert result.returncode == 0
    assert "ask" in result.stdout and "train" in result.stdout
    result = run("ask", "--help")
    for flag in ("--temperature", "--top-k", "--top-p", "--min-p", "--repetition-penalty", "--seed",
                 "--max-new-tokens", "--system", "--json", "--model"):
        assert flag in result.stdout


def test_ask_json_streams_one_object_per_token_then_a_summary(tiny_checkpoint):
    result = run("ask", "Hello", "--model", str(tiny_checkpoint), "--seed", "3", "--max-new-tokens", "8", "--json")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    tokens, summary = lines[:-1], lines[-1]
    assert summary["done"] is True
    assert summary["tokens"] == len(tokens) and 1 <= len(tokens) <= 8
    assert summary["stop_reason"] in {"eos", "length"}
    assert summary["tokens_per_s"] > 0
    for record in tokens:
        assert set(record) == {"token", "id", "prob", "top"}
        assert isinstance(record["id"], int) and 0 < record["prob"] <= 1
        assert len(record["top"]) == 10
        assert set(record["top"][0]) == {"token", "id", "prob"}


def test_ask_is_reproducible_with_a_seed(tiny_checkpoint):
    args = ("ask", "Hello", "--model", str(tiny_checkpoint), "--seed", "7", "--max-new-tokens", "12",
            "--temperature", "1.3")
    a, b = run(*args), run(*args)
    assert a.returncode == 0 and a.stdout == b.stdout


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--temperature", "-1", "temperature"),
        ("--top-p", "1.5", "top_p"),
        ("--top-k", "-3", "top_k"),
        ("--max-new-tokens", "0", "max_new_tokens"),
        ("--temperature", "nan", "temperature"),
        ("--top-p", "abc", "top_p"),
    ],
)
def test_invalid_sampling_values_fail_with_one_line(tiny_checkpoint, flag, value, expected):
    result = run("ask", "Hello", "--model", str(tiny_checkpoint), flag, value)
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0] and value in lines[0] and "allowed" in lines[0]
    assert "Traceback" not in result.stderr


def test_missing_model_fails_with_one_line(tmp_path):
    result = run("ask", "Hello", "--model", str(tmp_path / "no-such-model"))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-such-model" in lines[0]
    assert "Traceback" not in result.stderr


def test_corrupt_checkpoint_fails_with_one_line(tmp_path, tiny_checkpoint):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    result = run("ask", "Hello", "--model", str(folder))
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1
    assert "model.safetensors" in result.stderr


def test_bundled_model_answers_hello():
    result = run("ask", "hello", "--seed", "0", "--json")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    text = "".join(record["token"] for record in lines[:-1])
    assert text.strip(), "the bundled model gave an empty reply"
    assert lines[-1]["stop_reason"] == "eos", "the bundled model should end its own turn"


def test_bundled_model_greets_in_english_and_chinese():
    english = run("ask", "Hello", "--temperature", "0").stdout.strip()
    chinese = run("ask", "你好", "--temperature", "0").stdout.strip()
    assert any(c.isascii() and c.isalpha() for c in english)
    assert any("\u4e00" <= c <= "\u9fff" for c in chinese), chinese
