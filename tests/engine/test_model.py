"""The mini-GPT: causality, the KV cache, both attention paths, GPT-2 compatibility."""

import math

import pytest
import torch

from chat_tui.engine.model import GPT, GPTConfig, KVCache, token_losses

CFG = GPTConfig(vocab_size=97, block_size=96, n_layer=3, n_head=4, n_embd=32)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(CFG).eval()


def test_attention_rows_sum_to_one_and_never_look_ahead(model):
    idx = torch.randint(0, CFG.vocab_size, (2, 20))
    with torch.no_grad():
        _, _, attention = model(idx, capture=True)
    assert len(attention) == CFG.n_layer
    for layer in attention:
        scores, weights = layer.scores, layer.weights
        assert weights.shape == (2, CFG.n_head, 20, 20)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, CFG.n_head, 20))
        future = torch.triu(torch.ones(20, 20, dtype=torch.bool), diagonal=1)
        assert torch.all(weights[..., future] == 0)
        assert torch.all(torch.isinf(scores[..., future]))
        # the weights are the softmax of the returned (scaled) scores
        torch.testing.assert_close(torch.softmax(scores, -1), weights)


def test_changing_a_future_token_does_not_change_past_logits(model):
    idx = torch.randint(0, CFG.vocab_size, (1, 16))
    changed = idx.clone()
    changed[0, 10] = (changed[0, 10] + 1) % CFG.vocab_size
    with torch.no_grad():
        a, _, _ = model(idx)
        b, _, _ = model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("capture", [False, True])
def test_kv_cache_decode_equals_full_recompute_for_64_steps(model, capture):
    torch.manual_seed(1)
    prompt = torch.randint(0, CFG.vocab_size, (1, 12))
    cache = KVCache(CFG)
    seq = prompt
    with torch.no_grad():
        logits, _, _ = model(prompt, cache=cache, capture=capture, last_only=True)
        for _ in range(64):
            full, _, _ = model(seq)
            torch.testing.assert_close(logits[0, -1], full[0, -1], atol=1e-5, rtol=0)
            token = torch.argmax(logits[0, -1]).view(1, 1)
            seq = torch.cat([seq, token], dim=1)
            logits, _, _ = model(token, cache=cache, capture=capture)
    assert cache.length == seq.size(1)


def test_chunked_prefill_with_cache_matches_full(model):
    idx = torch.randint(0, CFG.vocab_size, (1, 30))
    cache = KVCache(CFG)
    with torch.no_grad():
        model(idx[:, :18], cache=cache)
        chunk, _, _ = model(idx[:, 18:], cache=cache)
        full, _, _ = model(idx)
    torch.testing.assert_close(chunk[0], full[0, 18:], atol=1e-5, rtol=0)


def test_sdpa_and_explicit_attention_agree(model):
    idx = torch.randint(0, CFG.vocab_size, (3, 40))
    with torch.no_grad():
        fast, _, none = model(idx, capture=False)
        explicit, _, attention = model(idx, capture=True)
    assert none is None and attention is not None
    torch.testing.assert_close(fast, explicit, atol=1e-5, rtol=1e-5)


def test_decode_attention_row_matches_full_matrix(model):
    idx = torch.randint(0, CFG.vocab_size, (1, 25))
    cache = KVCache(CFG)
    with torch.no_grad():
        model(idx[:, :24], cache=cache)
        _, _, rows = model(idx[:, 24:], cache=cache, capture=True)
        _, _, full = model(idx, capture=True)
    for row, matrix in zip(rows, full, strict=True):
        torch.testing.assert_close(row.weights[0, :, 0], matrix.weights[0, :, 24])


def test_capture_keeps_each_layers_queries_keys_and_values_behind_its_scores(model):
    idx = torch.randint(0, CFG.vocab_size, (1, 14))
    head_dim = CFG.n_embd // CFG.n_head
    with torch.no_grad():
        _, _, full = model(idx, capture=True)
        cache = KVCache(CFG)
        model(idx[:, :10], cache=cache)
        _, _, cached = model(idx[:, 10:], cache=cache, capture=True)
    future = torch.triu(torch.ones(14, 14, dtype=torch.bool), diagonal=1)
    for layer, later in zip(full, cached, strict=True):
        assert layer.q.shape == layer.k.shape == layer.v.shape == (1, CFG.n_head, 14, head_dim)
        scores = (layer.q @ layer.k.transpose(-2, -1)) / math.sqrt(head_dim)
        torch.testing.assert_close(layer.scores[..., ~future], scores[..., ~future])
        # with a cache the 4 new queries see all 14 keys and values: the cached ones too
        assert later.q.shape == (1, CFG.n_head, 4, head_dim) and later.k.shape == (1, CFG.n_head, 14, head_dim)
        torch.testing.assert_close(later.q, layer.q[:, :, 10:], atol=1e-5, rtol=0)
        torch.testing.assert_close(later.k, layer.k, atol=1e-5, rtol=0)
        torch.testing.assert_close(later.v, layer.v, atol=1e-5, rtol=0)


def test_the_loss_is_the_mean_of_token_losses_over_the_targets_not_minus_one(model):
    idx = torch.randint(0, CFG.vocab_size, (2, 12))
    targets = torch.randint(0, CFG.vocab_size, (2, 12))
    targets[0, :4] = -1
    with torch.no_grad():
        logits, loss, _ = model(idx, targets)
    losses = token_losses(logits, targets)
    assert losses.shape == (2, 12) and torch.all(losses[0, :4] == 0)
    reference = torch.nn.functional.cross_entropy(logits.view(-1, CFG.vocab_size), targets.view(-1), ignore_index=-1)
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(loss, losses.sum() / 20)


def test_longer_than_context_is_refused(model):
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, CFG.block_size + 1, dtype=torch.long))


def test_gpt2_initialisation_and_tied_head():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=500, block_size=64, n_layer=8, n_head=4, n_embd=128)
    m = GPT(cfg)
    assert m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()
    assert abs(m.transformer.h[0].attn.c_attn.weight.std().item() - 0.02) < 0.002
    residual = m.transformer.h[0].mlp.c_proj.weight.std().item()
    assert abs(residual - 0.02 / math.sqrt(2 * cfg.n_layer)) < 0.001
    assert torch.all(m.transformer.h[0].attn.c_attn.bias == 0)


def test_loss_mask_counts_only_masked_positions(model):
    idx = torch.randint(0, CFG.vocab_size, (1, 10))
    targets = torch.randint(0, CFG.vocab_size, (1, 10))
    mask = torch.zeros(1, 10)
    mask[0, 5:] = 1
    with torch.no_grad():
        logits, masked, _ = model(idx, targets, loss_mask=mask)
        per_token = torch.nn.functional.cross_entropy(logits[0], targets[0], reduction="none")
    torch.testing.assert_close(masked, per_token[5:].mean())


def test_same_weights_load_into_transformers_gpt2_with_transposes_only(model):
    from chat_tui.engine.convert import to_hf_model

    hf = to_hf_model(model)
    idx = torch.randint(0, CFG.vocab_size, (2, 33))
    with torch.no_grad():
        ours, _, _ = model(idx)
        theirs = hf(idx).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
