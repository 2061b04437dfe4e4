"""An engine that runs in a child process, behind the same `Engine` interface.

Why: on a CPU, a token step of a small model is mostly short BLAS calls that each let go of the
interpreter lock. With the UI painting in the same process, every such call hands the lock to the
UI thread and the model then waits for it back: the bundled model streamed at about 0.6x its
headless speed inside the app. In a child process the model keeps a core of its own, and the UI
thread of the app only receives finished `Step`s.

The child loads the model with `load_engine` and answers on two pipes:

- control (both ways): the app's requests (`call`, `stream`, `params`, `cancel`, `close`); the child
  answers `call` only, in order.
- steps (child to app): for each stream, its `Step`s, then ("end", None) or ("error", ...).

Mid-reply edits reach the child as `params` messages and Esc as `cancel`; both are forwarded between
tokens (every `POLL_S` at the latest), so they apply within a token or two. Exceptions come back as
themselves (EngineError, CheckpointError, ...), with the child's traceback as a note. If the child
dies, the app gets an EngineError that says so, never a hang.

Nothing here imports torch: the child does, when it loads the model.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
from typing import IO, Any

from chat_tui.engine.params import SamplingParams
from chat_tui.engine.types import Conversation, EngineError, MessageSpan, ParamsSource, Step, resolve_params

POLL_S = 0.005  # how often a waiting stream forwards edits and Esc to the child
CLOSE_WAIT_S = 2.0
STDERR_TAIL = 4000  # characters of the child's stderr kept in the error that reports its death
PIPE_BYTES = 1 << 20  # the steps pipe's buffer (Linux; the default 64 KB holds some six Steps)  # how long close() waits for the child before terminating it

# what the app reads from an engine, copied once from the child's engine when it is ready
ATTRIBUTES = ("backend", "model_name", "device", "context_length", "n_layer", "n_head", "chat_format",
              "checkpoint_hash", "attention_unavailable", "vocab_size")

Setup = Callable[[Any], None]


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
    vocab_size: int | None

    def __init__(self, process: subprocess.Popen, control: Connection, steps: Connection, stderr: IO[bytes],
                 info: dict[str, Any]) -> None:
        self._process = process
        self._stderr = stderr
        self._control = control
        self._steps = steps
        self._send_lock = threading.Lock()  # several threads send requests
        self._call_lock = threading.Lock()  # one call's request and answer at a time
        self._stream_lock = threading.Lock()  # one stream at a time, as in-process engines
        self._token_texts: dict[int, str] = {}
        self._closed = False
        for name in ATTRIBUTES:
            setattr(self, name, info.get(name))
        self._defaults = info["default_params"]

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
            _stop(process, connection)
            steps.close()
            stderr.close()
            raise

    def close(self, *, wait: bool = True) -> None:
        """Stop the child (a reply in progress is cancelled first). Safe to call again.

        `wait=False` only tells the child to go (an app that is exiting does not wait for torch to
        unload); it also goes by itself when the app's end of the pipe closes. A later call with
        `wait=True` waits for it.
        """
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError, ValueError):
                with self._send_lock:
                    self._control.send(("close", None))
        if wait and not self._steps.closed:
            _stop(self._process, self._control)
            self._steps.close()
            self._stderr.close()

    @property
    def pid(self) -> int:
        return self._process.pid

    def _alive(self) -> bool:
        return self._process.poll() is None

    def _died(self, when: str) -> EngineError:
        if self._closed:
            return EngineError("the model was closed")
        return _died(when, self._process, self._stderr)

    # ------------------------------------------------------------------ the Engine protocol

    def encode(self, text: str) -> list[int]:
        return self._call("encode", text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._call("decode", list(ids))

    def token_text(self, token_id: int) -> str:
        # the inspector asks for the same few hundred tokens again and again: ask the child once each
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self._call("token_text", token_id)
        return text

    def default_params(self) -> SamplingParams:
        # read once in the child at load: the app asks from its UI thread, which must never wait on a pipe
        defaults = self._defaults
        if isinstance(defaults, SamplingParams):
            return defaults
        raise _restore(defaults)

    def render(self, conversation: Conversation) -> tuple[list[int], list[MessageSpan]]:
        return self._call("render", list(conversation))

    def stream(
        self,
        conversation: Conversation,
        params: ParamsSource,
        *,
        inspect: bool = False,
        cancel: threading.Event | None = None,
    ) -> Iterator[Step]:
        with self._stream_lock:
            sent = resolve_params(params)
            self._send(("stream", (list(conversation), sent, inspect)))
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
                    if not self._steps.poll(POLL_S):
                        if not self._alive():
                            raise self._died("while generating")
                        continue
                    kind, payload = self._receive_step()
                    if kind == "end":
                        ended = True
                        return
                    if kind == "error":
                        ended = True
                        raise _restore(payload)
                    yield payload
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
                    if not self._alive():
                        raise EOFError
                kind, payload = self._control.recv()
            except (EOFError, OSError):
                raise self._died("") from None
        if kind == "error":
            raise _restore(payload)
        return payload

    def _receive_step(self) -> tuple[str, Any]:
        try:
            return self._steps.recv()
        except (EOFError, OSError):
            _wait(self._process, CLOSE_WAIT_S)
            raise self._died("while generating") from None

    def _abandon(self) -> None:
        """Cancel the child's stream and read it to its end, so the next stream starts clean."""
        self._tell(("cancel", None))
        with contextlib.suppress(EngineError):
            while True:
                if not self._steps.poll(POLL_S):
                    if not self._alive():
                        return
                    continue
                kind, _ = self._receive_step()
                if kind in ("end", "error"):
                    return


def _widen_pipe(fd: int) -> None:
    """Room for some hundred Steps (~10 KB each with attention): a busy UI then never stalls the model."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None) if fcntl is not None else None
    if set_size is not None:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, set_size, PIPE_BYTES)


def _wait(process: subprocess.Popen, seconds: float) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(seconds)


def _stop(process: subprocess.Popen, control: Connection) -> None:
    _wait(process, CLOSE_WAIT_S)
    if process.poll() is None:
        process.terminate()
        _wait(process, CLOSE_WAIT_S)
    with contextlib.suppress(OSError):
        control.close()


def _died(when: str, process: subprocess.Popen, stderr: IO[bytes]) -> EngineError:
    """The error for a child that went away: one line, and what it last wrote to stderr as a note."""
    code = process.poll()
    how = f"exit code {code}" if code is not None and code >= 0 else (
        f"killed by signal {-code}" if code is not None else "still running, but its pipe closed")
    error = EngineError(f"the model's process stopped unexpectedly{f' {when}' if when else ''} ({how})")
    try:
        stderr.seek(0, os.SEEK_END)
        stderr.seek(max(0, stderr.tell() - STDERR_TAIL))
        tail = stderr.read().decode("utf-8", "replace").strip()
    except (OSError, ValueError):
        tail = ""
    if tail and hasattr(error, "add_note"):
        error.add_note(f"The model's process wrote:\n{tail}")
    return error


# ---------------------------------------------------------------------- exceptions across the pipe


def _portable(exc: BaseException) -> tuple[BaseException | None, str, str]:
    """(the exception itself, its one-line text, the child's traceback).

    Only Python's own exceptions and ours travel as themselves: unpickling one of torch's or
    transformers' would import that library into the app. Others become EngineError("Type: text").
    """
    text = str(exc) or type(exc).__name__
    trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    module = type(exc).__module__
    if module == "builtins" or module == "chat_tui" or module.startswith("chat_tui."):
        try:
            pickle.loads(pickle.dumps(exc))
        except Exception:
            pass
        else:
            return exc, text, trace
    return None, f"{type(exc).__name__}: {text}", trace


def _restore(payload: tuple[BaseException | None, str, str]) -> BaseException:
    exc, text, trace = payload
    if exc is None:
        exc = EngineError(text)
    if hasattr(exc, "add_note"):  # 3.11+: the log file then shows where in the child it happened
        exc.add_note(f"In the model's process:\n{trace}")
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
    _serve(control, steps, model, device, load_options, setup)


def _serve(control: Connection, steps: Connection, model: str | None, device: str | None,
           load_options: dict[str, Any], setup: Setup | None) -> None:
    """The child's main loop: load the model, then answer requests until `close` or the app is gone."""
    try:
        from chat_tui.engine import load_engine

        engine = load_engine(model, device=device, progress=lambda text: control.send(("progress", text)),
                             **load_options)
        if setup is not None:
            setup(engine)
        control.send(("ready", _describe(engine)))
    except BaseException as exc:
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
                answer = ("ok", getattr(engine, name)(*args))
            except BaseException as exc:
                answer = ("error", _portable(exc))
            control.send(answer)
        elif kind == "params":
            latest["params"] = payload
        elif kind == "cancel":
            cancel.set()
        elif kind == "stream":
            if worker is not None:
                worker.join()  # the app reads each stream to its end before it starts another
            conversation, params, inspect = payload
            latest["params"] = params
            cancel = threading.Event()
            worker = threading.Thread(target=_generate, args=(engine, steps, conversation, latest, inspect, cancel),
                                      name="generate", daemon=True)
            worker.start()
        elif kind == "close":
            cancel.set()
            if worker is not None:
                worker.join(CLOSE_WAIT_S)
            return


def _generate(engine: Any, steps: Connection, conversation: Conversation, latest: dict[str, SamplingParams],
              inspect: bool, cancel: threading.Event) -> None:
    try:
        for step in engine.stream(conversation, lambda: latest["params"], inspect=inspect, cancel=cancel):
            steps.send(("step", step))
        steps.send(("end", None))
    except (OSError, ValueError):  # the app has gone
        cancel.set()
    except BaseException as exc:
        with contextlib.suppress(OSError, ValueError):
            steps.send(("error", _portable(exc)))


def _describe(engine: Any) -> dict[str, Any]:
    from chat_tui.engine.explain import vocab_size_of

    info = {name: getattr(engine, name, None) for name in ATTRIBUTES}
    info["vocab_size"] = vocab_size_of(engine)
    try:
        info["default_params"] = engine.default_params()
    except Exception as exc:  # raised again when the app asks
        info["default_params"] = _portable(exc)
    return info
