"""The inside views and Explain on tiny random Hugging Face checkpoints (GPT-2, Llama, Qwen2, Gemma; and
GPT-NeoX for a family without attribution), each checked against the model computed another way."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from chat_tui.engine import load_engine  # noqa: E402
from chat_tui.engine.explain import ExplainUnavailable, explain_attention  # noqa: E402
from chat_tui.engine.inside import INSIDE_VIEWS, inside  # noqa: E402
from tests.engine.test_hf import build_model, no_network, train_bpe  # noqa: E402, F401 - the fixture cuts the network

TEXT = "Hello there! How are you today?"
FAMILIES = ("gpt2", "llama", "qwen2", "gemma")


def build_extra(arch: str, folder, bpe_json: str):
    from transformers import GemmaConfig, GemmaForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

    from tests.engine.test_hf import make_tokenizer

    torch.manual_seed(0)
    tok = make_tokenizer(bpe_json, None, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    if arch == "gemma":
        model = GemmaForCausalLM(GemmaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                                             max_position_embeddings=128, initializer_range=0.3))
    else:
        model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=400, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4,
                                                 max_position_embeddings=128, initializer_range=0.3))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    bpe = train_bpe()
    root = tmp_path_factory.mktemp("inside-hf")
    folders = {arch: build_model(arch, root / arch, bpe) for arch in ("gpt2", "llama", "qwen2")}
    folders |= {arch: build_extra(arch, root / arch, bpe) for arch in ("gemma", "gpt_neox")}
    return {arch: load_engine(folder, device="cpu") for arch, folder in folders.items()}


def own_logits(engine, ids) -> torch.Tensor:
    with torch.inference_mode():
        return engine.model(torch.tensor([ids])).logits[0, -1].double()


@pytest.mark.parametrize("arch", FAMILIES)
def test_every_view_for_the_named_families(engines, arch):
    engine = engines[arch]
    assert inside(engine) is engine and engine.explains
    assert engine.inside_views() == dict.fromkeys(INSIDE_VIEWS)


def test_another_architecture_says_which_views_it_lacks_in_one_line(engines):
    engine = engines["gpt_neox"]
    views = engine.inside_views()
    assert views["lens"] is None and views["knockout"] is None and views["tokens"] is None and views["rollout"] is None
    for view in ("attribution", "block"):
        assert views[view] is not None and "not available for this architecture" in views[view]
        assert "\n" not in views[view]
    assert not engine.explains
    ids = engine.encode(TEXT)
    with pytest.raises(ExplainUnavailable, match="not available for this architecture"):
        engine.attribute(ids, 3)
    with pytest.raises(ExplainUnavailable, match="mini-GPT"):
        explain_attention(engine, ids, 2, 0, 0)
    lens = engine.logit_lens(ids, 3)
    probs = torch.softmax(own_logits(engine, ids), -1)
    assert lens.layers[-1].chosen_prob == pytest.approx(float(probs[3]), abs=1e-5)


@pytest.mark.parametrize("arch", FAMILIES)
def test_lens_at_the_last_layer_is_the_models_own_distribution(engines, arch):
    engine = engines[arch]
    ids = engine.encode(TEXT)
    probs = torch.softmax(own_logits(engine, ids), -1).numpy()
    token = int(probs.argmax())
    lens = engine.logit_lens(ids, token, top=3)
    assert len(lens.layers) == engine.n_layer
    assert lens.layers[-1].chosen_prob == pytest.approx(probs[token], abs=1e-5)
    assert [t.id for t in lens.layers[-1].top] == list(np.argsort(-probs)[:3])
    assert lens.commit_layer is not None


@pytest.mark.parametrize("arch", FAMILIES)
def test_attribution_components_and_bias_sum_to_the_logit(engines, arch):
    engine = engines[arch]
    ids = engine.encode(TEXT)
    logits = own_logits(engine, ids)
    for token in (5, int(logits.argmax())):
        attribution = engine.attribute(ids, token)
        assert attribution.logit == pytest.approx(float(logits[token]), abs=1e-4)
        assert attribution.residual_error < 1e-4
        assert len(attribution.components) == 1 + engine.n_layer * (engine.n_head + 1)


def test_attribution_counts_gpt2s_biases_in_the_bias(engines):
    engine = engines["gpt2"]
    ids = engine.encode(TEXT)
    model = copy.deepcopy(engine.model)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.bias.normal_()
            block.mlp.c_proj.bias.normal_()
        model.transformer.ln_f.bias.normal_()
    from chat_tui.engine.hf.engine import HFEngine

    biased = HFEngine(model, engine.tokenizer, name="biased")
    attribution = biased.attribute(ids, 5)
    assert attribution.bias != 0.0 and attribution.residual_error < 1e-4
    assert attribution.logit == pytest.approx(float(own_logits(biased, ids)[5]), abs=1e-4)


@pytest.mark.parametrize("arch", [*FAMILIES, "gpt_neox"])
def test_rollout_rows_sum_to_one(engines, arch):
    engine = engines[arch]
    ids = engine.encode(TEXT)
    rolled = engine.rollout(ids)
    assert rolled.rollout.shape == (len(ids),)
    assert rolled.rollout.sum() == pytest.approx(1.0, abs=1e-5)
    assert rolled.last_layer.sum() == pytest.approx(1.0, abs=1e-5)


def zero_head_by_hand(model, arch: str, layer: int, head: int, head_dim: int):
    """A copy of the model whose output projection ignores the head's slice of its input."""
    model = copy.deepcopy(model)
    cut = slice(head * head_dim, (head + 1) * head_dim)
    with torch.no_grad():
        if arch == "gpt2":
            model.transformer.h[layer].attn.c_proj.weight[cut, :] = 0  # Conv1D: (in, out)
        elif arch == "gpt_neox":
            model.gpt_neox.layers[layer].attention.dense.weight[:, cut] = 0
        else:
            model.model.layers[layer].self_attn.o_proj.weight[:, cut] = 0
    return model


@pytest.mark.parametrize("arch", [*FAMILIES, "gpt_neox"])
def test_knocking_out_a_head_matches_zeroing_its_slice_by_hand(engines, arch):
    engine = engines[arch]
    ids = engine.encode(TEXT)
    nothing = engine.knock_out(ids, frozenset())
    assert nothing.kl_bits == 0.0 and all(b == a for _, b, a in nothing.rows)
    ko = engine.knock_out(ids, frozenset({(1, 1)}), top=5)
    reference = zero_head_by_hand(engine.model, arch, 1, 1, engine._inside.parts.head_dim)
    with torch.inference_mode():
        after = torch.softmax(reference(torch.tensor([ids])).logits[0, -1].double(), -1).numpy()
    for token, _, p_after in ko.rows:
        assert p_after == pytest.approx(after[token.id], abs=1e-5)
    assert ko.kl_bits > 0 and ko.top_after == int(after.argmax())
    # cold, on a context no view has seen: the first block's kept output stands in for running it again
    fresh = ids[1:]
    engine._inside._cache = None
    cold = engine.knock_out(fresh, frozenset({(1, 1)}), top=5)
    with torch.inference_mode():
        after = torch.softmax(reference(torch.tensor([fresh])).logits[0, -1].double(), -1).numpy()
    for token, _, p_after in cold.rows:
        assert p_after == pytest.approx(after[token.id], abs=1e-5)
    assert engine._inside._before[2] is not None  # it did keep the blocks' outputs
    assert not any("forward" in layer.__dict__ for layer in engine._inside.parts.layers)  # and put them back
    # the hooks are gone: the model answers as before
    assert torch.equal(own_logits(engine, ids), own_logits(engine, ids))
    again = engine.knock_out(ids, frozenset()).rows  # (whole pass or cache: the same to float rounding)
    assert [t.id for t, _, _ in again] == [t.id for t, _, _ in nothing.rows]
    assert [b for _, b, _ in again] == pytest.approx([b for _, b, _ in nothing.rows], abs=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_token_pieces_count_as_the_encoder_and_their_bytes_round_trip(engines, arch):
    engine = engines[arch]
    for text in ("你好", "Hello 你好 🙂 <|im_end|>"):
        pieces = engine.token_pieces(text)
        assert [p.id for p in pieces] == engine.encode(text)
        assert b"".join(p.data for p in pieces) == text.encode("utf-8")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_token_that_is_part_of_a_character_is_labelled_by_its_bytes(engines, arch):
    from chat_tui.engine.token_bytes import label_bytes

    engine = engines[arch]
    fragments = [p for p in engine.token_pieces("龍 🙂 猫") if not _is_utf8(p.data)]
    assert fragments  # a 400-token vocabulary splits these characters into bytes
    for piece in fragments:
        label = engine.token_text(piece.id)
        assert label == "".join(f"<0x{b:02X}>" for b in piece.data) and label_bytes(label) == piece.data


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize("arch", FAMILIES)
def test_explain_matches_the_models_attention_weights(engines, arch):
    engine = engines[arch]
    ids = engine.encode(TEXT)
    explained = explain_attention(engine, ids, len(ids) - 1, 1, 1)
    engine.attention_mode(True)
    try:
        with torch.inference_mode():
            weights = engine.model(torch.tensor([ids]), output_attentions=True).attentions[1][0, 1, -1]
    finally:
        engine.attention_mode(False)
    assert explained.weights == pytest.approx(weights.double().numpy(), abs=1e-5)
    assert explained.scaled == pytest.approx(explained.qk * explained.scale)
    trace = engine.block_trace(ids, 1, 1)
    rows = {row.name: row for row in trace.rows}
    assert rows["q"].norm == pytest.approx(explained.query_norm, rel=1e-5)
    assert rows["k"].norm == pytest.approx(float(explained.key_norms[-1]), rel=1e-5)
    assert ("position embedding" in rows) == (arch == "gpt2")  # the others rotate q and k instead


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_reply_with_a_head_off_is_the_greedy_reply_of_the_model_without_it(engines, arch):
    from chat_tui.engine import Message, SamplingParams, collect

    engine = engines[arch]
    heads = frozenset({(1, 1)})
    params = SamplingParams(temperature=0, max_new_tokens=8)
    conversation = [Message("user", TEXT)]
    reply = collect(engine.stream(conversation, params, knock_out=heads))
    assert reply.prompt.knocked_out == heads
    reference = zero_head_by_hand(engine.model, arch, 1, 1, engine._inside.parts.head_dim)
    ids = list(reply.prompt.ids)
    with torch.inference_mode():
        for step in reply.steps:
            assert step.token_id == int(reference(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(step.token_id)
    plain = collect(engine.stream(conversation, params))
    assert plain.prompt.knocked_out == frozenset()
    assert [s.token_id for s in plain.steps] != [s.token_id for s in reply.steps]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_views_reusing_the_last_contexts_cache_give_the_same_numbers(engines, arch):
    engine = engines[arch]
    ids = engine.encode(TEXT)
    views = engine._inside

    def fresh(view, *args):
        views._cache = None
        return view(*args)

    # one token further, the same token again, a shorter context, another one of the same length
    for context in (ids[:4], ids[:5], ids[:5], ids[:3], ids[:2] + ids[5:6]):
        lens = engine.logit_lens(context, 5)
        assert views._cache[0] == tuple(context)
        again = fresh(engine.logit_lens, context, 5)
        assert [x.chosen_prob for x in lens.layers] == pytest.approx([x.chosen_prob for x in again.layers], abs=1e-6)
        mine = engine.attribute(context, 5)  # the same context: only its last token runs again
        theirs = fresh(engine.attribute, context, 5)
        assert [c.value for c in mine.components] == pytest.approx([c.value for c in theirs.components], abs=1e-5)
        trace = engine.block_trace(context + [7], 1, 1)
        alone = fresh(engine.block_trace, context + [7], 1, 1)
        assert [r.norm for r in trace.rows] == pytest.approx([r.norm for r in alone.rows], rel=1e-5)
        assert trace.rows[4].first == pytest.approx(alone.rows[4].first, abs=1e-5)


def test_views_run_only_the_tokens_they_do_not_share_with_the_last_context(engines):
    engine = engines["llama"]
    ids = engine.encode(TEXT)
    fed: list[int] = []
    handle = engine.model.get_input_embeddings().register_forward_hook(lambda m, a, out: fed.append(a[0].shape[-1]))
    try:
        engine._inside._cache = None
        engine.logit_lens(ids[:4], 5)  # whole
        engine.logit_lens(ids[:5], 5)  # one token further
        engine.attribute(ids[:5], 5)  # the same token: its last position again
        engine.logit_lens(ids[:3], 5)  # back: the shared two kept
        engine.rollout(ids[:3])  # every position's attention: whole
    finally:
        handle.remove()
    assert fed == [4, 1, 1, 1, 3]


def test_rollout_does_not_wait_long_for_a_reply_without_attention_weights(engines):
    engine = engines["llama"]
    assert engine._current_attention != "eager"
    with engine._lock:  # a reply streaming with the fast attention
        with pytest.raises(ExplainUnavailable, match="once the reply streaming without them has ended"):
            engine.rollout(engine.encode(TEXT))
    assert engine.rollout(engine.encode(TEXT)).rollout.sum() == pytest.approx(1.0, abs=1e-5)
