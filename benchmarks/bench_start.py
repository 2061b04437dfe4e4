"""Start-up time of the bundled model, against the time it takes just to import torch.

Three commands, each in a fresh interpreter, run alternately `--runs` times (median wall time):

- `python -c "import torch"`: the floor any torch-based start pays;
- `chat-tui ask hello --max-new-tokens 16`: load the bundled mini-GPT, answer, exit;
- the app's model process: a fresh interpreter that starts a `ProcessEngine` on the bundled model
  and waits until it is ready (what the app waits for before "idle"), then closes it.

Target: ask / import torch <= 0.5 (the mini-GPT on the CPU never imports torch).

    python benchmarks/bench_start.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MODEL_PROCESS = (
    "from chat_tui.engine.process import ProcessEngine\n"
    "engine = ProcessEngine.start(None, device='cpu')\n"
    "engine.close()\n"
)


def commands() -> dict[str, list[str]]:
    script = shutil.which("chat-tui")
    ask = [script] if script else [sys.executable, "-m", "chat_tui"]
    return {
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        "chat-tui ask hello --max-new-tokens 16": [*ask, "ask", "hello", "--max-new-tokens", "16"],
        "model process ready (ProcessEngine.start)": [sys.executable, "-c", MODEL_PROCESS],
    }


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each command, alternating (at least 5)")
    args = parser.parse_args()
    runs = max(5, args.runs)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    cmds = commands()
    for argv in cmds.values():  # warm the file cache once
        timed(argv, env)
    times: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(runs):
        for name, argv in cmds.items():
            times[name].append(timed(argv, env))

    floor = statistics.median(times['python -c "import torch"'])
    print(f"{runs} alternating runs each, {os.cpu_count()} CPUs; median wall time of a fresh process")
    print()
    print(f"| {'command':<42} | {'median s':>8} | {'min s':>6} | {'/ import torch':>14} |")
    print(f"|{'-' * 44}|{'-' * 10}|{'-' * 8}|{'-' * 16}|")
    for name, ts in times.items():
        median = statistics.median(ts)
        print(f"| {name:<42} | {median:>8.3f} | {min(ts):>6.3f} | {median / floor:>13.2f}x |")
    ratio = statistics.median(times["chat-tui ask hello --max-new-tokens 16"]) / floor
    print()
    print(f"chat-tui ask / import torch: {ratio:.2f}x  (target <= 0.5)")


if __name__ == "__main__":
    main()
