"""DDP: two gloo processes (`--nproc 2`, through torchrun) match one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chat_tui.engine.checkpoint import load_model
from chat_tui.train.loop import TrainConfig, read_metrics, read_train_state, train

ROOT = Path(__file__).resolve().parents[2]
TEXT = "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n" * 30
STEPS = 6


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    common = ["--tokenizer", "char", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
              "--lr", "3e-3", "--warmup", "2", "--max-steps", str(STEPS), "--eval-every", "3", "--eval-iters", "2",
              "--log-every", "1", "--seed", "7", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    two = tmp_path / "two"
    done = subprocess.run(
        [sys.executable, "-m", "chat_tui", "train", "pretrain", "--data", str(corpus), "--out", str(two),
         "--batch-size", "4", "--nproc", "2", *common],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "x 2 processes" in done.stdout
    assert read_train_state(two)["world"] == 2

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # one process, the same 8 sequences per step as two processes x 4
        one = train(TrainConfig(data=[str(corpus)], out=str(tmp_path / "one"), tokenizer="char", n_layer=1, n_head=2,
                                n_embd=16, block_size=16, batch_size=4, grad_accum=2, lr=3e-3, warmup=2, max_steps=STEPS,
                                eval_every=3, eval_iters=2, log_every=1, seed=7))
    finally:
        torch.set_num_threads(before)
    assert one.step == STEPS
    a, b = read_metrics(tmp_path / "one"), read_metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5)
        assert ra["tokens"] == rb["tokens"]
    assert a[-1]["val_loss"] == pytest.approx(b[-1]["val_loss"], abs=1e-5)
    assert a[-1]["loss"] < a[0]["loss"]  # the steps did something, so matching is not trivial
    wa, wb = load_model(tmp_path / "one")[0].state_dict(), load_model(two)[0].state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_a_data_error_in_a_multi_process_run_is_still_one_line(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "chat_tui", "train", "pretrain", "--data", str(empty), "--out", str(tmp_path / "o"),
         "--nproc", "2", "--max-steps", "1", "--quiet"],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.count("\n") == 1 and "file is empty" in done.stderr
