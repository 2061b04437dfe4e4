"""`chat-tui ask` when the context fills: the window slides and stderr says so once, `--no-slide-context`
ends the reply instead; and `--json` names how a Hugging Face model without a KV cache decodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_cli import run

PROMPT = "Hello there! How are you today?"


def save_endless64(folder: Path, tokenizer) -> Path:
    """A 64-token mini-GPT whose special tokens are marked never learned (as an imported nanoGPT model's
    are): nothing ends its replies before max_new_tokens, so a long one fills the context."""
    from tests.engine.test_minigpt_numpy import save_tiny

    specials = sorted(tokenizer.special_ids.values())
    return save_tiny(folder, tokenizer, block_size=64, std=0.3, extra_config={"untrained_token_ids": specials})


@pytest.fixture(scope="module")
def endless64(tmp_path_factory, tiny_tokenizer) -> Path:
    return save_endless64(tmp_path_factory.mktemp("slide") / "endless64", tiny_tokenizer)


def test_ask_slides_the_window_and_says_so_once(endless64):
    result = run("ask", PROMPT, "--model", str(endless64), "--temperature", "0", "--max-new-tokens", "150", "--json")
    assert result.returncode == 0, result.stderr
    *tokens, summary = (json.loads(line) for line in result.stdout.splitlines())
    assert summary["stop_reason"] == "length" and summary["tokens"] == len(tokens) == 150
    notes = result.stderr.strip().splitlines()
    assert len(notes) == 1, result.stderr
    assert notes[0].startswith("chat-tui: note: the context window filled; the model saw only the last ")
    seen, start = map(int, notes[0].removeprefix("chat-tui: note: the context window filled; the model saw only "
                                                 "the last ").removesuffix(" on").split(" tokens from token "))
    assert 0 < seen <= 64 and start > 0
    assert 150 < start + seen <= 150 + 64, "the window ends at the reply's last token (after a prompt that fit)"
    assert "decode_note" not in summary  # a mini-GPT decodes through its KV cache


def test_no_slide_context_ends_the_reply_at_the_context(endless64):
    result = run("ask", PROMPT, "--model", str(endless64), "--temperature", "0", "--max-new-tokens", "150", "--json",
                 "--no-slide-context")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["stop_reason"] == "context" and summary["tokens"] < 64
    assert result.stderr == ""


def test_ask_json_names_a_decode_without_kv_cache(tmp_path):
    pytest.importorskip("transformers")
    from tests.engine.test_hf import train_bpe
    from tests.engine.test_hf_architectures import build

    folder = build("openai-gpt", tmp_path / "gpt1", train_bpe())
    result = run("ask", "Hello", "--model", str(folder), "--chat-format", "plain", "--temperature", "0",
                 "--max-new-tokens", "3", "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["decode_note"] == "no KV cache: recomputing the whole sequence each step (slower)"
    assert result.stderr == "", "stderr stays quiet: nothing is wrong"


def test_ask_on_a_hugging_face_model_with_nan_weights_names_it(tmp_path):
    pytest.importorskip("transformers")
    import torch
    from transformers import AutoModelForCausalLM

    from tests.engine.test_hf import train_bpe
    from tests.engine.test_hf_architectures import build

    folder = build("gpt2", tmp_path / "broken-gpt2", train_bpe())
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.fill_(float("nan"))
    model.save_pretrained(folder)
    result = run("ask", "Hello", "--model", str(folder), "--chat-format", "plain", timeout=300)
    assert result.returncode != 0 and result.stdout.strip() == ""
    assert result.stderr == "chat-tui: error: broken-gpt2: the model produced NaN; the checkpoint is broken\n"
