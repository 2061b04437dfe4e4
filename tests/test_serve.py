"""`chat-tui serve` against the official `openai` SDK, over a real socket on a loopback port.

The server runs the real engines (the bundled mini-GPT, a tiny random mini-GPT whose replies rarely
end on their own); the clients are the official SDK and plain httpx for what the SDK cannot send
(invalid JSON, an oversized body).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai", reason="the openai extra is not installed (pip install 'chat-tui[openai]')")
pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'chat-tui[serve]')")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed")
httpx = pytest.importorskip("httpx2", reason="httpx2 comes with the openai SDK")  # the SDK's HTTP client

from chat_tui.engine import Message, load_engine  # noqa: E402
from chat_tui.engine.types import collect  # noqa: E402
from chat_tui.serve import create_app  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`create_app(engine)` served by uvicorn in a thread, on a free loopback port."""

    def __init__(self, engine, **options) -> None:
        self.engine = engine
        self.port = free_port()
        config = uvicorn.Config(create_app(engine, **options), host="127.0.0.1", port=self.port,
                                log_level="error", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self, key: str = "unused", **options):
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=60, **options)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class Counting:
    """A real engine whose streams are counted (how many tokens each made, whether it ended) and
    paced: `delay` seconds a token, as a bigger model would take, so a reply lasts long enough to
    be interrupted or to hold the queue."""

    def __init__(self, engine, delay: float = 0.0) -> None:
        self._engine = engine
        self.delay = delay
        self.streams: list[dict] = []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def stream(self, conversation, params, **kwargs):
        record = {"tokens": 0, "ended": False, "cancel": kwargs.get("cancel")}
        self.streams.append(record)
        try:
            for step in self._engine.stream(conversation, params, **kwargs):
                record["tokens"] += 1
                time.sleep(self.delay)
                yield step
        finally:
            record["ended"] = True


@pytest.fixture(scope="module")
def bundled():
    return load_engine(None)


@pytest.fixture(scope="module")
def bundled_server(bundled):
    with Server(bundled) as server:
        yield server


def test_models_lists_the_served_model(bundled_server):
    models = bundled_server.client().models.list()
    assert [m.id for m in models.data] == [bundled_server.engine.model_name]


def test_a_greedy_reply_is_the_engines_own_reply(bundled_server, bundled):
    client = bundled_server.client()
    answer = client.chat.completions.create(
        model=bundled.model_name, messages=[{"role": "user", "content": "What is AI?"}], temperature=0,
        max_tokens=40)
    own = collect(bundled.stream([Message("user", "What is AI?")],
                                 bundled.default_params().with_(temperature=0, max_new_tokens=40)))
    assert answer.choices[0].message.content == own.text
    assert answer.choices[0].message.role == "assistant"
    assert answer.usage.completion_tokens == own.tokens
    assert answer.usage.prompt_tokens == len(bundled.render([Message("user", "What is AI?")])[0])
    assert answer.choices[0].finish_reason in {"stop", "length"}


def test_streamed_chunks_add_up_to_the_whole_reply(bundled_server, bundled):
    client = bundled_server.client()
    kwargs = dict(model=bundled.model_name, messages=[{"role": "system", "content": "Be brief."},
                                                      {"role": "user", "content": "Hello!"}],
                  temperature=0.8, seed=7, max_tokens=30)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole and text
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals in (["stop"], ["length"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_logprobs_are_the_engines_raw_probabilities(bundled_server, bundled):
    client = bundled_server.client()
    answer = client.chat.completions.create(
        model=bundled.model_name, messages=[{"role": "user", "content": "Tell me a joke"}], temperature=0,
        max_tokens=12, logprobs=True, top_logprobs=5)
    content = answer.choices[0].logprobs.content
    params = bundled.default_params().with_(temperature=0, max_new_tokens=12, top_candidates=5)
    steps = list(bundled.stream([Message("user", "Tell me a joke")], params, candidates=True))
    assert len(content) == len(steps)
    for entry, step in zip(content, steps, strict=True):
        assert entry.token == step.token
        assert math.exp(entry.logprob) == pytest.approx(step.prob, abs=1e-5)
        assert [t.token for t in entry.top_logprobs] == [c.text for c in step.top[:5]]
        for top, candidate in zip(entry.top_logprobs, step.top, strict=False):
            assert math.exp(top.logprob) == pytest.approx(candidate.prob, abs=1e-5)
        assert bytes(entry.bytes).decode("utf-8", "replace") == step.text


def test_a_token_that_is_part_of_a_character_is_sent_with_its_own_byte(bundled_server, bundled):
    fragments = bundled.encode("龍")  # E9 BE 8D: three tokens, none a character alone
    assert len(fragments) == 3
    client = bundled_server.client()
    answer = client.chat.completions.create(
        model=bundled.model_name, messages=[{"role": "user", "content": "Hi"}], temperature=0, max_tokens=6,
        logprobs=True, logit_bias={str(i): 100 for i in fragments})
    content = answer.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert len(entry.bytes) == 1 and entry.bytes[0] in (0xE9, 0xBE, 0x8D)
        assert entry.token == f"<0x{entry.bytes[0]:02X}>"


def post_json(url: str, body: dict) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_tokenize_and_detokenize_answer_as_vllms_do(bundled_server, bundled):
    from chat_tui.engine.remote_tokens import pieces_from_strings

    root = f"http://127.0.0.1:{bundled_server.port}/"
    text = "Hello 龍!"
    _, answer = post_json(root + "tokenize", {"model": bundled.model_name, "prompt": text, "return_token_strs": True})
    assert answer["tokens"] == bundled.encode(text) and answer["count"] == len(answer["tokens"])
    assert answer["max_model_len"] == bundled.context_length
    pieces = pieces_from_strings(text, answer["tokens"], answer["token_strs"])
    assert pieces is not None and b"".join(p.data for p in pieces) == text.encode()
    assert post_json(root + "detokenize", {"model": bundled.model_name, "tokens": answer["tokens"]}) == (
        200, {"prompt": text})
    status, bad = post_json(root + "tokenize", {"model": bundled.model_name, "messages": []})
    assert status == 400 and "prompt is required" in bad["error"]["message"]
    status, wrong = post_json(root + "detokenize", {"model": bundled.model_name, "tokens": [10**9]})
    assert status == 400 and "outside the vocabulary" in wrong["error"]["message"]
    status, unknown = post_json(root + "tokenize", {"model": "other", "prompt": text})
    assert status == 404


def test_a_seed_reproduces_a_sampled_reply(bundled_server, bundled):
    client = bundled_server.client()

    def ask(seed: int) -> str:
        return client.chat.completions.create(
            model=bundled.model_name, messages=[{"role": "user", "content": "Tell me about robots"}],
            temperature=1.2, seed=seed, max_tokens=40, extra_body={"top_k": 0}).choices[0].message.content

    first = ask(1)
    assert ask(1) == first
    assert any(ask(seed) != first for seed in (2, 3, 4))


def test_every_sampling_setting_is_accepted_by_its_openai_or_vllm_name(bundled_server, bundled):
    client = bundled_server.client()
    answer = client.chat.completions.create(
        model=bundled.model_name, messages=[{"role": "user", "content": "Hi"}], temperature=0.7, top_p=0.9,
        presence_penalty=0.5, frequency_penalty=0.2, seed=3, stop=["\n\n"], max_completion_tokens=10,
        extra_body={"top_k": 20, "min_p": 0.05, "typical_p": 0.95, "repetition_penalty": 1.1})
    assert answer.usage.completion_tokens <= 10


def test_logit_bias_is_applied_and_a_banned_token_never_appears(bundled_server, bundled):
    client = bundled_server.client()
    messages = [{"role": "user", "content": "What is AI?"}]
    greedy = collect(bundled.stream([Message("user", "What is AI?")],
                                    bundled.default_params().with_(temperature=0, max_new_tokens=20)))
    banned = greedy.steps[0]  # the token the model would start with
    for sampling in ({"temperature": 0}, {"temperature": 1.3, "seed": 5, "extra_body": {"top_k": 0}}):
        answer = client.chat.completions.create(model=bundled.model_name, messages=messages, max_tokens=20,
                                                logit_bias={str(banned.token_id): -100}, logprobs=True,
                                                **sampling)
        tokens = [entry.token for entry in answer.choices[0].logprobs.content]
        assert tokens and banned.token not in tokens
    # the reply is the engine's own under the same bias
    params = bundled.default_params().with_(temperature=0, max_new_tokens=20, logit_bias={banned.token_id: -100})
    own = collect(bundled.stream([Message("user", "What is AI?")], params))
    answer = client.chat.completions.create(model=bundled.model_name, messages=messages, max_tokens=20,
                                            temperature=0, logit_bias={str(banned.token_id): -100})
    assert answer.choices[0].message.content == own.text != greedy.text


def test_a_completion_continues_the_text(bundled_server, bundled):
    client = bundled_server.client()
    answer = client.completions.create(model=bundled.model_name, prompt="Once upon a time", temperature=0,
                                       max_tokens=8, logprobs=3)
    choice = answer.choices[0]
    assert choice.text and answer.usage.completion_tokens == len(choice.logprobs.tokens)
    assert all(len(top) <= 3 for top in choice.logprobs.top_logprobs)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=bundled.model_name, prompt="Once upon a time", temperature=0, max_tokens=8, stream=True))
    assert streamed == choice.text


@pytest.mark.parametrize(
    ("change", "status", "param"),
    [
        ({"model": "gpt-5"}, 404, "model"),
        ({"temperature": -1}, 400, "temperature"),
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"top_logprobs": 50, "logprobs": True}, 400, "top_logprobs"),
        ({"n": 2}, 400, "n"),
        ({"logit_bias": {"5": 500}}, 400, "logit_bias"),
        ({"logit_bias": {"-5": 10}}, 400, "logit_bias"),
        ({"logit_bias": [5, 10]}, 400, "logit_bias"),
        ({"messages": [{"role": "user", "content": "   \n "}]}, 400, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "word " * 2000}]}, 400, "messages"),
    ],
)
def test_a_bad_request_gets_the_openai_error_object(bundled_server, bundled, change, status, param):
    body = {"model": bundled.model_name, "messages": [{"role": "user", "content": "hi"}], **change}
    response = httpx.post(f"{bundled_server.url}/chat/completions", json=body, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    if change.get("model"):
        assert bundled.model_name in error["message"] and error["code"] == "model_not_found"
    if param == "messages" and "word" in json.dumps(change):
        assert error["code"] == "context_length_exceeded"


def test_the_sdk_raises_its_own_error_classes(bundled_server, bundled):
    client = bundled_server.client()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=bundled.model_name, messages=[{"role": "user", "content": "hi"}],
                                       temperature=-1)


def test_invalid_json_and_an_oversized_body_are_refused(bundled_server):
    url = f"{bundled_server.url}/chat/completions"
    response = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    response = httpx.post(url, content=b"x" * 1_100_000, timeout=30)
    assert response.status_code == 413 and "limit" in response.json()["error"]["message"]


def test_a_key_is_required_when_one_is_set(bundled):
    with Server(bundled, api_key="s3cret") as server:
        with pytest.raises(openai.AuthenticationError) as caught:
            server.client("wrong").models.list()
        assert "s3cret" not in str(caught.value)
        assert server.client("s3cret").models.list().data


@pytest.fixture
def random_model(tiny_checkpoint):
    """A tiny mini-GPT with random weights: its replies run to max_tokens (it rarely says <|end|>)."""
    return Counting(load_engine(tiny_checkpoint, device="cpu"), delay=0.05)


def test_a_client_that_disconnects_stops_the_generation(random_model):
    with Server(random_model) as server:
        body = {"model": random_model.model_name, "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 120, "stream": True, "seed": 3}  # a seed whose reply runs to max_tokens
        with httpx.stream("POST", f"{server.url}/chat/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data: ") and '"content"' in line:
                    break
        deadline = time.monotonic() + 30
        while not random_model.streams[-1]["ended"] and time.monotonic() < deadline:
            time.sleep(0.01)
        record = random_model.streams[-1]
        assert record["ended"] and record["cancel"].is_set()
        # the client read one token and left: the model stops within a token (4 leaves room for a loaded machine)
        assert record["tokens"] <= 4
        # the model is free again: the next request is answered
        answer = server.client().chat.completions.create(
            model=random_model.model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
            seed=3)  # a seed whose reply does not end on its own before max_tokens
        assert answer.usage.completion_tokens == 3


def test_two_clients_at_once_each_get_their_whole_reply(random_model):
    def ask(seed: int) -> str:
        return server.client().chat.completions.create(
            model=random_model.model_name, messages=[{"role": "user", "content": "hello"}], seed=seed,
            temperature=1.0, max_tokens=25).choices[0].message.content

    with Server(random_model) as server:
        alone = {seed: ask(seed) for seed in (1, 2)}
        results: dict[int, str] = {}
        threads = [threading.Thread(target=lambda s=s: results.__setitem__(s, ask(s))) for s in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == alone


def test_a_full_queue_answers_429(random_model):
    with Server(random_model, max_queue=0) as server:
        body = {"model": random_model.model_name, "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 120, "stream": True, "seed": 3}  # a seed whose reply runs to max_tokens
        with httpx.stream("POST", f"{server.url}/chat/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)  # the first reply holds the model
            with pytest.raises(openai.RateLimitError, match="busy"):
                server.client().chat.completions.create(
                    model=random_model.model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=2)


# ------------------------------------------------------------------ the command, as a user runs it

@contextlib.contextmanager
def chat_tui_serve(*args: str, env: dict | None = None):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "chat_tui", "serve", "--port", str(port), *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise AssertionError(f"chat-tui serve exited: {process.stderr.read()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            if time.monotonic() > deadline:
                raise AssertionError("chat-tui serve did not start listening")
            time.sleep(0.1)
        yield port, process
    finally:
        process.terminate()
        process.wait(10)


def test_chat_tui_serve_runs_the_model_in_its_own_process_for_the_sdk():
    with chat_tui_serve("--api-key-env", "CHAT_TUI_SERVE_KEY", env={"CHAT_TUI_SERVE_KEY": "k-123"}) as (port, _):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k-123", max_retries=0)
        model = client.models.list().data[0].id
        chunks = list(client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hello!"}], stream=True, temperature=0, max_tokens=20))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_serving_beyond_this_machine_without_a_key_warns():
    with chat_tui_serve("--host", "0.0.0.0") as (_, process):
        pass
    assert "without a key" in process.stderr.read()


def test_a_missing_key_variable_is_a_one_line_error():
    done = subprocess.run([sys.executable, "-m", "chat_tui", "serve", "--api-key-env", "CHAT_TUI_NO_SUCH_VAR"],
                          capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k != "CHAT_TUI_NO_SUCH_VAR"})
    assert done.returncode == 2
    assert done.stderr.strip() == ("chat-tui: error: --api-key-env CHAT_TUI_NO_SUCH_VAR: the variable is not set "
                                   "or empty")


def test_a_hugging_face_checkpoint_is_served_too(tmp_path):
    pytest.importorskip("transformers", reason="the hf extra is not installed (pip install 'chat-tui[hf]')")
    from chat_tui.engine import bundled_model_path
    from chat_tui.engine.export import export_hf

    engine = load_engine(export_hf(bundled_model_path(), tmp_path / "hf"), device="cpu")  # torch, transformers
    assert engine.backend == "hf"
    hello = [{"role": "user", "content": "What is AI?"}]
    with Server(engine) as server:
        answer = server.client().chat.completions.create(model=engine.model_name, messages=hello, temperature=0,
                                                         max_tokens=20, logprobs=True, top_logprobs=3)
    own = collect(engine.stream([Message("user", "What is AI?")],
                                engine.default_params().with_(temperature=0, max_new_tokens=20, top_candidates=3)))
    assert answer.choices[0].message.content == own.text and own.text
    entries = answer.choices[0].logprobs.content
    assert [e.token for e in entries] == [s.token for s in own.steps]
    assert [math.exp(e.logprob) for e in entries] == pytest.approx([s.prob for s in own.steps], abs=1e-5)


@pytest.mark.parametrize(("field", "value", "setting"), [("temperature", -1, "temperature"), ("top_p", 2, "top_p"),
                                                          ("max_tokens", 0, "max_new_tokens")])
def test_an_out_of_range_setting_gets_the_apps_own_message(bundled_server, bundled, field, value, setting):
    from chat_tui.engine.params import InvalidParameter, SamplingParams

    with pytest.raises(InvalidParameter) as app_says:
        SamplingParams().with_(**{setting: value})
    body = {"model": bundled.model_name, "messages": [{"role": "user", "content": "hi"}], field: value}
    response = httpx.post(f"{bundled_server.url}/chat/completions", json=body, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == str(app_says.value).replace(setting, field, 1)
