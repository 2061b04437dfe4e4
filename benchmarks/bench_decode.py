"""Decode speed on the bundled model: our engine (with and without attention capture) against
`transformers.GPT2LMHeadModel.generate` on the same weights, side by side in one process.

Greedy, 256 new tokens (end-of-turn ignored so every run makes all 256). The runs alternate, so
background load hits all three alike, and every ratio is the median of the per-round ratios;
the load average is printed at the start and the end. "engine" is a plain reply (`ask`: no
candidates), "engine + capture" is the app's with the inspector shown (attention and candidates).
A fourth run, "products alone", makes only the model's matrix products for as many tokens: the
floor under any decoder that reads these float32 weights once a token, measured in the same
rounds, so it says how far any ratio to `generate` can go on this machine now. Each run's CPU
time is printed beside its wall time: on a shared machine the wall clock also counts the waits
for a core.

    python benchmarks/bench_decode.py [--runs 5] [--new-tokens 256] [--threads N]
    python benchmarks/bench_decode.py --profile   # where a token's time goes, per part of the loop
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
from bench_hf import memory_bandwidth  # this folder is on sys.path when run as a script

from chat_tui.engine import Message, SamplingParams, bundled_model_path, generation
from chat_tui.engine.convert import to_hf_model
from chat_tui.engine.generation import run_stream
from chat_tui.engine.minigpt import MiniGPTEngine, single_threaded_blas

PROMPT = [Message("user", "Hello! What is AI?")]


def ours(engine: MiniGPTEngine, new_tokens: int, inspect: bool, candidates: bool) -> tuple[float, list[int]]:
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
    runner = engine.runner()  # numpy on the CPU, as MiniGPTEngine.stream decodes
    start = time.perf_counter()
    with single_threaded_blas():  # as MiniGPTEngine.stream does
        ids = [
            step.token_id
            for step in run_stream(
                runner,
                conversation=PROMPT,
                render=engine.render,
                decode=engine.decode,
                token_text=engine.token_text,
                eos_ids=set(),  # make all tokens, like min_new_tokens below
                context_length=engine.context_length,
                params=params,
                inspect=inspect,
                cancel=None,
                candidates=candidates,
            )
        ]
    return time.perf_counter() - start, ids


def hf_generate(hf, prompt_ids: list[int], new_tokens: int) -> tuple[float, list[int]]:
    x = torch.tensor([prompt_ids])
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    return time.perf_counter() - start, out[0, len(prompt_ids) :].tolist()


class _Clock:
    """Seconds spent inside wrapped calls, per part of the loop (calls inside calls count once)."""

    def __init__(self, clock) -> None:
        self.clock = clock
        self.seconds: dict[str, float] = {}
        self.depth = 0

    def wrap(self, part: str, fn):
        def timed(*args, **kwargs):
            if self.depth:
                return fn(*args, **kwargs)
            self.depth += 1
            start = self.clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[part] = self.seconds.get(part, 0.0) + self.clock() - start
                self.depth -= 1

        return timed


def _blas_seconds(runner, first: int, last: int, clock=time.perf_counter) -> float:
    """The model's matrix products alone, at positions first..last-1, on the runner's own weights
    and filled cache: the products one `feed` makes, without anything around them."""
    w, cfg = runner.weights, runner.config
    nh, hd = cfg.n_head, cfg.n_embd // cfg.n_head
    attn, attn_proj, fc, fc_proj = w.biased[0]
    h, wide = np.ones(attn.shape[0], dtype=np.float32), np.ones(fc_proj.shape[0], dtype=np.float32)
    qkv, proj, hidden = np.empty(attn.shape[1], np.float32), np.empty(cfg.n_embd, np.float32), wide[:-1]
    q, scores = qkv[: cfg.n_embd].reshape(nh, hd, 1), np.empty((nh, cfg.block_size), np.float32)
    y_heads, logits = proj.reshape(nh, 1, hd), np.empty(cfg.vocab_size, np.float32)
    start = clock()
    for pos in range(first, last):
        S = pos + 1
        for i, (attn, attn_proj, fc, fc_proj) in enumerate(w.biased):
            np.matmul(h, attn, out=qkv)
            np.matmul(runner.kv[i, 0, :, :S], q, out=scores[:, :S, None])
            np.matmul(scores[:, None, :S], runner.kv[i, 1, :, :S], out=y_heads)
            np.matmul(h, attn_proj, out=proj)
            np.matmul(h, fc, out=hidden)
            np.matmul(wide, fc_proj, out=proj)
        np.matmul(h[:-1], w.lm_head, out=logits)
    return clock() - start


def products_alone(engine: MiniGPTEngine, prompt_ids: list[int], new_tokens: int) -> float:
    """Seconds for the matrix products of `new_tokens` tokens after the prompt, and nothing else:
    the floor under any decoder that reads these float32 weights once a token."""
    runner = engine.runner()
    with single_threaded_blas():
        runner.prefill(prompt_ids, inspect=False)
        return _blas_seconds(runner, len(prompt_ids), len(prompt_ids) + new_tokens)


def profile(engine: MiniGPTEngine, new_tokens: int, runs: int) -> None:
    """Where one token's time goes (greedy, capture on), median over `runs` runs: CPU time of this
    thread, in which all of it runs, so that a shared machine's waits for a core stay out."""
    parts = ["model: BLAS products", "model: numpy glue", "sampling (pick the token)",
             "inspector: log-sum-exp + top-256", "capture: attention to fp16", "detokenize + stop strings",
             "token text (Step.token, candidates)", "generator's own Python"]
    table: dict[str, list[float]] = {p: [] for p in [*parts, "total"]}
    originals = {name: getattr(generation, name) for name in
                 ("_pick", "_logsumexp", "_candidates", "_attention16", "_pad_keys", "StopStringFilter")}
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
    try:
        for _ in range(runs):
            clock = _Clock(time.thread_time)
            generation._pick = clock.wrap(parts[2], originals["_pick"])
            generation._logsumexp = clock.wrap(parts[3], originals["_logsumexp"])
            generation._candidates = clock.wrap(parts[3], originals["_candidates"])
            generation._attention16 = clock.wrap(parts[4], originals["_attention16"])
            generation._pad_keys = clock.wrap(parts[4], originals["_pad_keys"])

            class TimedStops(originals["StopStringFilter"]):
                feed = clock.wrap(parts[5], originals["StopStringFilter"].feed)

            generation.StopStringFilter = TimedStops
            runner = engine.runner()
            runner.feed = clock.wrap("feed", runner.feed)
            steps = 0
            with single_threaded_blas():
                start = time.thread_time()
                for _step in generation.run_stream(
                    runner, conversation=PROMPT, render=engine.render,
                    decode=clock.wrap(parts[5], engine.decode), token_text=clock.wrap(parts[6], engine.token_text),
                    eos_ids=set(), context_length=engine.context_length, params=params, inspect=True, cancel=None,
                ):
                    if steps == 0:  # from the first step on: the prefill is not decoding
                        start = time.thread_time()
                        clock.seconds.clear()
                    steps += 1
                total = time.thread_time() - start
                n = steps - 1
                prompt_length = runner.length - n
                blas = _blas_seconds(runner, prompt_length, prompt_length + n, time.thread_time)
            s = clock.seconds
            feed = s.pop("feed", 0.0)
            s[parts[0]] = blas
            s[parts[1]] = feed - blas
            s[parts[7]] = total - sum(s.values())
            for p in parts:
                table[p].append(1e6 * s.get(p, 0.0) / n)
            table["total"].append(1e6 * total / n)
    finally:
        for name, value in originals.items():
            setattr(generation, name, value)
    total = statistics.median(table["total"])
    print(f"per-token profile, greedy, capture on, {new_tokens} tokens, median of {runs} runs "
          "in CPU time (each timed call adds about 3 us of timing)")
    print()
    print(f"| {'part':<37} | {'us/token':>8} | {'share':>6} |")
    print(f"|{'-' * 39}|{'-' * 10}|{'-' * 8}|")
    for p in parts:
        us = statistics.median(table[p])
        print(f"| {p:<37} | {us:>8.1f} | {100 * us / total:>5.1f}% |")
    print(f"| {'total (one step of run_stream)':<37} | {total:>8.1f} | {100.0:>5.1f}% |")


def load_average() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--model", default=None, help="a mini-GPT checkpoint folder (default: the bundled one)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for generate (default 1: the engine decodes on one core too)")
    parser.add_argument("--profile", action="store_true", help="only the per-token profile of the decode loop")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    engine = MiniGPTEngine.load(args.model or bundled_model_path(), device="cpu")
    if args.profile:
        print(f"start: {load_average()}")
        profile(engine, 16, 1)  # warm-up
        profile(engine, args.new_tokens, args.runs)
        print(f"end: {load_average()}")
        return
    hf = to_hf_model(engine.model)
    prompt_ids, _ = engine.render(PROMPT)
    cfg = engine.config
    print(f"model: bundled mini-GPT, {cfg.n_layer} layers x {cfg.n_head} heads x {cfg.n_embd}, "
          f"vocab {cfg.vocab_size}, context {cfg.block_size}; prompt {len(prompt_ids)} tokens; "
          f"{args.new_tokens} new tokens, greedy; torch {torch.__version__}, {torch.get_num_threads()} threads")

    print(f"start: {load_average()}")
    # warm up every path once
    ours(engine, 16, False, False)
    ours(engine, 16, True, True)
    hf_generate(hf, prompt_ids, 16)

    runs = {
        "engine": lambda: ours(engine, args.new_tokens, False, False),
        "engine + capture": lambda: ours(engine, args.new_tokens, True, True),
        "HF generate": lambda: hf_generate(hf, prompt_ids, args.new_tokens),
        "products alone": lambda: (products_alone(engine, prompt_ids, args.new_tokens), None),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    # the CPU time of this thread too (every path computes in it): on a shared machine the wall
    # clock also counts the time spent waiting for a core
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    outputs: dict[str, list[int]] = {}
    for _ in range(args.runs):
        for name, fn in runs.items():
            cpu_start = time.thread_time()
            seconds, ids = fn()
            cpu[name].append(time.thread_time() - cpu_start)
            times[name].append(seconds)
            if ids is not None:
                outputs[name] = ids

    def ratio(a: str, b: str, clock: dict[str, list[float]] = times) -> float:
        """How many times faster a is than b: the median over rounds (a round runs each once)."""
        return statistics.median(tb / ta for ta, tb in zip(clock[a], clock[b], strict=True))

    same = outputs["engine"] == outputs["engine + capture"] == outputs["HF generate"]
    print()
    print(f"| {'run':<18} | {'tokens/s (median)':>17} | {'ms/token (median)':>17} | {'ms/token (best)':>15} | "
          f"{'CPU ms/token (median)':>21} |")
    print(f"|{'-' * 20}|{'-' * 19}|{'-' * 19}|{'-' * 17}|{'-' * 23}|")
    for name, ts in times.items():
        median = statistics.median(ts)
        print(f"| {name:<18} | {args.new_tokens / median:>17.1f} | {1000 * median / args.new_tokens:>17.3f} | "
              f"{1000 * min(ts) / args.new_tokens:>15.3f} | "
              f"{1000 * statistics.median(cpu[name]) / args.new_tokens:>21.3f} |")
    print()
    print(f"greedy tokens identical across the three: {same}")
    print(f"medians of {args.runs} alternating rounds:")
    print(f"engine / HF generate:             {ratio('engine', 'HF generate'):.2f}x")
    print(f"engine + capture / HF generate:   {ratio('engine + capture', 'HF generate'):.2f}x  (target >= 3x)")
    capture_ms = 1000 * statistics.median(times["engine + capture"]) / args.new_tokens
    print(f"engine + capture, ms a token:     {capture_ms:.3f}  (target <= 0.6)")
    print(f"the same two ratios in CPU time:  {ratio('engine', 'HF generate', cpu):.2f}x, "
          f"{ratio('engine + capture', 'HF generate', cpu):.2f}x")
    print(f"cost of capture and candidates:   {100 * (1 - 1 / ratio('engine', 'engine + capture')):.1f}%")
    print(f"the model's products alone, ms a token: {1000 * statistics.median(times['products alone']) / args.new_tokens:.3f}"
          f"; so no decoder of these float32 weights beats HF generate here by more than "
          f"{ratio('products alone', 'HF generate'):.2f}x")
    weights = engine.runner().weights
    read = weights.lm_head.nbytes + sum(a.nbytes for layer in weights.layers for pair in
                                        (layer.ln_1, layer.attn, layer.attn_proj, layer.ln_2, layer.fc, layer.fc_proj)
                                        for a in pair)
    bandwidth = memory_bandwidth()
    print(f"weights read per token: {read / 1e6:.1f} MB; at this machine's copy bandwidth now "
          f"({bandwidth / 1e9:.1f} GB/s copied) that alone takes {1000 * read / bandwidth:.2f} ms when they are "
          f"not in the cache")
    print(f"end: {load_average()}")


if __name__ == "__main__":
    main()
