"""The training loop: commands end to end, resume equivalence, atomic saves, NaN stop, Ctrl-C."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from chat_tui.cli import main
from chat_tui.engine import Message, SamplingParams, load_engine
from chat_tui.engine.checkpoint import load_model
from chat_tui.errors import TrainingError
from chat_tui.train.loop import (
    TrainConfig,
    lr_at,
    parse_duration,
    read_metrics,
    read_train_state,
    train,
)

ROOT = Path(__file__).resolve().parents[2]
TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
) * 12
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def tiny_config(corpus: Path, out: Path, **changes) -> TrainConfig:
    base = dict(data=[str(corpus)], out=str(out), tokenizer="char", n_layer=1, n_head=2, n_embd=16, block_size=16,
                batch_size=4, max_steps=8, warmup=2, eval_every=4, eval_iters=2, log_every=1, seed=3)
    return TrainConfig(**{**base, **changes})


def reply(folder: Path) -> str:
    engine = load_engine(folder, device="cpu")
    steps = list(engine.stream([Message("user", "Speak")], SamplingParams(max_new_tokens=8, seed=1)))
    return "".join(s.text for s in steps)


def losses(rows: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in rows]


# --- the schedule and small parts ----------------------------------------------------------------------


def test_lr_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    cfg = TrainConfig(out="x", lr=1e-3, min_lr=1e-4, warmup=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    budget = TrainConfig(out="x", lr=1e-3, warmup=0, max_steps=None, time_budget=60)
    assert lr_at(5, budget, time_fraction=1.0) == pytest.approx(1e-4)  # min_lr defaults to lr / 10


def test_a_device_that_is_not_here_is_one_training_error(corpus, tmp_path):
    with pytest.raises(TrainingError, match=r"^unknown device 'tpu' \(use cpu, cuda, cuda:N or mps\)$"):
        train(tiny_config(corpus, tmp_path / "run", device="tpu"))


@pytest.mark.parametrize("text,seconds", [("90", 90), ("90s", 90), ("10m", 600), ("1h30m", 5400), ("1.5m", 90)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten minutes", "10x", "0", "-5m"])
def test_bad_durations_are_refused(text):
    with pytest.raises(ValueError):
        parse_duration(text)


# --- commands end to end ---------------------------------------------------------------------------------


def test_pretrain_command_char_model_learns_saves_and_chats(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "pretrain", "--data", str(corpus), "--out", str(out), "--tokenizer", "char",
                 "--max-steps", "30", "--eval-every", "15", "--log-every", "5", "--lr", "1e-2", "--warmup", "5", *TINY])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.err == ""
    assert "done: 30 steps" in captured.out
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 5, 10, 15, 20, 25, 30]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5  # it learned something
    assert {"val_loss", "val_bpb"} <= set(rows[-1]) and rows[-1]["val_bpb"] > 0
    assert all(r["tokens_per_s"] > 0 and "lr" in r and "eta_s" in r for r in rows)
    model, tokenizer, _ = load_model(out)
    assert model.config.block_size == 16 and tokenizer.vocab_size == len(set(TEXT)) + 5
    assert (out / "best" / "model.safetensors").is_file()
    assert json.loads((out / "status.json").read_text())["state"] == "done"
    assert set(reply(out)) <= set(TEXT)  # a character model speaks in its own characters


def test_pretrain_with_the_exact_gelu_keeps_it_in_the_checkpoint_and_its_export(corpus, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from chat_tui.engine.export import export_hf

    out = tmp_path / "run"
    code = main(["train", "pretrain", "--data", str(corpus), "--out", str(out), "--tokenizer", "char", "--activation",
                 "gelu", "--max-steps", "4", "--eval-every", "4", "--quiet", *TINY])
    assert code == 0, capsys.readouterr().err
    model, _, _ = load_model(out)
    assert model.config.activation == "gelu" and model.transformer.h[0].mlp.approximate == "none"
    hf = AutoModelForCausalLM.from_pretrained(str(export_hf(out, tmp_path / "hf"))).eval()
    x = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x)[0], atol=1e-4, rtol=1e-4)
    with pytest.raises(SystemExit):  # argparse's usage line, then status 2
        main(["train", "pretrain", "--data", str(corpus), "--out", str(tmp_path / "y"), "--activation", "relu"])
    assert "--activation" in capsys.readouterr().err


def test_pretrain_bpe_and_the_cache_makes_a_second_run_start_at_once(corpus, tmp_path, capsys):
    out = tmp_path / "bpe"
    args = ["train", "pretrain", "--data", str(corpus), "--out", str(out), "--tokenizer", "bpe", "--vocab-size", "300",
            "--max-steps", "2", "--eval-every", "2", *TINY]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "training a bpe tokenizer" in first
    assert main(args) == 0
    second = capsys.readouterr().out
    assert "training a bpe tokenizer" not in second and "(from the cache)" in second
    corpus.write_text(TEXT + "A new line of text.\n", encoding="utf-8")  # changed data is read again
    assert main(args) == 0
    assert "(from the cache)" not in capsys.readouterr().out
    assert load_model(out)[1].vocab_size <= 300


def test_sft_command_learns_replies_and_keeps_the_tokenizer(corpus, tmp_path, capsys):
    base = tmp_path / "base"
    assert main(["train", "pretrain", "--data", str(corpus), "--out", str(base), "--tokenizer", "char",
                 "--max-steps", "2", *TINY]) == 0
    dialogues = tmp_path / "chat.jsonl"
    lines = [{"messages": [{"role": "user", "content": f"Speak {i}"}, {"role": "assistant", "content": "Speak, speak."}]}
             for i in range(12)]
    dialogues.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    out = tmp_path / "sft"
    code = main(["train", "sft", "--from", str(base), "--data", str(dialogues), "--out", str(out), "--max-steps", "12",
                 "--lr", "3e-3", "--warmup", "2", "--eval-every", "6", "--log-every", "1", "--batch-size", "4", "--quiet"])
    assert code == 0, capsys.readouterr().err
    rows = read_metrics(out)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert "val_loss" in rows[-1]
    base_tok = (base / "tokenizer.json").read_text()
    assert (out / "tokenizer.json").read_text() == base_tok
    assert read_train_state(out)["config"]["kind"] == "sft"
    reply(out)


def test_sft_loss_mask_ignores_everything_but_the_replies(tmp_path):
    """Changing the user's or system's tokens' targets cannot change the fine-tuning loss."""
    from chat_tui.engine.model import GPT, GPTConfig
    from chat_tui.train.chartok import char_tokenizer
    from chat_tui.train.dataset import pack_rows
    from chat_tui.train.loop import to_tensors

    tok = char_tokenizer(["abcdefgh ?!"])
    conversation = [Message("system", "be a"), Message("user", "bcd?"), Message("assistant", "ef!")]
    ids, mask, _ = tok.render_conversation(conversation, add_generation_prompt=False)
    rows, masks = pack_rows([(ids, mask)] * 2, 40)
    x, y, m = to_tensors(rows.astype("int64"), masks.astype("float32"), torch.device("cpu"))
    learned = [tok.decode([int(t)]) for t, w in zip(y[0], m[0], strict=True) if w]
    assert "".join(learned) == "ef!<|end|>" * 2  # both conversations packed in one row
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=40, n_layer=1, n_head=2, n_embd=16))
    loss = model(x, y, loss_mask=m)[1]
    y2 = y.clone()
    y2[m == 0] = torch.randint(0, tok.vocab_size, (int((m == 0).sum()),)).clamp(min=0)  # scramble prompt targets
    assert model(x, y2, loss_mask=m)[1].item() == pytest.approx(loss.item(), abs=1e-7)
    y3 = y.clone()
    y3[m == 1] = (y3[m == 1] + 1) % tok.vocab_size  # but the replies' targets count
    assert abs(model(x, y3, loss_mask=m)[1].item() - loss.item()) > 1e-3


# --- resume -----------------------------------------------------------------------------------------------


def test_resume_continues_exactly_where_the_run_stopped(corpus, tmp_path):
    """N steps in one go == N/2, stop, resume, N/2: same losses (1e-5), same weights; dropout on."""
    straight = train(tiny_config(corpus, tmp_path / "a", dropout=0.1, grad_accum=2))
    stop = threading.Event()

    def halfway(entry: dict) -> None:
        if entry["step"] == 3:  # not a save or eval step: the stop itself must save
            stop.set()

    first = train(tiny_config(corpus, tmp_path / "b", dropout=0.1, grad_accum=2), stop=stop, on_metrics=halfway)
    assert (first.reason, first.step) == ("interrupted", 3)
    assert read_train_state(tmp_path / "b")["step"] == 3
    second = train(tiny_config(corpus, tmp_path / "b", dropout=0.1, grad_accum=2), resume=True)
    assert second.step == 8
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 9))  # one line per step, none twice
    for (sa, la), (sb, lb) in zip(losses(a), losses(b), strict=True):
        assert sa == sb and la == pytest.approx(lb, abs=1e-5)
    assert [r.get("val_loss") for r in a] == pytest.approx([r.get("val_loss") for r in b], abs=1e-5)
    wa, wb = load_model(tmp_path / "a")[0].state_dict(), load_model(tmp_path / "b")[0].state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    assert straight.best_val_loss == pytest.approx(second.best_val_loss, abs=1e-6)


def test_resume_from_the_command_line_and_its_guard_rails(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "pretrain", "--data", str(corpus), "--out", str(out), "--tokenizer", "char",
                 "--max-steps", "4", *TINY]) == 0
    assert main(["train", "pretrain", "--resume", str(out), "--max-steps", "6", "--quiet"]) == 0
    assert read_train_state(out)["step"] == 6 and [r["step"] for r in read_metrics(out)][-1] == 6
    capsys.readouterr()
    assert main(["train", "pretrain", "--resume", str(out), "--lr", "0.5", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--lr cannot change when resuming" in err
    assert main(["train", "sft", "--resume", str(out), "--quiet"]) == 2
    assert "holds a pretrain run" in capsys.readouterr().err
    assert main(["train", "pretrain", "--resume", str(tmp_path / "nothing"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing to resume" in err


# --- failures --------------------------------------------------------------------------------------------


def test_a_failed_save_never_leaves_a_broken_checkpoint(corpus, tmp_path, monkeypatch):
    """os.replace raising (a full disk) mid-save: the previous checkpoint loads and resumes intact."""
    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_steps=4, eval_every=2))  # saves at step 2, then 4
    before = (out / "train_state.pt").read_bytes()
    real_replace = os.replace

    def failing_replace(src, dst, *args, **kwargs):
        if str(dst).endswith("train_state.pt"):  # the disk fills up half-way through the step-6 save
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(TrainingError, match="could not save the checkpoint.*No space left"):
        train(tiny_config(corpus, out, max_steps=8, eval_every=2), resume=True)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not [p for p in out.rglob("*.tmp")]  # no temp file left behind
    assert (out / "train_state.pt").read_bytes() == before
    load_model(out)  # the folder still loads: its weights are whole (here the step-6 ones), never half-written
    assert read_train_state(out)["step"] == 4
    assert json.loads((out / "status.json").read_text())["state"] == "failed"
    result = train(tiny_config(corpus, out, max_steps=8, eval_every=2), resume=True)
    assert result.step == 8


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    from chat_tui.engine.model import GPT

    real = GPT.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None, **kwargs):
        logits, loss, attention = real(self, idx, targets, **kwargs)
        if targets is None:  # an evaluation, not a training step
            return logits, loss, attention
        calls["n"] += 1
        return logits, (loss * float("nan") if calls["n"] == 6 else loss), attention

    monkeypatch.setattr(GPT, "forward", poisoned)
    code = main(["train", "pretrain", "--data", str(corpus), "--out", str(out), "--tokenizer", "char",
                 "--max-steps", "10", "--eval-every", "4", "--log-every", "1", *TINY])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "loss became nan at step 6" in err and "step 4" in err
    state = read_train_state(out)
    assert state["step"] == 4
    model = load_model(out)[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [r["step"] for r in read_metrics(out)][-1] == 5  # nothing logged for the poisoned step
    assert json.loads((out / "status.json").read_text())["state"] == "failed"


def test_a_diverging_run_never_keeps_a_nan_validation_loss_as_good_or_best(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    # a learning rate so large that the weights blow up within a few steps (a checkpoint is saved at every eval)
    code = main(["train", "pretrain", "--data", str(corpus), "--out", str(out), "--tokenizer", "char",
                 "--max-steps", "20", "--eval-every", "1", "--eval-iters", "2", "--warmup", "10", "--lr", "1e5", *TINY])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    stopped = re.search(r"loss became nan at step (\d+): training stopped; the last good checkpoint \(step (\d+)\)", err)
    assert stopped, err
    assert int(stopped[2]) == int(stopped[1]) - 1 == read_train_state(out)["step"]
    for folder in (out, out / "best"):
        config = json.loads((folder / "config.json").read_text())
        assert math.isfinite(config["val_loss"]) and config["step"] < int(stopped[1])
        assert set(reply(folder)) <= set(TEXT)  # it loads and generates
    assert all(math.isfinite(r["val_loss"]) for r in read_metrics(out) if "val_loss" in r)
    assert json.loads((out / "status.json").read_text())["state"] == "failed"


def test_weights_that_overflow_are_never_saved_between_evaluations(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    # one step at this learning rate makes the weights infinite while the loss that led there was finite
    code = main(["train", "pretrain", "--data", str(corpus), "--out", str(out), "--tokenizer", "char", "--max-steps", "8",
                 "--eval-every", "4", "--save-every", "1", "--warmup", "0", "--lr", "1e39", *TINY])
    err = capsys.readouterr().err
    assert code == 1 and "weights became inf or nan at step 1: training stopped; no checkpoint had been saved yet" in err
    assert not (out / "config.json").exists() and not (out / "train_state.pt").exists()


def test_time_budget_stops_the_run(corpus, tmp_path):
    result = train(tiny_config(corpus, tmp_path / "run", max_steps=None, time_budget=0.3, eval_every=10_000))
    assert result.reason == "time budget" and result.step >= 1
    assert result.elapsed_s >= 0.3
    assert read_train_state(tmp_path / "run")["step"] == result.step
    assert "val_loss" in read_metrics(tmp_path / "run")[-1]


def test_ctrl_c_saves_and_exits_cleanly(corpus, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "chat_tui", "train", "pretrain", "--data", str(corpus), "--out", str(out),
         "--tokenizer", "char", "--max-steps", "1000000", "--eval-every", "100000", "--log-every", "1", *TINY],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "metrics.jsonl").is_file():
        time.sleep(0.05)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr == ""
    assert "interrupted at step" in stdout and "--resume" in stdout
    state = read_train_state(out)
    assert state["step"] >= 1 and read_metrics(out)[-1]["step"] == state["step"]
    assert json.loads((out / "status.json").read_text())["state"] == "interrupted"
    load_model(out)


def test_bad_options_are_one_line_errors(corpus, tmp_path, capsys):
    out = str(tmp_path / "x")
    cases = [
        (["--n-embd", "30", "--n-head", "4"], "multiple of --n-head"),
        (["--dropout", "1.5"], "--dropout"),
        (["--tokenizer", "bpe", "--vocab-size", "100"], "too small"),
    ]
    for extra, message in cases:
        code = main(["train", "pretrain", "--data", str(corpus), "--out", out, "--max-steps", "1", "--quiet", *extra])
        err = capsys.readouterr().err
        assert code != 0 and err.count("\n") == 1 and message in err, (extra, err)
    assert main(["train", "sft", "--from", str(tmp_path / "missing"), "--data", str(corpus), "--out", out, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing" in err


def test_resume_keeps_the_saved_vocabulary_even_if_the_text_changed(corpus, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_steps=2))
    vocabulary = (out / "tokenizer.json").read_text()
    corpus.write_text(TEXT + "Zounds! 1234 — new characters ☺\n", encoding="utf-8")  # a new vocabulary if retrained
    result = train(tiny_config(corpus, out, max_steps=4), resume=True)
    assert result.step == 4
    assert (out / "tokenizer.json").read_text() == vocabulary


def test_sft_resumes_from_its_own_folder_even_without_the_base(corpus, tmp_path):
    import shutil

    base = tmp_path / "base"
    train(tiny_config(corpus, base, max_steps=1))
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": "Speak"},
                                                       {"role": "assistant", "content": f"All {i}"}]})
                              for i in range(6)) + "\n", encoding="utf-8")
    cfg = dict(kind="sft", init_from=str(base), data=[str(chat)], batch_size=2, max_steps=4, eval_every=2, log_every=1)
    stop = threading.Event()
    first = train(TrainConfig(out=str(tmp_path / "sft"), **cfg), stop=stop,
                  on_metrics=lambda e: stop.set() if e["step"] == 2 else None)
    assert first.step == 2
    shutil.rmtree(base)
    assert train(TrainConfig(out=str(tmp_path / "sft"), **cfg), resume=True).step == 4


def test_a_new_run_never_replaces_an_unfinished_one(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    stop = threading.Event()
    train(tiny_config(corpus, out, max_steps=5), stop=stop, on_metrics=lambda e: stop.set())
    before = (out / "train_state.pt").read_bytes()
    code = main(["train", "pretrain", "--data", str(corpus), "--out", str(out), "--tokenizer", "char",
                 "--max-steps", "2", *TINY])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "unfinished run (step 1, interrupted)" in err and "--resume" in err
    assert (out / "train_state.pt").read_bytes() == before
    train(tiny_config(corpus, out, max_steps=5), resume=True)  # once finished, a new run may replace it
    assert main(["train", "pretrain", "--data", str(corpus), "--out", str(out), "--tokenizer", "char",
                 "--max-steps", "2", *TINY]) == 0
    assert read_train_state(out)["step"] == 2


def test_the_command_line_offers_exactly_the_models_activations():
    from chat_tui.cli import build_parser
    from chat_tui.engine.model import ACTIVATIONS

    pretrain = build_parser()._subparsers._group_actions[0].choices["train"]._subparsers._group_actions[0].choices["pretrain"]
    (action,) = [a for a in pretrain._actions if a.dest == "activation"]
    assert tuple(action.choices) == tuple(ACTIVATIONS)
