"""The model in a child process (ProcessEngine): the same tokens, edits and Esc reach it, errors come
back as themselves, and a dead child is reported instead of hanging the app."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from chat_tui.engine import CheckpointError, EngineError, Message, SamplingParams, collect, load_engine
from chat_tui.engine.process import ProcessEngine

CONVERSATION = [Message("user", "Hello there! How are you today?")]


def endless(engine) -> None:
    """Runs in the child (ProcessEngine's setup): no end-of-text, so replies run to max_new_tokens."""
    engine.eos_ids = set()


def slow(engine) -> None:
    """Runs in the child: endless, and 20 ms a token, like a big model (the tiny one makes thousands a
    second, far ahead of any reader)."""
    from chat_tui.engine.minigpt import MiniGPTRunner

    endless(engine)
    feed = MiniGPTRunner.feed

    def slow_feed(self, token_id, inspect):
        time.sleep(0.02)
        return feed(self, token_id, inspect)

    MiniGPTRunner.feed = slow_feed


@pytest.fixture(scope="module")
def local(tiny_checkpoint):
    engine = load_engine(tiny_checkpoint, device="cpu")
    endless(engine)
    return engine


@pytest.fixture(scope="module")
def remote(tiny_checkpoint):
    engine = ProcessEngine.start(tiny_checkpoint, device="cpu", setup=endless)
    yield engine
    engine.close()


def test_it_describes_the_same_model(remote, local):
    for name in ("backend", "model_name", "device", "context_length", "n_layer", "n_head", "chat_format",
                 "checkpoint_hash", "attention_unavailable"):
        assert getattr(remote, name) == getattr(local, name), name
    assert remote.vocab_size == local.tokenizer.vocab_size
    assert remote.default_params() == local.default_params()
    text = "Hello there! 你好 🙂"
    assert remote.encode(text) == local.encode(text)
    assert remote.decode(local.encode(text)) == text
    assert [remote.token_text(i) for i in range(40)] == [local.token_text(i) for i in range(40)]
    assert remote.render(CONVERSATION) == local.render(CONVERSATION)


def test_it_is_an_engine_and_an_explainer_as_its_model_is(remote, local):
    from chat_tui.engine import Engine, explainer
    from chat_tui.engine.explain import can_explain, vocab_size_of

    assert isinstance(remote, Engine) and remote.alive
    assert explainer(remote) is remote and explainer(local) is local and can_explain(remote)
    assert remote.vocab_size == local.vocab_size == vocab_size_of(remote)


def test_the_inspector_numbers_come_from_the_model_process(remote, local):
    from chat_tui.engine.explain import explain_attention, replay_chain, vocab_size_of

    assert remote.explains is True
    reply = collect(local.stream(CONVERSATION, SamplingParams(temperature=0.0, max_new_tokens=6), inspect=True))
    ids = reply.prompt.ids + [step.token_id for step in reply.steps]
    theirs, ours = remote.explain_attention(ids, len(ids) - 1, 1, 1), explain_attention(local, ids, len(ids) - 1, 1, 1)
    assert np.allclose(theirs.weights, ours.weights) and np.allclose(theirs.qk, ours.qk) and np.allclose(theirs.value_norms, ours.value_norms)
    step, context = reply.steps[-1], ids[:-1]
    other = SamplingParams(temperature=1.5, top_k=5)
    for params in (step.params, other):
        a, b = remote.replay_chain(step, context, params), replay_chain(step, context, params,
                                                                         vocab_size=vocab_size_of(local))
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.dropped_by, b.dropped_by)
        assert np.allclose(a.chain_probs, b.chain_probs) and (a.exact, a.tail_kept) == (b.exact, b.tail_kept)
    assert [remote.token_text(int(i)) for i in step.top_ids] == [local.token_text(int(i)) for i in step.top_ids]


def test_it_streams_the_same_tokens_and_attention(remote, local):
    params = SamplingParams(temperature=0.9, top_k=20, seed=3, max_new_tokens=24)
    theirs, ours = collect(remote.stream(CONVERSATION, params, inspect=True)), collect(
        local.stream(CONVERSATION, params, inspect=True))
    assert [s.token_id for s in theirs.steps] == [s.token_id for s in ours.steps]
    assert theirs.text == ours.text and theirs.finish_reason == ours.finish_reason == "length"
    assert theirs.prompt.ids == ours.prompt.ids
    for a, b in zip(theirs.steps, ours.steps, strict=True):
        assert np.array_equal(a.attention, b.attention)
        assert a.prob == pytest.approx(b.prob) and a.params == params


def test_the_lens_gutters_commitment_layers_come_from_the_model_process(remote, local):
    params = SamplingParams(temperature=0.9, top_k=20, seed=3, max_new_tokens=16)
    theirs = collect(remote.stream(CONVERSATION, params, lens=True))
    ours = collect(local.stream(CONVERSATION, params, lens=True))
    assert [s.commit_layer for s in theirs.steps] == [s.commit_layer for s in ours.steps]
    assert all(s.commit_layer is not None for s in theirs.steps)


def test_a_reply_goes_on_from_its_prefix_ids_in_the_model_process(remote, local):
    """A fork's first tokens cross the pipe as ids: the model's process prefills them as they are."""
    prefix = local.encode(" Hello")[:1] + local.encode("!")
    params = SamplingParams(temperature=0.9, top_k=20, seed=3, max_new_tokens=8)
    theirs = collect(remote.stream(CONVERSATION, params, prefix_ids=prefix))
    ours = collect(local.stream(CONVERSATION, params, prefix_ids=prefix))
    assert theirs.prompt.ids == ours.prompt.ids == local.render(CONVERSATION)[0] + prefix
    assert theirs.prompt.prefix_ids == tuple(prefix)
    assert [s.token_id for s in theirs.steps] == [s.token_id for s in ours.steps]
    plain = collect(remote.stream(CONVERSATION, params))  # and a stream without them has none
    assert plain.prompt.prefix_ids == () and plain.prompt.ids == local.render(CONVERSATION)[0]

def test_an_edit_mid_reply_reaches_the_model(remote):
    first = SamplingParams(temperature=0.0, max_new_tokens=500)
    edited = first.with_(max_new_tokens=80)
    seen: list = []

    def params():
        return edited if len(seen) >= 4 else first

    for step in remote.stream(CONVERSATION, params):
        seen.append(step)
    # the child runs ahead of what the caller has read; the edit applies from the next token it makes
    # once the edit arrives, and every step records the settings it was made with
    used = [step.params for step in seen]
    switch = used.index(edited)
    assert 4 <= switch < 80 and used[:switch] == [first] * switch and used[switch:] == [edited] * (len(used) - switch)
    assert seen[-1].finish_reason == "length" and len(seen) == 80


def stop_after(engine, count: int, then=None, max_new_tokens: int = 500) -> list:
    """Stream greedily; after `count` steps press Esc (set cancel) and call `then()`; all the steps."""
    cancel = threading.Event()
    steps = []
    for step in engine.stream(CONVERSATION, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens),
                              cancel=cancel):
        steps.append(step)
        if len(steps) == count:
            cancel.set()
            if then is not None:
                then()
    return steps


def test_esc_stops_within_a_token_or_two(tiny_checkpoint):
    engine = ProcessEngine.start(tiny_checkpoint, device="cpu", setup=slow)
    steps = stop_after(engine, 5)
    engine.close()
    assert steps[-1].finish_reason == "cancelled" and len(steps) <= 7


def test_closing_during_a_reply_ends_it_as_cancelled(tiny_checkpoint):
    engine = ProcessEngine.start(tiny_checkpoint, device="cpu", setup=slow)
    # what the app does when another model is loaded mid-reply
    steps = stop_after(engine, 3, then=threading.Thread(target=engine.close).start)
    assert steps[-1].finish_reason == "cancelled" and len(steps) <= 6  # 3, the one in the making, the last


def test_closing_while_a_slow_reader_is_behind_ends_the_reply_quietly(tiny_checkpoint):
    engine = ProcessEngine.start(tiny_checkpoint, device="cpu", setup=endless)
    closing = threading.Thread(target=engine.close)

    def close_and_fall_behind():
        closing.start()
        time.sleep(0.5)  # the reader falls behind while the child is stopped and the pipes closed

    steps = stop_after(engine, 1, then=close_and_fall_behind, max_new_tokens=100_000)
    closing.join(10)
    assert not closing.is_alive() and len(steps) < 100_000


def test_a_stream_left_open_does_not_block_a_cancelled_one(remote):
    first = remote.stream(CONVERSATION, SamplingParams(temperature=0.0, max_new_tokens=50))
    next(first)  # started, then left open (an error's traceback can keep such a generator alive)
    cancel = threading.Event()
    cancel.set()
    started = time.monotonic()
    assert list(remote.stream(CONVERSATION, SamplingParams(max_new_tokens=5), cancel=cancel)) == []
    assert time.monotonic() - started < 5
    first.close()
    assert collect(remote.stream(CONVERSATION, SamplingParams(max_new_tokens=5))).tokens == 5


def test_a_stream_left_early_does_not_disturb_the_next(remote, local):
    params = SamplingParams(temperature=0.0, max_new_tokens=30)
    for index, _ in enumerate(remote.stream(CONVERSATION, params)):
        if index == 3:
            break  # the caller leaves: the child's stream is cancelled and read to its end
    again = collect(remote.stream(CONVERSATION, params))
    assert again.text == collect(local.stream(CONVERSATION, params)).text and again.tokens == 30


def test_errors_in_the_model_process_come_back_as_themselves(remote, local):
    for call in (lambda engine: engine.decode([10**12]), lambda engine: engine.render([Message("robot", "x")]),
                 lambda engine: collect(engine.stream([Message("robot", "x")], SamplingParams()))):
        with pytest.raises(Exception) as theirs:
            call(remote)
        with pytest.raises(Exception) as ours:
            call(local)
        assert type(theirs.value) is type(ours.value) and str(theirs.value) == str(ours.value)
    assert collect(remote.stream(CONVERSATION, SamplingParams(max_new_tokens=3))).tokens == 3  # still serving


def test_an_error_raised_again_is_a_fresh_one_each_time():
    from chat_tui.engine.process import _portable, _restore

    try:
        raise CheckpointError("broken defaults")
    except CheckpointError as exc:
        payload = _portable(exc)
    first, second = _restore(payload), _restore(payload)
    assert first is not second and type(first) is CheckpointError and str(second) == "broken defaults"
    if hasattr(first, "__notes__"):
        assert len(first.__notes__) == len(second.__notes__) == 1


def test_an_invalid_parameter_crosses_the_pipe_as_itself():
    import pickle

    from chat_tui.engine.params import InvalidParameter

    error = pickle.loads(pickle.dumps(InvalidParameter("top_p", 2.0, "[0, 1]")))
    assert isinstance(error, InvalidParameter) and (error.name, error.value) == ("top_p", 2.0)
    assert str(error) == "top_p = 2.0 is invalid: allowed [0, 1]"


def test_load_errors_are_the_in_process_errors(tmp_path, tiny_checkpoint):
    missing = tmp_path / "no-such-model"
    with pytest.raises(CheckpointError) as theirs:
        ProcessEngine.start(missing)
    with pytest.raises(CheckpointError) as ours:
        load_engine(missing)
    assert str(theirs.value) == str(ours.value)
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in tiny_checkpoint.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError) as theirs:
        ProcessEngine.start(broken)
    with pytest.raises(CheckpointError) as ours:
        load_engine(broken)
    assert str(theirs.value) == str(ours.value)
    assert "In the model's process" in "".join(getattr(theirs.value, "__notes__", ["In the model's process"]))


def test_a_dead_model_process_is_an_error_not_a_hang(tiny_checkpoint):
    engine = ProcessEngine.start(tiny_checkpoint, device="cpu", setup=endless)
    started = time.monotonic()
    with pytest.raises(EngineError, match="stopped unexpectedly"):
        for index, _ in enumerate(engine.stream(CONVERSATION, SamplingParams(max_new_tokens=100_000))):
            if index == 2:
                os.kill(engine.pid, signal.SIGKILL)
    assert time.monotonic() - started < 30
    with pytest.raises(EngineError, match="stopped unexpectedly"):
        engine.token_text(1)
    engine.close()


def crash(engine) -> None:
    """Runs in the child: a crash with a last word on stderr, as a native library's abort leaves."""
    import sys

    sys.stderr.write("fatal: out of cheese\n")
    sys.stderr.flush()
    os._exit(3)


def test_a_crash_while_loading_says_so_and_keeps_its_last_words(tiny_checkpoint):
    with pytest.raises(EngineError, match=r"stopped unexpectedly while loading the model \(exit code 3\)") as info:
        ProcessEngine.start(tiny_checkpoint, device="cpu", setup=crash)
    if hasattr(info.value, "__notes__"):
        assert "out of cheese" in "".join(info.value.__notes__)


def test_progress_arrives_and_close_ends_the_process(tiny_checkpoint):
    lines: list[str] = []
    engine = ProcessEngine.start(tiny_checkpoint, device="cpu", progress=lines.append)
    assert lines and all(isinstance(line, str) for line in lines)
    pid = engine.pid
    assert engine.alive
    engine.close()
    engine.close()  # twice is fine
    assert not engine.alive
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(EngineError, match="closed"):
        collect(engine.stream(CONVERSATION, SamplingParams(max_new_tokens=3)))


def test_the_app_side_never_imports_torch(tiny_checkpoint):
    import subprocess
    import sys
    from pathlib import Path

    code = f"""
import sys
from chat_tui.engine import Message, SamplingParams, collect
from chat_tui.engine.process import ProcessEngine
engine = ProcessEngine.start({str(tiny_checkpoint)!r}, device="cpu")
reply = collect(engine.stream([Message("user", "Hello")], SamplingParams(max_new_tokens=4, seed=1),
                              inspect=True))
ids = reply.prompt.ids + [s.token_id for s in reply.steps]
step = reply.steps[-1]
explanation = engine.explain_attention(ids, len(ids) - 1, 0, 0)
replay = engine.replay_chain(step, ids[:-1], step.params)
[replay.stage(i) for i in range(len(replay.ids))]
engine.token_text(1)
engine.close()
assert "torch" not in sys.modules, "torch was imported in the app's process"
print("ok", reply.tokens, len(explanation.weights), len(ids))
"""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-2000:]
    ok, tokens, weights, context = done.stdout.split()
    # a reply of 1 to 4 tokens (a tiny random model may end early), and the explanation of its last token
    # covers the whole context: answered across the process boundary, with no torch on this side
    assert ok == "ok" and 1 <= int(tokens) <= 4 and int(weights) == int(context)


def test_a_stream_without_candidates_skips_them_in_the_model_process(remote):
    params = SamplingParams(temperature=0, max_new_tokens=8)
    plain = collect(remote.stream(CONVERSATION, params, candidates=False))
    full = collect(remote.stream(CONVERSATION, params))
    assert [s.token_id for s in plain.steps] == [s.token_id for s in full.steps]
    assert all(s.top_logits is None and s.top == [] for s in plain.steps)
    assert all(s.top_logits is not None and s.top for s in full.steps)
