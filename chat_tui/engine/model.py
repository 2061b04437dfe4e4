"""The mini-GPT: GPT-2's architecture in one file, top to bottom, in the manner of nanoGPT.

`GPT.forward` is the reference for the network's maths: training, evaluation and the explain view
(`capture=True`) run it. The two decoders in `chat_tui.engine.minigpt` (numpy on the CPU, torch on a
GPU) are the only other copies, each written for decoding and tested equal to it.

Parameter names and shapes follow `transformers.GPT2LMHeadModel` (`transformer.h.0.attn.c_attn.weight`,
...). Our projections are `nn.Linear` (out, in); GPT-2's are `Conv1D` (in, out), so exporting is a
transpose of the four projection matrices per block and nothing else.

Attention has two paths. The fast one calls `F.scaled_dot_product_attention`. The inspecting one
computes the scores explicitly and keeps, per layer, the queries, keys and values with the
pre-softmax (scaled) scores and the softmaxed weights, so the UI can show the real numbers. Both
give the same output.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
from torch.nn import functional as F

from chat_tui.engine.gptconfig import ACTIVATIONS, GPTConfig

__all__ = ["ACTIVATIONS", "GPT", "AttentionCapture", "GPTConfig", "KVCache", "token_losses"]


class KVCache:
    """Preallocated keys and values for every layer; decoding appends one position at a time.

    Kept outside the model (as in nanochat) so the model stays a pure function of its inputs.
    """

    def __init__(self, config: GPTConfig, batch_size: int = 1, device=None, dtype=torch.float32) -> None:
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, 2, batch_size, config.n_head, config.block_size, head_dim)
        self.kv = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled
        self.capacity = config.block_size

    def reset(self) -> None:
        self.length = 0

    def insert(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values for one layer; return all keys/values so far."""
        start, end = self.length, self.length + k.size(2)
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} positions > context length {self.capacity}")
        self.kv[layer, 0, :, :, start:end] = k
        self.kv[layer, 1, :, :, start:end] = v
        return self.kv[layer, 0, :, :, :end], self.kv[layer, 1, :, :, :end]


class AttentionCapture(NamedTuple):
    """One layer, kept by `GPT.forward(capture=True)`: its attention, each (B, heads, positions, ...),
    and the residual stream through the block, each (B, T, n_embd) (the inspector's lens,
    attribution and block views read these)."""

    q: torch.Tensor  # (B, heads, T, head_dim): the queries of the positions fed
    k: torch.Tensor  # (B, heads, S, head_dim): every key they see (with a cache: the past ones too, views of it)
    v: torch.Tensor  # (B, heads, S, head_dim)
    scores: torch.Tensor  # (B, heads, T, S): (q · k) / √head_dim, -inf where causality masks
    weights: torch.Tensor  # (B, heads, T, S): softmax(scores)
    heads: torch.Tensor | None = None  # (B, heads, T, head_dim): each head's output, before the projection
    resid_pre: torch.Tensor | None = None  # the block's input (layer 0: token + position embedding)
    ln_1: torch.Tensor | None = None
    attn_out: torch.Tensor | None = None  # after the output projection
    resid_mid: torch.Tensor | None = None  # resid_pre + attn_out
    ln_2: torch.Tensor | None = None
    mlp_out: torch.Tensor | None = None
    resid_post: torch.Tensor | None = None  # resid_mid + mlp_out: the block's output


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.head_dim = config.n_embd // config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # query, key, value for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.residual_projection = True  # GPT-2 scales its initialisation
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout

    def forward(self, x, layer: int = 0, cache: KVCache | None = None, capture: list | None = None,
                head_mask: torch.Tensor | None = None):
        """`head_mask` (heads,): each head's output is multiplied by it before the projection (0 knocks it out)."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.insert(layer, k, v)
        S = k.size(2)  # keys visible: the past plus these T positions

        if capture is None:
            # The fast path. One query with a cache sees every key: no mask needed.
            if T == 1 or past == 0:
                y = F.scaled_dot_product_attention(
                    q, k, v, is_causal=(T > 1), dropout_p=self.dropout if self.training else 0.0
                )
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_mask(T, S, past, x.device))
        else:
            # The inspecting path: the same computation, written out so its parts can be kept.
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # (B, nh, T, S)
            if T > 1:
                scores = scores.masked_fill(~_causal_mask(T, S, past, x.device), float("-inf"))
            weights = F.softmax(scores, dim=-1)
            y = self.attn_dropout(weights) @ v
        if head_mask is not None:  # heads knocked out: their outputs zeroed before the projection
            y = y * head_mask.view(1, -1, 1, 1).to(y.dtype)
        if capture is not None:
            capture.append(AttentionCapture(q, k, v, scores, weights, heads=y))
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


def _causal_mask(T: int, S: int, past: int, device) -> torch.Tensor:
    """True where query i (at position past + i) may look at key j: j <= past + i."""
    q_pos = torch.arange(past, past + T, device=device).unsqueeze(1)
    return torch.arange(S, device=device).unsqueeze(0) <= q_pos


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.approximate = ACTIVATIONS[config.activation]
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, layer: int = 0, cache: KVCache | None = None, capture: list | None = None,
                head_mask: torch.Tensor | None = None):
        ln_1 = self.ln_1(x)  # pre-LayerNorm, residual
        attn_out = self.attn(ln_1, layer, cache, capture, head_mask)
        mid = x + attn_out
        ln_2 = self.ln_2(mid)
        mlp_out = self.mlp(ln_2)
        out = mid + mlp_out
        if capture is not None:
            capture[-1] = capture[-1]._replace(resid_pre=x, ln_1=ln_1, attn_out=attn_out, resid_mid=mid, ln_2=ln_2,
                                               mlp_out=mlp_out, resid_post=out)
        return out


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_projection", False):
                std = 0.02 / math.sqrt(2 * self.config.n_layer)  # GPT-2: scale residual projections
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        capture: bool = False,
        loss_mask: torch.Tensor | None = None,
        last_only: bool = False,
        head_mask: torch.Tensor | None = None,
    ):
        """Logits for `idx` (B, T). With a cache, `idx` continues the cached positions.

        Returns (logits, loss, attention): `loss` when `targets` are given (averaged over the
        positions where `loss_mask` is 1, if given, else over the targets that are not -1);
        `attention` is a list per layer of `AttentionCapture` when `capture` is on, else None.
        `head_mask` (layers, heads): each head's output is multiplied by it (0 switches the head off).
        """
        B, T = idx.size()
        past = cache.length if cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens is longer than the context ({self.config.block_size})")
        pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        attention: list[AttentionCapture] | None = [] if capture else None
        for i, block in enumerate(self.transformer.h):
            x = block(x, i, cache, attention, None if head_mask is None else head_mask[i])
        if cache is not None:
            cache.length += T
        x = self.transformer.ln_f(x)

        if targets is None:
            logits = self.lm_head(x[:, -1:, :] if last_only else x)
            return logits, None, attention
        logits = self.lm_head(x)
        losses = token_losses(logits, targets)
        weight = (targets != -1) if loss_mask is None else loss_mask
        weight = weight.to(losses.dtype)
        loss = (losses * weight).sum() / weight.sum().clamp(min=1.0)
        return logits, loss, attention

    def configure_optimizer(self, weight_decay: float, learning_rate: float, betas=(0.9, 0.95)):
        """AdamW with weight decay on the matrices only (not biases, LayerNorms)."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=False)


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss: cross-entropy in nats at each position (B, T), in float32, 0 where the target is -1."""
    losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1,
                             reduction="none")
    return losses.view(targets.shape)
