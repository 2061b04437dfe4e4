"""The `chat-tui` command: the app by default, `ask` for a headless reply, `train` for models.

Every error exits non-zero with one clear line on stderr, never a traceback. Heavy imports
(torch, transformers, textual) happen inside the command that needs them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NoReturn

from chat_tui import __version__
from chat_tui.errors import CLIError, EngineError, TrainingError, first_line

SUBCOMMANDS = ("ask", "compare", "train", "export", "import", "tokens")
TRACES = ("lens", "attribution")  # what `ask --json --trace` can add to each token


class OneLineParser(argparse.ArgumentParser):
    """Argument errors are one line, as every other error is; the usage is one --help away.

    Subparsers are made of their parent's class, so every command (train's and import's too) gets this.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"chat-tui: error: {message} (see {self.prog} --help)\n")


def _add_model_options(parser: argparse.ArgumentParser, *, sub: bool = False, server: bool = True,
                       per_column: bool = False) -> None:
    # In a subcommand, an option left out must not undo the same option given before the subcommand.
    unset = {"default": argparse.SUPPRESS} if sub else {}
    if per_column:
        parser.add_argument("--model", metavar="PATH", action="append", help="a checkpoint folder or Hugging Face "
                            "hub id: once for every column, or once per column (default: the bundled mini-GPT)",
                            **unset)
    else:
        parser.add_argument("--model", metavar="PATH", help="a checkpoint folder or Hugging Face hub id (default: "
                            "the bundled mini-GPT); with --base-url, the server's model", **unset)
    parser.add_argument("--device", help="cpu, cuda or mps (default: the best available)", **unset)
    hf = parser.add_argument_group("Hugging Face models")
    hf.add_argument("--dtype", metavar="DTYPE", help="float32, bfloat16, float16 or auto (default: float32 on CPU, "
                    "bfloat16 or float16 on a GPU)", **unset)
    hf.add_argument("--quantize", choices=("int8",), help="int8: the Linear layers' weights in int8 for CPU decoding "
                    "(about a quarter of the bytes to read a token; the reply can differ a little from float32's)",
                    **unset)
    hf.add_argument("--device-map", metavar="MAP", help="'auto': spread a model too big for one device over the GPUs "
                    "and the CPU (needs accelerate: pip install accelerate)", **unset)
    hf.add_argument("--chat-format", choices=("template", "dialogpt", "plain", "raw"), help="how a conversation becomes "
                    "a prompt (default: the tokenizer's chat template, DialoGPT's format, else plain)", **unset)
    hf.add_argument("--offline", action="store_true", default=argparse.SUPPRESS if sub else False,
                    help="never use the network: a hub id must be in the local cache (like HF_HUB_OFFLINE=1)")
    hf.add_argument("--trust-remote-code", action="store_true", default=argparse.SUPPRESS if sub else False,
                    help="let a model run the Python code of its repository (read that code first)")
    if not server:
        return
    remote = parser.add_argument_group("a model on an OpenAI-compatible server (vLLM, llama.cpp, Ollama, "
                                       "transformers serve, chat-tui serve, the OpenAI API)")
    remote.add_argument("--base-url", metavar="URL", help="the server, e.g. http://127.0.0.1:8000/v1; --model then "
                        "names one of its models (default: its only one)", **unset)
    remote.add_argument("--api-key-env", metavar="VAR", help="the environment variable holding the key "
                        "(default: OPENAI_API_KEY)", **unset)
    remote.add_argument("--api-key-file", metavar="PATH", help="a file holding the key (others must not be able "
                        "to read it: chmod 600)", **unset)
    remote.add_argument("--timeout", type=float, metavar="S", help="seconds to wait for the first token and "
                        "between tokens (default: 60)", **unset)


def model_options(args: argparse.Namespace) -> dict:
    """The Hugging Face loading options that were given, for load_engine(**options), and the file where
    a server's rejected fields are remembered."""
    from chat_tui.config import get_paths

    options: dict = {"server_memory": str(get_paths().server_memory)}
    for name in ("device_map", "chat_format", "quantize", "base_url", "api_key_env", "api_key_file", "timeout"):
        if getattr(args, name, None):
            options[name] = getattr(args, name)
    for name in ("offline", "trust_remote_code"):
        if getattr(args, name, False):
            options[name] = True
    return options


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling (default: the model's generation_config.json)")
    group.add_argument("--temperature", type=str, metavar="T", help="0 = greedy")
    group.add_argument("--top-k", type=str, metavar="K", help="0 = off")
    group.add_argument("--top-p", type=str, metavar="P", help="in (0, 1]; 1 = off")
    group.add_argument("--min-p", type=str, metavar="P", help="in [0, 1]; 0 = off")
    group.add_argument("--typical-p", type=str, metavar="P", help="in (0, 1]; 1 = off")
    group.add_argument("--repetition-penalty", type=str, metavar="R", help="1 = off")
    group.add_argument("--presence-penalty", type=str, metavar="X")
    group.add_argument("--frequency-penalty", type=str, metavar="X")
    group.add_argument("--seed", type=str, metavar="S", help="fixed seed = reproducible reply")
    group.add_argument("--max-new-tokens", type=str, metavar="N")
    group.add_argument("--logit-bias", type=str, metavar="ID:BIAS,...", help="added to those tokens' raw logits, "
                       "e.g. 50256:-100,198:5 (biases in [-100, 100]; -100 all but bans a token)")
    group.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")
    group.add_argument("--no-slide-context", dest="slide_context", action="store_false", default=None,
                       help="end the reply when the context is full (by default the window slides and the reply "
                       "goes on, the model then seeing only the newest tokens)")


SAMPLING_FLAGS = (
    "temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "seed", "max_new_tokens", "logit_bias",
)


def build_parser(*, commands: bool = True) -> argparse.ArgumentParser:
    """The command line. Without `commands`, only the app's own options (no help, no subcommands):
    building every subcommand's options takes some 15 ms, which the app's first frame would wait for."""
    parser = OneLineParser(
        prog="chat-tui",
        description="Chat with a language model in your terminal, tune its sampling, watch its attention. "
        "With no command, opens the app.",
        add_help=commands,
        exit_on_error=commands,  # the short parser's errors are reported by the whole one
    )
    parser.add_argument("--version", action="version", version=f"chat-tui {__version__}")
    _add_model_options(parser)
    parser.add_argument("--new", action="store_true", help="start with a new conversation")
    parser.add_argument("--conversation", type=int, metavar="ID", help="open a saved conversation")
    if not commands:
        parser.set_defaults(command=None)
        return parser
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    ask = sub.add_parser("ask", help="print the model's reply to PROMPT (no UI)")
    ask.add_argument("prompt", metavar="PROMPT", nargs="?",
                     help="what to ask; '-', or none with input piped in, reads it from standard input")
    _add_model_options(ask, sub=True)
    ask.add_argument("--system", metavar="TEXT", help="system prompt")
    _add_sampling_options(ask)
    ask.add_argument("--json", action="store_true", help="one JSON object per token, then a summary")
    ask.add_argument("--raw", action="store_true", help="write the reply byte for byte (by default control "
                     "characters such as escape codes are shown as visible stand-ins, as in the app)")
    inside = ask.add_argument_group("inside the model (the mini-GPT, and Hugging Face models: see the README)")
    inside.add_argument("--trace", metavar="VIEWS", help="with --json: add to each token its logit lens (lens: the "
                        "top tokens after each layer, and the layer from which the chosen one stays first) and its "
                        "direct logit attribution (attribution: what each head and MLP wrote toward its logit); "
                        "comma-separated")
    inside.add_argument("--knockout", metavar="HEADS", help="generate with these attention heads switched off "
                        "(their output zeroed), e.g. L1H2,L3H1 (layers and heads counted from 1)")

    tokens = sub.add_parser("tokens", help="show how the model's tokenizer splits TEXT",
                            description="Print each token of TEXT with its id and bytes, and the count (a byte-level "
                            "BPE can split one Chinese character into two or three tokens).")
    tokens.add_argument("text", metavar="TEXT", nargs="?", help="the text; '-', or none with input piped in, reads "
                        "it from standard input")
    _add_model_options(tokens, sub=True)
    tokens.add_argument("--json", action="store_true", help="one JSON object: the tokens and the count")

    compare = sub.add_parser("compare", help="answer PROMPT with two to four settings (or models) side by side, on "
                             "the same random numbers", description="Each --set is a column: its settings over the "
                             "first model's defaults. Every column uses one seed and so the same random draw at every "
                             "token: a difference between the columns comes from their settings alone.")
    compare.add_argument("prompt", metavar="PROMPT", nargs="?",
                         help="what to ask; '-', or none with input piped in, reads it from standard input")
    compare.add_argument("--set", dest="columns", action="append", default=[], metavar="SETTINGS",
                         help='one column\'s settings, e.g. "temperature=1.3,top_p=0.95" ("" = the model\'s '
                         "defaults); give it two to four times")
    _add_model_options(compare, sub=True, server=False, per_column=True)
    compare.add_argument("--system", metavar="TEXT", help="system prompt")
    compare.add_argument("--seed", metavar="S", help="the seed every column shares (default: a random one, shown)")
    compare.add_argument("--max-tokens", metavar="N", help="the longest reply of every column, in tokens")
    compare.add_argument("--json", action="store_true", help="one JSON object per token per column, a summary per "
                         "column, then the divergence")
    compare.add_argument("--raw", action="store_true", help="write the replies byte for byte")

    train = sub.add_parser("train", help="train a mini-GPT")
    train_sub = train.add_subparsers(dest="train_command", metavar="STAGE", required=True)
    from chat_tui.train.cli_train import add_import_command, add_train_commands

    add_train_commands(train_sub)  # bundled, pretrain, sft
    add_import_command(sub)  # import nanogpt

    export = sub.add_parser("export", help="write a mini-GPT checkpoint as a standard Hugging Face model folder",
                            description="Write CHECKPOINT (a mini-GPT folder) to OUT as a GPT2LMHeadModel with its "
                            "tokenizer and chat template; load it back with --model OUT or transformers.")
    export.add_argument("checkpoint", metavar="CHECKPOINT", help="a mini-GPT checkpoint folder")
    export.add_argument("--format", choices=("hf",), default="hf", help="hf: Hugging Face transformers (the default)")
    export.add_argument("out", metavar="OUT", help="the folder to write (must not exist, or be empty)")

    serve = sub.add_parser("serve", help="serve the model over the OpenAI chat-completions protocol",
                           description="Serve MODEL (default: the bundled mini-GPT) at http://HOST:PORT/v1 with "
                           "GET /v1/models, POST /v1/chat/completions and POST /v1/completions, streamed or not, "
                           "for any OpenAI client. Needs the serve extra: pip install \"chat-tui[serve]\".")
    _add_model_options(serve, sub=True, server=False)
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1, this "
                       "machine only; any other address warns unless --api-key-env is set)")
    serve.add_argument("--port", type=int, default=8000, help="the port (default: 8000)")
    serve.add_argument("--api-key-env", metavar="VAR", help="clients must send the key held in the environment "
                       "variable VAR (Authorization: Bearer KEY); default: no key")
    serve.add_argument("--max-queue", type=int, default=16, metavar="N", help="requests that may wait for the "
                       "model; more are answered 429 (default: 16)")
    serve.add_argument("--model-id", metavar="NAME", help="the model's name in /v1/models and requests "
                       "(default: the model's own name)")
    return parser


def sampling_params(args: argparse.Namespace, defaults):
    from chat_tui.engine import SamplingParams

    changes = {name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name, None) is not None}
    if args.stop:
        changes["stop"] = tuple(args.stop)
    if getattr(args, "slide_context", None) is not None:
        changes["slide_context"] = args.slide_context
    base = defaults if defaults is not None else SamplingParams()
    return base.with_(**changes)


def read_prompt(prompt: str | None) -> str:
    """The prompt given, or standard input's text for '-' (and for none when input is piped in)."""
    if prompt is not None and prompt != "-":
        return prompt
    if sys.stdin is None or (prompt is None and sys.stdin.isatty()):
        raise CLIError('no prompt: give one (chat-tui ask "hello"), or pipe it in (echo hello | chat-tui ask -)')
    stdin = getattr(sys.stdin, "buffer", None)  # None: a text stream put there by a caller
    try:
        text = stdin.read().decode("utf-8") if stdin is not None else sys.stdin.read()
    except UnicodeDecodeError as exc:
        raise CLIError(f"standard input is not UTF-8 text (byte {exc.start})") from None
    return text[:-1] if text.endswith("\n") else text  # the newline of echo or a heredoc ends the input


@contextmanager
def _progress_bars_on_a_terminal_only() -> Iterator[None]:
    """transformers and the hub draw progress bars on stderr: in a pipe or a log they are noise.

    huggingface_hub reads the setting when it is imported (by the load, in a command); a user's own
    setting wins, and the environment is given back as it was, for a caller of main().
    """
    quiet = not sys.stderr.isatty() and "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
    if quiet:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:
        yield
    finally:
        if quiet:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)


def cmd_ask(args: argparse.Namespace) -> int:
    from chat_tui.engine import Message, SamplingParams, load_engine
    from chat_tui.textsafe import clean, clean_json

    # Validate the flags before the (slow) model load, so a typo fails at once.
    sampling_params(args, SamplingParams())
    traces = _traces(args)
    if args.knockout is not None:
        _heads(args.knockout, None)
    prompt = read_prompt(args.prompt)
    if not prompt.strip():
        raise CLIError("the prompt is empty")
    with _progress_bars_on_a_terminal_only():
        engine = load_engine(args.model, device=args.device, dtype=args.dtype, **model_options(args))
    params = sampling_params(args, engine.default_params())
    opened = _inside_for(engine, [*traces, *(["knockout"] if args.knockout else [])])
    knock_out = _heads(args.knockout, engine) if args.knockout else frozenset()
    conversation = []
    if args.system:
        conversation.append(Message("system", args.system))
    conversation.append(Message("user", prompt))
    out = sys.stdout
    # a pager or a file shown later is a terminal too: escape codes are neutralised unless --raw
    safe, safe_json = ((lambda s: s), (lambda s: s)) if args.raw else (clean, clean_json)
    tokens, reason, dropped, prefill, decode_s = 0, None, 0, 0.0, 0.0
    last = None  # the last step: where the window ended up
    cancel = threading.Event()
    context: list[int] = []  # the prompt and the reply so far, for --trace
    extra = {"knock_out": knock_out} if knock_out else {}
    try:
        # a plain reply reads only the text: the candidates (top-256, probabilities) are skipped
        for step in engine.stream(conversation, params, cancel=cancel, candidates=args.json, **extra):
            tokens += 1
            if step.prompt is not None:
                context = list(step.prompt.ids)
                prefill = step.prompt.prefill_s
                dropped = step.prompt.dropped_tokens
                if dropped:
                    total = len(step.prompt.ids) + dropped
                    print(f"chat-tui: note: the prompt was cut to fit the context: {dropped} of {total} tokens "
                          f"left out ({engine.context_length}-token window)", file=sys.stderr, flush=True)
            decode_s = step.elapsed_s - prefill
            reason = step.finish_reason or reason
            last = step
            if args.json:
                record = {
                    "token": step.text,
                    "id": step.token_id,
                    "prob": _prob(step.prob),
                    "top": [{"token": c.text, "id": c.id, "prob": _prob(c.prob)} for c in step.top],
                }
                if opened is not None and traces:
                    record.update(_trace_record(opened, traces, context[step.window_start : step.position],
                                                step.token_id))
                out.write(safe_json(json.dumps(record, ensure_ascii=False)) + "\n")
            else:
                out.write(safe(step.text))
            out.flush()
            context.append(step.token_id)
    except KeyboardInterrupt:
        cancel.set()
        reason = "cancelled"
    if args.json:
        summary = {
            "done": True,
            "tokens": tokens,
            "tokens_per_s": round(tokens / decode_s, 2) if tokens and decode_s > 0 else 0.0,
            "stop_reason": reason or "cancelled",
            "dropped_tokens": dropped,
        }
        if knock_out:
            summary["knocked_out"] = _head_names(knock_out)
        if engine.decode_note:  # why the speed is what it is (stderr stays quiet: nothing is wrong)
            summary["decode_note"] = engine.decode_note
        from chat_tui.engine.remote import RemoteEngine

        if isinstance(engine, RemoteEngine):  # the receipt: exactly what was sent, and what had to change
            summary["server"] = engine.server
            summary["sent"] = engine.last_request
            if engine.last_note:
                summary["server_note"] = engine.last_note
        out.write(json.dumps(summary) + "\n")
    else:
        out.write("\n")
    out.flush()
    if knock_out and not args.json:
        print(f"chat-tui: note: generated with {', '.join(_head_names(knock_out))} switched off", file=sys.stderr,
              flush=True)
    if last is not None and last.window_start > 0:  # after the reply's last line, on a terminal too
        print(f"chat-tui: note: the context window filled; the model saw only the last "
              f"{last.position + 1 - last.window_start} tokens from token {last.window_start} on",
              file=sys.stderr, flush=True)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from chat_tui.compare_cli import run_compare

    return run_compare(args)


def _traces(args: argparse.Namespace) -> list[str]:
    """The views `--trace` asks for (checked: known names, and --json)."""
    if args.trace is None:
        return []
    names = [name.strip() for name in args.trace.split(",") if name.strip()]
    unknown = [name for name in names if name not in TRACES]
    if unknown or not names:
        raise CLIError(f"--trace {args.trace!r}: choose from {', '.join(TRACES)} (comma-separated)")
    if not args.json:
        raise CLIError("--trace adds to each token's JSON object: use it with --json")
    return list(dict.fromkeys(names))


def _heads(text: str, engine) -> frozenset[tuple[int, int]]:
    """`--knockout`'s heads; without an engine only the names are checked (before the load)."""
    from chat_tui.engine.inside import parse_heads

    size = (engine.n_layer, engine.n_head) if engine is not None else (1 << 30, 1 << 30)
    try:
        heads = parse_heads(text, *size)
    except ValueError as exc:
        raise CLIError(f"--knockout: {exc}") from None
    if not heads:
        raise CLIError("--knockout: name at least one head, e.g. L1H2")
    return heads


def _head_names(heads: frozenset[tuple[int, int]]) -> list[str]:
    from chat_tui.engine.inside import head_name

    return [head_name(layer, head) for layer, head in sorted(heads)]


def _inside_for(engine, views: list[str]):
    """The engine as an Inside when it can show `views` (none asked: None); else the one-line reason why not."""
    if not views:
        return None
    from chat_tui.engine.inside_maths import inside_views_of

    reasons = inside_views_of(engine)
    for view in views:
        if reasons.get(view) is not None:
            raise CLIError(f"{engine.model_name}: {reasons[view]}")
    from chat_tui.engine.inside import inside

    return inside(engine)


def _trace_record(opened, traces: list[str], ids: list[int], token_id: int) -> dict:
    """A token's `--trace` fields: layers and heads counted from 1, as people name them."""
    record: dict = {}
    if "lens" in traces:
        lens = opened.logit_lens(ids, token_id)
        record["lens"] = [{"layer": layer.layer + 1,
                           "top": [{"token": t.text, "id": t.id, "prob": _prob(t.prob)} for t in layer.top]}
                          for layer in lens.layers]
        record["commit_layer"] = None if lens.commit_layer is None else lens.commit_layer + 1
    if "attribution" in traces:
        attribution = opened.attribute(ids, token_id)
        record["attribution"] = {
            "logit": round(attribution.logit, 6), "bias": round(attribution.bias, 6),
            "components": [{"name": c.name, "value": round(c.value, 6)} for c in attribution.components]}
    return record


def cmd_tokens(args: argparse.Namespace) -> int:
    from chat_tui.engine import load_engine
    from chat_tui.textsafe import clean_json, clean_line

    text = read_prompt(args.text)
    if not text:
        raise CLIError("the text is empty")
    with _progress_bars_on_a_terminal_only():
        engine = load_engine(getattr(args, "model", None), device=getattr(args, "device", None),
                             dtype=getattr(args, "dtype", None), **model_options(args))
    opened = _inside_for(engine, ["tokens"])
    pieces = opened.token_pieces(text)
    window = engine.context_length
    if args.json:
        record = {"tokens": [{"id": p.id, "token": p.text, "bytes": p.data.hex(" "), "start": p.start, "end": p.end}
                             for p in pieces],
                  "count": len(pieces), "context_length": window}
        print(clean_json(json.dumps(record, ensure_ascii=False)))
        return 0
    width = max((len(p.data.hex(" ")) for p in pieces), default=0)
    for p in pieces:
        print(f"{p.id:>8}  {p.data.hex(' '):<{width}}  {clean_line(repr(p.text))}")
    print(f"{len(pieces)} token{'s' if len(pieces) != 1 else ''}" + (f" of a {window}-token context" if window else ""))
    return 0


def _prob(p: float) -> float | None:
    """A probability for JSON: None where the backend gives none (a server without logprobs)."""
    return None if p != p else round(p, 6)  # NaN is not JSON


def cmd_train(args: argparse.Namespace) -> int:
    from chat_tui.train.cli_train import cmd_train_bundled, cmd_train_run

    if args.train_command == "bundled":
        return cmd_train_bundled(args)
    return cmd_train_run(args, getattr(args, "argv", None))


def cmd_export(args: argparse.Namespace) -> int:
    from chat_tui.engine.export import export_hf

    out = export_hf(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} to {out} (GPT2LMHeadModel, Hugging Face format); "
          f"chat with it: chat-tui --model {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn  # noqa: F401

        from chat_tui.serve import api_key_from_env, serve
    except ImportError:
        raise CLIError('chat-tui serve needs FastAPI and uvicorn: pip install "chat-tui[serve]"') from None
    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port {args.port}: must be from 0 to 65535")
    if args.max_queue < 0:
        raise CLIError(f"--max-queue {args.max_queue}: must be 0 or more")
    api_key = api_key_from_env(args.api_key_env)
    from chat_tui.engine.process import ProcessEngine

    options = model_options(args)
    options.pop("api_key_env", None)  # serve's own --api-key-env is the key its clients must send
    if args.dtype:
        options["dtype"] = args.dtype
    with _progress_bars_on_a_terminal_only():
        # the same child process as the app's: a crash of the model cannot take the server down with it
        engine = ProcessEngine.start(args.model, device=args.device, **options)
    try:
        serve(engine, host=args.host, port=args.port, model_id=args.model_id, api_key=api_key,
              max_queue=args.max_queue)
    finally:
        engine.close()
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    if not (sys.stdin and sys.stdin.isatty() and sys.stdout and sys.stdout.isatty()):
        raise CLIError("chat-tui needs a terminal; for scripts use chat-tui ask")  # not escape codes into a file
    from chat_tui.ui import run_app

    options = model_options(args)
    if args.dtype:
        options["dtype"] = args.dtype
    return run_app(model=args.model, new=args.new, conversation_id=args.conversation, device=args.device,
                   load_options=options or None)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(argv) if argv is not None else sys.argv[1:]
    # the app's options alone parse most starts; anything else (a command, --help, a typo) gets the
    # whole parser, with its subcommands and its messages
    try:
        args, rest = build_parser(commands=False).parse_known_args(arguments)
    except argparse.ArgumentError:
        rest = ["(error)"]
    if rest or "--" in arguments:
        parser = build_parser()
        args, rest = parser.parse_known_args(arguments)
        if rest:  # what parse_args does, with the help of the command that was given to point to
            given = [getattr(args, name, None) for name in ("command", "train_command", "import_command")]
            parser.prog = " ".join(["chat-tui", *filter(None, given)])
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.argv = arguments

    def cmd_import(args: argparse.Namespace) -> int | None:
        from chat_tui.train.cli_train import cmd_import

        return cmd_import(args)

    handlers = {"ask": cmd_ask, "compare": cmd_compare, "train": cmd_train, "export": cmd_export,
                "import": cmd_import, "serve": cmd_serve, "tokens": cmd_tokens, None: cmd_app}
    try:
        return handlers[args.command](args) or 0
    except KeyboardInterrupt:
        print("chat-tui: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # noqa: BLE001 - the one place every error becomes one line
        return _report(exc)


def _report(exc: BaseException) -> int:
    # no model library here: reporting an error must not import torch (chat_tui.errors and these are light)
    from chat_tui.engine.params import InvalidParameter
    from chat_tui.train.data import DataError

    known = (CLIError, EngineError, TrainingError, DataError, InvalidParameter, OSError, ValueError)
    message = first_line(exc)
    if not isinstance(exc, known):
        message = f"unexpected error: {type(exc).__name__}: {message}"
    print(f"chat-tui: error: {message}", file=sys.stderr)
    return 2 if isinstance(exc, (CLIError, InvalidParameter)) else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
