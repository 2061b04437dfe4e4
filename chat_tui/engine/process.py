"""An engine that runs in a child process, behind the same `Engine` interface.

Why: on a CPU, a token step of a small model is mostly short BLAS calls that each let go of the
interpreter lock. With the UI painting in the same process, every such call hands the lock to the
UI thread and the model then waits for it back: the bundled model streamed at about 0.6x its
headless speed inside the app. In a child process the model keeps a core of its own, and the UI
thread of the app only receives finished `Step`s.

The child loads the model with `load_engine` and answers on two channels:

- control (both ways): the app's requests (`call`, `stream`, `stream_columns`, `params`, `cancel`,
  `close`); the child answers `call` only, in order.
- steps (child to app): for each stream, its `Step`s (in batches of those made within BATCH_S),
  then ("end", the REFRESHED attributes as they now are) or ("error", ...).

Mid-reply edits reach the child as `params` messages and Esc as `cancel`; both are forwarded between
tokens (every `POLL_S` at the latest), so they apply within a token or two. Exceptions come back as
themselves (EngineError, CheckpointError, ...), with the child's traceback as a note. If the child
dies, the app gets an EngineError that says so, never a hang; if the app dies, the child goes too.

Nothing here imports torch: the child does, when it loads a model that needs it (a mini-GPT on the
CPU does not).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from typing import IO, TYPE_CHECKING, Any

from chat_tui.engine.collector import tune_collection
from chat_tui.engine.inside import Attribution, BlockTrace, Head, KnockOut, Lens, Rollout, TokenPiece
from chat_tui.engine.inside_maths import inside_views_of
from chat_tui.engine.params import SamplingParams
from chat_tui.engine.types import (
    Conversation,
    Engine,
    EngineError,
    MessageSpan,
    ParamsSource,
    Step,
    explainer,
    resolve_params,
)
from chat_tui.errors import first_line

if TYPE_CHECKING:
    from chat_tui.engine.explain import ChainReplay, Explanation

try:
    import fcntl
except ImportError:  # Windows (where the app keeps the model in its own process)
    fcntl = None  # type: ignore[assignment]

POLL_S = 0.005  # how often a waiting stream forwards edits and Esc to the child
CLOSE_WAIT_S = 2.0  # how long close() waits for the child before terminating it
STDERR_TAIL = 4000  # characters of the child's stderr kept in the error that reports its death
BATCH_S = 0.004  # a step waits at most this long (or one token, if that is longer) to go with the next
PIPE_BYTES = 1 << 20  # the steps pipe's buffer (Linux; the default 64 KB holds some six Steps)

# what the app reads from an engine (the Engine protocol's attributes), copied once from the child's
# engine when it is ready
ATTRIBUTES = tuple(Engine.__annotations__)
# what a reply may change (the inspector finds a model's attention unavailable while it runs): sent
# again with each stream's end
REFRESHED = ("attention_unavailable", "attention_note", "decode_note")
# the engine methods the app may ask the child for, besides `stream`
CALLS = ("encode", "decode", "token_text", "token_texts", "render", "explain_attention", "replay_chain",
         "logit_lens", "attribute", "rollout", "knock_out", "token_pieces", "block_trace")

Setup = Callable[[Any], None]
Payload = tuple[BaseException | None, str, str]  # an exception on its way across (see _portable)


class ProcessEngine:
    """The `Engine` protocol, served by a model in a child process (see the module docstring)."""

    backend: str
    model_name: str
    device: str
    context_length: int
    n_layer: int
    n_head: int
    chat_format: str
    checkpoint_hash: str
    attention_unavailable: str | None
    attention_note: str | None
    decode_note: str | None
    vocab_size: int | None
    # an Explainer when the child's engine is one (the mini-GPT): see `types.explainer`
    explains: bool

    def __init__(self, process: subprocess.Popen, control: Connection, steps: Connection, stderr: IO[bytes],
                 info: dict[str, Any]) -> None:
        self._process = process
        self._stderr = stderr
        self._control = control
        self._steps = steps
        self._send_lock = threading.Lock()  # several threads send requests
        self._call_lock = threading.Lock()  # one call's request and answer at a time
        self._stream_lock = threading.Lock()  # one stream at a time, as in-process engines
        self._token_texts: list[str] | None = None  # every token's text, fetched at the first need
        self._closed = False
        for name in ATTRIBUTES:
            setattr(self, name, info.get(name))
        self.explains = bool(info.get("explains"))
        self._inside_views: dict[str, str | None] = info["inside_views"]
        self._defaults: SamplingParams | Payload = info["default_params"]

    # ------------------------------------------------------------------ start and stop

    @classmethod
    def start(
        cls,
        model: str | os.PathLike[str] | None = None,
        *,
        device: str | None = None,
        progress: Callable[[str], None] | None = None,
        setup: Setup | None = None,
        **load_options: Any,
    ) -> ProcessEngine:
        """Start a child process and load `model` there with `load_engine` (same arguments and errors).

        `setup(engine)` runs in the child after the load; it must pickle by reference (a function in
        an importable module: benchmarks use it).
        """
        control, child_control = socket.socketpair()
        steps_read, steps_write = os.pipe()
        _widen_pipe(steps_write)
        stderr = tempfile.TemporaryFile()
        # a fresh interpreter, not fork (the app has threads that may hold locks) and not
        # multiprocessing's spawn (it re-runs the app's __main__ module in the child)
        code = ("import json, sys; sys.path[:0] = json.loads(sys.argv[1]); "
                "from chat_tui.engine.process import _child_main; _child_main(int(sys.argv[2]), int(sys.argv[3]))")
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", code, json.dumps(sys.path), str(child_control.fileno()), str(steps_write)],
                pass_fds=(child_control.fileno(), steps_write), close_fds=True,
                # its output must not land on the app's screen; what it writes to stderr (a crash,
                # a library's warning) is kept for the error that reports its death
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
            )
        except OSError as exc:
            stderr.close()
            control.close()
            os.close(steps_read)
            raise EngineError(f"could not start the model's process: {exc.strerror or exc}") from None
        finally:
            child_control.close()
            os.close(steps_write)
        connection = Connection(control.detach())
        steps = Connection(steps_read, writable=False)
        try:
            connection.send((None if model is None else os.fspath(model), device, load_options, setup))
            while True:
                try:
                    kind, payload = connection.recv()
                except (EOFError, OSError):
                    _wait(process, CLOSE_WAIT_S)
                    raise _died("while loading the model", process, stderr) from None
                if kind == "progress":
                    if progress is not None:
                        progress(payload)
                elif kind == "error":
                    raise _restore(payload)
                else:
                    return cls(process, connection, steps, stderr, payload)
        except BaseException:
            # the child may still be loading: closing our end tells it to go, and it is not waited for
            connection.close()
            _stop(process, wait_s=0.5)
            steps.close()
            stderr.close()
            raise

    def close(self, *, wait: bool = True) -> None:
        """Stop the child; a reply in progress ends as cancelled. Safe to call again.

        `wait=False` only tells the child to go (an app that is exiting does not wait for torch to
        unload; the child also goes by itself when the app's end of the pipe closes). A later call
        with `wait=True` waits for it.
        """
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError, ValueError):
                with self._send_lock:
                    self._control.send(("close", None))
        if not wait:
            # reap it when it exits, so no zombie is left behind while the app runs on
            threading.Thread(target=self._process.wait, name="model-process-reaper", daemon=True).start()
            return
        _stop(self._process)
        with contextlib.suppress(OSError):
            self._control.close()
        # a stream still reading (another thread) ends at the child's exit; its pipe is closed after it
        if self._stream_lock.acquire(timeout=CLOSE_WAIT_S):
            try:
                self._steps.close()
                self._stderr.close()
            finally:
                self._stream_lock.release()

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def alive(self) -> bool:
        """Whether the child still serves the model: False once closed, or killed or crashed (the app
        then starts a new one)."""
        return not self._closed and self._process.poll() is None

    # ------------------------------------------------------------------ the Engine protocol

    def encode(self, text: str) -> list[int]:
        return self._call("encode", text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._call("decode", list(ids))

    def token_text(self, token_id: int) -> str:
        # the inspector asks for hundreds of tokens at a time: one request brings the whole vocabulary
        if self._token_texts is None and self.vocab_size:
            self._token_texts = self._call("token_texts")
        texts = self._token_texts
        if texts is not None and 0 <= token_id < len(texts):
            return texts[token_id]
        return self._call("token_text", token_id)

    def default_params(self) -> SamplingParams:
        # read once in the child at load: the app asks from its UI thread, which must never wait on a pipe
        defaults = self._defaults
        if isinstance(defaults, SamplingParams):
            return defaults
        raise _restore(defaults)

    def render(self, conversation: Conversation) -> tuple[list[int], list[MessageSpan]]:
        return self._call("render", list(conversation))

    # The inspector's numbers, computed where the model and torch are (the app's process has neither)

    def explain_attention(self, ids: Sequence[int], query_position: int, layer: int, head: int) -> Explanation:
        """`chat_tui.engine.explain.explain_attention` on the child's model (an Explanation)."""
        return self._call("explain_attention", list(ids), query_position, layer, head)

    def replay_chain(self, step: Step, context_ids: Sequence[int] | None,
                     params: SamplingParams | None) -> ChainReplay:
        """`chat_tui.engine.explain.replay_chain` for this model's vocabulary (a ChainReplay)."""
        return self._call("replay_chain", step, None if context_ids is None else list(context_ids), params)

    # The inside views (issue #14), computed in the child; which it can show is known from its load

    def inside_views(self) -> dict[str, str | None]:
        return dict(self._inside_views)

    def logit_lens(self, ids: Sequence[int], token_id: int, top: int = 3) -> Lens:
        return self._call("logit_lens", list(ids), token_id, top)

    def attribute(self, ids: Sequence[int], token_id: int) -> Attribution:
        return self._call("attribute", list(ids), token_id)

    def rollout(self, ids: Sequence[int]) -> Rollout:
        return self._call("rollout", list(ids))

    def knock_out(self, ids: Sequence[int], heads: frozenset[Head], top: int = 8) -> KnockOut:
        return self._call("knock_out", list(ids), frozenset(heads), top)

    def token_pieces(self, text: str) -> list[TokenPiece]:
        return self._call("token_pieces", text)

    def block_trace(self, ids: Sequence[int], layer: int, head: int) -> BlockTrace:
        return self._call("block_trace", list(ids), layer, head)

    def stream(
        self,
        conversation: Conversation,
        params: ParamsSource,
        *,
        inspect: bool = False,
        cancel: threading.Event | None = None,
        candidates: bool = True,
        knock_out: frozenset[tuple[int, int]] = frozenset(),
        prefix_ids: Sequence[int] = (),
        lens: bool = False,
    ) -> Iterator[Step]:
        # one stream at a time; a caller that is cancelled while it waits for the last one gets nothing
        while not self._stream_lock.acquire(timeout=POLL_S * 10):
            if cancel is not None and cancel.is_set():
                return
        try:
            yield from self._stream(conversation, params, inspect, cancel, candidates, frozenset(knock_out),
                                    tuple(int(i) for i in prefix_ids), lens)
        finally:
            self._stream_lock.release()

    def stream_columns(self, conversation: Conversation, params: Sequence[ParamsSource], *,
                       cancel: threading.Event | None = None, candidates: bool = True) -> Iterator[tuple[int, Step]]:
        """Several settings answering one conversation in the model's process, a token of each in turn:
        (column, step) (`chat_tui.engine.compare.stream_columns`). The settings are fixed for the run."""
        while not self._stream_lock.acquire(timeout=POLL_S * 10):
            if cancel is not None and cancel.is_set():
                return
        try:
            fixed = [resolve_params(p) for p in params]
            yield from self._stream(conversation, fixed, False, cancel, candidates, frozenset(), (), False,
                                    request="stream_columns")
        finally:
            self._stream_lock.release()

    def _stream(self, conversation: Conversation, params: ParamsSource | list[SamplingParams], inspect: bool,
                cancel: threading.Event | None, candidates: bool, knock_out: frozenset[Head],
                prefix_ids: tuple[int, ...], lens: bool, request: str = "stream") -> Iterator[Any]:
        sent = params if isinstance(params, list) else resolve_params(params)
        self._send((request, (list(conversation), sent, inspect, candidates, knock_out, prefix_ids, lens)))
        pending: deque[Any] = deque()  # received in one batch, not yet handed on
        cancel_sent = False
        ended = False
        try:
            while True:
                # between tokens: pass on an edit of the settings and Esc
                if callable(params):
                    now = params()
                    if now is not sent and now != sent:
                        sent = now
                        self._tell(("params", now))
                if cancel is not None and not cancel_sent and cancel.is_set():
                    cancel_sent = True
                    self._tell(("cancel", None))
                if pending:
                    yield pending.popleft()
                    continue
                message = self._next_step()
                if message is None:
                    continue
                kind, payload = message
                if kind == "end":
                    ended = True
                    self._refresh(payload)
                    return
                if kind == "error":
                    ended = True
                    raise _restore(payload)
                pending.extend(payload)
        except _Closed:
            ended = True  # closed by the app: the reply simply ends here (the app has marked it stopped)
        finally:
            if not ended:  # the caller stopped early (or failed): end the child's stream too
                self._abandon()

    # ------------------------------------------------------------------ plumbing

    def _send(self, message: tuple[str, Any]) -> None:
        if self._closed:
            raise EngineError("the model was closed")
        try:
            with self._send_lock:
                self._control.send(message)
        except (OSError, ValueError):
            raise self._died("") from None

    def _tell(self, message: tuple[str, Any]) -> None:
        """Send, when a failure can wait: a closed or dead child shows as the stream's end or error."""
        with contextlib.suppress(EngineError):
            self._send(message)

    def _call(self, name: str, *args: Any) -> Any:
        with self._call_lock:
            self._send(("call", (name, args)))
            try:
                while not self._control.poll(POLL_S * 10):
                    if self._process.poll() is not None:
                        raise EOFError
                kind, payload = self._control.recv()
            except (EOFError, OSError, ValueError):
                raise self._died("") from None
        if kind == "error":
            raise _restore(payload)
        return payload

    def _next_step(self) -> tuple[str, Any] | None:
        """The next message on the steps pipe, or None after POLL_S without one.

        Raises _Closed when the app closed this engine and the child is gone, EngineError when the
        child died on its own.
        """
        try:
            if not self._steps.poll(POLL_S):
                if self._process.poll() is not None and not self._steps.poll(0):
                    raise EOFError
                return None
            return self._steps.recv()
        except (EOFError, OSError, ValueError):
            if self._closed:
                raise _Closed from None
            _wait(self._process, CLOSE_WAIT_S)
            raise self._died("while generating") from None

    def _abandon(self) -> None:
        """Cancel the child's stream and read it to its end, so the next stream starts clean."""
        self._tell(("cancel", None))
        with contextlib.suppress(EngineError, _Closed):
            while True:
                message = self._next_step()
                if message is not None and message[0] in ("end", "error"):
                    if message[0] == "end":
                        self._refresh(message[1])
                    return

    def _refresh(self, attributes: dict[str, Any]) -> None:
        """Take the attributes a reply may have changed in the child's engine (see REFRESHED)."""
        for name in REFRESHED:
            if name in attributes:
                setattr(self, name, attributes[name])

    def _died(self, when: str) -> EngineError:
        if self._closed:
            return EngineError("the model was closed")
        return _died(when, self._process, self._stderr)


class _Closed(Exception):
    """The app closed the engine while a stream was being read."""


def _widen_pipe(fd: int) -> None:
    """Room for some hundred Steps (~10 KB each with attention): a busy UI then never stalls the model."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None) if fcntl is not None else None
    if set_size is not None:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, set_size, PIPE_BYTES)


def _wait(process: subprocess.Popen, seconds: float) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(seconds)


def _stop(process: subprocess.Popen, wait_s: float = CLOSE_WAIT_S) -> None:
    _wait(process, wait_s)
    if process.poll() is None:
        process.terminate()
        _wait(process, CLOSE_WAIT_S)
        if process.poll() is None:
            process.kill()
            _wait(process, CLOSE_WAIT_S)


def _died(when: str, process: subprocess.Popen, stderr: IO[bytes]) -> EngineError:
    """The error for a child that went away: one line, and what it last wrote to stderr as a note."""
    code = process.poll()
    how = f"exit code {code}" if code is not None and code >= 0 else (
        f"killed by signal {-code}" if code is not None else "still running, but its pipe closed")
    error = EngineError(f"the model's process stopped unexpectedly{f' {when}' if when else ''} ({how})")
    try:
        # its own descriptor: threads that each report the death do not share one file position
        with open(os.dup(stderr.fileno()), "rb") as own:
            size = os.fstat(own.fileno()).st_size
            tail = os.pread(own.fileno(), STDERR_TAIL, max(0, size - STDERR_TAIL)).decode("utf-8", "replace").strip()
    except (OSError, ValueError):
        tail = ""
    if tail and hasattr(error, "add_note"):
        error.add_note(f"The model's process wrote:\n{tail}")
    return error


# ---------------------------------------------------------------------- exceptions across the pipe


def _portable(exc: BaseException) -> Payload:
    """(the exception itself, its one-line text, the child's traceback).

    Only Python's own exceptions and ours travel as themselves: unpickling one of torch's or
    transformers' would import that library into the app. Others become EngineError("Type: text").
    """
    trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    module = type(exc).__module__
    if module == "builtins" or module == "chat_tui" or module.startswith("chat_tui."):
        try:
            pickle.loads(pickle.dumps(exc))
        except Exception:
            pass
        else:
            return exc, first_line(exc), trace
    return None, first_line(f"{type(exc).__name__}: {first_line(exc)}"), trace


def _restore(payload: Payload) -> BaseException:
    """A fresh exception each time (one raised twice would gather notes and traceback frames)."""
    original, text, trace = payload
    exc = copy.copy(original) if original is not None else EngineError(text)
    if hasattr(exc, "add_note"):  # 3.11+: the log file then shows where in the child it happened
        exc.__notes__ = [*getattr(original, "__notes__", ()), f"In the model's process:\n{trace}"]
    return exc


# ---------------------------------------------------------------------- the child


def _child_main(control_fd: int, steps_fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C belongs to the app, which closes us
    control = Connection(control_fd)
    steps = Connection(steps_fd, readable=False)
    try:
        model, device, load_options, setup = control.recv()
    except (EOFError, OSError):
        return
    loaded = threading.Event()
    threading.Thread(target=_exit_if_orphaned, args=(control_fd, loaded), name="orphan-watch", daemon=True).start()
    _serve(control, steps, model, device, load_options, setup, loaded)


def _exit_if_orphaned(control_fd: int, loaded: threading.Event) -> None:
    """While the model loads (minutes, for a big one) nothing reads the control socket: if the app
    goes meanwhile (killed, or it gave up), go too. The app sends nothing until the model is ready,
    so the socket turning readable before then means the app's end closed."""
    with contextlib.suppress(OSError, ValueError):
        select.select([control_fd], [], [])
    if not loaded.is_set():
        os._exit(0)


def _serve(control: Connection, steps: Connection, model: str | None, device: str | None,
           load_options: dict[str, Any], setup: Setup | None, loaded: threading.Event) -> None:
    """The child's main loop: load the model, then answer requests until `close` or the app is gone."""
    send_lock = threading.Lock()  # a hub download reports progress from several threads

    def progress(text: str) -> None:
        with send_lock:
            control.send(("progress", text))

    try:
        from chat_tui.engine import load_engine

        engine = load_engine(model, device=device, progress=progress, **load_options)
        if setup is not None:
            setup(engine)
        info = _describe(engine)
        tune_collection()  # torch and the model are a million long-lived objects
        with send_lock:
            loaded.set()
            control.send(("ready", info))
    except BaseException as exc:
        with send_lock:
            loaded.set()
            control.send(("error", _portable(exc)))
        return
    latest: dict[str, SamplingParams] = {}
    cancel = threading.Event()
    worker: threading.Thread | None = None
    while True:
        try:
            kind, payload = control.recv()
        except (EOFError, OSError):  # the app has gone
            cancel.set()
            return
        if kind == "call":
            name, args = payload
            try:
                answer = ("ok", _answer(engine, name, args))
            except BaseException as exc:
                answer = ("error", _portable(exc))
            control.send(answer)
        elif kind == "params":
            latest["params"] = payload
        elif kind == "cancel":
            cancel.set()
        elif kind in ("stream", "stream_columns"):
            if worker is not None:
                worker.join()  # the app reads each stream to its end before it starts another
            conversation, params, inspect, candidates, knock_out, prefix_ids, lens = payload
            cancel = threading.Event()
            if kind == "stream":
                latest["params"] = params
                generate = _stream_of(engine, conversation, latest, inspect, candidates, knock_out, prefix_ids,
                                      lens, cancel)
            else:
                from chat_tui.engine.compare import stream_columns

                generate = stream_columns(engine, conversation, params, cancel=cancel, candidates=candidates)
            worker = threading.Thread(target=_generate, args=(engine, steps, generate, cancel), name="generate",
                                      daemon=True)
            worker.start()
        elif kind == "close":
            cancel.set()
            if worker is not None:
                worker.join(CLOSE_WAIT_S)
            return


def _answer(engine: Any, name: str, args: tuple[Any, ...]) -> Any:
    if name not in CALLS:
        raise EngineError(f"the model's process has no request {name!r}")
    if name == "explain_attention":
        from chat_tui.engine.explain import explain_attention

        return explain_attention(engine, *args)
    if name == "replay_chain":
        from chat_tui.engine.explain import replay_chain, vocab_size_of

        return replay_chain(*args, vocab_size=vocab_size_of(engine))
    if name == "token_texts":
        from chat_tui.engine.explain import vocab_size_of

        return [engine.token_text(i) for i in range(vocab_size_of(engine) or 0)]
    return getattr(engine, name)(*args)


def _stream_of(engine: Any, conversation: Conversation, latest: dict[str, SamplingParams], inspect: bool,
               candidates: bool, knock_out: frozenset[Head], prefix_ids: tuple[int, ...], lens: bool,
               cancel: threading.Event) -> Iterator[Step]:
    """A reply's steps; the settings are asked again at every token (the app sends edits as they happen)."""
    # an engine that cannot switch heads off, or take a reply's first ids, is asked only when it must
    extra: dict[str, Any] = {"knock_out": knock_out} if knock_out else {}
    if prefix_ids:
        extra["prefix_ids"] = prefix_ids
    if lens:
        extra["lens"] = True
    return engine.stream(conversation, lambda: latest["params"], inspect=inspect, cancel=cancel,
                         candidates=candidates, **extra)


def _generate(engine: Any, steps: Connection, generate: Iterator[Any], cancel: threading.Event) -> None:
    """Send what `generate` yields (Steps, or (column, Step) pairs) to the app in batches, then the end."""
    batch: list[Any] = []
    sent_at = 0.0
    try:
        for item in generate:
            batch.append(item)
            step = item[1] if isinstance(item, tuple) else item
            now = time.perf_counter()
            # a fast model's steps go a few at a time: each message costs a write and a wake-up of
            # the app (about 40 us), 6% of a small model's token on a CPU
            if now - sent_at >= BATCH_S or step.finish_reason is not None:
                steps.send(("steps", batch))
                batch, sent_at = [], now
        if batch:
            steps.send(("steps", batch))
        steps.send(("end", {name: getattr(engine, name, None) for name in REFRESHED}))
    except (OSError, ValueError):  # the app has gone
        cancel.set()
    except BaseException as exc:
        with contextlib.suppress(OSError, ValueError):
            steps.send(("error", _portable(exc)))


def _describe(engine: Any) -> dict[str, Any]:
    from chat_tui.engine.explain import vocab_size_of

    info = {name: getattr(engine, name, None) for name in ATTRIBUTES}
    info["vocab_size"] = vocab_size_of(engine)  # the Hugging Face engine's is its model's config's
    # the mini-GPT says so without building its torch model
    info["explains"] = explainer(engine) is not None
    info["inside_views"] = inside_views_of(engine)
    try:
        info["default_params"] = engine.default_params()
    except Exception as exc:  # raised again when the app asks
        info["default_params"] = _portable(exc)
    return info
