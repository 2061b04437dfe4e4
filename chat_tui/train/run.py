"""A training run in the background, for the app's training screen.

    run = TrainingRun.start(TrainConfig(kind="pretrain", data=["my.txt"], out="runs/mine", tokenizer="char"))
    for row in run.poll():          # new metrics.jsonl rows since the last poll (never blocks)
        chart.add(row)              # e.g. chat_tui.train.progress.LossChart, a Rich renderable
    run.latest_checkpoint()         # OUT, once a checkpoint is saved: load_engine(it) while training goes on
    run.stop()                      # like Ctrl-C: finishes the step, saves, exits

The run is a separate process (`python -m chat_tui train … --quiet`), so training never competes
with the UI for the GIL and a crash in it cannot take the app down. Everything the screen shows
comes from files the trainer writes atomically: metrics.jsonl (one JSON line per logged step),
status.json (running / done / interrupted / failed, with a one-line message), and the checkpoint.
`TrainingRun.attach(OUT)` watches a run started elsewhere (e.g. from a terminal).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from chat_tui.train.loop import BEST_DIR, METRICS_FILE, STATUS_FILE, TrainConfig

_FLAGS = {
    "n_layer": "--n-layer", "n_head": "--n-head", "n_embd": "--n-embd", "block_size": "--block-size",
    "tokenizer": "--tokenizer", "vocab_size": "--vocab-size", "batch_size": "--batch-size", "grad_accum": "--grad-accum",
    "lr": "--lr", "min_lr": "--min-lr", "warmup": "--warmup", "max_steps": "--max-steps", "time_budget": "--time-budget",
    "dropout": "--dropout", "weight_decay": "--weight-decay", "grad_clip": "--grad-clip", "eval_every": "--eval-every",
    "eval_iters": "--eval-iters", "log_every": "--log-every", "save_every": "--save-every",
    "val_fraction": "--val-fraction", "seed": "--seed", "device": "--device",
}
_PRETRAIN_ONLY = {"n_layer", "n_head", "n_embd", "block_size", "tokenizer", "vocab_size"}


def config_argv(cfg: TrainConfig) -> list[str]:
    """The `chat-tui train …` arguments that reproduce `cfg`."""
    argv = ["train", cfg.kind]
    if cfg.kind == "sft":
        argv += ["--from", str(cfg.init_from)]
    argv += ["--data", *cfg.data, "--out", cfg.out]
    for name, flag in _FLAGS.items():
        value = getattr(cfg, name)
        if value is None or (cfg.kind == "sft" and name in _PRETRAIN_ONLY):
            continue
        argv += [flag, str(value)]
    if cfg.compile:
        argv.append("--compile")
    return argv


class TrainingRun:
    def __init__(self, out: str | Path, process: subprocess.Popen | None = None) -> None:
        self.out = Path(out)
        self.process = process
        self._offset = 0
        self._partial = b""

    # -- starting and stopping --

    @classmethod
    def start(cls, cfg: TrainConfig, *, resume: bool = False, nproc: int | None = None,
              python: str = sys.executable) -> TrainingRun:
        """Start `cfg` (or, with resume, continue the run in cfg.out) in a background process."""
        cfg.validate()
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        argv = ["train", cfg.kind, "--resume", str(out)] if resume else config_argv(cfg)
        if nproc and nproc > 1:
            argv += ["--nproc", str(nproc)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        with open(out / "train.log", "ab") as log, open(out / "train.err", "wb") as err:
            process = subprocess.Popen([python, "-m", "chat_tui", *argv, "--quiet"], stdout=log, stderr=err,
                                       stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        return cls(out, process)

    @classmethod
    def attach(cls, out: str | Path) -> TrainingRun:
        """Watch the run in OUT without owning its process."""
        return cls(out)

    def stop(self, *, wait: bool = True, timeout: float | None = 120.0) -> int | None:
        """Ask the run to finish its step, save and exit (SIGINT, as Ctrl-C). Returns the exit status."""
        if self.process is None:
            status = self.status()
            pid = status.get("pid")
            if status.get("state") == "running" and isinstance(pid, int):
                try:
                    os.kill(pid, signal.SIGINT)
                except OSError:
                    pass
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        if wait:
            try:
                return self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return None
        return self.process.poll()

    # -- watching --

    @property
    def running(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return self.status().get("state") == "running"

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def status(self) -> dict:
        """status.json: state (running, done, interrupted, failed), step, saved_step, best_val_loss, message."""
        try:
            return json.loads((self.out / STATUS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def error(self) -> str | None:
        """The run's one-line error, once it has failed."""
        if self.process is not None and self.process.poll() not in (None, 0, 130):
            try:
                lines = (self.out / "train.err").read_text(encoding="utf-8", errors="replace").strip().splitlines()
            except OSError:
                lines = []
            if lines:
                return lines[-1].removeprefix("chat-tui: error: ")
            return f"training exited with status {self.process.poll()}"
        status = self.status()
        return status.get("message") if status.get("state") == "failed" else None

    def poll(self) -> list[dict]:
        """The metrics rows written since the last call (complete lines only)."""
        path = self.out / METRICS_FILE
        try:
            size = path.stat().st_size
        except OSError:
            return []
        if size < self._offset:  # rewritten (a resume trims it): read again from the start
            self._offset, self._partial = 0, b""
        if size == self._offset:
            return []
        with path.open("rb") as f:
            f.seek(self._offset)
            chunk = f.read(size - self._offset)
        self._offset = size
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        rows = []
        for line in lines:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
        return rows

    def events(self, interval: float = 0.5, timeout: float | None = None) -> Iterator[dict]:
        """Metrics rows as they come, until the run ends (or `timeout` seconds pass)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            yield from self.poll()
            if not self.running:
                yield from self.poll()
                return
            if deadline is not None and time.monotonic() > deadline:
                return
            time.sleep(interval)

    def latest_checkpoint(self) -> Path | None:
        """OUT once it holds a saved checkpoint (safe to load while training goes on)."""
        return self.out if (self.out / "config.json").is_file() and (self.out / "model.safetensors").is_file() else None

    def best_checkpoint(self) -> Path | None:
        best = self.out / BEST_DIR
        return best if (best / "config.json").is_file() and (best / "model.safetensors").is_file() else None
