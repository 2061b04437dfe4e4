"""The mini-GPT's shape, torch-free: the config and the tensors it implies.

Both the torch model (`chat_tui.engine.model`) and the numpy decoder (`chat_tui.engine.minigpt`)
read it, so a checkpoint can be checked and run on the CPU without importing torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

ACTIVATIONS = {"gelu_tanh": "tanh", "gelu": "none"}  # name -> F.gelu's `approximate`


@dataclass
class GPTConfig:
    vocab_size: int = 8192
    block_size: int = 256  # the context length
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5
    activation: str = "gelu_tanh"  # GPT-2's tanh approximation; "gelu" (exact, erf) for nanoGPT imports

    def to_dict(self) -> dict:
        return {"model_type": "chat-tui-minigpt", **asdict(self)}


def parameter_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """The stored tensors' names and shapes (GPT's state dict without the tied `lm_head.weight`)."""
    C, V = config.n_embd, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (V, C),
        "transformer.wpe.weight": (config.block_size, C),
    }
    for i in range(config.n_layer):
        block = f"transformer.h.{i}."
        shapes.update({
            block + "ln_1.weight": (C,), block + "ln_1.bias": (C,),
            block + "attn.c_attn.weight": (3 * C, C), block + "attn.c_attn.bias": (3 * C,),
            block + "attn.c_proj.weight": (C, C), block + "attn.c_proj.bias": (C,),
            block + "ln_2.weight": (C,), block + "ln_2.bias": (C,),
            block + "mlp.c_fc.weight": (4 * C, C), block + "mlp.c_fc.bias": (4 * C,),
            block + "mlp.c_proj.weight": (C, 4 * C), block + "mlp.c_proj.bias": (C,),
        })
    shapes["transformer.ln_f.weight"] = (C,)
    shapes["transformer.ln_f.bias"] = (C,)
    return shapes
