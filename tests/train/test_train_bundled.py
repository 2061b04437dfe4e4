"""The bundled model's recipe, scaled down: its runs go through the one train() end to end, and the
result opens in the engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from chat_tui.engine import Message, SamplingParams, load_engine
from chat_tui.engine.checkpoint import load_model
from chat_tui.train.bundled import BUNDLED_DEFAULTS, RUNS, build_bundled, bundled_runs, casual_variants
from chat_tui.train.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

ENGLISH = [["Hello", "Hi there, how are you?"], ["What is AI?", "Artificial intelligence is a branch of science."],
           ["How are you?", "I am doing well, thank you."], ["Tell me a joke", "What do you call a fish? A fsh."]]
CHINESE = [["你好", "你好，很高兴认识你。"], ["你是谁？", "我是一个小模型。"]]
FRENCH = [["Bonjour", "Bonjour, comment allez-vous ?"]]
TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=300, batch_size=2, eval_iters=1, eval_every=2)


def write_corpus(root: Path) -> Path:
    """A folder laid out like the chatterbot corpus: one folder of .yml files per language."""
    for language, conversations in (("english", ENGLISH), ("chinese", CHINESE), ("french", FRENCH)):
        (root / language).mkdir(parents=True)
        (root / language / "talk.yml").write_text(
            yaml.safe_dump({"categories": ["talk"], "conversations": conversations * 12}, allow_unicode=True),
            encoding="utf-8")
    return root


def test_the_recipe_is_a_pretraining_run_then_fine_tuning_rounds_each_from_the_one_before(tmp_path):
    runs = bundled_runs(tmp_path)
    assert [(Path(r.out).name, r.kind) for r in runs] == [(name, kind) for name, kind, _data, _s in RUNS]
    assert runs[0].kind == "pretrain" and runs[0].init_from is None
    assert (runs[0].n_layer, runs[0].n_embd, runs[0].block_size, runs[0].vocab_size) == (4, 256, 512, 4096)
    assert [r.init_from for r in runs[1:]] == [r.out for r in runs[:-1]]
    assert [r.max_steps for r in runs] == [300, 700, 600, 400]
    assert [r.lr for r in runs] == [1e-3, 5e-4, 1e-3, 5e-4]
    for run in runs:
        run.validate()
    assert [r.max_steps for r in bundled_runs(tmp_path, steps=[5, None, 7])] == [5, 700, 7, 400]


def test_casual_variants_lower_case_the_user_turns_and_drop_the_final_punctuation():
    conversation = [Message("user", "What is AI?"), Message("assistant", "A field of science.")]
    assert casual_variants([conversation]) == [[Message("user", "what is ai"), conversation[1]]]
    assert casual_variants([[Message("user", "hi"), Message("assistant", "Hello.")]]) == []  # nothing to change


def test_the_recipe_scaled_down_trains_end_to_end_and_the_engine_opens_it(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    out = tmp_path / "minigpt"
    lines: list[str] = []
    build_bundled(out, steps=[4, 2, 2, 2], corpus=corpus, log=lines.append, **TINY)

    work = tmp_path / "minigpt-runs"
    sft_1 = [json.loads(line) for line in (work / "sft-1.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {m["content"] for c in sft_1 for m in c["messages"]} >= {"Hello", "你好"}
    assert not any(m["content"] == "Bonjour" for c in sft_1 for m in c["messages"])  # pretraining only
    assert any(c["messages"][0]["role"] == "system" for c in sft_1)
    log = json.loads((out / "training_log.json").read_text(encoding="utf-8"))
    assert list(log) == [name for name, *_ in RUNS]
    for name, kind, _data, _settings in RUNS:
        assert log[name]["settings"]["kind"] == kind
        assert log[name]["metrics"][-1]["step"] == log[name]["settings"]["max_steps"]
        assert json.loads((work / name / "status.json").read_text())["state"] == "done"

    model, _tokenizer, defaults = load_model(out)
    assert defaults == BUNDLED_DEFAULTS
    assert (model.config.n_layer, model.config.n_embd, model.config.block_size) == (1, 16, 32)
    engine = load_engine(out, device="cpu")
    reply = list(engine.stream([Message("user", "Hello")], SamplingParams(max_new_tokens=4, seed=1)))
    assert 1 <= len(reply) <= 4

    lines.clear()  # run again: every run is done with the same settings, so each is kept
    build_bundled(out, steps=[4, 2, 2, 2], corpus=corpus, log=lines.append, **TINY)
    assert [line for line in lines if "kept" in line] == [f"{name}: done before, kept" for name, *_ in RUNS]


def test_the_kinds_defaults_are_the_cli_defaults(tmp_path):
    from chat_tui.cli import build_parser
    from chat_tui.train.cli_train import build_config

    for kind, extra in (("pretrain", []), ("sft", ["--from", str(tmp_path)])):
        args = build_parser().parse_args(["train", kind, "--data", "x.txt", "--out", str(tmp_path / "o"), *extra])
        built = build_config(args)
        assert built.to_dict() == {**TrainConfig.defaults(kind).to_dict(), "data": ["x.txt"], "out": str(tmp_path / "o"),
                                   "init_from": str(tmp_path) if extra else None}
    assert TrainConfig.defaults("sft").max_steps == 500 and TrainConfig.defaults("pretrain").max_steps == 2000
    timed = TrainConfig.of_kind("sft", time_budget=60.0)
    assert timed.max_steps is None and timed.lr == 3e-4  # a time budget alone sets no step limit


def test_the_bundled_model_leaves_room_for_an_ordinary_answer():
    bundled = Path(__file__).resolve().parents[2] / "assets" / "minigpt"
    saved = json.loads((bundled / "generation_config.json").read_text())
    assert saved["max_new_tokens"] == BUNDLED_DEFAULTS.max_new_tokens == SamplingParams().max_new_tokens == 256
