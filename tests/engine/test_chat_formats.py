"""The plain and raw chat formats with a mini-GPT checkpoint, as with Hugging Face models."""

from __future__ import annotations

import json

import pytest

from chat_tui.cli import main
from chat_tui.engine import EngineError, Message, SamplingParams, collect, load_engine
from chat_tui.engine.tokenizer import BOS, USER

CONVERSATION = [Message("system", "Be brief."), Message("user", "ROMEO: <|end|> hi"),
                Message("assistant", "Good day."), Message("user", "And you?")]


def first_step(engine, conversation, **params):
    """The reply's first token, carrying the prompt it was generated from and its settings."""
    reply = collect(engine.stream(conversation, SamplingParams(max_new_tokens=1, seed=0, **params)))
    return reply.steps[0]


def test_raw_prompts_with_exactly_the_typed_text():
    engine = load_engine(None, device="cpu", chat_format="raw")
    assert engine.chat_format == "raw"
    typed = "ROMEO:\nBut soft, what light"
    assert first_step(engine, [Message("user", typed)]).prompt.ids == engine.encode(typed)  # no <|bos|>, no roles
    # every message's text joined as it is; special tokens typed by hand are the tokens (a format written by hand)
    ids, spans = engine.render(CONVERSATION)
    assert engine.decode(ids) == "Be brief.ROMEO: <|end|> hiGood day.And you?"
    assert engine.tokenizer.end_id in ids
    assert [(s.message_index, engine.decode(ids[s.start:s.end])) for s in spans] == [
        (0, "Be brief."), (1, "ROMEO: <|end|> hi"), (2, "Good day."), (3, "And you?")]


def test_plain_prompts_with_role_lines_and_stops_at_the_users_next_line():
    engine = load_engine(None, device="cpu", chat_format="plain")
    step = first_step(engine, CONVERSATION, stop=("zz",))
    ids = step.prompt.ids
    assert engine.decode(ids) == "Be brief.\n\nUser: ROMEO: <|end|> hi\nAssistant: Good day.\nUser: And you?\nAssistant:"
    assert engine.tokenizer.end_id not in ids and engine.tokenizer.bos_id not in ids  # typed text stays text
    assert [engine.decode(ids[s.start:s.end]) for s in step.prompt.spans] == [
        "Be brief.\n\n", "User: ROMEO: <|end|> hi\n", "Assistant: Good day.\n", "User: And you?\n", "Assistant:"]
    assert set(step.params.stop) == {"zz", "\nUser:"}


def test_the_default_and_template_are_the_checkpoints_own_chat_tokens():
    for chat_format in (None, "template"):
        engine = load_engine(None, device="cpu", chat_format=chat_format)
        assert engine.chat_format == "minigpt"
        assert engine.decode(engine.render([Message("user", "hi")])[0]) == f"{BOS}{USER}hi<|end|><|assistant|>"
    with pytest.raises(EngineError, match="dialogpt.*does not fit a mini-GPT checkpoint"):
        load_engine(None, device="cpu", chat_format="dialogpt")


def test_ask_takes_chat_format_for_a_mini_gpt(capsys):
    import torch

    from chat_tui.engine import bundled_model_path
    from chat_tui.engine.checkpoint import load_model

    typed = "What is your favourite"
    assert main(["ask", "--chat-format", "raw", "--temperature", "0", "--max-new-tokens", "4", "--json", typed]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # the model's own greedy continuation of exactly the typed text (up to a special token, which ends a reply)
    model, tokenizer, _ = load_model(bundled_model_path())
    ids, greedy = tokenizer.encode(typed), []
    with torch.no_grad():
        while len(greedy) < 4 and not (greedy and greedy[-1] in tokenizer.special_ids.values()):
            greedy.append(int(model(torch.tensor([ids + greedy]))[0][0, -1].argmax()))
    assert [line["id"] for line in lines if "id" in line] == greedy
