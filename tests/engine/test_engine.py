"""The engine's stream: steps, attention, seeds, stop strings, context policy, cancel."""

import threading

import numpy as np
import pytest
import torch

from chat_tui.engine import EngineError, Message, SamplingParams, collect
from chat_tui.engine.generation import IncrementalDetokenizer, fit_to_context

HELLO = [Message("user", "Hello there! How are you today?")]


def test_stream_yields_complete_steps(tiny_engine):
    reply = collect(tiny_engine.stream(HELLO, SamplingParams(max_new_tokens=12, seed=1)))
    assert 1 <= reply.tokens <= 12
    assert reply.finish_reason in {"eos", "length"}
    first = reply.steps[0]
    assert first.prompt is not None and first.prompt.ids[0] == tiny_engine.tokenizer.bos_id
    assert first.prompt.seed == 1
    for i, step in enumerate(reply.steps):
        assert step.index == i
        assert step.position == len(first.prompt.ids) + i
        assert 0.0 < step.prob <= 1.0 and 0.0 < step.chain_prob <= 1.0
        assert len(step.top) == 10
        probs = [c.prob for c in step.top]
        assert probs == sorted(probs, reverse=True)
        assert step.attention is None
        assert step.top_ids.shape == (256,) and step.top_logits.dtype == np.float32
        assert step.elapsed_s >= step.step_s >= 0
    assert reply.steps[-1].finish_reason == reply.finish_reason
    assert all(s.finish_reason is None for s in reply.steps[:-1])


def test_top_candidates_report_raw_and_chain_probabilities(tiny_engine):
    params = SamplingParams(top_k=3, max_new_tokens=5, seed=3, top_candidates=8)
    for step in tiny_engine.stream(HELLO, params):
        kept = [c for c in step.top if c.chain_prob > 0]
        assert len(kept) == 3  # top-k 3 keeps exactly the 3 most likely
        assert kept == step.top[:3]
        assert sum(c.chain_prob for c in kept) == pytest.approx(1.0, abs=1e-5)
        assert step.token_id in {c.id for c in kept}


def test_seed_makes_generation_reproducible(tiny_engine):
    params = SamplingParams(temperature=1.2, max_new_tokens=16, seed=42)
    a = [s.token_id for s in tiny_engine.stream(HELLO, params)]
    b = [s.token_id for s in tiny_engine.stream(HELLO, params)]
    c = [s.token_id for s in tiny_engine.stream(HELLO, params.with_(seed=43))]
    assert a == b
    assert a != c


def test_greedy_matches_argmax_of_a_full_forward(tiny_engine):
    reply = collect(tiny_engine.stream(HELLO, SamplingParams(temperature=0, max_new_tokens=10)))
    ids = list(reply.prompt.ids)
    with torch.no_grad():
        for step in reply.steps:
            logits, _, _ = tiny_engine.model(torch.tensor([ids]))
            assert step.token_id == int(torch.argmax(logits[0, -1]))
            assert step.chain_prob == 1.0
            ids.append(step.token_id)


def test_attention_rows_when_inspecting(tiny_engine):
    reply = collect(tiny_engine.stream(HELLO, SamplingParams(max_new_tokens=8, seed=5), inspect=True))
    n_prompt = len(reply.prompt.ids)
    matrix = reply.prompt.attention
    assert matrix.dtype == np.float16
    assert matrix.shape == (tiny_engine.n_layer, tiny_engine.n_head, n_prompt, n_prompt)
    np.testing.assert_allclose(matrix.astype(np.float32).sum(-1), 1.0, atol=2e-3)
    ids = list(reply.prompt.ids)
    for step in reply.steps:
        ids.append(step.token_id)
        assert step.attention.shape == (tiny_engine.n_layer, tiny_engine.n_head, step.position + 1)
    # the streamed rows equal a direct forward pass over the whole sequence
    with torch.no_grad():
        _, _, full = tiny_engine.model(torch.tensor([ids]), capture=True)
    for layer, captured in enumerate(full):
        for step in reply.steps:
            np.testing.assert_allclose(
                step.attention[layer].astype(np.float32),
                captured.weights[0, :, step.position, : step.position + 1].numpy(),
                atol=1e-3,
            )


def test_streamed_text_equals_decoded_tokens(tiny_engine):
    for seed in range(5):
        reply = collect(tiny_engine.stream(HELLO, SamplingParams(temperature=1.5, max_new_tokens=30, seed=seed)))
        ids = [s.token_id for s in reply.steps if s.token_id not in tiny_engine.eos_ids]
        assert reply.text == tiny_engine.decode(ids)
        for step in reply.steps:
            assert "\ufffd" not in step.text or "\ufffd" in tiny_engine.decode(ids)


def test_incremental_detokenizer_never_splits_a_character(tiny_tokenizer):
    ids = tiny_tokenizer.encode("你好🙂🚀 done")
    detok = IncrementalDetokenizer(tiny_tokenizer.decode)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == "你好🙂🚀 done"
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_never_leaks(tiny_engine):
    # find a seeded reply long enough, then stop on a piece of it
    for seed in range(50):
        params = SamplingParams(max_new_tokens=30, seed=seed)
        base = collect(tiny_engine.stream(HELLO, params))
        if len(base.text) >= 8:
            break
    stop = base.text[3:7]
    reply = collect(tiny_engine.stream(HELLO, params.with_(stop=(stop,))))
    assert reply.finish_reason == "stop"
    assert stop not in reply.text
    assert reply.text == base.text[: base.text.index(stop)]


def test_cancel_stops_within_one_token(tiny_engine):
    cancel = threading.Event()
    steps = []
    for step in tiny_engine.stream(HELLO, SamplingParams(max_new_tokens=50, seed=0), cancel=cancel):
        steps.append(step)
        if step.index == 2:
            cancel.set()
    assert steps[-1].finish_reason in {"cancelled", "eos"}
    assert len(steps) <= 4


def test_params_change_mid_reply_applies_at_next_token(tiny_engine):
    current = {"params": SamplingParams(max_new_tokens=20, seed=0)}
    seen = []
    for step in tiny_engine.stream(HELLO, lambda: current["params"]):
        seen.append(step.params)
        if step.index == 1:
            current["params"] = current["params"].with_(top_k=1)
    assert seen[0].top_k == 0 and seen[1].top_k == 0
    assert all(p.top_k == 1 for p in seen[2:])


def test_long_conversation_drops_oldest_turns_but_keeps_system(tiny_engine):
    system = Message("system", "Stay kind.")
    turns = []
    for i in range(40):
        turns += [Message("user", f"question {i} about the quick brown fox"), Message("assistant", f"answer {i}")]
    conversation = [system, *turns, Message("user", "last question")]
    reply = collect(tiny_engine.stream(conversation, SamplingParams(max_new_tokens=4, seed=0)))
    prompt = reply.prompt
    assert prompt.dropped_messages > 0 and prompt.dropped_tokens > 0
    assert len(prompt.ids) <= tiny_engine.context_length - 4
    text = tiny_engine.decode(prompt.ids)
    assert "Stay kind." in text and "last question" in text and "question 0 " not in text
    assert prompt.spans[0].message_index == 0 and prompt.spans[0].role == "system"
    assert prompt.spans[-2].message_index == len(conversation) - 1


def test_single_prompt_longer_than_context_is_cut_from_the_start(tiny_engine):
    long = " ".join(f"word{i}" for i in range(400)) + " THE END"
    reply = collect(tiny_engine.stream([Message("user", long)], SamplingParams(max_new_tokens=4, seed=0)))
    assert reply.prompt.dropped_tokens > 0
    assert tiny_engine.decode(reply.prompt.ids).removesuffix("<|assistant|>").endswith("THE END<|end|>")


def test_generation_stops_at_the_context_edge_when_sliding_is_off(tiny_engine):
    text = " ".join(f"w{i}" for i in range(30))
    params = SamplingParams(max_new_tokens=1000, seed=0, temperature=2, slide_context=False)
    reply = collect(tiny_engine.stream([Message("user", text)], params))
    assert reply.steps[-1].position < tiny_engine.context_length
    assert reply.finish_reason in {"context", "eos"}


def test_system_prompt_too_long_is_a_clear_error(tiny_engine):
    with pytest.raises(EngineError, match="context"):
        fit_to_context([Message("system", "x " * 500), Message("user", "hi")], tiny_engine.render, 64)


def test_empty_conversation_is_refused(tiny_engine):
    with pytest.raises(EngineError, match="empty"):
        list(tiny_engine.stream([], SamplingParams()))


def test_continue_a_stopped_reply(tiny_engine):
    conversation = [*HELLO, Message("assistant", "I am")]
    reply = collect(tiny_engine.stream(conversation, SamplingParams(max_new_tokens=3, seed=0)))
    assert tiny_engine.decode(reply.prompt.ids).endswith("<|assistant|>I am")


def test_engine_package_imports_without_torch():
    import subprocess
    import sys

    code = (
        "import sys, chat_tui, chat_tui.engine, chat_tui.engine.types, chat_tui.engine.params, chat_tui.engine.process, chat_tui.engine.explain; "
        "import chat_tui.engine.minigpt, chat_tui.engine.generation, chat_tui.engine.sampling, chat_tui.engine.checkpoint; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules and 'textual' not in sys.modules, "
        "sorted(m for m in sys.modules if m.split('.')[0] in ('torch','transformers','textual'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _runner(engine, numpy_path: bool):
    from chat_tui.engine.minigpt import DecodeWeights, MiniGPTRunner

    model = engine.model
    if numpy_path:
        arrays = {k: v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        return MiniGPTRunner(model.config, DecodeWeights.from_arrays(model.config, arrays))
    return MiniGPTRunner(model.config, DecodeWeights.from_model(model), model=model)


@pytest.mark.parametrize("inspect", [False, True])
@pytest.mark.parametrize("numpy_path", [True, False])
def test_runner_decode_path_equals_the_model_forward(tiny_engine, inspect, numpy_path):
    torch.manual_seed(0)
    ids = torch.randint(0, tiny_engine.model.config.vocab_size, (40,)).tolist()
    runner = _runner(tiny_engine, numpy_path)
    assert runner.numpy_path == numpy_path
    with torch.no_grad():
        logits, matrix = runner.prefill(ids[:10], inspect)
        _, _, full = tiny_engine.model(torch.tensor([ids]), capture=True)
        reference, _, _ = tiny_engine.model(torch.tensor([ids]))
        np.testing.assert_allclose(logits, reference[0, 9].numpy(), atol=1e-5, rtol=0)
        if inspect:
            expected = torch.stack([layer.weights[0, :, :10, :10] for layer in full]).numpy()
            np.testing.assert_allclose(np.asarray(matrix), expected, atol=1e-6, rtol=0)
        for position in range(10, 40):
            logits, row = runner.feed(ids[position], inspect)
            np.testing.assert_allclose(logits, reference[0, position].numpy(), atol=1e-5, rtol=0)
            if inspect:
                expected = torch.stack([layer.weights[0, :, position, : position + 1] for layer in full])
                torch.testing.assert_close(torch.as_tensor(np.asarray(row)), expected, atol=1e-6, rtol=0)
            else:
                assert row is None
