"""The engine-side API for the app's training screen: a background run, its live metrics, its checkpoint."""

from __future__ import annotations

import json
import time

from rich.console import Console

from chat_tui.engine import Message, SamplingParams, load_engine
from chat_tui.train.loop import TrainConfig, read_train_state
from chat_tui.train.progress import ConsoleProgress, LossChart
from chat_tui.train.run import TrainingRun, config_argv

TEXT = "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n" * 20


def tiny(tmp_path, **changes) -> TrainConfig:
    corpus = tmp_path / "sonnet.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    base = dict(data=[str(corpus)], out=str(tmp_path / "run"), tokenizer="char", n_layer=1, n_head=2, n_embd=16,
                block_size=16, batch_size=4, max_steps=1_000_000, eval_every=20, eval_iters=2, log_every=5, warmup=5)
    return TrainConfig(**{**base, **changes})


def test_a_background_run_streams_metrics_serves_its_checkpoint_and_stops_cleanly(tmp_path):
    run = TrainingRun.start(tiny(tmp_path))
    rows: list[dict] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not any("val_loss" in r for r in rows):
        rows += run.poll()
        assert run.running or run.returncode == 0, run.error()
        time.sleep(0.1)
    assert any("val_loss" in r for r in rows), run.error()
    assert run.status()["state"] == "running"
    latest = run.latest_checkpoint()
    assert latest is not None  # the app can open it in a chat while training goes on
    engine = load_engine(latest, device="cpu")
    list(engine.stream([Message("user", "Shall I")], SamplingParams(max_new_tokens=4, seed=0)))
    assert run.best_checkpoint() is not None
    assert run.stop(timeout=60) == 130
    rows += run.poll()
    assert not run.running and run.error() is None
    status = run.status()
    assert status["state"] == "interrupted"
    assert read_train_state(run.out)["step"] == status["step"] == rows[-1]["step"]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps))  # each row once, in order
    chart = LossChart.from_metrics(rows)
    assert len(chart.train) == len(rows) and chart.val


def test_a_failed_background_run_reports_its_one_line_error(tmp_path):
    cfg = tiny(tmp_path, block_size=4096)  # longer than the text
    run = TrainingRun.start(cfg)
    rows = list(run.events(interval=0.1, timeout=90))
    assert rows == []
    assert run.returncode == 1
    assert "too short for a context of 4096" in run.error()


def test_config_argv_round_trips_through_the_cli_parser(tmp_path):
    from chat_tui.cli import build_parser
    from chat_tui.train.cli_train import build_config

    cfg = tiny(tmp_path, lr=2e-3, time_budget=90.0, max_steps=None, dropout=0.1)
    args = build_parser().parse_args(config_argv(cfg))
    assert build_config(args).to_dict() == cfg.to_dict()


def test_the_loss_chart_and_the_progress_lines():
    rows = [{"step": s, "loss": 4.0 - s / 50, "lr": 1e-3, "tokens_per_s": 1000.0, "eta_s": 10.0} for s in range(1, 101)]
    rows[-1].update(val_loss=2.5, val_bpb=3.6)
    chart = LossChart.from_metrics(rows, width=60, height=6)
    console = Console(width=60, record=True, color_system=None)
    console.print(chart)
    text = console.export_text()
    assert "3.980" in text and "2.000" in text  # the y axis spans the losses
    assert "step 1" in text and "100" in text and "validation" in text
    assert any(0x2800 < ord(ch) <= 0x28FF for ch in text)  # braille dots drawn
    console = Console(width=200, record=True, color_system=None)
    view = ConsoleProgress(100, console=console, live=False)
    view.update(rows[-1])
    line = console.export_text()
    assert "step 100/100" in line and "loss 2.0000" in line and "val 2.5000" in line and "tok/s" in line
    assert json.dumps(rows[-1])  # rows are plain JSON
