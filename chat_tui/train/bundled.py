"""The bundled model's recipe (`chat-tui train bundled`): its data, then its runs as TrainConfigs.

Like nanoGPT's config/*.py files: each run is a few settings, and the one `train()` of
`chat_tui.train.loop` runs them in order, each fine-tuning round starting from the checkpoint of
the run before it. No torch at import (the CLI's parser reads RUNS for its --help); training
imports it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from chat_tui.engine.params import SamplingParams
from chat_tui.engine.types import Message
from chat_tui.train.config import TrainConfig
from chat_tui.train.data import chatterbot_corpus_dir, load_chatterbot_yaml

SFT_LANGUAGES = ("english", "chinese")  # pretraining reads every language of the corpus
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a friendly chatbot.",
    "You are chat-tui's small model. Answer briefly.",
    "你是一个乐于助人的助手。",
)
SYSTEM_PROMPT_SHARE = 0.3  # of the conversations that are also shown once with a system prompt
# max_new_tokens: room for an ordinary answer (64 cut them off mid-word); the context holds 512
BUNDLED_DEFAULTS = SamplingParams(temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.1, max_new_tokens=256)

MODEL = dict(n_layer=4, n_head=4, n_embd=256, block_size=512, tokenizer="bpe", vocab_size=4096)

# (run folder, kind, data file, settings): pretraining on the raw text of every conversation, then
# three rounds of fine-tuning on the English and Chinese ones (loss on the replies only); the last
# also shows the user turns typed casually ("what is ai" as "What is AI?").
RUNS: tuple[tuple[str, str, str, dict], ...] = (
    ("1-pretrain", "pretrain", "pretrain.jsonl",
     dict(**MODEL, batch_size=8, lr=1e-3, warmup=100, max_steps=300, val_fraction=0.05)),
    ("2-sft", "sft", "sft-1.jsonl", dict(batch_size=8, lr=5e-4, warmup=50, max_steps=700, val_fraction=0.05)),
    ("3-sft", "sft", "sft-2.jsonl", dict(batch_size=8, lr=1e-3, warmup=30, max_steps=600, val_fraction=0.05, seed=7)),
    ("4-sft-casual", "sft", "sft-3.jsonl",
     dict(batch_size=8, lr=5e-4, warmup=30, max_steps=400, val_fraction=0.05, seed=11)),
)
# The data file of each fine-tuning round: (seed of its system prompts, with casual copies)
SFT_DATA = {"sft-1.jsonl": (1, False), "sft-2.jsonl": (2, False), "sft-3.jsonl": (11, True)}


def bundled_runs(work: Path, *, steps: Sequence[int | None] = (), **changes) -> list[TrainConfig]:
    """The recipe's runs, writing into `work`; `steps` replaces each run's max_steps in turn, and
    `changes` apply to every run (a smaller model and batch for a quick trial)."""
    work = Path(work)
    configs: list[TrainConfig] = []
    for i, (name, kind, data, settings) in enumerate(RUNS):
        settings = {**settings, **changes}
        if i < len(steps) and steps[i] is not None:
            settings["max_steps"] = steps[i]
        configs.append(TrainConfig.of_kind(kind, data=[str(work / data)], out=str(work / name),
                                           init_from=configs[-1].out if configs else None, **settings))
    return configs


def corpus_conversations(corpus: Path | None = None) -> dict[str, list[list[Message]]]:
    """The chatterbot corpus (or a folder laid out like it: one folder of .yml files per language)."""
    root = Path(corpus) if corpus is not None else chatterbot_corpus_dir()
    result = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        conversations = []
        for path in sorted(folder.glob("*.yml")):
            conversations.extend(load_chatterbot_yaml(path))
        result[folder.name] = conversations
    return result


def with_system_prompts(conversations: list[list[Message]], rng: random.Random) -> list[list[Message]]:
    """Some copies get a system prompt, so the model learns to answer with or without one."""
    out = []
    for conversation in conversations:
        out.append(conversation)
        if rng.random() < SYSTEM_PROMPT_SHARE:
            out.append([Message("system", rng.choice(SYSTEM_PROMPTS)), *conversation])
    return out


def casual_variants(conversations: list[list[Message]]) -> list[list[Message]]:
    """Copies whose user turns are typed casually: lower-case, no final punctuation."""
    out = []
    for conversation in conversations:
        casual = [
            Message(m.role, m.content.lower().rstrip("?!.。？！ ")) if m.role == "user" else m
            for m in conversation
        ]
        if casual != conversation and all(m.content for m in casual):
            out.append(casual)
    return out


def _write_jsonl(path: Path, conversations: list[list[Message]]) -> None:
    lines = (json.dumps({"messages": [{"role": m.role, "content": m.content} for m in c]}, ensure_ascii=False)
             for c in conversations)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def write_bundled_data(work: Path, corpus: Path | None = None) -> list[Path]:
    """The runs' data files in `work`, as .jsonl conversations the training commands read too."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    by_language = corpus_conversations(corpus)
    sft = [c for language in SFT_LANGUAGES for c in by_language.get(language, [])]
    written = [work / "pretrain.jsonl"]
    _write_jsonl(written[0], [c for conversations in by_language.values() for c in conversations])
    for name, (seed, casual) in SFT_DATA.items():
        written.append(work / name)
        _write_jsonl(written[-1], with_system_prompts(sft + casual_variants(sft) if casual else sft, random.Random(seed)))
    return written


def build_bundled(out: Path, *, steps: Sequence[int | None] = (), corpus: Path | None = None,
                  log: Callable[[str], None] = print, **changes) -> Path:
    """Train the bundled mini-GPT from scratch (all offline) and save it in `out`.

    The runs write into OUT-runs/ beside it; a run already done there with the same settings is
    kept, and one that was stopped is resumed, so an interrupted recipe goes on where it stopped.
    """
    from chat_tui.engine.checkpoint import load_model, save_checkpoint
    from chat_tui.train.loop import STATE_FILE, read_metrics, read_train_state, train

    out = Path(out)
    work = out.with_name(out.name + "-runs")
    write_bundled_data(work, corpus)
    runs = bundled_runs(work, steps=steps, **changes)

    def show(entry: dict) -> None:
        log("  " + "  ".join(f"{k} {v}" for k, v in entry.items()))

    for cfg in runs:
        name = Path(cfg.out).name
        state = read_train_state(Path(cfg.out)) if (Path(cfg.out) / STATE_FILE).is_file() else None
        same = state is not None and TrainConfig.from_dict(state["config"]).to_dict() == cfg.to_dict()
        if same and state["step"] >= cfg.max_steps:
            log(f"{name}: done before, kept")
            continue
        log(f"{name}: {cfg.kind}, {cfg.max_steps} steps{' (resumed)' if same else ''}")
        train(cfg, resume=same, log=log, on_metrics=show)
    model, tokenizer, _ = load_model(runs[-1].out, device="cpu")
    save_checkpoint(out, model, tokenizer, BUNDLED_DEFAULTS,
                    extra_config={"trained_by": "chat-tui train bundled", "data": "chatterbot-corpus"})
    training_log = {Path(cfg.out).name: {"settings": cfg.to_dict(), "metrics": read_metrics(cfg.out)} for cfg in runs}
    (out / "training_log.json").write_text(json.dumps(training_log, indent=1) + "\n", encoding="utf-8")
    load_model(out)  # prove the folder loads
    log(f"saved {out}")
    return out
