"""Weight layout conversions between our mini-GPT and Hugging Face's GPT-2.

Same names and shapes, except that GPT-2's four projections per block are `Conv1D` (in, out)
where ours are `nn.Linear` (out, in): a transpose each, nothing else.
"""

from __future__ import annotations

import torch

from chat_tui.engine.model import GPT, GPTConfig

TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        state[name] = tensor.t().contiguous() if name.endswith(TRANSPOSED) else tensor.clone()
    return state


def hf_gpt2_config(config: GPTConfig, **extra):
    """The `transformers.GPT2Config` that describes the same network."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=4 * config.n_embd,
        # GPT-2's tanh approximation is "gelu_new" in transformers; "gelu" is the exact one
        activation_function="gelu_new" if config.activation == "gelu_tanh" else "gelu",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=config.layer_norm_epsilon,
        tie_word_embeddings=True,
        **extra,
    )


def to_hf_model(model: GPT, **config_extra):
    """A `transformers.GPT2LMHeadModel` holding exactly our weights."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel(hf_gpt2_config(model.config, **config_extra))
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    # GPT-2 keeps non-persistent attention buffers; anything else missing is a real mismatch
    real_missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if real_missing or unexpected:
        raise ValueError(f"layout mismatch: missing {real_missing[:3]}, unexpected {unexpected[:3]}")
    hf.tie_weights()
    return hf.eval()
