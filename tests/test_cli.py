"""The headless CLI: `chat-tui ask`, --json, --version, and one-line errors."""

import json
import os
import subprocess
import sys

import pytest

from chat_tui import __version__


def run(*args: str, timeout: float = 120, input: str | None = None, **options) -> subprocess.CompletedProcess:
    """`chat-tui ARGS` in a child process; its standard input is `input`, else empty (never the terminal
    pytest may run in, which `ask` without a prompt would wait on)."""
    if input is None:
        options.setdefault("stdin", subprocess.DEVNULL)
    options.setdefault("stdout", subprocess.PIPE)
    return subprocess.run([sys.executable, "-m", "chat_tui", *args], stderr=subprocess.PIPE, text=True,
                          timeout=timeout, input=input, **options)


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


def test_reporting_an_error_never_imports_torch():
    code = (
        "import sys\n"
        "from chat_tui import cli\n"
        "from chat_tui.errors import DeviceError, TrainingError\n"
        "from chat_tui.train.data import DataError\n"
        "assert cli._report(TrainingError('the loss became nan at step 3\\nmore')) == 1\n"
        "assert cli._report(DeviceError(\"device 'cuda': CUDA is not available here\")) == 1\n"
        "assert cli._report(DataError('corpus.txt: file is empty')) == 1\n"
        "assert cli._report(cli.CLIError('--out DIR is required')) == 2\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'torch')\n"
        "assert not loaded, loaded[:5]\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "chat-tui: error: the loss became nan at step 3",
        "chat-tui: error: device 'cuda': CUDA is not available here",
        "chat-tui: error: corpus.txt: file is empty",
        "chat-tui: error: --out DIR is required",
    ]


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


def test_ask_logit_bias_bans_a_token(tiny_checkpoint):
    args = ("ask", "Hello", "--model", str(tiny_checkpoint), "--temperature", "0", "--max-new-tokens", "6", "--json")
    greedy = run(*args)
    first = json.loads(greedy.stdout.splitlines()[0])["id"]
    banned = run(*args, "--logit-bias", f"{first}:-100")
    assert banned.returncode == 0, banned.stderr
    ids = [json.loads(line)["id"] for line in banned.stdout.splitlines()[:-1]]
    assert ids and first not in ids


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--temperature", "-1", "temperature"),
        ("--top-p", "1.5", "top_p"),
        ("--top-k", "-3", "top_k"),
        ("--max-new-tokens", "0", "max_new_tokens"),
        ("--temperature", "nan", "temperature"),
        ("--top-p", "abc", "top_p"),
        ("--logit-bias", "5:300", "logit_bias"),
        ("--logit-bias", "five:1", "logit_bias"),
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


def test_ask_reads_the_prompt_from_standard_input():
    given = run("ask", "你好", "--temperature", "0")
    assert given.returncode == 0 and any("\u4e00" <= c <= "\u9fff" for c in given.stdout), given.stdout
    dash = run("ask", "-", "--temperature", "0", input="你好\n")  # echo's newline ends the input
    assert (dash.returncode, dash.stdout, dash.stderr) == (0, given.stdout, "")
    piped = run("ask", "--temperature", "0", input="你好")  # no prompt, input piped in
    assert (piped.returncode, piped.stdout, piped.stderr) == (0, given.stdout, "")


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_ask_without_a_prompt_on_a_terminal_is_one_line():
    terminal, other_end = os.openpty()
    try:
        result = run("ask", stdin=other_end, timeout=60)
    finally:
        os.close(terminal)
        os.close(other_end)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("chat-tui: error: no prompt"), result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["ask", "hi", "--bogus"], "unrecognized arguments: --bogus (see chat-tui ask --help)"),
        (["ask", "hi", "--temperature"], "argument --temperature: expected one argument"),
        (["--conversation", "abc"], "invalid int value: 'abc'"),
        (["frob"], "invalid choice: 'frob'"),
        (["train"], "the following arguments are required: STAGE"),
        (["train", "pretrain", "--n-layer", "0"], "--n-layer"),
        (["import", "nanogpt"], "the following arguments are required: CKPT.pt, OUT"),
        (["export", "a", "b", "--format", "onnx"], "invalid choice: 'onnx'"),
    ],
)
def test_argument_errors_are_one_line(args, expected):
    result = run(*args, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("chat-tui: error: "), result.stderr
    assert expected in result.stderr and "usage" not in result.stderr


def test_the_app_without_a_terminal_says_so_at_once(tmp_path):
    with open(tmp_path / "out", "w") as out:
        result = run(stdout=out, timeout=60)  # stdin /dev/null, stdout a file: before the fix, it hung
    assert result.returncode == 2
    assert result.stderr == "chat-tui: error: chat-tui needs a terminal; for scripts use chat-tui ask\n"
    assert (tmp_path / "out").read_text() == ""  # no escape codes in the file


def test_ask_says_when_the_prompt_was_cut_to_fit_the_context(tiny_checkpoint):
    prompt = "Hello there! How are you today? " * 60  # over the tiny model's 128 tokens
    result = run("ask", prompt, "--model", str(tiny_checkpoint), "--max-new-tokens", "4", "--json")
    assert result.returncode == 0, result.stderr
    dropped = json.loads(result.stdout.splitlines()[-1])["dropped_tokens"]
    assert dropped > 0
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("chat-tui: note: the prompt was cut")
    assert f" {dropped} of " in result.stderr and "(128-token window)" in result.stderr
    short = run("ask", "Hello", "--model", str(tiny_checkpoint), "--max-new-tokens", "4")
    assert short.returncode == 0 and short.stderr == ""


@pytest.fixture(scope="module")
def escape_checkpoint(tmp_path_factory, tiny_tokenizer):
    """A mini-GPT that answers anything with the token "\x1b[" (the start of an escape sequence), again
    and again: its final LayerNorm ignores the input and points at that token's (lengthened) embedding."""
    import torch

    from chat_tui.engine.checkpoint import save_checkpoint
    from chat_tui.engine.model import GPT, GPTConfig
    from chat_tui.engine.params import SamplingParams

    (escape,) = [i for i in tiny_tokenizer.encode("\x1b[2J") if tiny_tokenizer.decode([i]) == "\x1b["]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tiny_tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32))
    with torch.no_grad():
        model.transformer.wte.weight[escape] *= 5
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(model.transformer.wte.weight[escape])
    folder = tmp_path_factory.mktemp("escape") / "escape"
    save_checkpoint(folder, model, tiny_tokenizer, SamplingParams(temperature=0, max_new_tokens=3))
    return folder


def test_ask_shows_escape_codes_as_visible_stand_ins_unless_raw(escape_checkpoint):
    shown = run("ask", "Hello", "--model", str(escape_checkpoint))
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == "\u241b[" * 3 + "\n"  # ␛[ : what the app shows too
    raw = run("ask", "Hello", "--model", str(escape_checkpoint), "--raw")
    assert raw.returncode == 0 and raw.stdout == "\x1b[" * 3 + "\n"
    exact = run("ask", "Hello", "--model", str(escape_checkpoint), "--json")
    tokens = [json.loads(line).get("token") for line in exact.stdout.splitlines()[:-1]]
    assert tokens == ["\x1b["] * 3 and "\x1b" not in exact.stdout  # JSON keeps the text, escaped


def test_clean_json_keeps_the_values_and_leaves_no_raw_control():
    from chat_tui.textsafe import clean_json

    record = {"token": "a\x1b[2J\x7f\x9b31m\u202eb\n", "top": [{"token": "\x85"}]}
    line = clean_json(json.dumps(record, ensure_ascii=False))
    assert json.loads(line) == record
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or c == "\u202e" for c in line)


def test_ask_on_a_hugging_face_model_keeps_stderr_empty(tmp_path, tiny_checkpoint):
    from chat_tui.engine.export import export_hf

    folder = export_hf(tiny_checkpoint, tmp_path / "hf")  # a GPT2LMHeadModel folder that transformers loads
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE")}
    # --json: one line per token even if the random model's reply is blank; --seed: the same reply every run
    result = run("ask", "Hello", "--model", str(folder), "--max-new-tokens", "4", "--seed", "0", "--json", env=env)
    assert result.returncode == 0 and '"done": true' in result.stdout, result.stderr
    assert result.stderr == ""  # no "Loading weights: 0%|…" in a pipe or a log
