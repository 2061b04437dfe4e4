"""A model on an OpenAI-compatible server (vLLM, llama.cpp, Ollama, `transformers serve`, the
OpenAI API, `chat-tui serve`), behind the same `Engine` interface as a local model.

The server tokenizes, applies its chat template and samples: chat-tui sends the conversation and
the settings, and turns the streamed chunks into Steps. What a local model gives and a server does
not (attention, the raw logits for the chain X-ray) is said once, in `attention_unavailable` and
the Steps' NaN fields. The official `openai` SDK is the client (`pip install "chat-tui[openai]"`),
imported when the engine is made, never at start.

Servers differ in what they accept: a setting a server rejects (an error naming the field) is
dropped and the request sent again once; the engine remembers it (`unsupported`) so that every
later request leaves it out, and the UI can say "not supported by this server". A field the error
asks for under another name (`max_completion_tokens` for `max_tokens`) is renamed the same way.
With a `remember` file, both are kept there per server (its URL without credentials) and model, so
that the next connection leaves them out from its first request.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from chat_tui.engine.files import atomic_write_bytes
from chat_tui.engine.inside import (
    INSIDE_VIEWS,
    Attribution,
    BlockTrace,
    Head,
    KnockOut,
    Lens,
    Rollout,
    TokenPiece,
)
from chat_tui.engine.params import SamplingParams
from chat_tui.engine.types import (
    Candidate,
    Conversation,
    MessageSpan,
    ParamsSource,
    PromptInfo,
    Step,
    resolve_params,
)
from chat_tui.errors import EngineError, first_line

DEFAULT_KEY_ENV = "OPENAI_API_KEY"
DEFAULT_TIMEOUT_S = 60.0  # before the first token, and between two tokens
RETRY_AFTER_LIMIT_S = 30.0  # a 429 asking to wait longer than this is reported instead
MAX_TOP_LOGPROBS = 20  # the OpenAI API's limit, which the other servers follow
ATTENTION_UNAVAILABLE = "attention is not available over the OpenAI protocol (the server keeps it)"
# the settings that are always sent; any other is sent only when it is on (not its neutral value)
ALWAYS = ("temperature", "max_tokens", "max_completion_tokens")
MAX_REMEMBERED_BYTES = 1 << 20  # the file of rejected fields is a few kB: a bigger one is not ours
MAX_TOKENIZE_BYTES = 16 << 20  # a /tokenize answer for a prompt the view shows: more is not one


class ServerError(EngineError):
    """The server could not be reached, refused the request, or broke off (one line naming it)."""


def public_url(url: str) -> str:
    """`url` without credentials (user:password@), as it is shown and saved."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


def read_key(key_env: str | None = None, key_file: str | os.PathLike[str] | None = None) -> str | None:
    """The API key: from `key_file` (which others must not be able to read), else the variable
    `key_env` (default OPENAI_API_KEY); None when neither holds one (a local server needs none)."""
    if key_file is not None:
        path = Path(key_file).expanduser()
        try:
            mode = path.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ServerError(f"{path}: the key file is readable by others; chmod 600 {path}")
            key = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ServerError(f"{path}: cannot read the key file ({exc.strerror or type(exc).__name__})") from None
        if not key:
            raise ServerError(f"{path}: the key file is empty")
        return key
    key = os.environ.get(key_env or DEFAULT_KEY_ENV, "").strip()
    return key or None


def request_fields(params: SamplingParams, *, logprobs: bool) -> dict[str, Any]:
    """The request's sampling fields for `params`: what is on, under the names servers use."""
    fields: dict[str, Any] = {"temperature": params.temperature, "max_tokens": params.max_new_tokens}
    if params.top_p < 1:
        fields["top_p"] = params.top_p
    if params.presence_penalty:
        fields["presence_penalty"] = params.presence_penalty
    if params.frequency_penalty:
        fields["frequency_penalty"] = params.frequency_penalty
    if params.seed is not None:
        fields["seed"] = params.seed
    if params.stop:
        fields["stop"] = list(params.stop)
    if params.logit_bias:  # the API's keys are token ids as strings
        fields["logit_bias"] = {str(token): bias for token, bias in params.logit_bias}
    # vLLM, llama.cpp and chat-tui serve take these four under these names; the OpenAI API rejects them
    if params.top_k > 0:
        fields["top_k"] = params.top_k
    if params.min_p > 0:
        fields["min_p"] = params.min_p
    if params.typical_p < 1:
        fields["typical_p"] = params.typical_p
    if params.repetition_penalty != 1:
        fields["repetition_penalty"] = params.repetition_penalty
    if logprobs:
        fields["logprobs"] = True
        fields["top_logprobs"] = min(MAX_TOP_LOGPROBS, params.top_candidates)
    return fields


# a field some servers want under another name, which their error names (the OpenAI API's reasoning
# models: "Unsupported parameter: 'max_tokens' ... Use 'max_completion_tokens' instead.")
RENAMES = {"max_tokens": "max_completion_tokens"}
# the chat-tui setting behind each request field whose name differs from the setting's
SETTING_OF_FIELD = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                    "logprobs": "top_candidates", "top_logprobs": "top_candidates"}


def unsupported_settings(fields: Iterable[str]) -> frozenset[str]:
    """The chat-tui settings (SamplingParams names) behind request fields a server rejected."""
    return frozenset(SETTING_OF_FIELD.get(name, name) for name in fields)


def rejected_fields(message: str, sent: Sequence[str]) -> set[str]:
    """The sent fields an error message names (the server's way of saying it does not take them)."""
    return {name for name in sent if name not in ALWAYS and re.search(rf"\b{re.escape(name)}\b", message)}


def renamed_fields(message: str, sent: Sequence[str]) -> dict[str, str]:
    """The sent fields an error message asks to send under another name (both names in it)."""
    return {old: new for old, new in RENAMES.items()
            if old in sent and all(re.search(rf"\b{name}\b", message) for name in (old, new))}


def recall_fields(path: Path | None, server: str, model: str) -> tuple[set[str], dict[str, str]]:
    """The fields `server` rejected for `model` (left out) and those it takes under another name
    (renamed), as `remember_fields` kept them; nothing when the file is missing, unreadable or corrupt."""
    try:
        if path is None or path.stat().st_size > MAX_REMEMBERED_BYTES:
            return set(), {}
        entry = json.loads(path.read_text(encoding="utf-8")).get(server, {}).get(model, {})
        listed = entry.get("unsupported", [])
        unsupported = {name for name in listed if isinstance(name, str)} if isinstance(listed, list) else set()
        renamed = {old: new for old, new in entry.get("renamed", {}).items()
                   if RENAMES.get(old) == new}  # only the renames this client knows
        return unsupported, renamed
    except (OSError, ValueError, AttributeError, TypeError):  # a corrupt file forgets, quietly
        return set(), {}


def remember_fields(path: Path, server: str, model: str, unsupported: Iterable[str], renamed: dict[str, str]) -> None:
    """Keep what `server` (its public URL: never credentials, never the key) rejected for `model`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.stat().st_size <= MAX_REMEMBERED_BYTES else {}
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    models = data.get(server) if isinstance(data.get(server), dict) else {}
    models[model] = {"unsupported": sorted(unsupported), "renamed": dict(sorted(renamed.items()))}
    data[server] = models
    try:
        atomic_write_bytes(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode("utf-8"))
    except OSError:  # not remembered: the next connection finds out again, once
        pass


def server_models(base_url: str, key_env: str | None = None, key_file: str | None = None,
                  timeout: float = DEFAULT_TIMEOUT_S) -> list[str]:
    """The names of the models `base_url` serves (GET /v1/models); ServerError in one line."""
    try:
        import openai
    except ImportError:
        raise ServerError('a server needs the openai SDK: pip install "chat-tui[openai]"') from None
    key = read_key(key_env, key_file)
    client = openai.OpenAI(base_url=base_url.rstrip("/"), api_key=key or "unused", max_retries=0, timeout=timeout)
    try:
        return [m.id for m in client.models.list().data]
    except Exception as exc:  # noqa: BLE001 - one line naming the server, never the key
        text = describe_failure(openai, exc, public_url(base_url), timeout)
        raise ServerError(text.replace(key, "***") if key else text) from None
    finally:
        client.close()


def describe_failure(openai: Any, exc: BaseException, where: str, timeout: float) -> str:
    """A failed request to the server `where`, in one line that says what to do (`openai`: the SDK)."""
    o = openai
    if isinstance(exc, o.APITimeoutError):
        return f"{where}: no answer within {timeout:g} s (is the server overloaded? raise --timeout)"
    if isinstance(exc, o.APIConnectionError):
        cause = first_line(exc.__cause__) if exc.__cause__ is not None else first_line(exc)
        return f"{where}: cannot connect ({cause}); is the server running, and the URL right?"
    if isinstance(exc, (o.AuthenticationError, o.PermissionDeniedError)):
        return (f"{where}: the server refused the key ({exc.status_code}): set the right one in "
                f"--api-key-env (default {DEFAULT_KEY_ENV}) or --api-key-file")
    if isinstance(exc, o.NotFoundError):
        return f"{where}: {_message(exc) or 'not found'} (404)"
    if isinstance(exc, o.RateLimitError):
        wait = _retry_after(exc)
        return f"{where}: busy (429)" + (f"; it asks to wait {wait:g} s" if wait else "") + ", try again later"
    if isinstance(exc, o.APIStatusError):
        return f"{where}: {_message(exc) or 'error'} ({exc.status_code})"
    if isinstance(exc, ValueError):  # malformed JSON in an event
        return f"{where}: sent a malformed event ({first_line(exc)})"
    return f"{where}: {type(exc).__name__}: {first_line(exc)}"


class RemoteEngine:
    """A model on an OpenAI-compatible server. `model=None` takes the server's only model."""

    backend = "openai"
    n_layer = 0
    n_head = 0
    chat_format = "server"  # the server applies its own chat template
    checkpoint_hash = ""
    attention_unavailable = ATTENTION_UNAVAILABLE
    attention_note = None
    decode_note = "a server: setting changes apply from the next request"
    vocab_size = None
    explains = False

    def __init__(self, base_url: str, model: str | None = None, *, api_key: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, retry_after_limit: float = RETRY_AFTER_LIMIT_S,
                 remember: str | os.PathLike[str] | None = None) -> None:
        try:
            import openai
        except ImportError:
            raise ServerError('a server needs the openai SDK: pip install "chat-tui[openai]"') from None
        if not re.match(r"^https?://", base_url or ""):
            raise ServerError(f"{base_url!r}: the server's URL must start with http:// or https://")
        self._openai = openai
        self.base_url = base_url.rstrip("/")
        self.server = public_url(self.base_url)
        self.device = self.server
        self._key = api_key
        self.timeout = timeout
        self.retry_after_limit = retry_after_limit
        self.last_request: dict[str, Any] = {}  # the fields of the last request, as sent (no key)
        self.last_note: str | None = None  # what the last request had to change (a dropped field, a continue)
        # the SDK's own retries are off: a 429 is waited for here, where a cancel can stop the wait
        self._client = openai.OpenAI(base_url=self.base_url, api_key=api_key or "unused", max_retries=0,
                                     timeout=timeout)
        models = self.list_models()
        if model is None:
            if len(models) != 1:
                names = ", ".join(m["id"] for m in models) or "none"
                raise ServerError(f"{self.server} serves {len(models)} models ({names}): choose one with --model")
            model = models[0]["id"]
        elif models and model not in {m["id"] for m in models}:
            names = ", ".join(m["id"] for m in models)
            raise ServerError(f"{self.server} has no model {model!r}; it serves: {names}")
        self.model_name = model
        entry = next((m for m in models if m.get("id") == model), {})
        self.family = str(entry.get("owned_by") or "")
        # vLLM says max_model_len, llama.cpp meta.n_ctx_train; 0 when the server does not say
        meta = entry.get("meta") if isinstance(entry.get("meta"), dict) else {}
        self.context_length = int(entry.get("max_model_len") or meta.get("n_ctx_train") or 0)
        # what this server rejected for this model before (`remember`: the file that keeps it)
        self._remember = Path(remember) if remember is not None else None
        # the fields this server rejected (left out), and those it takes under another name (sent so)
        self.unsupported, self.renamed = recall_fields(self._remember, self.server, model)
        self._recalled = bool(self.unsupported)  # said once, with the first request that leaves them out
        # where the tokens view reads the model's tokenizer: "server" (/tokenize), a local tokenizer, "none";
        # None until first asked
        self._tokens_source: Any = None
        self._tokens_lock = threading.Lock()

    # ------------------------------------------------------------------ the Engine interface

    @property
    def alive(self) -> bool:
        return True

    def close(self, *, wait: bool = True) -> None:
        self._client.close()

    def default_params(self) -> SamplingParams:
        return SamplingParams()

    def encode(self, text: str) -> list[int]:
        raise ServerError(f"{self.server} tokenizes on the server: token ids are not available here")

    def decode(self, ids: Sequence[int]) -> str:
        raise ServerError(f"{self.server} tokenizes on the server: token ids are not available here")

    def token_text(self, token_id: int) -> str:
        return ""

    def render(self, conversation: Conversation) -> tuple[list[int], list[MessageSpan]]:
        return [], []  # the server renders the prompt with its own template

    def list_models(self) -> list[dict[str, Any]]:
        """The server's models (GET /v1/models), as it describes them."""
        response = self._call(lambda: self._client.models.list())
        return [m.model_dump() if hasattr(m, "model_dump") else dict(m) for m in response.data]

    def stream(self, conversation: Conversation, params: ParamsSource, *, inspect: bool = False,
               cancel: threading.Event | None = None, candidates: bool = True,
               knock_out: frozenset[tuple[int, int]] = frozenset(), prefix_ids: Sequence[int] = (),
               lens: bool = False) -> Iterator[Step]:
        # `lens`: the server sends no layers (commit_layer stays None; the lens view says why)
        if knock_out:
            raise ServerError(f"{self.server} runs the model: its heads cannot be switched off from here")
        if prefix_ids:  # the chat API takes text, which the server would tokenize again: not the same ids
            raise ServerError(f"{self.server} runs the model: a reply cannot be continued from token ids here")
        cancel = cancel or threading.Event()
        started = time.perf_counter()
        first = resolve_params(params)  # one request, one set of settings: later changes apply next time
        if first.seed is None:  # as a local model does: a seed chosen here, sent, and shown with the reply
            first = first.with_(seed=secrets.randbits(31))
        messages = [{"role": m.role, "content": m.content} for m in conversation]
        wanted = request_fields(first, logprobs=candidates)
        fields = {self.renamed.get(k, k): v for k, v in wanted.items() if k not in self.unsupported}
        notes: list[str] = []
        left_out = sorted(set(wanted) & self.unsupported)
        if self._recalled and left_out:
            self._recalled = False
            notes.append(f"{self.server} rejected {', '.join(left_out)} before: left out")
        if messages and messages[-1]["role"] == "assistant":  # continue a stopped reply
            if self.family == "vllm":
                fields.update(continue_final_message=True, add_generation_prompt=False)
            else:
                notes.append("continued as a new request (this server cannot continue a message)")
        stream = self._open(messages, fields, notes, cancel)
        self.last_note = "; ".join(notes) or None
        if stream is None:  # cancelled while waiting out a 429
            return
        finished = threading.Event()
        threading.Thread(target=_close_on_cancel, args=(cancel, finished, stream), daemon=True,
                         name="chat-tui-remote-cancel").start()
        index, last_at, reason = 0, started, None
        pending: Step | None = None  # held back one token, so the last Step can carry the finish reason
        try:
            for chunk in stream:
                if cancel.is_set():
                    break
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                reason = _finish(choice.finish_reason) or reason
                text = (choice.delta.content if choice.delta is not None else None) or ""
                for token, prob, top in _tokens(choice, text):
                    now = time.perf_counter()
                    if pending is not None:
                        yield pending
                    pending = Step(
                        index=index, position=index, token_id=-1, token=token, text=token, prob=prob,
                        chain_prob=math.nan, top=top, attention=None, top_ids=None, top_logits=None,
                        logsumexp=math.nan, step_s=now - last_at, elapsed_s=now - started, params=first,
                        prompt=self._prompt_info(first, started) if index == 0 else None)
                    index, last_at = index + 1, now
        except Exception as exc:  # noqa: BLE001 - every failure becomes one line naming the server
            if not cancel.is_set():
                if pending is not None:
                    yield pending  # the partial reply is kept
                raise self._error(exc, during="mid-reply" if pending is not None else "") from None
        finally:
            finished.set()
            _quietly_close(stream)
        if reason is None and not cancel.is_set():  # the stream ended with no finish reason: cut off
            if pending is not None:
                yield pending  # the partial reply is kept
            raise ServerError(f"{self.server}: the server closed the stream mid-reply; the partial reply is kept")
        if pending is not None:
            pending.finish_reason = "cancelled" if cancel.is_set() else reason
            yield pending

    # ------------------------------------------------------------------ the inside views (issue #14): none

    def inside_views(self) -> dict[str, str | None]:
        """The tokens view only (`token_pieces` says in one line when even that cannot be read); the others
        say why not: the server keeps the model's layers."""
        reasons: dict[str, str | None] = dict.fromkeys(
            INSIDE_VIEWS, f"{self.server} keeps the model's layers: the server does not send them")
        reasons["tokens"] = None
        return reasons

    def _no_view(self, view: str) -> ServerError:
        return ServerError(self.inside_views()[view] or view)

    def logit_lens(self, ids: Sequence[int], token_id: int, top: int = 3) -> Lens:
        raise self._no_view("lens")

    def attribute(self, ids: Sequence[int], token_id: int) -> Attribution:
        raise self._no_view("attribution")

    def rollout(self, ids: Sequence[int]) -> Rollout:
        raise self._no_view("rollout")

    def knock_out(self, ids: Sequence[int], heads: frozenset[Head], top: int = 8) -> KnockOut:
        raise self._no_view("knockout")

    def token_pieces(self, text: str) -> list[TokenPiece]:
        """`text` as the server's model tokenizes it (`chat_tui.engine.remote_tokens`): the server's own
        /tokenize, else the model's tokenizer where it is on this machine, else one line saying why not."""
        from chat_tui.engine.remote_tokens import local_tokenizer

        if not text:
            return []
        with self._tokens_lock:
            if self._tokens_source is None:
                pieces = self._server_tokenize(text)
                if pieces is not None:
                    self._tokens_source = "server"
                    return pieces
                local = local_tokenizer(self.model_name)
                self._tokens_source = local if local is not None else "none"
            source = self._tokens_source
        if source == "server":
            pieces = self._server_tokenize(text)
            if pieces is None:
                raise ServerError(f"{self.server}'s /tokenize answered what chat-tui cannot read")
            return pieces
        if callable(source):
            return source(text)
        raise ServerError(f"{self.server} tokenizes on the server and has no /tokenize, and the tokenizer of "
                          f"{self.model_name!r} is not on this machine: its tokens are not available here")

    def _server_tokenize(self, text: str) -> list[TokenPiece] | None:
        """vLLM's POST /tokenize (`chat-tui serve` has it too); None when the server has none."""
        import urllib.error
        import urllib.request

        from chat_tui.engine.remote_tokens import parse_tokenize_answer, server_root

        body = {"model": self.model_name, "prompt": text, "add_special_tokens": False, "return_token_strs": True}
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(server_root(self.base_url) + "/tokenize", data=json.dumps(body).encode(),
                                         headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:  # noqa: S310 - http(s) only
                data = answer.read(MAX_TOKENIZE_BYTES + 1)
        except urllib.error.HTTPError:  # 404 and the like: no /tokenize here
            return None
        except (urllib.error.URLError, OSError) as exc:
            raise ServerError(f"{self.server}: /tokenize failed ({first_line(exc)})") from None
        if len(data) > MAX_TOKENIZE_BYTES:
            return None
        try:
            return parse_tokenize_answer(text, json.loads(data))
        except ValueError:
            return None

    def block_trace(self, ids: Sequence[int], layer: int, head: int) -> BlockTrace:
        raise self._no_view("block")

    # ------------------------------------------------------------------ requests and errors

    def _open(self, messages: list[dict[str, Any]], fields: dict[str, Any], notes: list[str],
              cancel: threading.Event) -> Any:
        """The streamed response, after dropping rejected fields once and waiting out a 429."""
        waited = 0.0
        dropped_once = False
        while True:
            body = {"model": self.model_name, "messages": messages, "stream": True, **fields}
            self.last_request = {k: v for k, v in body.items() if k != "messages"}
            try:
                extra = {k: v for k, v in body.items() if k not in ("model", "messages", "stream")}
                return self._client.chat.completions.create(
                    model=self.model_name, messages=messages, stream=True, extra_body=extra)
            except self._openai.RateLimitError as exc:
                wait = _retry_after(exc)
                if wait is None or waited + wait > self.retry_after_limit:
                    raise self._error(exc) from None
                if cancel.wait(wait):
                    return None
                waited += wait
            except (self._openai.BadRequestError, self._openai.UnprocessableEntityError) as exc:
                renamed = renamed_fields(_message(exc), list(fields))
                rejected = rejected_fields(_message(exc), list(fields)) - set(renamed) - set(renamed.values())
                if dropped_once or not (rejected or renamed):
                    raise self._error(exc) from None
                dropped_once = True
                for old, new in renamed.items():
                    fields[new] = fields.pop(old)
                    self.renamed[old] = new
                    notes.append(f"{self.server} takes {old} as {new}: sent so")
                self.unsupported |= rejected
                for name in rejected:
                    fields.pop(name, None)
                    if name == "logprobs":
                        fields.pop("top_logprobs", None)
                        self.unsupported.add("top_logprobs")
                if rejected:
                    notes.append(f"{self.server} does not take {', '.join(sorted(rejected))}: left out")
                if self._remember is not None:
                    remember_fields(self._remember, self.server, self.model_name, self.unsupported, self.renamed)
            except Exception as exc:  # noqa: BLE001
                raise self._error(exc) from None

    def _call(self, fn: Any) -> Any:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc) from None

    def _error(self, exc: BaseException, during: str = "") -> ServerError:
        """One line naming the server and what to do; never the key."""
        text = describe_failure(self._openai, exc, f"{self.server}{' ' + during if during else ''}", self.timeout)
        if isinstance(exc, self._openai.NotFoundError):
            try:
                text += f"; it serves: {', '.join(m['id'] for m in self.list_models())}"
            except ServerError:
                pass
        return ServerError(text.replace(self._key, "***") if self._key else text)

    def _prompt_info(self, params: SamplingParams, started: float) -> PromptInfo:
        return PromptInfo(ids=[], tokens=[], spans=[], dropped_messages=0, dropped_tokens=0,
                          seed=params.seed if params.seed is not None else -1,  # -1: the server chose
                          prefill_s=time.perf_counter() - started, sent=dict(self.last_request),
                          note=self.last_note, unsupported=tuple(sorted(self.unsupported)))


def _finish(reason: str | None) -> str | None:
    if reason is None:
        return None
    return {"stop": "eos", "length": "length", "content_filter": "stop"}.get(reason, "eos")


def _tokens(choice: Any, text: str) -> list[tuple[str, float, list[Candidate]]]:
    """The tokens of one chunk: one per logprobs entry when the server sent them (and they spell
    the chunk's text), else the chunk's text as one token with no probability."""
    logprobs = getattr(choice, "logprobs", None)
    entries = getattr(logprobs, "content", None) or []
    if entries and "".join(e.token for e in entries) == text:
        return [(e.token, math.exp(e.logprob),
                 [Candidate(id=-1, text=t.token, prob=math.exp(t.logprob), chain_prob=math.nan)
                  for t in (e.top_logprobs or [])]) for e in entries]
    if not text:
        return []
    return [(text, math.nan, [])]


def _message(exc: Any) -> str:
    """The server's own message from an error response (OpenAI's error object, FastAPI's detail)."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return first_line(str(error["message"]))
        if isinstance(body.get("detail"), list):  # FastAPI's validation errors
            return "; ".join(f"{'.'.join(map(str, d.get('loc', [])[1:]))}: {d.get('msg', '')}"
                             for d in body["detail"] if isinstance(d, dict))
        if body.get("detail"):
            return first_line(str(body["detail"]))
    return first_line(getattr(exc, "message", "") or str(exc))


def _retry_after(exc: Any) -> float | None:
    response = getattr(exc, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _close_on_cancel(cancel: threading.Event, finished: threading.Event, stream: Any) -> None:
    while not cancel.wait(0.05):
        if finished.is_set():
            return
    _quietly_close(stream)  # Esc: the HTTP stream closes at once, even mid-read


def _quietly_close(stream: Any) -> None:
    try:
        stream.close()
    except Exception:  # noqa: BLE001 - closing twice, or from another thread mid-read
        pass
