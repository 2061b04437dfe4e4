"""The Hugging Face backend across architectures: tiny random models built here from their Config class.

For each one, the greedy reply streamed by the engine equals `model.generate(do_sample=False)` token
for token, the inspector never changes it, and the attention it shows equals an eager forward pass
with `output_attentions`, for the layers that have attention (the others are named). A transformers
release that breaks one of them fails here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from chat_tui.engine import Message, SamplingParams, collect, load_engine  # noqa: E402
from tests.engine.test_hf import make_tokenizer, train_bpe  # noqa: E402

VOCAB = 400
LLAMA_LIKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128)
# architecture: (Config class, its tiny sizes). A wide initialisation keeps greedy away from near-ties.
ARCHITECTURES = {
    "gpt2": ("GPT2Config", dict(n_positions=128, n_embd=32, n_layer=2, n_head=2)),
    "llama": ("LlamaConfig", LLAMA_LIKE),
    "qwen2": ("Qwen2Config", LLAMA_LIKE),
    "mistral": ("MistralConfig", LLAMA_LIKE),
    "gemma": ("GemmaConfig", dict(LLAMA_LIKE, head_dim=8)),
    "phi": ("PhiConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=128)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       max_position_embeddings=128)),
    "opt": ("OPTConfig", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=128, word_embed_proj_dim=32)),
    "falcon": ("FalconConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    max_position_embeddings=128)),
    "mamba": ("MambaConfig", dict(hidden_size=32, num_hidden_layers=2, state_size=4, expand=2, conv_kernel=4)),
    "mamba2": ("Mamba2Config", dict(hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4,
                                    num_heads=8, head_dim=8, n_groups=1, chunk_size=16)),
    "minimax": ("MiniMaxConfig", dict(LLAMA_LIKE, num_local_experts=2, num_experts_per_tok=1, head_dim=8,
                                      layer_types=["linear_attention", "full_attention"])),
    "bamba": ("BambaConfig", dict(LLAMA_LIKE, attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=1,
                                  mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=16)),
    "roberta": ("RobertaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      max_position_embeddings=130, is_decoder=True)),
    "openai-gpt": ("OpenAIGPTConfig", dict(n_positions=128, n_embd=32, n_layer=2, n_head=2)),
    "rwkv": ("RwkvConfig", dict(hidden_size=32, num_hidden_layers=2, attention_hidden_size=32, intermediate_size=64,
                                context_length=128)),
    "recurrent_gemma": ("RecurrentGemmaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                     num_attention_heads=4, num_key_value_heads=2, lru_width=32,
                                                     attention_window_size=16, head_dim=8)),
    # hash_seed: LSH attention hashes with fresh random rotations on every call otherwise
    "reformer": ("ReformerConfig", dict(hidden_size=32, feed_forward_size=64, num_attention_heads=2,
                                        attention_head_size=16, attn_layers=["local", "lsh"], axial_pos_embds=False,
                                        max_position_embeddings=128, local_attn_chunk_length=16,
                                        lsh_attn_chunk_length=16, is_decoder=True, num_buckets=4, hash_seed=0)),
    # a multimodal model whose top-level config says eager while its language model runs SDPA
    "got_ocr2": ("GotOcr2Config", dict(
        vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=64, patch_size=16,
                           output_channels=16, mlp_dim=32, global_attn_indexes=[0]),
        text_config=LLAMA_LIKE, image_token_index=VOCAB - 1)),
    "xlm": ("XLMConfig", dict(emb_dim=32, n_layers=2, n_heads=2, max_position_embeddings=128, is_decoder=True,
                              causal=True)),
}
# what the inspector shows: "all" layers, "some" (and names the others), or "none" (and says why)
NO_ATTENTION = {"falcon", "mamba", "mamba2", "rwkv", "reformer"}  # Falcon: it cannot switch to eager at run time
STATE_SPACE = {"mamba", "mamba2"}
SOME_ATTENTION = {"minimax", "bamba", "recurrent_gemma"}  # linear-attention / state-space layers beside attention
RECOMPUTING = {"openai-gpt", "xlm", "reformer"}  # no KV cache and no state: every step runs the whole sequence
# GPT-1 as built replies one token over and over (its last LayerNorm's unit gains favour one embedding):
# random gains give a reply in which a wrong decode would show
RANDOM_NORM_GAINS = {"openai-gpt"}
CONVERSATION = [Message("user", "Hello there! How are you today?")]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    return train_bpe()


def build(arch: str, folder: Path, tokenizer_json: str) -> Path:
    import transformers

    class_name, sizes = ARCHITECTURES[arch]
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, initializer_range=0.3, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    if "text_config" in sizes:  # the language model's sizes are its text config's
        sizes = {**sizes, "text_config": {**common, **sizes["text_config"]}}
    else:
        sizes = {**common, **sizes}
    config = getattr(transformers, class_name)(**sizes)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if arch in RANDOM_NORM_GAINS:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "ln" in name and name.endswith("weight"):
                    parameter.normal_(1.0, 1.0)
    model.save_pretrained(folder)
    make_tokenizer(tokenizer_json, None, bos_token="<|endoftext|>", eos_token="<|endoftext|>").save_pretrained(folder)
    return folder


def generate(model, ids: list[int], eos: list[int], *, use_cache: bool) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=NEW_TOKENS,
                             eos_token_id=eos, pad_token_id=1, use_cache=use_cache)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_greedy_reply_and_attention_match_transformers(arch, tmp_path, tokenizer_json, one_thread, capfd):
    from transformers import AutoModelForCausalLM

    folder = build(arch, tmp_path / arch, tokenizer_json)
    engine = load_engine(folder, device="cpu", chat_format="plain")
    capfd.readouterr()
    ids, _ = engine.render(CONVERSATION)
    greedy = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS)
    # known from the load, for the status line: each step of a model without a cache costs a prefill
    if arch in RECOMPUTING:
        assert engine.decode_mode == "recompute"
        assert engine.decode_note == "no KV cache: recomputing the whole sequence each step (slower)"
    else:
        assert engine.decode_mode in {"cache", "own-cache", "state"} and engine.decode_note is None
    if arch in STATE_SPACE:  # their outputs have no attentions at all: the inspector knows before it asks
        assert "has no attention layers" in engine.attention_unavailable

    ours = [s.token_id for s in collect(engine.stream(CONVERSATION, greedy)).steps]
    inspected = collect(engine.stream(CONVERSATION, greedy, inspect=True))
    assert capfd.readouterr().err == ""  # transformers' notes stay off the terminal (Reformer pads every step)
    # XLM's generate keeps its mask token's keys in the cache in place of each new token's; without
    # the cache it runs what its prepare_inputs_for_generation describes, as chat-tui does
    theirs = generate(engine.model, ids, sorted(engine.eos_ids), use_cache=arch != "xlm")
    assert len(theirs) >= 4 and len(set(theirs)) >= 2  # a reply that can tell a wrong decode apart
    assert ours == theirs
    assert [s.token_id for s in inspected.steps] == theirs  # the inspector never changes the reply
    if arch in NO_ATTENTION:
        assert engine.attention_unavailable and inspected.prompt.attention is None
        assert all(s.attention is None for s in inspected.steps)
        return
    assert engine.attention_unavailable is None
    layers = engine.attention_layers
    if arch in SOME_ATTENTION:
        assert 0 < len(layers) < engine.n_layer
        missing = [str(i) for i in range(engine.n_layer) if i not in layers]
        assert "no attention weights" in engine.attention_note and all(m in engine.attention_note for m in missing)
    else:
        assert layers == list(range(engine.n_layer)) and engine.attention_note is None

    # the same numbers as one eager forward pass over the whole sequence
    eager = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()
    sequence = list(ids) + theirs
    x = torch.tensor([sequence])
    positions = {"position_ids": torch.arange(len(sequence))[None]} if engine.takes_position_ids else {}  # as generate
    with torch.no_grad():
        full = eager(x, output_attentions=True, **positions).attentions
    n = len(ids)
    matrix = inspected.prompt.attention.astype(np.float32)
    assert matrix.shape[:1] == (len(layers),) and matrix.shape[2:] == (n, n)
    for row, layer in enumerate(layers):
        np.testing.assert_allclose(matrix[row], full[layer][0, :, :n, :n].numpy(), atol=2e-3)
        for step in inspected.steps[:-1]:  # the last token's row comes from a forward after the reply ended
            expected = full[layer][0, :, step.position, : step.position + 1].numpy()
            np.testing.assert_allclose(step.attention[row].astype(np.float32), expected, atol=2e-3)
