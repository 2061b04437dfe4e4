"""`chat-tui serve`: the engine behind the OpenAI chat-completions protocol.

Any OpenAI client (the official SDK, curl, another chat UI) can then talk to a mini-GPT or a Hugging
Face checkpoint the way it talks to vLLM or the OpenAI API: `GET /v1/models`,
`POST /v1/chat/completions` and `POST /v1/completions`, streamed as server-sent events or not.

One model answers one request at a time: requests wait in a queue of at most `max_queue`
(a full queue answers 429). The model runs in a thread (`engine.stream` blocks); its steps reach
the event loop through an asyncio queue. A client that goes away mid-stream sets the reply's
cancel event, so the model stops within a token.

FastAPI and uvicorn are an optional extra (`pip install "chat-tui[serve]"`): this module imports
FastAPI, and nothing imports this module but `chat-tui serve` (and its tests).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import Request as HTTPRequest

from chat_tui.engine.explain import vocab_size_of
from chat_tui.engine.inside import inside
from chat_tui.engine.params import InvalidParameter, SamplingParams
from chat_tui.engine.token_bytes import byte_level_string, label_bytes
from chat_tui.engine.types import ROLES, Message, Step
from chat_tui.errors import CLIError, EngineError, first_line

if TYPE_CHECKING:
    from chat_tui.engine.types import Engine

MAX_BODY_BYTES = 1_000_000  # a request body larger than this is refused with 413
MAX_TOP_LOGPROBS = 20  # as the OpenAI API
LOOPBACK = {"127.0.0.1", "localhost", "::1"}

# OpenAI's name (or vLLM's extra one) -> the SamplingParams field it sets
PARAM_NAMES = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "typical_p": "typical_p",
    "repetition_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "seed": "seed",
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
}
# how a reply ended, in OpenAI's words (a cut by the context window is "length", as vLLM says)
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "cancelled": "stop"}


class APIError(Exception):
    """A request the server refuses: an OpenAI error object with its HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------- requests

@dataclass(frozen=True)
class Request:
    """A checked request: what to run and what to send back."""

    conversation: list[Message] | None  # chat completions
    prompt: str | None  # completions: the text the model continues
    params: SamplingParams
    stream: bool
    logprobs: bool
    top_logprobs: int
    include_usage: bool  # stream_options.include_usage


def parse_request(body: Any, defaults: SamplingParams, *, chat: bool) -> Request:
    """Check a request body and turn it into a Request; APIError (400/422) names the bad field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    n = body.get("n", 1)
    if n not in (1, None):
        raise APIError(400, f"n={n!r}: chat-tui serve answers one choice per request (n must be 1)", param="n")
    changes: dict[str, Any] = {}
    bias = body.get("logit_bias")
    if bias is not None:  # OpenAI's object of token ids (as strings) to biases in [-100, 100]
        if not isinstance(bias, dict):
            raise APIError(400, "logit_bias must be an object of token ids to biases, e.g. {\"50256\": -100}",
                           param="logit_bias")
        changes["logit_bias"] = bias
    for name, field in PARAM_NAMES.items():
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise APIError(400, f"{name} must be a number, not {json.dumps(value)[:40]}", param=name)
        changes[field] = value
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 16:
            raise APIError(400, "stop must be a string or a list of at most 16 strings", param="stop")
        changes["stop"] = tuple(s for s in stops if s)
    logprobs, top = _logprobs(body, chat=chat)
    if top:
        changes["top_candidates"] = top
    try:
        params = defaults.with_(**changes)
    except InvalidParameter as exc:  # the app's message, with the name the request used
        name = "top_logprobs" if exc.name == "top_candidates" else \
            next((k for k, f in PARAM_NAMES.items() if f == exc.name and k in body), exc.name)
        message = str(exc).replace(exc.name, name, 1) if name != exc.name else str(exc)
        raise APIError(400, message, param=name) from None
    except (TypeError, ValueError) as exc:
        raise APIError(400, first_line(exc)) from None
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be true or false", param="stream")
    options = body.get("stream_options") or {}
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    if chat:
        conversation, prompt = _messages(body.get("messages")), None
    else:
        conversation, prompt = None, _prompt(body.get("prompt"))
    return Request(conversation, prompt, params, stream, logprobs, top, include_usage)


def _logprobs(body: dict[str, Any], *, chat: bool) -> tuple[bool, int]:
    """(whether to send log-probabilities, how many alternatives per token)."""
    if chat:
        wanted = body.get("logprobs", False)
        if not isinstance(wanted, bool):
            raise APIError(400, "logprobs must be true or false", param="logprobs")
        top = body.get("top_logprobs")
        if top is None:
            return wanted, 0
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise APIError(400, f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}", param="top_logprobs")
        if top and not wanted:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return wanted, top
    top = body.get("logprobs")  # the completions API: an integer, the number of alternatives
    if top is None:
        return False, 0
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}", param="logprobs")
    return True, top


def _messages(messages: Any) -> list[Message]:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    out: list[Message] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise APIError(400, f"messages[{i}] must be an object with role and content", param="messages")
        role = "system" if message.get("role") == "developer" else message.get("role")
        if role not in ROLES:
            raise APIError(400, f"messages[{i}].role must be system, user or assistant, not {json.dumps(role)[:40]}",
                           param="messages")
        out.append(Message(role, _content(message.get("content"), i)))
    if not any(m.content.strip() for m in out if m.role == "user"):
        raise APIError(400, "the messages hold no user text (only whitespace)", param="messages")
    return out


def _content(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            texts.append(part["text"])
        return "".join(texts)
    raise APIError(400, f"messages[{i}].content must be a string", param="messages")


def _prompt(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise APIError(400, "prompt must be a string (one prompt per request)", param="prompt")
    if not prompt.strip():
        raise APIError(400, "the prompt is empty (only whitespace)", param="prompt")
    return prompt


# ------------------------------------------------------------------------------- the model's queue

class ModelQueue:
    """One model, one reply at a time; at most `max_queue` requests wait for it."""

    def __init__(self, engine: Engine, max_queue: int) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self._lock = asyncio.Lock()
        self._waiting = 0

    async def run(self, request: Request, cancel: threading.Event) -> AsyncIterator[Step]:
        """The reply's steps, as the model makes them; setting `cancel` stops it within a token."""
        if self._waiting >= self.max_queue and self._lock.locked():
            raise APIError(429, f"the server is busy: {self._waiting} requests are already waiting",
                           kind="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        self._waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self._waiting -= 1
        try:
            loop = asyncio.get_running_loop()
            steps: asyncio.Queue[Step | BaseException | None] = asyncio.Queue()
            thread = threading.Thread(target=self._produce, args=(request, cancel, loop, steps.put_nowait),
                                      name="chat-tui-serve-reply", daemon=True)
            thread.start()
            try:
                while True:
                    item = await steps.get()
                    if item is None:
                        break
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                cancel.set()  # the client went away (or the reply ended): the model stops within a token
                while thread.is_alive():
                    await asyncio.sleep(0.005)
        finally:
            self._lock.release()

    def _produce(self, request: Request, cancel: threading.Event, loop: asyncio.AbstractEventLoop,
                 put: Callable[[Any], None]) -> None:
        try:
            for step in self.engine.stream(_conversation_of(request), request.params, cancel=cancel,
                                           candidates=request.logprobs):
                loop.call_soon_threadsafe(put, step)
                if cancel.is_set():
                    break
        except BaseException as exc:  # noqa: BLE001 - handed to the request, which answers with it
            loop.call_soon_threadsafe(put, exc)
        finally:
            loop.call_soon_threadsafe(put, None)


def _conversation_of(request: Request) -> list[Message]:
    if request.conversation is not None:
        return request.conversation
    # a completion continues the text as it is: an unfinished assistant turn, which the engine continues
    return [Message("assistant", request.prompt or "")]


def check_fits(engine: Engine, request: Request) -> int:
    """The prompt's length in tokens; 400 when it leaves no room for a reply in the context."""
    ids, _ = engine.render(_conversation_of(request))
    if len(ids) >= engine.context_length:
        raise APIError(400, f"this model's context is {engine.context_length} tokens; the prompt is {len(ids)} "
                       "(shorten it)", param="messages" if request.conversation is not None else "prompt",
                       code="context_length_exceeded")
    return len(ids)


# ------------------------------------------------------------------------------------- responses

def _token_bytes(text: str) -> list[int]:
    return list(label_bytes(text))  # a character's fragment is labelled `<0xE4>`: send its real byte


def _logprob(p: float) -> float:
    import math

    return math.log(p) if p > 0 else -9999.0  # what OpenAI sends for "never"


def logprob_entry(step: Step, top: int) -> dict[str, Any]:
    """One token's `logprobs.content` entry, from the model's raw distribution (temperature 1)."""
    return {
        "token": step.token,
        "logprob": _logprob(step.prob),
        "bytes": _token_bytes(step.token),
        "top_logprobs": [
            {"token": c.text, "logprob": _logprob(c.prob), "bytes": _token_bytes(c.text)} for c in step.top[:top]
        ],
    }


def _completion_logprobs(entries: list[dict[str, Any]], offsets: list[int]) -> dict[str, Any]:
    """The legacy completions API's logprobs object."""
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
        "text_offset": offsets,
    }


def create_app(engine: Engine, *, model_id: str | None = None, api_key: str | None = None,
               max_queue: int = 16, max_body: int = MAX_BODY_BYTES) -> FastAPI:
    """The ASGI app serving `engine` (the caller owns the engine and closes it)."""
    served = model_id or engine.model_name
    queue = ModelQueue(engine, max_queue)
    created = int(time.time())
    app = FastAPI(title="chat-tui", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(_: HTTPRequest, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(_: HTTPRequest, exc: Exception) -> JSONResponse:  # never a traceback to a client
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}: {first_line(exc)}",
                                     kind="server_error").body(), status_code=500)

    def authorize(http: HTTPRequest) -> None:
        if api_key is None:
            return
        given = http.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                           kind="authentication_error", code="invalid_api_key")

    async def read_body(http: HTTPRequest) -> Any:
        length = http.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body:
            raise APIError(413, f"the request body is {int(length):,} bytes; the limit is {max_body:,}")
        data = bytearray()
        async for chunk in http.stream():
            data += chunk
            if len(data) > max_body:
                raise APIError(413, f"the request body is over the limit of {max_body:,} bytes")
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON ({first_line(exc)})") from None

    def check_model(body: Any) -> None:
        name = body.get("model") if isinstance(body, dict) else None
        if name is None:
            raise APIError(400, "model is required (GET /v1/models lists it)", param="model")
        if name != served:
            raise APIError(404, f"the model {json.dumps(name)[:80]} does not exist here; this server has {served!r}",
                           param="model", code="model_not_found")

    @app.get("/v1/models")
    async def models(http: HTTPRequest) -> dict[str, Any]:
        authorize(http)
        return {"object": "list", "data": [{"id": served, "object": "model", "created": created,
                                            "owned_by": "chat-tui"}]}

    async def complete(http: HTTPRequest, chat: bool) -> Any:
        authorize(http)
        body = await read_body(http)
        check_model(body)
        request = parse_request(body, engine.default_params(), chat=chat)
        prompt_tokens = check_fits(engine, request)
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        cancel = threading.Event()
        steps = queue.run(request, cancel)
        if request.stream:
            first = await _first(steps)  # a full queue or an engine error answers before the stream opens
            return StreamingResponse(_sse(first, steps, request, rid, served, chat, prompt_tokens, cancel),
                                     media_type="text/event-stream")
        return await _whole(steps, request, rid, served, chat, prompt_tokens)

    @app.post("/tokenize")
    async def tokenize(http: HTTPRequest) -> dict[str, Any]:
        """vLLM's /tokenize for a `prompt`: the ids (no special tokens added), and with `return_token_strs`
        each token in GPT-2's byte-level alphabet, whatever the model's tokenizer (its bytes, exactly)."""
        authorize(http)
        body = await read_body(http)
        check_model(body)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise APIError(400, "prompt is required (a string): this server tokenizes text, not messages",
                           param="prompt")
        source = inside(engine)
        reason = "this model has no tokenizer to show" if source is None else source.inside_views().get("tokens")
        if source is None or reason:
            raise APIError(400, reason or "no tokens view")
        try:
            pieces = await asyncio.to_thread(source.token_pieces, prompt)
        except EngineError as exc:
            raise APIError(400, first_line(exc)) from None
        answer: dict[str, Any] = {"count": len(pieces), "max_model_len": engine.context_length,
                                  "tokens": [p.id for p in pieces]}
        if body.get("return_token_strs"):
            answer["token_strs"] = [byte_level_string(p.data) for p in pieces]
        return answer

    @app.post("/detokenize")
    async def detokenize(http: HTTPRequest) -> dict[str, Any]:
        """vLLM's /detokenize: the text of `tokens` (ids)."""
        authorize(http)
        body = await read_body(http)
        check_model(body)
        ids = body.get("tokens")
        if not (isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
            raise APIError(400, "tokens is required (a list of token ids)", param="tokens")
        vocab = vocab_size_of(engine)
        if vocab and any(not 0 <= i < vocab for i in ids):
            raise APIError(400, f"a token id is outside the vocabulary (0 to {vocab - 1})", param="tokens")
        try:
            return {"prompt": await asyncio.to_thread(engine.decode, ids)}
        except EngineError as exc:
            raise APIError(400, first_line(exc)) from None

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest) -> Any:
        return await complete(http, chat=True)

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest) -> Any:
        return await complete(http, chat=False)

    return app


async def _first(steps: AsyncIterator[Step]) -> Step | None:
    try:
        return await steps.__anext__()
    except StopAsyncIteration:
        return None
    except EngineError as exc:
        raise APIError(400, first_line(exc)) from None


def _choice_delta(chat: bool, text: str, step: Step | None, request: Request, *, first: bool) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0}
    if chat:
        choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
        if request.logprobs and step is not None:
            choice["logprobs"] = {"content": [logprob_entry(step, request.top_logprobs)]}
        else:
            choice["logprobs"] = None
    else:
        choice["text"] = text
        choice["logprobs"] = None
        if request.logprobs and step is not None:
            entry = logprob_entry(step, request.top_logprobs)
            choice["logprobs"] = _completion_logprobs([entry], [0])
    choice["finish_reason"] = None
    return choice


async def _sse(first: Step | None, steps: AsyncIterator[Step], request: Request, rid: str, model: str,
               chat: bool, prompt_tokens: int, cancel: threading.Event) -> AsyncIterator[bytes]:
    kind = "chat.completion.chunk" if chat else "text_completion"
    created = int(time.time())

    def event(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
        chunk: dict[str, Any] = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices}
        if request.include_usage:
            chunk["usage"] = usage
        return b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"

    count, reason = 0, "stop"
    try:
        step = first
        is_first = True
        while step is not None:
            count += 1
            yield event([_choice_delta(chat, step.text, step, request, first=is_first)])
            is_first = False
            if step.finish_reason:
                reason = FINISH.get(step.finish_reason, "stop")
            try:
                step = await steps.__anext__()
            except StopAsyncIteration:
                step = None
        done = {"index": 0, "finish_reason": reason, "logprobs": None}
        done.update({"delta": {}} if chat else {"text": ""})
        yield event([done])
        if request.include_usage:
            yield event([], {"prompt_tokens": prompt_tokens, "completion_tokens": count,
                             "total_tokens": prompt_tokens + count})
    except EngineError as exc:  # mid-stream: the stream ends with an error event, as vLLM sends it
        yield b"data: " + json.dumps(APIError(500, first_line(exc), kind="server_error").body()).encode() + b"\n\n"
    finally:
        cancel.set()
        await steps.aclose()
    yield b"data: [DONE]\n\n"


async def _whole(steps: AsyncIterator[Step], request: Request, rid: str, model: str, chat: bool,
                 prompt_tokens: int) -> dict[str, Any]:
    texts: list[str] = []
    entries: list[dict[str, Any]] = []
    offsets: list[int] = []
    reason = "stop"
    length = 0
    try:
        async for step in steps:
            offsets.append(length)
            texts.append(step.text)
            length += len(step.text)
            if request.logprobs:
                entries.append(logprob_entry(step, request.top_logprobs))
            if step.finish_reason:
                reason = FINISH.get(step.finish_reason, "stop")
    except EngineError as exc:
        raise APIError(500, first_line(exc), kind="server_error") from None
    text = "".join(texts)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(texts),
             "total_tokens": prompt_tokens + len(texts)}
    if chat:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "logprobs": {"content": entries} if request.logprobs else None,
                                  "finish_reason": reason}
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": reason,
                  "logprobs": _completion_logprobs(entries, offsets) if request.logprobs else None}
        kind = "text_completion"
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": [choice],
            "usage": usage}


# -------------------------------------------------------------------------------------- the command

def api_key_from_env(var: str | None) -> str | None:
    """The key clients must send, from the environment variable `var` (None: no key asked)."""
    import os

    if not var:
        return None
    key = os.environ.get(var, "").strip()
    if not key:
        raise CLIError(f"--api-key-env {var}: the variable is not set or empty")
    return key


def serve(engine: Engine, *, host: str, port: int, model_id: str | None, api_key: str | None,
          max_queue: int, log: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> None:
    """Serve until interrupted (Ctrl-C)."""
    import uvicorn

    if host not in LOOPBACK and api_key is None:
        log(f"chat-tui: warning: serving on {host} without a key: anyone who can reach this port can use "
            "the model (set --api-key-env VAR)")
    app = create_app(engine, model_id=model_id, api_key=api_key, max_queue=max_queue)
    log(f"chat-tui: serving {model_id or engine.model_name} at http://{host}:{port}/v1 (Ctrl-C stops)")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
