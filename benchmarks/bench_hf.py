"""The Hugging Face backend's decode loop against `model.generate`, side by side in one process.

Greedy, 128 new tokens (end-of-text ignored so every run makes all of them), best of N runs,
interleaved so background load hits every path alike, on two models:

The reference is `generate` on the model exactly as transformers builds or loads it. The backend
stores the output head column-major on the CPU (`chat_tui.engine.hf._relayout_output_head`), so a
third row runs `generate` on the engine's own model too: the gap between it and our loop is what the
loop itself costs or saves, apart from the layout.

- a GPT-2-124M-shaped model with random weights (12 layers × 12 heads × 768, vocabulary 50257):
  our loop, our loop capturing attention (eager attention, every layer's row each token), and
  `generate`;
- the bundled mini-GPT exported to the Hugging Face format (`chat_tui.engine.export.export_hf`)
  and loaded back through the backend: our loop and `generate`.

Targets: our loop / generate >= 1.0x; attention capture costs <= 10% on the 124M model.

    python benchmarks/bench_hf.py [--runs 5] [--new-tokens 128] [--threads N] [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from chat_tui.engine import CheckpointError, Message, SamplingParams, bundled_model_path
from chat_tui.engine.generation import run_stream
from chat_tui.engine.hf import HFEngine, HFRunner

PROMPT = [Message("user", "Hello! What is AI?")]
CHATML = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def ours(engine: HFEngine, new_tokens: int, inspect: bool) -> tuple[float, list[int]]:
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
    start = time.perf_counter()
    ids = [
        step.token_id
        for step in run_stream(
            HFRunner(engine),
            conversation=PROMPT,
            render=engine.render,
            decode=engine.decode,
            token_text=engine.token_text,
            eos_ids=set(),  # make all tokens, as generate does below
            context_length=engine.context_length,
            params=params,
            inspect=inspect,
            cancel=None,
        )
    ]
    elapsed = time.perf_counter() - start
    engine.attention_mode(False)  # back to the fast attention, as the engine's next stream would
    if inspect and engine.attention_unavailable:
        raise SystemExit(f"attention capture failed: {engine.attention_unavailable}")
    return elapsed, ids


def hf_generate(model, prompt_ids: list[int], new_tokens: int) -> tuple[float, list[int]]:
    from transformers import GenerationConfig

    x = torch.tensor([prompt_ids])
    config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=config)
    return time.perf_counter() - start, out[0, len(prompt_ids):].tolist()


def gpt2_124m() -> tuple[HFEngine, torch.nn.Module]:
    """GPT-2 small's shape with random weights, and a small trained tokenizer with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["Hello! What is AI? Artificial intelligence is the study of machines."] * 50, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", chat_template=CHATML)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval()  # 124M: 12 layers, 12 heads, 768 wide, vocabulary 50257
    stock = copy.deepcopy(model)  # the reference: the model exactly as transformers builds it
    return HFEngine(model, tokenizer, name="gpt2-124m-random"), stock


def exported_bundled(checkpoint: Path | None, workdir: Path) -> tuple[HFEngine, torch.nn.Module] | None:
    from transformers import AutoModelForCausalLM

    from chat_tui.engine.export import export_hf

    try:
        source = checkpoint or bundled_model_path()
    except CheckpointError as exc:
        print(f"(skipping the exported model: {exc})")
        return None
    folder = export_hf(source, workdir / "exported")
    stock = AutoModelForCausalLM.from_pretrained(str(folder)).eval()  # as transformers loads it
    return HFEngine.load(str(folder), device="cpu"), stock


def bench(name: str, engine: HFEngine, stock: torch.nn.Module, runs: int, new_tokens: int,
          capture: bool) -> dict[str, list[float]]:
    from transformers import GenerationConfig

    # generate() merges the checkpoint's generation_config (end-of-text ids, penalties): clear it so both
    # paths do the same plain greedy decode
    engine.model.generation_config = GenerationConfig(pad_token_id=0)
    stock.generation_config = GenerationConfig(pad_token_id=0)
    prompt_ids, _ = engine.render(PROMPT)
    if len(prompt_ids) + new_tokens > engine.context_length:
        raise SystemExit(f"{name}: {len(prompt_ids)} + {new_tokens} tokens do not fit its context of {engine.context_length}")
    paths: dict[str, Callable[[], tuple[float, list[int]]]] = {
        "our loop": lambda: ours(engine, new_tokens, False),
        "HF generate": lambda: hf_generate(stock, prompt_ids, new_tokens),
        # the same generate on the engine's own model: what the loop itself adds, layout aside
        "HF generate, our layout": lambda: hf_generate(engine.model, prompt_ids, new_tokens),
    }
    if capture:
        paths["our loop + attention"] = lambda: ours(engine, new_tokens, True)
    for fn in (lambda: ours(engine, 16, False), lambda: ours(engine, 16, True), lambda: hf_generate(stock, prompt_ids, 16),
               lambda: hf_generate(engine.model, prompt_ids, 16)):
        fn()  # warm up every path
    times: dict[str, list[float]] = {path: [] for path in paths}
    outputs: dict[str, list[int]] = {}
    for _ in range(runs):
        for path, fn in paths.items():
            seconds, ids = fn()
            times[path].append(seconds)
            outputs[path] = ids
    same = all(ids == outputs["HF generate"] for ids in outputs.values())
    print(f"{name}: {engine.parameters / 1e6:.1f}M parameters, {engine.n_layer} layers x {engine.n_head} heads, "
          f"prompt {len(prompt_ids)} tokens; greedy tokens identical across paths: {same}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--models", default="124m,bundled", help="which models, comma-separated (124m, bundled)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="a mini-GPT to export (default: the bundled one)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"{args.new_tokens} new tokens, greedy, best of {args.runs} (of {4 * args.runs} on the bundled model)")
    results: list[tuple[str, dict[str, list[float]]]] = []
    models = {name.strip() for name in args.models.split(",")}
    if "124m" in models:
        results.append(("GPT-2 124M (random)", bench("GPT-2 124M (random)", *gpt2_124m(), args.runs, args.new_tokens,
                                                     True)))
    if "bundled" in models:
        with tempfile.TemporaryDirectory() as tmp:
            loaded = exported_bundled(args.checkpoint, Path(tmp))
            if loaded is not None:
                # a run takes half a second here and this machine's noise is of the order of the gap being
                # measured: more runs, so that the best of each path is a quiet one
                results.append(("bundled mini-GPT, exported", bench("bundled mini-GPT, exported", *loaded,
                                                                    4 * args.runs, args.new_tokens, False)))

    n = args.new_tokens
    print()
    print(f"| {'model':<27} | {'path':<23} | {'tokens/s (best)':>15} | {'median s':>8} | {'ms/token':>8} |")
    print(f"|{'-' * 29}|{'-' * 25}|{'-' * 17}|{'-' * 10}|{'-' * 10}|")
    for model, times in results:
        for path, ts in times.items():
            print(f"| {model:<27} | {path:<23} | {n / min(ts):>15.1f} | {statistics.median(ts):>8.3f} | "
                  f"{1000 * min(ts) / n:>8.2f} |")
    print()
    for model, times in results:
        rate = {path: n / min(ts) for path, ts in times.items()}
        print(f"{model}: our loop / HF generate = {rate['our loop'] / rate['HF generate']:.2f}x  (target >= 1.0x); "
              f"against generate on our weight layout {rate['our loop'] / rate['HF generate, our layout']:.2f}x")
        if "our loop + attention" in rate:
            cost = 1 - rate["our loop + attention"] / rate["our loop"]
            print(f"{model}: cost of attention capture = {100 * cost:.1f}%  (target <= 10%)")


if __name__ == "__main__":
    main()
