"""Shared fixtures: a tiny mini-GPT checkpoint built in a temp folder (no download)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never write to the user's real config/data folders.
os.environ.setdefault("CHAT_TUI_HOME", str(Path(__file__).parent / ".chat-tui-home-unused"))

CORPUS = [
    "Hello there! How are you today?",
    "I am fine, thank you. What is AI?",
    "Artificial intelligence is the study of machines that think.",
    "你好！今天天气很好。我们去公园吧。",
    "Emoji 🙂🚀 and markup [bold]x[/bold] and escapes \x1b[2J stay text.",
    "The quick brown fox jumps over the lazy dog.",
] * 20


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from chat_tui.engine.tokenizer import ChatTokenizer, train_tokenizer

    return ChatTokenizer(train_tokenizer(CORPUS, vocab_size=400))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_tokenizer) -> Path:
    import torch

    from chat_tui.engine.checkpoint import save_checkpoint
    from chat_tui.engine.model import GPT, GPTConfig
    from chat_tui.engine.params import SamplingParams

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tiny_tokenizer.vocab_size, block_size=128, n_layer=2, n_head=2, n_embd=32))
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(folder, model, tiny_tokenizer, SamplingParams(temperature=0.8, top_k=20, max_new_tokens=20))
    return folder


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint):
    from chat_tui.engine import load_engine

    return load_engine(tiny_checkpoint, device="cpu")


@pytest.fixture
def one_thread():
    """Tiny models on a shared machine: one thread is both faster and deterministic."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

