"""The Hugging Face backend's decode loop against `model.generate`, side by side in one process.

Greedy, 128 new tokens (end-of-text ignored so every run makes all of them), best of N runs,
interleaved so background load hits every path alike, on two models:

The reference is `generate` on the model exactly as transformers builds or loads it. The backend
stores the output head column-major on the CPU (`chat_tui.engine.hf.loading.relayout_output_head`), so a
third row runs `generate` on the engine's own model too: the gap between it and our loop is what the
loop itself costs or saves, apart from the layout.

- a GPT-2-124M-shaped model with random weights (12 layers × 12 heads × 768, vocabulary 50257):
  our loop, our loop capturing attention (eager attention, every layer's row each token), and
  `generate`;
- the bundled mini-GPT exported to the Hugging Face format (`chat_tui.engine.export.export_hf`)
  and loaded back through the backend: our loop and `generate`.

Targets: our loop / generate >= 1.0x; attention capture costs <= 10% on the 124M model.

`limits` (in --models by default) measures this machine's memory bandwidth in the same rounds,
two ways, one thread like the decode: a large numpy copy (bytes copied / seconds; each is read
once and written once, so the bytes moved are twice that) and a float32 matrix-vector product
over a 512 MiB matrix (the decode's own kernel, which only reads). It sets GPT-2 124M's tokens/s
against the bound `bandwidth / weight bytes` (a token reads every weight once) for each, in
wall time and in CPU time (a shared machine's waits for a core left out), in float32, in int8
(`--quantize int8`) and in bfloat16 (`--dtype bfloat16`; whether this CPU has native bf16
arithmetic, AVX-512 BF16 or AMX, is detected and printed), each with its greedy agreement with
float32 over the new tokens. Every ratio is the median of the rounds' ratios (a round runs each
path once, alternating); the load average is printed at the start and the end.

    python benchmarks/bench_hf.py [--runs 5] [--new-tokens 128] [--threads N] [--checkpoint DIR]
    python benchmarks/bench_hf.py --models limits
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from chat_tui.engine import CheckpointError, Message, SamplingParams, bundled_model_path
from chat_tui.engine.generation import run_stream
from chat_tui.engine.hf import HFEngine, HFRunner, quantize_int8

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


def load_average() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def median_seconds(work: Callable[[], object], repeats: int, clock: Callable[[], float]) -> float:
    """The median time of `repeats` runs of `work`, after one untimed run that touches every page."""
    work()
    seconds = []
    for _ in range(repeats):
        start = clock()
        work()
        seconds.append(clock() - start)
    return statistics.median(seconds)


def memory_bandwidth(mib: int = 512, repeats: int = 5, clock: Callable[[], float] = time.perf_counter) -> float:
    """This machine's memory bandwidth now: bytes copied per second by a large numpy copy (the
    median of `repeats` copies of `mib` MiB, far larger than any cache). Each byte is read once
    and written once: the bytes moved are twice this. `clock`: time.thread_time counts only the
    time this thread ran (a memory stall counts; a wait for a core does not)."""
    import numpy as np

    source = np.ones(mib * 2**20 // 4, dtype=np.float32)
    target = np.empty_like(source)
    return source.nbytes / median_seconds(lambda: np.copyto(target, source), repeats, clock)


def product_bandwidth(mib: int = 512, repeats: int = 5, clock: Callable[[], float] = time.perf_counter) -> float:
    """Bytes per second a float32 matrix-vector product reads from memory: one vector times a
    `mib` MiB matrix (far larger than any cache), in torch on its current threads, as a decode
    step reads its weights. The median of `repeats`. A copy writes as much as it reads; a product
    only reads, so this is the tighter bound of the two on a decode step. `clock` as for
    `memory_bandwidth` (with one torch thread the product runs in this thread)."""
    matrix = torch.ones(mib * 2**20 // (4 * 4096), 4096)
    vector = torch.ones(matrix.shape[0])
    with torch.inference_mode():
        return matrix.numel() * 4 / median_seconds(lambda: torch.matmul(vector, matrix), repeats, clock)


def fast_bf16() -> str:
    """Whether this CPU does bfloat16 arithmetic natively (AVX-512 BF16 or AMX), in words."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    native = sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})
    if native:
        return f"yes ({', '.join(native)})"
    return "no (no avx512_bf16 or amx_bf16 flag: torch converts bf16 to float32 around each product)"


def weight_bytes(model: torch.nn.Module) -> int:
    """The bytes one decoded token reads: every weight once (a tied one once), except the position
    embedding, of which it reads one row."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    positions = getattr(getattr(model, "transformer", None), "wpe", None)
    if positions is not None:
        total -= positions.weight.numel() * positions.weight.element_size()
    return total


def limits(runs: int, new_tokens: int) -> None:
    """GPT-2 124M against the bandwidth bound: float32, int8 and bfloat16."""
    engine, stock = gpt2_124m()
    int8_model = copy.deepcopy(stock)
    quantize_int8(int8_model)
    int8 = HFEngine(int8_model, engine.tokenizer, name="gpt2-124m-int8")
    bf16 = HFEngine(copy.deepcopy(stock).to(torch.bfloat16), engine.tokenizer, name="gpt2-124m-bf16")
    for e in (engine, int8, bf16):
        e.learn_decode_mode()
    bytes_fp32 = weight_bytes(engine.model)
    paths: dict[str, Callable[[], tuple[float, list[int]]]] = {
        "float32, our loop": lambda: ours(engine, new_tokens, False),
        "int8, our loop": lambda: ours(int8, new_tokens, False),
        "bfloat16, our loop": lambda: ours(bf16, new_tokens, False),
    }
    for fn in paths.values():
        fn()  # warm up
    times: dict[str, list[float]] = {path: [] for path in paths}
    cpu: dict[str, list[float]] = {path: [] for path in paths}  # this thread's CPU time (one torch thread)
    copies: dict[str, list[float]] = {"wall": [], "cpu": []}  # bytes/s, per round
    reads: dict[str, list[float]] = {"wall": [], "cpu": []}
    outputs: dict[str, list[int]] = {}
    for _ in range(runs):
        for clock, key in ((time.perf_counter, "wall"), (time.thread_time, "cpu")):
            copies[key].append(memory_bandwidth(clock=clock))
            reads[key].append(product_bandwidth(clock=clock))
        for path, fn in paths.items():
            cpu_start = time.thread_time()
            seconds, ids = fn()
            cpu[path].append(time.thread_time() - cpu_start)
            times[path].append(seconds)
            outputs[path] = ids
    reference = outputs["float32, our loop"]

    def gb(rates: list[float]) -> str:
        return f"{statistics.median(rates) / 1e9:.1f} GB/s (rounds: {', '.join(f'{r / 1e9:.1f}' for r in rates)})"

    print()
    print(f"GPT-2 124M (random weights), {new_tokens} new tokens, greedy, {runs} alternating rounds; "
          f"float32 weights read per token: {bytes_fp32 / 1e6:.0f} MB")
    print(f"memory bandwidth, a numpy copy (bytes copied; read + written is twice): {gb(copies['wall'])}; "
          f"in CPU time {gb(copies['cpu'])}")
    print(f"read by a float32 matrix-vector product (torch, {torch.get_num_threads()} threads): {gb(reads['wall'])}; "
          f"in CPU time {gb(reads['cpu'])}")
    print(f"float32 bound (bandwidth / weight bytes): {statistics.median(copies['wall']) / bytes_fp32:.1f} tokens/s "
          f"(copy), {statistics.median(reads['wall']) / bytes_fp32:.1f} (product read)")
    print(f"native bfloat16 on this CPU: {fast_bf16()}")
    print()
    print("each round's tokens/s against the bound measured in the same round; 'CPU' counts only the time this "
          "thread ran, for both")
    print(f"| {'path':<18} | {'tokens/s':>8} | {'x copy bound':>12} | {'x product bound':>15} | "
          f"{'x copy (CPU)':>12} | {'x product (CPU)':>15} | {'x float32':>9} | {'greedy agreement with float32':>31} |")
    print(f"|{'-' * 20}|{'-' * 10}|{'-' * 14}|{'-' * 17}|{'-' * 14}|{'-' * 17}|{'-' * 11}|{'-' * 33}|")
    fp32 = times["float32, our loop"]

    def of(ts: list[float], rates: list[float]) -> float:
        return statistics.median(new_tokens / t / (r / bytes_fp32) for t, r in zip(ts, rates, strict=True))

    for path, ts in times.items():
        rate = statistics.median(new_tokens / t for t in ts)
        speedup = statistics.median(f / t for f, t in zip(fp32, ts, strict=True))
        ids = outputs[path]
        equal = sum(a == b for a, b in zip(ids, reference, strict=True))
        first = next((i for i, (a, b) in enumerate(zip(ids, reference, strict=True)) if a != b), None)
        agreement = f"{equal}/{new_tokens}" + (f", first differs at {first}" if first is not None else "")
        print(f"| {path:<18} | {rate:>8.1f} | {of(ts, copies['wall']):>11.2f}x | {of(ts, reads['wall']):>14.2f}x | "
              f"{of(cpu[path], copies['cpu']):>11.2f}x | {of(cpu[path], reads['cpu']):>14.2f}x | {speedup:>8.2f}x | "
              f"{agreement:>31} |")
    print()
    print("(random weights give nearly flat logits, so rounding flips a greedy pick early; see the trained model below)")
    trained_agreement(new_tokens)
    print("targets: float32 >= 0.8x the bound; int8 >= 1.8x float32 (medians of the rounds). int8 trades a "
          "little accuracy (weights rounded to 256 levels, activations quantized per call) for a quarter of the "
          "weight bytes; bfloat16 halves the bytes but without native bf16 each product converts to float32.")


def trained_agreement(new_tokens: int) -> None:
    """int8's and bfloat16's greedy agreement with float32 on trained weights: the bundled mini-GPT,
    exported to the Hugging Face format and loaded through the backend each way."""
    from chat_tui.engine.export import export_hf

    with tempfile.TemporaryDirectory() as tmp:
        folder = export_hf(bundled_model_path(), Path(tmp) / "exported")
        replies = {}
        for label, options in (("float32", {}), ("int8", {"quantize": "int8"}), ("bfloat16", {"dtype": "bfloat16"})):
            engine = HFEngine.load(str(folder), device="cpu", **options)
            replies[label] = ours(engine, new_tokens, False)[1]
    for label in ("int8", "bfloat16"):
        ids = replies[label]
        pairs = list(zip(ids, replies["float32"], strict=True))
        equal = sum(a == b for a, b in pairs)
        first = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
        where = f", first differs at {first}" if first is not None else ""
        print(f"bundled mini-GPT (trained), {label}: greedy agreement with float32 {equal}/{new_tokens}{where}")


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
    parser.add_argument("--models", default="limits,124m,bundled",
                        help="which benchmarks, comma-separated (limits, 124m, bundled)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="a mini-GPT to export (default: the bundled one)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    print(f"{os.cpu_count()} CPUs; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads, "
          f"{args.new_tokens} new tokens, greedy, best of {args.runs} (of {4 * args.runs} on the bundled model)")
    print(f"start: {load_average()}")
    results: list[tuple[str, dict[str, list[float]]]] = []
    models = {name.strip() for name in args.models.split(",")}
    if "limits" in models:
        limits(args.runs, args.new_tokens)
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
    if not results:
        print(f"end: {load_average()}")
        return
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
    print(f"end: {load_average()}")


if __name__ == "__main__":
    main()
