"""`chat-tui export CHECKPOINT --format hf OUT`: a mini-GPT as a standard Hugging Face model folder.

Plain transformers must reproduce our model from OUT: the same prompt ids through
`apply_chat_template`, logits equal to 1e-4, greedy replies identical token for token; and
`--model OUT` must run through the Hugging Face backend with the same replies.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chat_tui.engine import CheckpointError, Message, SamplingParams, bundled_model_path, collect, load_engine

transformers = pytest.importorskip("transformers")

from chat_tui.engine.export import export_hf  # noqa: E402

CONVERSATIONS = [
    [Message("user", "Hello! What is AI?")],
    [Message("system", "You are terse."), Message("user", "你好！How are you today?")],
    [Message("user", "Hi"), Message("assistant", "Hello there! How are you?"), Message("user", "Fine. And you?")],
]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="session")
def decisive_checkpoint(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny random mini-GPT whose logits are far apart, so greedy replies run long and never tie."""
    from chat_tui.engine.checkpoint import save_checkpoint
    from chat_tui.engine.model import GPT, GPTConfig

    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=tiny_tokenizer.vocab_size, block_size=128, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    folder = tmp_path_factory.mktemp("decisive") / "mini"
    save_checkpoint(folder, model, tiny_tokenizer,
                    SamplingParams(temperature=0.7, top_k=30, top_p=0.9, repetition_penalty=1.1, max_new_tokens=40,
                                   stop=("\n\n",)))
    return folder


@pytest.fixture(scope="session")
def exported(tmp_path_factory, decisive_checkpoint) -> Path:
    return export_hf(decisive_checkpoint, tmp_path_factory.mktemp("export") / "mini-hf")


def as_dicts(conversation):
    return [{"role": m.role, "content": m.content} for m in conversation]


def check_round_trip(checkpoint: Path, out: Path, new_tokens: int, min_reply: int) -> None:
    """Everything section 4 promises, for one checkpoint and its export."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours = load_engine(checkpoint, device="cpu")
    assert ours.backend == "minigpt"
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "GPT2LMHeadModel"
    theirs = load_engine(out, device="cpu")  # `chat-tui --model OUT`
    assert theirs.backend == "hf" and theirs.chat_format == "template" and theirs.system_prompt == "native"
    assert theirs.default_params() == ours.default_params()
    # greedy with the checkpoint's other defaults (a repetition penalty): generate applies the exported
    # generation_config the same way. Stop strings are ours only (generate knows none).
    greedy = ours.default_params().with_(temperature=0, max_new_tokens=new_tokens, stop=())
    longest = 0
    for conversation in CONVERSATIONS:
        ids, spans = ours.render(conversation)
        assert tokenizer.apply_chat_template(as_dicts(conversation), add_generation_prompt=True, return_dict=False) == ids
        assert theirs.render(conversation) == (ids, spans)
        x = torch.tensor([ids])
        with torch.no_grad():
            expected, _, _ = ours.model(x)
            got = model(x).logits
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        reply = collect(ours.stream(conversation, greedy))
        with torch.no_grad():
            out_ids = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new_tokens)
        assert out_ids[0, len(ids):].tolist() == [s.token_id for s in reply.steps]
        again = collect(theirs.stream(conversation, greedy))
        assert [s.token_id for s in again.steps] == [s.token_id for s in reply.steps]
        assert again.text == reply.text and again.finish_reason == reply.finish_reason
        longest = max(longest, reply.tokens)
    assert longest >= min_reply  # replies long enough for "token for token" to mean something
    # a reply the model is asked to continue: continue_final_message renders our open turn
    conversation = [*CONVERSATIONS[0], Message("assistant", "AI is")]
    ids, _ = ours.render(conversation)
    assert tokenizer.apply_chat_template(as_dicts(conversation), continue_final_message=True, return_dict=False) == ids


def test_export_writes_a_standard_folder(exported, decisive_checkpoint):
    names = {p.name for p in exported.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["model_type"] == "gpt2"
    assert config["n_positions"] == 128 and config["vocab_size"] == 400
    generation = json.loads((exported / "generation_config.json").read_text())
    assert generation["do_sample"] is True and generation["temperature"] == 0.7 and generation["top_k"] == 30
    assert generation["stop"] == ["\n\n"] and "stop_strings" not in generation and len(generation["eos_token_id"]) == 5
    tokenizer_config = json.loads((exported / "tokenizer_config.json").read_text())
    assert "<|end|>" in tokenizer_config["chat_template"]
    assert tokenizer_config["eos_token"] == "<|end|>" and tokenizer_config["bos_token"] == "<|bos|>"
    assert not any(p.name.endswith(".tmp") for p in exported.parent.iterdir())


def test_transformers_reproduces_the_exported_model(decisive_checkpoint, exported):
    check_round_trip(decisive_checkpoint, exported, new_tokens=24, min_reply=8)


def test_bundled_model_round_trip(tmp_path):
    try:
        bundled = bundled_model_path()
    except CheckpointError:
        pytest.skip("the bundled model is not in this checkout")
    out = export_hf(bundled, tmp_path / "bundled-hf")
    check_round_trip(bundled, out, new_tokens=32, min_reply=3)


def test_export_refuses_to_overwrite(tmp_path, tiny_checkpoint):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists and is not an empty folder"):
        export_hf(tiny_checkpoint, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (export_hf(tiny_checkpoint, empty) / "model.safetensors").is_file()


def test_cli_export_and_reload(tmp_path, tiny_checkpoint, capsys):
    from chat_tui.cli import main

    out = tmp_path / "cli-hf"
    assert main(["export", str(tiny_checkpoint), "--format", "hf", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"chat-tui --model {out}" in printed and (out / "model.safetensors").is_file()
    assert main(["ask", "Hello!", "--model", str(out), "--device", "cpu", "--temperature", "0",
                 "--max-new-tokens", "4", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["done"] is True and summary["tokens"] >= 1
    # errors stay one line
    for argv in (["export", str(tiny_checkpoint), "--format", "hf", str(out)],
                 ["export", str(tmp_path / "nope"), "--format", "hf", str(tmp_path / "x")]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("chat-tui: error: ") and err.count("\n") == 1
    with pytest.raises(SystemExit) as info:  # argparse: only hf is offered
        main(["export", str(tiny_checkpoint), "--format", "onnx", str(tmp_path / "y")])
    assert info.value.code == 2 and "invalid choice: 'onnx'" in capsys.readouterr().err
