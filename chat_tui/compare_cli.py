"""`chat-tui compare`: two to four columns of settings (or models) answer one prompt on the same random
numbers, printed one after the other (or as JSON lines), with where the replies first diverge."""

from __future__ import annotations

import argparse
import json
import sys
import threading

from chat_tui.cli import _prob, _progress_bars_on_a_terminal_only, model_options, read_prompt
from chat_tui.engine import Message, SamplingParams, load_engine
from chat_tui.engine.compare import (
    SAME_DRAWS_LINE,
    SettingsLineError,
    check_columns,
    column_stats,
    describe_divergence,
    find_divergence,
    parse_settings,
    shared_seed,
)
from chat_tui.engine.params import SPECS, check_value
from chat_tui.engine.types import Engine, Step
from chat_tui.errors import CLIError
from chat_tui.textsafe import clean, clean_json

LABELS = "ABCD"


def column_plan(settings: list[str], models: list[str] | None) -> tuple[list[str], list[str | None]]:
    """Each column's settings line and model: --set and --model per column, or one of them for all."""
    models = list(models or [])
    count = max(len(settings), len(models))
    if len(settings) > 1 and len(models) > 1 and len(settings) != len(models):
        raise CLIError(f"{len(settings)} --set but {len(models)} --model: give --model once, or once per column")
    try:
        check_columns(count)
    except ValueError:
        raise CLIError(f"compare needs 2 to 4 columns, not {count}: give --set (or --model) once per column") from None
    lines = settings if len(settings) == count else (settings or [""]) * count
    column_models: list[str | None] = models if len(models) == count else (models or [None]) * count
    return lines, column_models


def run_compare(args: argparse.Namespace) -> int:
    model_arg = getattr(args, "model", None)
    models = [model_arg] if isinstance(model_arg, str) else model_arg  # given before the command: one for all
    lines, column_models = column_plan(args.columns, models)
    # every value checked before the (slow) model loads, so a typo fails at once
    try:
        for line in lines:
            parse_settings(line, SamplingParams())
    except SettingsLineError as exc:
        raise CLIError(f"--set: {exc}") from None
    seed = shared_seed(None if args.seed is None else check_value(SPECS["seed"], args.seed))
    max_tokens = None if args.max_tokens is None else check_value(SPECS["max_new_tokens"], args.max_tokens)
    prompt = read_prompt(args.prompt)
    if not prompt.strip():
        raise CLIError("the prompt is empty")
    conversation = ([Message("system", args.system)] if args.system else []) + [Message("user", prompt)]

    engines: dict[str | None, Engine] = {}
    options = model_options(args)
    with _progress_bars_on_a_terminal_only():
        for model in column_models:  # one engine per model: columns on one model share it
            if model not in engines:  # a Hugging Face model checks the free memory before it loads
                engines[model] = load_engine(model, device=getattr(args, "device", None),
                                             dtype=getattr(args, "dtype", None), **options)
    # one base for every column, the first model's defaults: two models compare on the same settings
    base = engines[column_models[0]].default_params().with_(seed=seed)
    if max_tokens is not None:
        base = base.with_(max_new_tokens=max_tokens)
    params = [parse_settings(line, base) for line in lines]

    out = sys.stdout
    safe, safe_json = ((lambda s: s), (lambda s: s)) if args.raw else (clean, clean_json)
    if not args.json:
        out.write(f"{SAME_DRAWS_LINE} (seed {seed})\n")
    columns: list[list[Step]] = []
    cancel = threading.Event()
    try:
        for index, (column_params, model) in enumerate(zip(params, column_models, strict=True)):
            engine = engines[model]
            steps: list[Step] = []
            columns.append(steps)
            if not args.json:
                out.write(f"\n[{LABELS[index]}] {line_of(lines[index])} · {safe(engine.model_name)}\n")
            for step in engine.stream(conversation, column_params, cancel=cancel):
                steps.append(step)
                if args.json:
                    record = {"column": index, "token": step.text, "id": step.token_id, "prob": _prob(step.prob),
                              "chain_prob": _prob(step.chain_prob)}
                    out.write(safe_json(json.dumps(record, ensure_ascii=False)) + "\n")
                else:
                    out.write(safe(step.text))
                out.flush()
            stats = column_stats(steps)
            if args.json:
                summary = {"column": index, "done": True, "model": engine.model_name, "settings": lines[index],
                           "seed": seed, "tokens": stats.tokens, "tokens_per_s": round(stats.tokens_per_s, 2),
                           "mean_logprob": _rounded(stats.mean_logprob), "perplexity": _rounded(stats.perplexity),
                           "stop_reason": stats.stop_reason}
                out.write(safe_json(json.dumps(summary, ensure_ascii=False)) + "\n")
            else:
                out.write(f"\n  ({stats_line(stats)})\n")
            out.flush()
        several = len(engines) > 1  # different models: tokens compared by their text
        divergence = find_divergence(columns, [engines[m].token_text for m in column_models] if several else None)
    except KeyboardInterrupt:
        cancel.set()
        raise
    finally:
        for engine in engines.values():
            engine.close()
    labels = LABELS[: len(columns)]
    if args.json:
        record = {"divergence": None if divergence is None else divergence.index,
                  "at_divergence": None if divergence is None else [
                      {"column": c, "id": at.token_id, "token": at.token, "prob": _maybe(at.prob),
                       "chain_prob": _maybe(at.chain_prob),
                       "others": [{"column": o.column, "id": o.token_id, "token": o.token, "prob": _maybe(o.prob),
                                   "chain_prob": _maybe(o.chain_prob), "dropped_by": o.dropped_by}
                                  for o in at.others]}
                      for c, at in enumerate(divergence.columns)]}
        out.write(safe_json(json.dumps(record, ensure_ascii=False)) + "\n")
    else:
        out.write("\n" + safe(describe_divergence(divergence, labels, lambda t: repr(t))) + "\n")
    out.flush()
    return 0


def line_of(settings: str) -> str:
    return settings.strip() or "the model's defaults"


def stats_line(stats) -> str:
    """"12 tokens · 40.1 tokens/s · mean log-prob -1.234 · perplexity 3.43 · stop eos"."""
    parts = [f"{stats.tokens} tokens", f"{stats.tokens_per_s:.1f} tokens/s"]
    if stats.mean_logprob is not None:
        parts += [f"mean log-prob {stats.mean_logprob:.3f}", f"perplexity {stats.perplexity:.2f}"]
    parts.append(f"stop {stats.stop_reason or '…'}")
    return " · ".join(parts)


def _rounded(x: float | None) -> float | None:
    return None if x is None or x != x or x in (float("inf"), float("-inf")) else round(x, 4)


def _maybe(p: float | None) -> float | None:
    return None if p is None else round(p, 6)
