"""The mini-GPT without torch: numpy decoding equal to GPT.forward, a start that never imports torch,
a window that slides when the context fills, NaN weights and never-learned tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch_free_setup import report_torch

from chat_tui.engine import EngineError, Message, SamplingParams, collect, load_engine
from chat_tui.engine.process import ProcessEngine

HELLO = [Message("user", "Hello there! How are you today?")]
ROOT = Path(__file__).resolve().parents[2]


def save_tiny(folder: Path, tokenizer, *, block_size: int = 128, activation: str = "gelu_tanh", std: float = 0.02,
              edit=None, extra_config: dict | None = None) -> Path:
    from chat_tui.engine.checkpoint import save_checkpoint
    from chat_tui.engine.model import GPT, GPTConfig

    torch.manual_seed(1)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32,
                       activation=activation)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)  # wide weights: GELU's curved part and peaked distributions get exercised
        if edit is not None:
            edit(model)
    save_checkpoint(folder, model, tokenizer, SamplingParams(temperature=0.0), extra_config=extra_config)
    return folder


def greedy_by_forward(model, ids: list[int], n: int, block_size: int) -> list[int]:
    """nanoGPT's generate, greedy: crop to the last block_size tokens, full forward, argmax."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits, _, _ = model(torch.tensor([ids[-block_size:]]))
            out.append(int(torch.argmax(logits[0, -1])))
            ids.append(out[-1])
    return out


@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu"])
def test_numpy_decoding_equals_the_torch_model(tmp_path, tiny_tokenizer, activation):
    folder = save_tiny(tmp_path / activation, tiny_tokenizer, activation=activation, std=0.3)
    engine = load_engine(folder, device="cpu")
    runner = engine.runner()
    assert runner.numpy_path and not runner.uses_torch
    model = engine.model  # the torch model, built on first use
    ids = torch.randint(0, tiny_tokenizer.vocab_size, (60,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        reference = model(torch.tensor([ids]))[0][0].numpy()
    logits, _ = runner.prefill(ids[:20], inspect=False)
    np.testing.assert_allclose(logits, reference[19], atol=1e-4, rtol=0)
    for position in range(20, 60):
        logits, _ = runner.feed(ids[position], inspect=False)
        np.testing.assert_allclose(logits, reference[position], atol=1e-4, rtol=0)

    engine.eos_ids = set()
    reply = collect(engine.stream(HELLO, SamplingParams(temperature=0, max_new_tokens=30)))
    expected = greedy_by_forward(model, reply.prompt.ids, 30, engine.context_length)
    assert [s.token_id for s in reply.steps] == expected


def test_the_bundled_model_answers_without_importing_torch():
    code = (
        "import sys\n"
        "from chat_tui.cli import main\n"
        "rc = main(['ask', 'hello', '--max-new-tokens', '8', '--seed', '1'])\n"
        "assert rc == 0, rc\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'torch')\n"
        "assert not loaded, loaded[:5]\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()  # it did answer

    engine = ProcessEngine.start(None, device="cpu", setup=report_torch)
    try:
        reply = collect(engine.stream(HELLO, SamplingParams(max_new_tokens=8, seed=1)))  # raises if torch loaded
        assert reply.tokens >= 1
    finally:
        engine.close()


def test_the_device_is_chosen_by_engine_devices(tmp_path, tiny_tokenizer):
    from chat_tui.engine.devices import best_device
    from chat_tui.errors import DeviceError

    folder = save_tiny(tmp_path / "tiny", tiny_tokenizer)
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        load_engine(folder, device="tpu")
    engine = load_engine(folder, device="auto")
    assert engine.device.split(":")[0] == best_device()
    if best_device() == "cpu":  # "auto" without a GPU decodes in numpy, as "cpu" does
        assert engine.runner().numpy_path


# --- the window slides when the context fills -------------------------------------------------------


@pytest.fixture(scope="module")
def block64(tmp_path_factory, tiny_tokenizer) -> Path:
    return save_tiny(tmp_path_factory.mktemp("b64") / "block64", tiny_tokenizer, block_size=64, std=0.3)


@pytest.mark.parametrize("inspect", [False, True])
def test_a_full_context_slides_and_the_reply_goes_on(block64, inspect):
    engine = load_engine(block64, device="cpu")
    engine.eos_ids = set()  # a reply that only the length ends
    reply = collect(engine.stream(HELLO, SamplingParams(temperature=0, max_new_tokens=150), inspect=inspect))
    assert reply.finish_reason == "length" and reply.tokens == 150
    assert reply.steps[-1].position > 150  # far beyond the 64 positions of the context
    slid = [s for s in reply.steps if s.window_start > 0]
    assert slid, "the window never slid"
    for step in reply.steps:
        assert step.position + 1 - step.window_start <= engine.context_length  # what the model sees fits
        if inspect:
            assert step.attention.shape == (engine.n_layer, engine.n_head, step.position + 1)
            np.testing.assert_allclose(step.attention[:, :, step.window_start :].astype(np.float32).sum(-1), 1.0,
                                       atol=2e-3)
            assert not step.attention[:, :, : step.window_start].any()
    # each token is the argmax of one forward pass over exactly the tokens the model saw
    ids = list(reply.prompt.ids)
    with torch.no_grad():
        for step, previous in zip(reply.steps[1:], reply.steps, strict=False):
            ids.append(previous.token_id)
            seen = ids[previous.window_start :]
            logits, _, _ = engine.model(torch.tensor([seen]))
            assert step.token_id == int(torch.argmax(logits[0, -1]))


def test_sliding_off_stops_at_the_context(block64):
    engine = load_engine(block64, device="cpu")
    engine.eos_ids = set()
    reply = collect(engine.stream(HELLO, SamplingParams(temperature=0, max_new_tokens=150, slide_context=False)))
    assert reply.finish_reason == "context"
    assert reply.steps[-1].position == engine.context_length - 1
    assert all(s.window_start == 0 for s in reply.steps)


# --- NaN weights ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broken(tmp_path_factory, tiny_tokenizer) -> Path:
    def poison(model):
        model.transformer.h[0].mlp.c_fc.weight.fill_(float("nan"))

    return save_tiny(tmp_path_factory.mktemp("nan") / "broken-model", tiny_tokenizer, edit=poison)


def test_nan_logits_are_a_one_line_error_naming_the_model(broken):
    engine = load_engine(broken, device="cpu")
    with pytest.raises(EngineError) as info:
        collect(engine.stream(HELLO, SamplingParams(max_new_tokens=5, seed=0)))
    message = str(info.value)
    assert "broken-model" in message and "produced NaN" in message and "\n" not in message


def test_ask_on_a_nan_checkpoint_fails_with_that_line(broken):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "chat_tui", "ask", "hello", "--model", str(broken)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "the model produced NaN; the checkpoint is broken" in lines[0], done.stderr
    assert "broken-model" in lines[0]
    assert done.stdout.strip() == ""


# --- tokens the checkpoint never learned ---------------------------------------------------------------


def _tie_specials(real: int):
    """The final hidden state is (nearly) one fixed vector whatever the input, so the logits are
    wte @ that vector: token `real` is made the clear favourite and the five special tokens
    (ids 0-4) get exactly its output row, as an imported nanoGPT model's appended tokens do."""

    def edit(model):
        direction = torch.randn(32, generator=torch.Generator().manual_seed(3))
        model.transformer.ln_f.weight.fill_(1e-4)
        model.transformer.ln_f.bias.copy_(direction)
        model.transformer.wte.weight[real] = direction * 3.0
        model.transformer.wte.weight[:5] = model.transformer.wte.weight[real]

    return edit


def test_untrained_tokens_never_compete(tmp_path, tiny_tokenizer):
    real = tiny_tokenizer.encode("\n")[0]
    assert real >= 5
    tied = save_tiny(tmp_path / "tied", tiny_tokenizer, edit=_tie_specials(real))
    masked = tmp_path / "masked"
    config = json.loads((tied / "config.json").read_text())
    save_tiny(masked, tiny_tokenizer, edit=_tie_specials(real), extra_config={"untrained_token_ids": [0, 1, 2, 3, 4]})
    assert json.loads((masked / "config.json").read_text())["untrained_token_ids"] == [0, 1, 2, 3, 4]

    # without the key the tie splits the probability six ways and greedy picks a special token
    plain = collect(load_engine(tied, device="cpu").stream(HELLO, SamplingParams(temperature=0, max_new_tokens=3)))
    assert plain.steps[0].token_id < 5 and plain.steps[0].prob < 0.2
    assert config.get("untrained_token_ids") is None

    engine = load_engine(masked, device="cpu")
    reply = collect(engine.stream(HELLO, SamplingParams(temperature=0, max_new_tokens=3)))
    first = reply.steps[0]
    assert first.token_id == real
    assert first.prob > 0.9  # the whole of its share, not a sixth of it
    assert all(c.id >= 5 for c in first.top if c.prob > 0)
    sampled = collect(engine.stream(HELLO, SamplingParams(temperature=1.5, max_new_tokens=40, seed=0)))
    assert all(s.token_id >= 5 for s in sampled.steps)


def test_untrained_token_ids_must_be_token_ids(tmp_path, tiny_tokenizer):
    folder = save_tiny(tmp_path / "bad", tiny_tokenizer, extra_config={"untrained_token_ids": [0, "x"]})
    with pytest.raises(EngineError, match="untrained_token_ids"):
        load_engine(folder, device="cpu")


# --- candidates only when asked --------------------------------------------------------------------------


def test_a_stream_without_candidates_gives_the_same_reply_and_no_candidates():
    engine = load_engine(None, device="cpu")
    params = SamplingParams(temperature=0.8, top_k=40, seed=7, max_new_tokens=24)
    full = collect(engine.stream(HELLO, params))
    plain = collect(engine.stream(HELLO, params, candidates=False))
    assert [s.token_id for s in plain.steps] == [s.token_id for s in full.steps]
    assert plain.text == full.text
    assert all(s.top_logits is not None and s.top for s in full.steps)
    assert all(s.top_logits is None and s.top_ids is None and s.top == [] for s in plain.steps)


def test_a_plain_ask_skips_the_candidates_and_ask_json_gets_them(monkeypatch, capsys):
    from chat_tui import cli
    from chat_tui.engine.minigpt import MiniGPTEngine

    seen = []  # every Step the real engine gives the CLI
    real_stream = MiniGPTEngine.stream

    def recording_stream(self, *args, **kwargs):
        for step in real_stream(self, *args, **kwargs):
            seen.append(step)
            yield step

    monkeypatch.setattr(MiniGPTEngine, "stream", recording_stream)
    assert cli.main(["ask", "hello", "--temperature", "0", "--max-new-tokens", "8"]) == 0
    assert seen and all(s.top_logits is None and s.top == [] for s in seen)
    seen.clear()
    assert cli.main(["ask", "hello", "--temperature", "0", "--max-new-tokens", "8", "--json"]) == 0
    assert seen and all(s.top_logits is not None and len(s.top) == 10 for s in seen)
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert all(len(r["top"]) == 10 for r in records if "token" in r)


def test_the_numpy_feed_reuses_its_buffers():
    """No allocation per token: every feed hands back the same logits buffer, filled anew."""
    engine = load_engine(None, device="cpu")
    runner = engine.runner()
    ids, _ = engine.render(HELLO)
    runner.prefill(ids, inspect=False)
    first, _ = runner.feed(ids[-1], inspect=True)
    first_copy = first.copy()
    second, row = runner.feed(ids[-2], inspect=True)
    assert second is first and not np.array_equal(first_copy, second)
    assert row.shape == (engine.n_layer, engine.n_head, len(ids) + 2)
    np.testing.assert_allclose(row.sum(-1), 1.0, atol=1e-5)


def test_the_numpy_weights_are_held_once_with_each_bias_beside_its_matrix():
    """Each product's bias is the last row of its matrix (one product adds it), and the (weight, bias)
    pairs that the prefill and the torch model read are views of those matrices, not copies."""
    engine = load_engine(None, device="cpu")
    weights = engine.runner().weights
    assert len(weights.biased) == engine.n_layer
    for layer, biased in zip(weights.layers, weights.biased, strict=True):
        for (weight, bias), matrix in zip((layer.attn, layer.attn_proj, layer.fc, layer.fc_proj), biased, strict=True):
            assert matrix.shape == (weight.shape[0] + 1, weight.shape[1])
            assert np.shares_memory(weight, matrix) and np.shares_memory(bias, matrix)
            np.testing.assert_array_equal(matrix[-1], bias)


def split_into_characters(engine, text: str) -> list[int]:
    """`text` as one token per character: ids its tokenizer would never produce for it (they merge)."""
    ids = [engine.encode(c)[0] for c in text]
    assert engine.decode(ids) == text and engine.encode(text) != ids
    return ids


def test_a_reply_goes_on_from_its_prefix_ids_exactly_as_given():
    """A fork's kept tokens and forced one go in as ids: prefilled after the prompt as they are, even split
    as the tokenizer never would, the reply being the greedy continuation of prompt + prefix by GPT.forward."""
    engine = load_engine(None, device="cpu")
    engine.eos_ids = set()
    rendered = engine.render(HELLO)[0]
    prefix = split_into_characters(engine, " Hello")
    reply = collect(engine.stream(HELLO, SamplingParams(temperature=0, max_new_tokens=12), prefix_ids=prefix))
    assert reply.prompt.ids == rendered + prefix and reply.prompt.prefix_ids == tuple(prefix)
    assert reply.steps[0].index == 0 and reply.steps[0].position == len(rendered) + len(prefix)
    model = engine.model
    with torch.no_grad():
        first = model(torch.tensor([rendered + prefix]))[0][0, -1].numpy()
    step = reply.steps[0]
    np.testing.assert_allclose(step.top_logits, first[step.top_ids], atol=1e-4, rtol=0)
    expected = greedy_by_forward(model, rendered + prefix, 12, engine.context_length)
    assert [s.token_id for s in reply.steps] == expected
    # the same text tokenized again is another prompt: the ids, not the text, are what the model saw
    retokenized = rendered + engine.encode(" Hello")
    assert reply.prompt.ids != retokenized
    # the reply's text goes on from the prefix's, as the whole would decode
    assert engine.decode(prefix) + reply.text == engine.decode(prefix + [s.token_id for s in reply.steps])


def test_a_long_prefix_keeps_a_quarter_of_the_context_for_the_prompt_or_says_it_cannot(tiny_checkpoint):
    engine = load_engine(tiny_checkpoint, device="cpu")  # a 128-token context
    engine.eos_ids = set()
    rendered = engine.render(HELLO)[0]
    prefix = engine.encode("Hello there! How are you today? I am fine, thank you.") * 5
    assert 128 - 64 < len(prefix) < 128 - 32 and len(rendered) < 32  # more than the context less the reserve
    reply = collect(engine.stream(HELLO, SamplingParams(temperature=0, max_new_tokens=64), prefix_ids=prefix))
    assert reply.prompt.ids == rendered + prefix and reply.tokens == 64  # the window slid for the rest
    with pytest.raises(EngineError, match="fork it at an earlier token") as caught:
        list(engine.stream(HELLO, SamplingParams(max_new_tokens=8), prefix_ids=prefix * 2))
    assert "\n" not in str(caught.value)
