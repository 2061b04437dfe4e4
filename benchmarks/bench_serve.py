"""`chat-tui serve` against `transformers serve`, on the same bundled model, side by side in one run.

Both servers run on loopback ports, offline; the client is the official `openai` SDK. Rows:

- `chat-tui serve` on the bundled mini-GPT checkpoint (numpy decode, the default);
- `chat-tui serve --model EXPORTED` on the same weights exported to the Hugging Face format (the
  Hugging Face backend, torch);
- `transformers serve EXPORTED` (the reference).

Greedy, up to `--new-tokens` (the bundled model ends its own replies, so each prompt's reply has
the same tokens on every server: the table gives the count). Single stream: time to the first
token and tokens/s, the median over `--runs` rounds that alternate the servers. Then total tokens/s
with `--clients` concurrent streaming clients. Last, the client's own overhead: tokens/s that
`RemoteEngine` (what `chat-tui ask --base-url` and the app use) gets from `chat-tui serve`
against what the SDK alone gets, alternating.

Targets (issue #12): single stream >= 2x transformers serve's tokens/s and time to first token <=
its; 4 clients >= 1x its total; RemoteEngine >= 0.95x the SDK alone.

    python benchmarks/bench_serve.py [--runs 5] [--new-tokens 128] [--clients 4]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# the bundled model's longest greedy replies (54, 41 and 36 tokens): it ends its own replies
PROMPTS = ["What is a computer?", "What is AI?", "Tell me a joke"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(command: list[str], port: int):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise SystemExit(f"{command[0]} exited with {process.returncode}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"{' '.join(command)} did not start")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait(20)


def one_stream(client, model: str, prompt: str, new_tokens: int) -> tuple[float, float, int]:
    """(time to first token, decode tokens/s after it, tokens) for one streamed greedy reply."""
    started = time.perf_counter()
    first = last = None
    tokens = 0
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                            temperature=0, max_tokens=new_tokens, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            first = first or now
            last = now
            tokens += 1
    assert first is not None and last is not None
    rate = (tokens - 1) / (last - first) if tokens > 1 and last > first else float("nan")
    return first - started, rate, tokens


def concurrent(client, model: str, prompts: list[str], new_tokens: int, clients: int) -> float:
    """Total tokens/s with `clients` streams at once."""
    counts = [0] * clients

    def run(i: int) -> None:
        counts[i] = one_stream(client, model, prompts[i % len(prompts)], new_tokens)[2]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()

    import openai

    from chat_tui.engine import Message, bundled_model_path
    from chat_tui.engine.export import export_hf
    from chat_tui.engine.params import SamplingParams
    from chat_tui.engine.remote import RemoteEngine

    transformers_cli = (shutil.which("transformers", path=str(Path(sys.executable).parent))
                        or shutil.which("transformers"))
    if transformers_cli is None:
        raise SystemExit("needs the transformers CLI (pip install transformers fastapi uvicorn)")
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_hf(bundled_model_path(), Path(tmp) / "minigpt-hf")
        ports = [free_port() for _ in range(3)]
        commands = {
            "chat-tui serve (mini-GPT)": [sys.executable, "-m", "chat_tui", "serve", "--port", str(ports[0])],
            "chat-tui serve (HF backend)": [sys.executable, "-m", "chat_tui", "serve", "--port", str(ports[1]),
                                            "--model", str(exported)],
            "transformers serve": [transformers_cli, "serve", str(exported), "--port", str(ports[2])],
        }
        with contextlib.ExitStack() as stack:
            urls = {name: stack.enter_context(server(cmd, port)) for (name, cmd), port in zip(
                commands.items(), ports, strict=True)}
            clients = {name: openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
                       for name, url in urls.items()}
            models = {name: c.models.list().data[0].id for name, c in clients.items()}
            for name, c in clients.items():  # warm up (transformers serve loads the model at the first request)
                one_stream(c, models[name], PROMPTS[0], 8)

            results: dict[str, dict[str, list[float]]] = {name: {"ttft": [], "rate": []} for name in clients}
            token_counts: dict[str, set[int]] = {name: set() for name in clients}
            for _ in range(args.runs):
                for name, c in clients.items():
                    ttft, rate, tokens = one_stream(c, models[name], PROMPTS[0], args.new_tokens)
                    results[name]["ttft"].append(ttft)
                    results[name]["rate"].append(rate)
                    token_counts[name].add(tokens)
            totals = {name: statistics.median(concurrent(c, models[name], PROMPTS, args.new_tokens, args.clients)
                                              for _ in range(max(1, args.runs // 2)))
                      for name, c in clients.items()}

            reference = "transformers serve"
            ref_rate = statistics.median(results[reference]["rate"])
            ref_ttft = statistics.median(results[reference]["ttft"])
            print(f"\nsingle stream, greedy, prompt {PROMPTS[0]!r}, up to {args.new_tokens} new tokens, "
                  f"median of {args.runs}; {args.clients} clients at once")
            print(f"| server | tokens | first token ms | tokens/s | / reference | {args.clients} clients tokens/s "
                  "| / reference |")
            print("|---|---|---|---|---|---|---|")
            for name in clients:
                rate = statistics.median(results[name]["rate"])
                ttft = statistics.median(results[name]["ttft"])
                print(f"| {name} | {'/'.join(map(str, sorted(token_counts[name])))} | {ttft * 1000:.1f} | {rate:.1f} "
                      f"| {rate / ref_rate:.2f}x | {totals[name]:.1f} | {totals[name] / totals[reference]:.2f}x |")
            print(f"(reference: transformers serve, first token {ref_ttft * 1000:.1f} ms)")

            # the client's overhead: RemoteEngine against the SDK alone, on chat-tui serve
            name = "chat-tui serve (mini-GPT)"
            engine = RemoteEngine(urls[name], models[name])
            params = SamplingParams(temperature=0, max_new_tokens=args.new_tokens, top_candidates=1)
            ours, sdk = [], []
            for _ in range(args.runs):
                steps = list(engine.stream([Message("user", PROMPTS[0])], params, candidates=False))
                span = steps[-1].elapsed_s - steps[0].elapsed_s
                ours.append((len(steps) - 1) / span if span > 0 else float("nan"))
                sdk.append(one_stream(clients[name], models[name], PROMPTS[0], args.new_tokens)[1])
            print("\n| client, on chat-tui serve | tokens/s | / SDK alone |")
            print("|---|---|---|")
            print(f"| openai SDK alone | {statistics.median(sdk):.1f} | 1.00x |")
            print(f"| RemoteEngine (chat-tui ask --base-url, the app) | {statistics.median(ours):.1f} | "
                  f"{statistics.median(ours) / statistics.median(sdk):.2f}x |")
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
