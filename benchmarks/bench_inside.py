"""How long each inside view (issue #14) takes for one token: the median of N runs, in milliseconds.

Each view is asked as the inspector asks it, for the last token of a context of --context tokens,
on two models:

- the bundled mini-GPT (its views from `GPT.forward(capture=...)`, one whole pass each): target <= 50 ms;
- a GPT-2-124M-shaped model with random weights (`GPT2Config()`: 12 layers x 12 heads x 768,
  vocabulary 50257), through the Hugging Face backend's hooks: target <= 500 ms.

Explain (q·k ÷ √d for one head) is timed too, and "(model forward)", one plain pass of the model over
the context, is the yardstick: a view costs about one such pass, or, following a reply one token
further, one position. A cold knock-out adds the pass with the heads off from their layer up (the
blocks below are replayed from the first pass): a head of the last layer costs a twelfth of a pass
more, one of layer 1 a whole pass more. The load average is printed at the start and the end: the
machine may be shared.

    python benchmarks/bench_inside.py [--runs 9] [--context 128] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

TARGETS_MS = {"bundled mini-GPT": 50.0, "GPT-2 124M (random)": 500.0}


def median_ms(fn: Callable[[int], object], runs: int) -> float:
    fn(runs)  # the first call builds what later ones reuse (the mini-GPT's torch model)
    times = []
    for run in range(runs):
        start = time.perf_counter()
        fn(run)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def views(engine, ids: list[int], text: str) -> dict[str, Callable[[int], object]]:
    """Each view for run `r`: a context whose first token differs from every other run's, so no run
    reuses what an earlier one kept (the cold cost); and the inspector's warm flows: "lens, next token"
    asks one token further each run (following a reply), "knock-out again" switches other heads off on
    one context (its original pass is kept)."""
    last = engine.n_layer - 1

    def context(r: int) -> list[int]:
        return [ids[0] + r + 1, *ids[1:]]

    model = engine.model

    def forward(r: int) -> object:
        with torch.inference_mode():
            return model(torch.tensor([context(r)]))

    return {
        "(model forward)": forward,  # the reference: one plain pass over the context, no views
        "lens": lambda r: engine.logit_lens(context(r)[:-1], ids[-1]),
        "lens, next token": lambda r: engine.logit_lens(ids[: len(ids) // 2 + r], ids[-1]),
        "attribution": lambda r: engine.attribute(context(r)[:-1], ids[-1]),
        "rollout": lambda r: engine.rollout(context(r)),
        "knock-out": lambda r: engine.knock_out(context(r)[:-1], frozenset({(last, 0)})),
        "knock-out, layer 1": lambda r: engine.knock_out(context(r)[:-1], frozenset({(0, 0)})),
        "knock-out again": lambda r: engine.knock_out(ids[:-1], frozenset({(last, r % engine.n_head)})),
        "tokens": lambda r: engine.token_pieces(text[r:]),
        "block": lambda r: engine.block_trace(context(r), last, 0),
        "explain": lambda r: engine.explain_attention(context(r), len(ids) - 1, last, 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--context", type=int, default=128, help="tokens of context (default 128)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"load average at start: {os.getloadavg()[0]:.2f}; torch threads: {torch.get_num_threads()}; "
          f"context {args.context} tokens; median of {args.runs} runs")

    from bench_hf import gpt2_124m

    from chat_tui.engine import Message, SamplingParams, collect, load_engine

    text = "Hello there! 你好！What is AI? Artificial intelligence is the study of machines that think. " * 8
    models = {"bundled mini-GPT": load_engine(None, device="cpu"), "GPT-2 124M (random)": gpt2_124m()[0]}
    rows = []
    for label, engine in models.items():
        # the app's views always follow a reply: one token of a reply first, as there (a Hugging Face
        # engine learns from its first prefill how the model carries its cache, which the views reuse)
        collect(engine.stream([Message("user", "Hi")], SamplingParams(temperature=0, max_new_tokens=1)))
        ids = (engine.encode(text) * (args.context // 10 + 1))[: args.context]
        for view, fn in views(engine, ids, text).items():
            rows.append((label, view, median_ms(fn, args.runs)))
    width = max(len(label) for label in models)
    print(f"\n{'model':<{width}}  {'view':<18} {'median ms':>10}  target")
    for label, view, ms in rows:
        target = TARGETS_MS[label]
        print(f"{label:<{width}}  {view:<18} {ms:>10.1f}  <= {target:.0f} {'ok' if ms <= target else 'SLOW'}")
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
