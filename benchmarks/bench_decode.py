"""Decode speed on the bundled model: our engine (with and without attention capture) against
`transformers.GPT2LMHeadModel.generate` on the same weights, side by side in one process.

Greedy, 256 new tokens (end-of-turn ignored so every run makes all 256), best of N runs,
runs interleaved so background load hits all three alike.

    python benchmarks/bench_decode.py [--runs 5] [--new-tokens 256] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from chat_tui.engine import Message, SamplingParams, bundled_model_path
from chat_tui.engine.convert import to_hf_model
from chat_tui.engine.generation import run_stream
from chat_tui.engine.minigpt import MiniGPTEngine, single_threaded_blas

PROMPT = [Message("user", "Hello! What is AI?")]


def ours(engine: MiniGPTEngine, new_tokens: int, inspect: bool) -> tuple[float, list[int]]:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--model", default=None, help="a mini-GPT checkpoint folder (default: the bundled one)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    engine = MiniGPTEngine.load(args.model or bundled_model_path(), device="cpu")
    hf = to_hf_model(engine.model)
    prompt_ids, _ = engine.render(PROMPT)
    cfg = engine.config
    print(f"model: bundled mini-GPT, {cfg.n_layer} layers x {cfg.n_head} heads x {cfg.n_embd}, "
          f"vocab {cfg.vocab_size}, context {cfg.block_size}; prompt {len(prompt_ids)} tokens; "
          f"{args.new_tokens} new tokens, greedy; torch {torch.__version__}, {torch.get_num_threads()} threads")

    # warm up every path once
    ours(engine, 16, False)
    ours(engine, 16, True)
    hf_generate(hf, prompt_ids, 16)

    times: dict[str, list[float]] = {"engine": [], "engine + capture": [], "HF generate": []}
    outputs: dict[str, list[int]] = {}
    for _ in range(args.runs):
        for name, fn in (
            ("engine", lambda: ours(engine, args.new_tokens, False)),
            ("engine + capture", lambda: ours(engine, args.new_tokens, True)),
            ("HF generate", lambda: hf_generate(hf, prompt_ids, args.new_tokens)),
        ):
            seconds, ids = fn()
            times[name].append(seconds)
            outputs[name] = ids

    same = outputs["engine"] == outputs["engine + capture"] == outputs["HF generate"]
    best = {name: min(ts) for name, ts in times.items()}
    rate = {name: args.new_tokens / t for name, t in best.items()}
    print()
    print(f"| {'run':<18} | {'tokens/s (best)':>15} | {'median s':>9} | {'ms/token':>8} |")
    print(f"|{'-' * 20}|{'-' * 17}|{'-' * 11}|{'-' * 10}|")
    for name in times:
        print(f"| {name:<18} | {rate[name]:>15.1f} | {statistics.median(times[name]):>9.3f} | "
              f"{1000 * best[name] / args.new_tokens:>8.2f} |")
    print()
    print(f"greedy tokens identical across the three: {same}")
    print(f"engine / HF generate:             {rate['engine'] / rate['HF generate']:.2f}x")
    print(f"engine + capture / HF generate:   {rate['engine + capture'] / rate['HF generate']:.2f}x  (target >= 2x)")
    cost = 1 - rate["engine + capture"] / rate["engine"]
    print(f"cost of attention capture:        {100 * cost:.1f}%  (target <= 15%)")


if __name__ == "__main__":
    main()
