"""The OpenAI-compatible client (`--base-url`) against real servers on loopback ports.

- `transformers serve`, a server this project did not write, serving the bundled model exported
  to the Hugging Face format, offline;
- `chat-tui serve` (the same model), for what transformers serve does not give (logprobs);
- small local HTTP servers for the faults a real server does not produce on demand: a refused
  connection, a server that sleeps past the timeout, one that closes mid-stream, one that answers
  429 with Retry-After, one that sends a malformed event.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("openai", reason="the openai extra is not installed (pip install 'chat-tui[openai]')")

from chat_tui.engine import Message, load_engine  # noqa: E402
from chat_tui.engine.remote import RemoteEngine, ServerError, public_url, read_key  # noqa: E402
from chat_tui.engine.types import collect  # noqa: E402

HELLO = [Message("user", "What is AI?")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        if process.poll() is not None:
            raise AssertionError(f"the server exited: {process.stderr.read() if process.stderr else ''}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        if time.monotonic() > deadline:
            raise AssertionError("the server did not start listening")
        time.sleep(0.2)


@contextlib.contextmanager
def running(command: list[str], port: int, seconds: float = 120):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for_port(port, process, seconds)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    from chat_tui.engine import bundled_model_path
    from chat_tui.engine.export import export_hf

    out = tmp_path_factory.mktemp("export") / "minigpt-hf"
    export_hf(bundled_model_path(), out)
    return out


def transformers_cli() -> str:
    """The `transformers` CLI beside this interpreter (its venv need not be on PATH), else on PATH."""
    cli = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
    if cli is None:
        pytest.skip("the transformers CLI is not installed")
    pytest.importorskip("fastapi", reason="transformers serve needs fastapi and uvicorn (the serve extra)")
    pytest.importorskip("accelerate", reason="transformers serve needs accelerate (the hf extra)")
    return cli


@pytest.fixture(scope="module")
def transformers_serve(exported):
    """`transformers serve FOLDER --port P`, offline; the model id in requests is the folder path."""
    cli = transformers_cli()
    port = free_port()
    with running([cli, "serve", str(exported), "--port", str(port), "--host", "127.0.0.1"], port):
        url = f"http://127.0.0.1:{port}/v1"
        RemoteEngine(url, str(exported), timeout=300).close()  # the first request loads the model
        yield url


@pytest.fixture(scope="module")
def two_models_url(tmp_path_factory):
    """`transformers serve` with no model: it lists the generative models of its Hugging Face cache,
    here two copies of the exported bundled model (chat-tui/minigpt-a and -b), loaded offline."""
    from chat_tui.engine import bundled_model_path
    from chat_tui.engine.export import export_hf

    cli = transformers_cli()
    root = tmp_path_factory.mktemp("two-models")
    exported = export_hf(bundled_model_path(), root / "exported")
    cache = root / "hub"
    commit = "0" * 40
    for name in ("minigpt-a", "minigpt-b"):  # the hub cache's layout: refs/main names a snapshot
        repo = cache / f"models--chat-tui--{name}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        shutil.copytree(exported, repo / "snapshots" / commit)
    port = free_port()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_CACHE", str(cache))  # the server's cache; it takes a copy of the environment
        server = running([cli, "serve", "--port", str(port), "--host", "127.0.0.1"], port)
        server.__enter__()
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.__exit__(None, None, None)


@pytest.fixture(scope="module")
def chat_tui_serve():
    pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'chat-tui[serve]')")
    port = free_port()
    command = [sys.executable, "-m", "chat_tui", "serve", "--port", str(port), "--api-key-env", "CT_TEST_KEY"]
    os.environ["CT_TEST_KEY"] = "sk-test-4242"
    try:
        with running(command, port, seconds=60):
            yield f"http://127.0.0.1:{port}/v1"
    finally:
        del os.environ["CT_TEST_KEY"]


@pytest.fixture(scope="module")
def bundled():
    return load_engine(None)


# ------------------------------------------------------------------------ transformers serve

def test_a_greedy_reply_from_transformers_serve_is_the_bundled_models_own(transformers_serve, exported, bundled):
    engine = RemoteEngine(transformers_serve, timeout=300)  # no --model: the server's only one
    assert engine.model_name == str(exported)
    params = bundled.default_params().with_(temperature=0, max_new_tokens=24, top_k=0, top_p=1.0)
    remote = collect(engine.stream(HELLO, params, candidates=False))
    local = collect(bundled.stream(HELLO, params))
    assert remote.text == local.text and remote.tokens == local.tokens
    assert engine.last_request["temperature"] == 0 and engine.last_request["max_tokens"] == 24


def test_stop_mid_reply_closes_the_stream_and_keeps_the_partial_reply(transformers_serve, bundled):
    engine = RemoteEngine(transformers_serve, timeout=300)
    cancel = threading.Event()
    steps = []
    started = time.monotonic()
    for step in engine.stream(HELLO, bundled.default_params().with_(temperature=0, max_new_tokens=200),
                              cancel=cancel, candidates=False):
        steps.append(step)
        if len(steps) == 3:
            cancel.set()
    assert 3 <= len(steps) <= 4 and steps[-1].finish_reason == "cancelled"
    assert time.monotonic() - started < 120
    again = collect(engine.stream(HELLO, bundled.default_params().with_(temperature=0, max_new_tokens=5)))
    assert again.text  # the next prompt works


def test_the_tokens_of_a_transformers_serve_model_come_from_its_tokenizer_on_this_machine(transformers_serve,
                                                                                           exported):
    from chat_tui.engine.inside import inside

    engine = RemoteEngine(transformers_serve, timeout=300)  # its model id: the folder it serves
    local = load_engine(str(exported), device="cpu")
    text = "Hello 你好 🙂, [bold]x[/bold]"
    pieces = inside(engine).token_pieces(text)
    assert [p.id for p in pieces] == local.encode(text)
    assert b"".join(p.data for p in pieces) == text.encode("utf-8")
    assert [p.text for p in pieces] == [p.text for p in local.token_pieces(text)]


def test_the_tokens_of_a_chat_tui_serve_model_come_from_its_tokenize(chat_tui_serve, bundled):
    engine = RemoteEngine(chat_tui_serve, api_key="sk-test-4242", timeout=60)
    text = "Hi 猫🎉 and 你好"
    pieces = engine.token_pieces(text)
    assert engine._tokens_source == "server"  # the model id, "minigpt", is no tokenizer on this machine
    assert pieces == bundled.token_pieces(text)  # ids, labels (<0xE7>), bytes and characters alike


def test_a_setting_the_server_rejects_is_dropped_once_and_remembered(transformers_serve, bundled):
    engine = RemoteEngine(transformers_serve, timeout=300)
    params = bundled.default_params().with_(temperature=0, max_new_tokens=8, top_k=5)
    reply = collect(engine.stream(HELLO, params, candidates=False))
    assert reply.text
    assert "top_k" in engine.unsupported and "top_k" not in engine.last_request
    assert "top_k" in (engine.last_note or "")
    collect(engine.stream(HELLO, params, candidates=False))
    assert "top_k" not in engine.last_request and engine.last_note is None  # not sent, not retried


def test_a_rejected_setting_is_remembered_for_the_next_connection(transformers_serve, bundled, tmp_path):
    memory = tmp_path / "servers.json"
    params = bundled.default_params().with_(temperature=0, max_new_tokens=8, top_k=5)
    first = RemoteEngine(transformers_serve, timeout=300, remember=memory)
    collect(first.stream(HELLO, params, candidates=False))
    assert "top_k" in first.unsupported and "does not take" in first.last_note and "top_k" in first.last_note
    second = RemoteEngine(transformers_serve, timeout=300, remember=memory)  # a new connection, as a new session
    assert "top_k" in second.unsupported
    reply = collect(second.stream(HELLO, params, candidates=False))
    assert reply.text and "top_k" not in second.last_request
    # its first request went without top_k: no rejection, no retry, and the reply says why it was left out
    assert "does not take" not in second.last_note and "before: left out" in second.last_note
    assert "top_k" in second.last_note
    assert "top_k" in reply.steps[0].prompt.unsupported  # what marks the sampling pane's row


def test_a_wrong_model_name_lists_the_servers_models(transformers_serve, exported):
    with pytest.raises(ServerError) as caught:
        RemoteEngine(transformers_serve, "gpt-7", timeout=300)
    message = str(caught.value)
    assert "gpt-7" in message and str(exported) in message and "\n" not in message


# ------------------------------------------------------------------------ chat-tui serve

def test_probabilities_come_from_the_servers_logprobs(chat_tui_serve, bundled):
    engine = RemoteEngine(chat_tui_serve, api_key="sk-test-4242")
    params = bundled.default_params().with_(temperature=0, max_new_tokens=10, top_candidates=5)
    remote = list(engine.stream(HELLO, params, candidates=True))
    local = list(bundled.stream(HELLO, params, candidates=True))
    assert [s.token for s in remote] == [s.token for s in local]
    for r, s in zip(remote, local, strict=True):
        assert r.prob == pytest.approx(s.prob, abs=1e-5)
        assert [c.text for c in r.top] == [c.text for c in s.top[:5]]
        assert math.isnan(r.chain_prob)  # the server's own sampler chose: no chain to replay
    assert engine.attention_unavailable and "OpenAI protocol" in engine.attention_unavailable


def test_a_logit_bias_is_sent_and_the_server_bans_the_token(chat_tui_serve, bundled):
    engine = RemoteEngine(chat_tui_serve, api_key="sk-test-4242")
    greedy = bundled.default_params().with_(temperature=0, max_new_tokens=12)
    first = collect(bundled.stream(HELLO, greedy)).steps[0]  # the token the model would start with
    banned = greedy.with_(logit_bias={first.token_id: -100})
    remote = collect(engine.stream(HELLO, banned, candidates=True))
    assert engine.last_request["logit_bias"] == {str(first.token_id): -100}
    assert first.token not in [s.token for s in remote.steps]
    assert remote.text == collect(bundled.stream(HELLO, banned)).text  # the engine's own reply under the bias


def test_ask_with_base_url_prints_the_reply_and_a_receipt(chat_tui_serve):
    env = {**os.environ, "CT_KEY": "sk-test-4242"}
    done = subprocess.run([sys.executable, "-m", "chat_tui", "ask", "Hello!", "--base-url", chat_tui_serve,
                           "--api-key-env", "CT_KEY", "--temperature", "0", "--max-new-tokens", "12", "--json"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    tokens, summary = lines[:-1], lines[-1]
    assert tokens and all(0 < t["prob"] <= 1 for t in tokens)
    assert all(t["top"] and all(0 < c["prob"] <= 1 for c in t["top"]) for t in tokens)  # the server's top_logprobs
    assert summary["server"] == chat_tui_serve and summary["sent"]["temperature"] == 0
    assert "sk-test-4242" not in done.stdout + done.stderr


def test_a_wrong_key_is_one_line_that_never_shows_the_key(chat_tui_serve):
    env = {**os.environ, "CT_KEY": "sk-wrong-key-777"}
    done = subprocess.run([sys.executable, "-m", "chat_tui", "ask", "Hello!", "--base-url", chat_tui_serve,
                           "--api-key-env", "CT_KEY"], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "refused the key (401)" in done.stderr
    assert "sk-wrong-key-777" not in done.stderr + done.stdout


# ------------------------------------------------------------------------ faults, on real sockets

class Scripted(BaseHTTPRequestHandler):
    """An OpenAI-ish server whose chat answer is `behaviour` (set per test)."""

    behaviour = "ok"
    owned_by = "test"  # "vllm": the server family that continues a message in place
    calls: list[dict] = []

    def log_message(self, *args) -> None:  # quiet
        pass

    def _json(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._json(200, {"object": "list", "data": [{"id": "m1", "object": "model", "owned_by": self.owned_by}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        type(self).calls.append(body)
        behaviour = type(self).behaviour
        if behaviour == "sleep":
            time.sleep(3)
            return
        if behaviour == "401-echo":  # as the OpenAI API does: the message quotes the key it refused
            key = self.headers.get("authorization", "").removeprefix("Bearer ")
            self._json(401, {"error": {"message": f"Incorrect API key provided: {key}.", "type": "invalid_request_error"}})
            return
        if behaviour == "no-top-k" and "top_k" in body:  # as the OpenAI API answers an extra field
            self._json(400, {"error": {"message": "Unrecognized request argument supplied: top_k",
                                       "type": "invalid_request_error", "param": None, "code": None}})
            return
        if behaviour == "reasoning" and "max_tokens" in body:  # the OpenAI API's reasoning models
            self._json(400, {"error": {"message": "Unsupported parameter: 'max_tokens' is not supported with this "
                                       "model. Use 'max_completion_tokens' instead.", "type": "invalid_request_error",
                                       "param": "max_tokens", "code": "unsupported_parameter"}})
            return
        if behaviour in ("400", "503"):
            message = "the prompt is too long for this model" if behaviour == "400" else "the model is loading"
            self._json(int(behaviour), {"error": {"message": message, "type": "error"}})
            return
        if behaviour.startswith("429"):
            if behaviour == "429-then-ok" and len(type(self).calls) > 1:
                behaviour = "ok"
            else:
                wait = "0.2" if behaviour == "429-then-ok" else "600"
                self._json(429, {"error": {"message": "slow down", "type": "rate_limit"}}, {"retry-after": wait})
                return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()

        def event(content: str) -> bytes:
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m1",
                     "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}
            return b"data: " + json.dumps(chunk).encode() + b"\n\n"

        self.wfile.write(event("Hello") + event(" there"))
        self.wfile.flush()
        if behaviour == "stall":  # silent between two tokens, past the client's timeout
            time.sleep(3)
            return
        if behaviour == "close":
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if behaviour == "malformed":
            self.wfile.write(b"data: {this is not json\n\n")
            self.wfile.flush()
            return
        done = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m1",
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        self.wfile.write(b"data: " + json.dumps(done).encode() + b"\n\ndata: [DONE]\n\n")


@pytest.fixture
def scripted():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    Scripted.calls = []
    Scripted.owned_by = "test"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def reply_and_error(engine, params=None):
    from chat_tui.engine import SamplingParams

    steps, error = [], None
    try:
        for step in engine.stream(HELLO, params or SamplingParams(max_new_tokens=20)):
            steps.append(step)
    except ServerError as exc:
        error = exc
    return "".join(s.text for s in steps), error


def test_nothing_listening_is_one_line_naming_the_server():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ServerError, match=r"cannot connect .*is the server running") as caught:
        RemoteEngine(url, "m1", timeout=5)
    assert public_url(url) in str(caught.value) and "\n" not in str(caught.value)


def test_a_server_that_sleeps_past_the_timeout_says_so(scripted):
    _, url = scripted
    Scripted.behaviour = "sleep"
    engine = RemoteEngine(url, timeout=0.5)
    text, error = reply_and_error(engine)
    assert text == "" and error is not None and "no answer within 0.5 s" in str(error)


def test_a_server_that_closes_mid_stream_keeps_the_partial_reply(scripted):
    _, url = scripted
    Scripted.behaviour = "close"
    text, error = reply_and_error(RemoteEngine(url, timeout=5))
    assert text == "Hello there" and error is not None and url in str(error)
    Scripted.behaviour = "ok"
    assert reply_and_error(RemoteEngine(url, timeout=5)) == ("Hello there", None)  # the next prompt works


def test_a_malformed_event_is_named(scripted):
    _, url = scripted
    Scripted.behaviour = "malformed"
    text, error = reply_and_error(RemoteEngine(url, timeout=5))
    assert text == "Hello there" and error is not None and "\n" not in str(error)


def test_429_is_waited_out_when_the_server_asks_for_little_and_reported_when_for_long(scripted):
    _, url = scripted
    Scripted.behaviour = "429-then-ok"
    started = time.monotonic()
    assert reply_and_error(RemoteEngine(url, timeout=5)) == ("Hello there", None)
    assert time.monotonic() - started >= 0.2 and len(Scripted.calls) == 2
    Scripted.behaviour = "429-long"
    text, error = reply_and_error(RemoteEngine(url, timeout=5))
    assert text == "" and "busy (429)" in str(error) and "600" in str(error)


def test_a_random_seed_is_chosen_here_sent_and_shown(scripted):
    from chat_tui.engine import SamplingParams

    _, url = scripted
    Scripted.behaviour = "ok"
    steps = list(RemoteEngine(url, timeout=5).stream(HELLO, SamplingParams(seed=None)))
    assert Scripted.calls[-1]["seed"] == steps[0].prompt.seed >= 0


def test_every_setting_is_sent_under_the_servers_names(scripted):
    from chat_tui.engine import SamplingParams

    _, url = scripted
    Scripted.behaviour = "ok"
    params = SamplingParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, typical_p=0.95,
                            repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.25, seed=3,
                            stop=("\n\n",), max_new_tokens=50, top_candidates=8, logit_bias="50256:-100,198:5")
    reply_and_error(RemoteEngine(url, timeout=5), params)
    sent = Scripted.calls[-1]
    assert {k: sent[k] for k in sent if k not in ("model", "messages", "stream")} == {
        "temperature": 0.7, "top_k": 40, "top_p": 0.9, "min_p": 0.05, "typical_p": 0.95,
        "repetition_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": 0.25, "seed": 3,
        "stop": ["\n\n"], "max_tokens": 50, "logprobs": True, "top_logprobs": 8,
        "logit_bias": {"198": 5, "50256": -100}}  # the API's keys are token ids as strings
    assert sent["messages"] == [{"role": "user", "content": "What is AI?"}]


def test_rejected_fields_are_kept_per_server_and_model_without_the_key(scripted, tmp_path):
    from chat_tui.engine import SamplingParams

    _, url = scripted
    Scripted.behaviour = "no-top-k"
    memory = tmp_path / "data" / "servers.json"
    params = SamplingParams(top_k=40, max_new_tokens=20)
    assert reply_and_error(RemoteEngine(url, timeout=5, api_key="sk-secret-999", remember=memory), params) == \
        ("Hello there", None)
    assert ["top_k" in call for call in Scripted.calls] == [True, False]  # rejected, then sent again without
    kept = json.loads(memory.read_text())
    assert kept == {url: {"m1": {"unsupported": ["top_k"], "renamed": {}}}}
    assert "sk-secret-999" not in memory.read_text()
    Scripted.calls.clear()
    steps = list(RemoteEngine(url, timeout=5, remember=memory).stream(HELLO, params))
    assert len(Scripted.calls) == 1 and "top_k" not in Scripted.calls[0]  # left out from the first request
    assert steps[0].prompt.unsupported == ("top_k",)
    # another server (the same one under another name) starts clean
    Scripted.calls.clear()
    other = url.replace("127.0.0.1", "localhost")
    reply_and_error(RemoteEngine(other, timeout=5, remember=memory), params)
    assert "top_k" in Scripted.calls[0]


def test_a_corrupt_file_of_rejected_fields_is_ignored_and_written_anew(scripted, tmp_path):
    from chat_tui.engine import SamplingParams

    _, url = scripted
    Scripted.behaviour = "no-top-k"
    memory = tmp_path / "servers.json"
    for corrupt in (b"{not json", b"[1, 2]", b'{"%s": {"m1": {"unsupported": "top_k", "renamed": 3}}}' % url.encode()):
        memory.write_bytes(corrupt)
        Scripted.calls.clear()
        engine = RemoteEngine(url, timeout=5, remember=memory)
        assert engine.unsupported == set()
        assert reply_and_error(engine, SamplingParams(top_k=40, max_new_tokens=20)) == ("Hello there", None)
        assert "top_k" in Scripted.calls[0]
        assert json.loads(memory.read_text())[url]["m1"]["unsupported"] == ["top_k"]


def test_a_key_file_others_can_read_is_refused(tmp_path):
    key = tmp_path / "key"
    key.write_text("sk-file-key\n")
    key.chmod(0o644)
    with pytest.raises(ServerError, match="readable by others; chmod 600"):
        read_key(key_file=key)
    key.chmod(0o600)
    assert read_key(key_file=key) == "sk-file-key"


def test_the_url_is_shown_without_credentials():
    assert public_url("https://user:pa55@example.com:8443/v1/") == "https://example.com:8443/v1"


def test_rejected_fields_name_the_settings_behind_them():
    from chat_tui.engine.params import SamplingParams
    from chat_tui.engine.remote import unsupported_settings

    names = unsupported_settings(["logprobs", "top_logprobs", "max_tokens", "top_k", "presence_penalty"])
    assert names == {"top_candidates", "max_new_tokens", "top_k", "presence_penalty"}
    assert names <= set(SamplingParams().to_dict())  # each is a row of the sampling pane


@pytest.mark.parametrize(("behaviour", "said", "partial"), [
    ("400", "the prompt is too long for this model (400)", ""),
    ("503", "the model is loading (503)", ""),
    ("stall", "no answer within 0.5 s", "Hello there"),
])
def test_a_server_error_is_one_line_and_the_next_prompt_works(scripted, behaviour, said, partial):
    _, url = scripted
    Scripted.behaviour = behaviour
    engine = RemoteEngine(url, timeout=0.5)
    text, error = reply_and_error(engine)
    assert text == partial and error is not None
    assert str(error).startswith(url) and said in str(error) and "\n" not in str(error)
    Scripted.behaviour = "ok"
    assert reply_and_error(engine) == ("Hello there", None)


def test_a_tls_error_and_an_unknown_host_are_one_line(scripted):
    _, url = scripted
    tls = url.replace("http://", "https://")  # TLS to a server that speaks plain HTTP
    with pytest.raises(ServerError, match=r"cannot connect \(.*SSL") as caught:
        RemoteEngine(tls, "m1", timeout=5)
    assert str(caught.value).startswith(tls) and "\n" not in str(caught.value)
    with pytest.raises(ServerError, match=r"no-such-host\.invalid/v1: cannot connect"):
        RemoteEngine("http://no-such-host.invalid/v1", "m1", timeout=5)


@pytest.mark.parametrize("family", ["vllm", "test"])
def test_continue_sends_the_partial_reply_the_way_the_server_family_expects(scripted, family):
    from chat_tui.engine import SamplingParams

    _, url = scripted
    Scripted.behaviour = "ok"
    Scripted.owned_by = family
    partial = [*HELLO, Message("assistant", "Artificial")]
    steps = list(RemoteEngine(url, timeout=5).stream(partial, SamplingParams(max_new_tokens=20)))
    sent = Scripted.calls[-1]
    assert sent["messages"][-1] == {"role": "assistant", "content": "Artificial"}
    if family == "vllm":
        assert sent["continue_final_message"] is True and sent["add_generation_prompt"] is False
        assert steps[0].prompt.note is None
    else:
        assert "continue_final_message" not in sent
        assert "continued as a new request" in steps[0].prompt.note  # the receipt says so


def test_ask_without_a_model_on_a_server_with_several_names_them_in_one_line(two_models_url):
    done = subprocess.run([sys.executable, "-m", "chat_tui", "ask", "Hello!", "--base-url", two_models_url],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "chat-tui/minigpt-a" in done.stderr and "chat-tui/minigpt-b" in done.stderr
    assert "--model" in done.stderr


def test_a_server_that_quotes_the_key_in_its_error_never_gets_it_shown(scripted):
    _, url = scripted
    Scripted.behaviour = "401-echo"
    text, error = reply_and_error(RemoteEngine(url, api_key="sk-secret-31337", timeout=5))
    assert text == "" and "refused the key (401)" in str(error) and "sk-secret-31337" not in str(error)


def test_max_tokens_is_sent_as_max_completion_tokens_where_the_server_asks(scripted):
    from chat_tui.engine import SamplingParams

    _, url = scripted
    Scripted.behaviour = "reasoning"
    engine = RemoteEngine(url, timeout=5)
    steps = list(engine.stream(HELLO, SamplingParams(max_new_tokens=20, seed=1)))
    assert "".join(s.text for s in steps) == "Hello there"
    assert Scripted.calls[-1]["max_completion_tokens"] == 20 and "max_tokens" not in Scripted.calls[-1]
    assert "max_completion_tokens" in steps[0].prompt.note and steps[0].prompt.unsupported == ()
    assert engine.last_request["max_completion_tokens"] == 20  # the receipt: as sent
    calls = len(Scripted.calls)
    reply_and_error(engine)
    assert len(Scripted.calls) == calls + 1 and "max_completion_tokens" in Scripted.calls[-1]  # no retry again
def test_a_server_model_says_why_each_inside_view_is_not_shown(scripted):
    from chat_tui.engine.inside import INSIDE_VIEWS, inside

    _, url = scripted
    Scripted.behaviour = "ok"
    engine = RemoteEngine(url, timeout=5)
    reasons = inside(engine).inside_views()
    assert list(reasons) == list(INSIDE_VIEWS)
    assert all("\n" not in reason for reason in reasons.values() if reason)
    assert reasons["tokens"] is None  # offered: the server's /tokenize, else the tokenizer on this machine
    assert all(reasons[view] for view in INSIDE_VIEWS if view != "tokens")
    with pytest.raises(ServerError, match="has no /tokenize, and the tokenizer of 'm1' is not on this machine"):
        engine.token_pieces("hello")
    with pytest.raises(ServerError, match="keeps the model's layers"):
        engine.logit_lens([1, 2], 3)


def test_a_server_model_refuses_a_reply_with_heads_off_in_one_line(scripted):
    from chat_tui.engine import SamplingParams

    _, url = scripted
    Scripted.behaviour = "ok"
    engine = RemoteEngine(url, timeout=5)
    with pytest.raises(ServerError, match="heads cannot be switched off") as caught:
        list(engine.stream(HELLO, SamplingParams(), knock_out=frozenset({(0, 0)})))
    assert "\n" not in str(caught.value)


def test_a_server_model_refuses_a_reply_from_token_ids_in_one_line(scripted):
    """The chat API takes text, tokenized again on the server: a fork's exact ids cannot be sent."""
    from chat_tui.engine import SamplingParams

    _, url = scripted
    Scripted.behaviour = "ok"
    engine = RemoteEngine(url, timeout=5)
    with pytest.raises(ServerError, match="cannot be continued from token ids") as caught:
        list(engine.stream(HELLO, SamplingParams(), prefix_ids=[5, 6]))
    assert "\n" not in str(caught.value)
