"""The `chat-tui train pretrain|sft` and `chat-tui import nanogpt` commands (argparse side).

Options default to None here so that `--resume` can tell what was typed from what was not; the
real defaults are `TrainConfig.defaults(kind)`, which --help shows too.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from chat_tui.engine.gptconfig import ACTIVATIONS
from chat_tui.errors import CLIError
from chat_tui.train.config import TrainConfig, setting_text

SPLIT_HELP = (
    "Validation split: the documents (text files; each conversation of a .jsonl/.yml file) are shuffled "
    "with --seed when there are several, tokenised, joined with <|bos|>, and the last --val-fraction of the "
    "tokens validates (one text file: its last 10%, as nanoGPT). Fine-tuning keeps the last --val-fraction "
    "of the shuffled conversations. Tokenised data is cached beside OUT (in .chat-tui-data-cache/), so the next "
    "run on the same files starts at once."
)

# --STEPS of each run of the bundled model's recipe (chat_tui.train.bundled.RUNS), in order
BUNDLED_STEP_FLAGS = ("--pretrain-steps", "--sft-steps", "--sft2-steps", "--sft3-steps")

# What --resume lets you change; everything else comes from the saved run.
RESUME_OVERRIDES = ("max_steps", "time_budget", "eval_every", "log_every", "save_every", "device", "compile")


def _duration(text: str) -> float:
    from chat_tui.train.duration import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _common_options(p: argparse.ArgumentParser, *, kind: str) -> None:
    pretrain = kind == "pretrain"
    d = TrainConfig.defaults(kind)

    def default(name: str) -> str:
        return setting_text(getattr(d, name))

    p.add_argument("--data", nargs="+", metavar="PATH",
                   help="text files or folders of them" + (", .jsonl conversations, chatterbot .yml" if pretrain
                                                           else ": .jsonl conversations or chatterbot .yml files"))
    p.add_argument("--out", metavar="DIR", help="output folder: the checkpoint, OUT/best/, metrics.jsonl, the data cache")
    p.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR exactly where it stopped")
    p.add_argument("--nproc", type=_positive_int, metavar="N", help="train with N processes (PyTorch DDP via torchrun)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=_positive_int, metavar="B",
                   help=f"sequences per process per micro-step (default {default('batch_size')})")
    o.add_argument("--grad-accum", type=_positive_int, metavar="K",
                   help=f"micro-steps per optimiser step (default {default('grad_accum')})")
    o.add_argument("--lr", type=float, metavar="LR", help=f"peak learning rate (default {default('lr')})")
    o.add_argument("--min-lr", type=float, metavar="LR", help="final learning rate of the cosine decay (default lr/10)")
    o.add_argument("--warmup", type=int, metavar="STEPS", help=f"linear warm-up steps (default {default('warmup')})")
    o.add_argument("--max-steps", type=_positive_int, metavar="N",
                   help=f"optimiser steps (default {default('max_steps')}, or none with --time-budget)")
    o.add_argument("--time-budget", type=_duration, metavar="TIME", help="stop after this long: 90s, 10m, 1h30m")
    o.add_argument("--dropout", type=float, metavar="P", help=f"dropout (default {default('dropout')})")
    o.add_argument("--weight-decay", type=float, metavar="WD",
                   help=f"AdamW weight decay on matrices (default {default('weight_decay')})")
    o.add_argument("--grad-clip", type=float, metavar="NORM",
                   help=f"clip the gradient norm (default {default('grad_clip')}; 0 = off)")
    e = p.add_argument_group("evaluation and saving")
    e.add_argument("--eval-every", type=_positive_int, metavar="STEPS",
                   help=f"validate (and save) every N steps (default {default('eval_every')})")
    e.add_argument("--eval-iters", type=_positive_int, metavar="N",
                   help=f"validation batches per evaluation (default {default('eval_iters')})")
    e.add_argument("--log-every", type=_positive_int, metavar="STEPS",
                   help=f"metrics.jsonl line every N steps (default {default('log_every')})")
    e.add_argument("--save-every", type=_positive_int, metavar="STEPS", help="save every N steps (default: --eval-every)")
    e.add_argument("--val-fraction", type=float, metavar="F",
                   help=f"share held out for validation (default {default('val_fraction')})")
    s = p.add_argument_group("system")
    s.add_argument("--seed", type=int, metavar="S", help=f"random seed (default {default('seed')})")
    s.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda if available, then mps, else cpu)")
    s.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    s.add_argument("--threads", type=_positive_int, metavar="N", help="CPU threads per process (default: all cores)")
    s.add_argument("--quiet", action="store_true", help="no progress display (metrics.jsonl is still written)")


def add_train_commands(train_sub) -> None:
    """Add `bundled`, `pretrain` and `sft` to the `chat-tui train` subparsers."""
    from chat_tui.train.bundled import RUNS

    bundled = train_sub.add_parser("bundled", help="re-train the bundled model from scratch (chatterbot corpus)",
                                   description="Re-train the bundled model: its runs (pretraining, then three rounds "
                                   "of fine-tuning) write into OUT-runs/, and the last becomes OUT.")
    bundled.add_argument("--out", required=True, metavar="DIR", help="output checkpoint folder")
    for flag, (name, _kind, _data, settings) in zip(BUNDLED_STEP_FLAGS, RUNS, strict=True):
        bundled.add_argument(flag, type=_positive_int, metavar="N",
                             help=f"optimiser steps of the run {name} (default {settings['max_steps']})")
    pre = train_sub.add_parser("pretrain", help="pretrain a mini-GPT from scratch on your text",
                               description="Pretrain a mini-GPT by next-token prediction. " + SPLIT_HELP)
    _common_options(pre, kind="pretrain")
    d = TrainConfig.defaults("pretrain")
    m = pre.add_argument_group("model")
    m.add_argument("--n-layer", type=_positive_int, metavar="N", help=f"transformer blocks (default {d.n_layer})")
    m.add_argument("--n-head", type=_positive_int, metavar="N", help=f"attention heads (default {d.n_head})")
    m.add_argument("--n-embd", type=_positive_int, metavar="N", help=f"width (default {d.n_embd})")
    m.add_argument("--block-size", type=_positive_int, metavar="N", help=f"context length in tokens (default {d.block_size})")
    m.add_argument("--activation", choices=tuple(ACTIVATIONS),  # the model's own list (torch-free)
                   help="GPT-2's tanh GELU (default) or the exact one, as nanoGPT's model has it")
    m.add_argument("--tokenizer", choices=("bpe", "char"), help="byte-level BPE (default) or one token per character")
    m.add_argument("--vocab-size", type=_positive_int, metavar="N", help=f"BPE vocabulary size (default {d.vocab_size})")

    sft = train_sub.add_parser("sft", help="fine-tune a checkpoint on dialogues (loss on the replies only)",
                               description="Fine-tune a mini-GPT on conversations; the loss covers the assistant's "
                               "tokens only. " + SPLIT_HELP)
    sft.add_argument("--from", dest="init_from", metavar="CKPT", help="the checkpoint folder to start from")
    _common_options(sft, kind="sft")


def add_import_command(sub) -> None:
    imp = sub.add_parser("import", help="bring a model from elsewhere")
    imp_sub = imp.add_subparsers(dest="import_command", metavar="FORMAT", required=True)
    nano = imp_sub.add_parser("nanogpt", help="a nanoGPT ckpt.pt (+ meta.pkl for a character model)")
    nano.add_argument("ckpt", metavar="CKPT.pt", help="nanoGPT's checkpoint (read with torch.load(weights_only=True))")
    nano.add_argument("out", metavar="OUT", help="the chat-tui checkpoint folder to write")
    nano.add_argument("--meta", metavar="meta.pkl", help="nanoGPT's character vocabulary (default: meta.pkl beside CKPT)")
    nano.add_argument("--tokenizer", metavar="tokenizer.json", help="for a GPT-2-token model: GPT-2's tokenizer.json")


# --- running ----------------------------------------------------------------------------------------

_CONFIG_FLAGS = (
    "n_layer", "n_head", "n_embd", "block_size", "dropout", "activation", "tokenizer", "vocab_size", "batch_size", "grad_accum", "lr",
    "min_lr", "warmup", "max_steps", "time_budget", "weight_decay", "grad_clip", "eval_every", "eval_iters",
    "log_every", "save_every", "val_fraction", "seed", "device", "compile",
)


def _given(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in _CONFIG_FLAGS if getattr(args, name, None) is not None}


def build_config(args: argparse.Namespace):
    from chat_tui.train.loop import resume_config

    kind = args.train_command
    given = _given(args)
    if args.resume:
        cfg = resume_config(args.resume)
        if cfg.kind != kind:
            raise CLIError(f"{args.resume} holds a {cfg.kind} run: resume it with chat-tui train {cfg.kind} --resume")
        fixed = sorted(k for k in given if k not in RESUME_OVERRIDES and given[k] != getattr(cfg, k))
        if args.data:
            fixed.insert(0, "data")
        if getattr(args, "init_from", None):
            fixed.insert(0, "from")
        if fixed:
            raise CLIError(f"--{fixed[0].replace('_', '-')} cannot change when resuming (the run keeps its settings; "
                           f"you may change {', '.join('--' + k.replace('_', '-') for k in RESUME_OVERRIDES)})")
        if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
            raise CLIError("--out must be the resumed folder (or left out)")
        for key in RESUME_OVERRIDES:
            if key in given:
                setattr(cfg, key, given[key])
        cfg.out = str(args.resume)
        return cfg
    if not args.data:
        raise CLIError("--data PATH… is required (or --resume DIR)")
    if not args.out:
        raise CLIError("--out DIR is required")
    return TrainConfig.of_kind(kind, data=list(args.data), out=args.out, init_from=getattr(args, "init_from", None),
                               **given)


def _sigint_handler(stop: threading.Event, say, *, worker: bool):
    """First Ctrl-C (or SIGTERM): finish the step, save, exit. A second one aborts, except in a
    torchrun worker, where torchrun itself may signal again while the processes save together."""
    state = {"count": 0}

    def handler(signum, frame):
        state["count"] += 1
        if state["count"] == 1:
            stop.set()
            say("stopping after this step and saving… (Ctrl-C again to abort without saving)")
        elif not worker:
            raise KeyboardInterrupt

    return handler


def cmd_train_run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """`chat-tui train pretrain|sft …`"""
    from chat_tui.train.launch import launch, under_torchrun

    if args.nproc and args.nproc > 1 and not under_torchrun():
        from chat_tui.train.loop import prepare_data, refuse_unfinished_run

        # Check and cache everything here, once: a bad option or bad data is one line before any process
        # starts, and the N processes then read the tokenised data from the cache.
        cfg = build_config(args)
        cfg.validate()
        if not args.resume:
            refuse_unfinished_run(Path(cfg.out))
        prepare_data(cfg, resume=bool(args.resume), log=print)
        return launch(args.nproc, list(argv if argv is not None else sys.argv[1:]), device=args.device)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from chat_tui.train.loop import Trainer
    from chat_tui.train.progress import ConsoleProgress

    cfg = build_config(args)
    cfg.validate()
    rank = int(os.environ.get("RANK", "0"))
    main_process = rank == 0
    stop = threading.Event()
    quiet = args.quiet or not main_process
    view = ConsoleProgress(cfg.max_steps, time_budget=cfg.time_budget, title=cfg.kind,
                           live=False if args.quiet else None) if main_process else None

    def say(line: str) -> None:
        if view is not None:
            view.log(line)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        handler = _sigint_handler(stop, say if main_process else (lambda _: None), worker=under_torchrun())
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    try:
        trainer = Trainer(cfg, resume=bool(args.resume), stop=stop,
                          on_metrics=None if quiet or view is None else view.update, log=say)
        if view is not None and not quiet:
            with view:
                result = trainer.run()
        else:
            result = trainer.run()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    if main_process:
        val = f", validation {result.val_loss:.4f}" if result.val_loss is not None else ""
        best = f" (best {result.best_val_loss:.4f}: {Path(cfg.out) / 'best'})" if result.best_val_loss is not None else ""
        minutes = result.elapsed_s / 60
        if result.reason == "interrupted":
            print(f"interrupted at step {result.step}; saved {cfg.out}. Continue with: "
                  f"chat-tui train {cfg.kind} --resume {cfg.out}", flush=True)
        else:
            stopped = " (time budget reached)" if result.reason == "time budget" else ""
            print(f"done{stopped}: {result.step} steps in {minutes:.1f} min, loss {result.loss:.4f}{val}{best}; "
                  f"checkpoint {cfg.out}", flush=True)
    if result.reason == "interrupted" and not under_torchrun():
        return 130
    return 0


def cmd_train_bundled(args: argparse.Namespace) -> int:
    """`chat-tui train bundled --out DIR`"""
    from chat_tui.train.bundled import build_bundled

    steps = [getattr(args, flag[2:].replace("-", "_")) for flag in BUNDLED_STEP_FLAGS]

    def log(line: str) -> None:
        print(line, flush=True)

    build_bundled(Path(args.out), steps=steps, log=log)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from chat_tui.train.nanogpt import import_nanogpt

    out = import_nanogpt(args.ckpt, args.out, meta=args.meta, tokenizer=args.tokenizer, log=print)
    print(f"imported {args.ckpt} → {out} (chat with it: chat-tui --model {out})")
    return 0
