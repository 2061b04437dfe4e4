"""`--nproc N`: run the same command under torchrun, N processes of PyTorch DDP on this machine.

Each process runs `python -m chat_tui <the same arguments without --nproc>`; torchrun sets RANK,
WORLD_SIZE and LOCAL_RANK, and the trainer joins the process group (gloo on CPU, NCCL on GPU).
torchrun's own chatter is filtered from stderr so an error is still one line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence


def strip_nproc(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        out.append(arg)
    return out


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def launch(nproc: int, argv: Sequence[str], *, device: str | None = None) -> int:
    """Run `chat-tui ARGV` in `nproc` DDP processes; returns the exit status."""
    env = dict(os.environ)
    cores = os.cpu_count() or 1
    on_gpu = device is not None and device.startswith("cuda")
    if not on_gpu:
        env.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)))  # share the cores, do not fight over them
    env.setdefault("PYTHONUNBUFFERED", "1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "chat_tui", *strip_nproc(argv),
    ]
    # Its own session: a Ctrl-C reaches this process only, which passes one SIGINT to torchrun, which
    # passes it to each worker: each finishes its step, they save together, and exit.
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, errors="replace",
                               start_new_session=True)
    seen: set[str] = set()
    ours: list[str] = []
    interrupted = False
    try:
        assert process.stderr is not None
        for line in process.stderr:
            text = line.rstrip("\n")
            if text.startswith("chat-tui:"):
                if text not in seen:  # every process reports the same data error: say it once
                    seen.add(text)
                    ours.append(text)
                    print(text, file=sys.stderr, flush=True)
            elif os.environ.get("CHAT_TUI_DEBUG"):
                print(text, file=sys.stderr, flush=True)
        code = process.wait()
    except KeyboardInterrupt:
        interrupted = True
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait()
        except KeyboardInterrupt:  # a second Ctrl-C: stop now, without saving
            os.killpg(process.pid, signal.SIGKILL)
            code = process.wait()
    if interrupted:
        return 130
    if code != 0 and not ours:
        print(f"chat-tui: error: the {nproc} training processes failed (exit status {code}); "
              "set CHAT_TUI_DEBUG=1 to see torchrun's output", file=sys.stderr)
    return code
