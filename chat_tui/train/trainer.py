"""A first trainer: pretraining by next-token prediction, then chat fine-tuning with the loss mask.

Enough to make the bundled model from scratch, reproducibly (`chat-tui train bundled`).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from chat_tui.engine.checkpoint import load_model, save_checkpoint
from chat_tui.engine.model import GPT, GPTConfig
from chat_tui.engine.params import SamplingParams
from chat_tui.engine.tokenizer import ChatTokenizer, train_tokenizer
from chat_tui.engine.types import Message
from chat_tui.train.data import DataError, chatterbot_corpus_dir, conversation_text, load_chatterbot_yaml


@dataclass
class OptimConfig:
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 250
    seed: int = 1337


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # inputs, targets, loss mask


class TokenStream:
    """Random windows of block_size + 1 tokens from one long array (pretraining)."""

    def __init__(self, ids: list[int], block_size: int, seed: int) -> None:
        if len(ids) < block_size + 2:
            raise DataError(f"the text has {len(ids)} tokens, fewer than the context ({block_size}) + 2")
        self.data = torch.tensor(ids, dtype=torch.long)
        self.block_size = block_size
        self.generator = torch.Generator().manual_seed(seed)

    def batch(self, batch_size: int) -> Batch:
        starts = torch.randint(len(self.data) - self.block_size - 1, (batch_size,), generator=self.generator)
        offsets = torch.arange(self.block_size + 1)
        rows = self.data[starts.unsqueeze(1) + offsets]
        return rows[:, :-1], rows[:, 1:], None


class PackedConversations:
    """Chat-formatted conversations packed into rows of block_size; loss only on assistant tokens."""

    def __init__(self, rendered: list[tuple[list[int], list[int]]], block_size: int, seed: int) -> None:
        if not rendered:
            raise DataError("no conversations to fine-tune on")
        self.items = [(ids[: block_size + 1], mask[: block_size + 1]) for ids, mask in rendered]
        self.block_size = block_size
        self.rng = random.Random(seed)
        self.rows: list[tuple[list[int], list[int]]] = []

    def _refill(self) -> None:
        order = list(range(len(self.items)))
        self.rng.shuffle(order)
        ids: list[int] = []
        mask: list[int] = []
        width = self.block_size + 1
        for i in order:
            item_ids, item_mask = self.items[i]
            if len(ids) + len(item_ids) > width and ids:
                self.rows.append((ids, mask))
                ids, mask = [], []
            ids = ids + item_ids
            mask = mask + item_mask
        if ids:
            self.rows.append((ids, mask))

    def batch(self, batch_size: int) -> Batch:
        while len(self.rows) < batch_size:
            self._refill()
        picked, self.rows = self.rows[:batch_size], self.rows[batch_size:]
        width = max(len(ids) for ids, _ in picked)
        x = torch.zeros(batch_size, width - 1, dtype=torch.long)
        y = torch.full((batch_size, width - 1), -1, dtype=torch.long)
        m = torch.zeros(batch_size, width - 1, dtype=torch.float32)
        for r, (ids, mask) in enumerate(picked):
            n = len(ids) - 1
            x[r, :n] = torch.tensor(ids[:-1])
            y[r, :n] = torch.tensor(ids[1:])
            m[r, :n] = torch.tensor(mask[1:], dtype=torch.float32)  # mask of the predicted token
        return x, y, m


def train(
    model: GPT,
    source: TokenStream | PackedConversations,
    cfg: OptimConfig,
    *,
    evaluate: Callable[[], float] | None = None,
    log: Callable[[dict], None] | None = None,
) -> list[dict]:
    """The loop: AdamW, warm-up + cosine, clipping; fp32 on the CPU. Returns the logged metrics."""
    torch.manual_seed(cfg.seed)
    optimizer = model.configure_optimizer(cfg.weight_decay, cfg.lr)
    model.train()
    history = []
    started = time.perf_counter()
    tokens = 0
    for step in range(cfg.steps):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y, mask = source.batch(cfg.batch_size)
        _, loss, _ = model(x, y, loss_mask=mask)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}: stopping")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        tokens += x.numel()
        last = step == cfg.steps - 1
        if step % 50 == 0 or last or (evaluate and step % cfg.eval_every == 0):
            entry = {"step": step, "loss": round(loss.item(), 4), "lr": lr,
                     "tokens_per_s": round(tokens / (time.perf_counter() - started))}
            if evaluate is not None and (step % cfg.eval_every == 0 or last):
                model.eval()
                entry["val_loss"] = round(evaluate(), 4)
                model.train()
            history.append(entry)
            if log:
                log(entry)
    model.eval()
    return history


# --- the bundled model -----------------------------------------------------------------------------

BUNDLED_CONFIG = GPTConfig(vocab_size=4096, block_size=512, n_layer=4, n_head=4, n_embd=256, dropout=0.0)
BUNDLED_SFT_LANGUAGES = ("english", "chinese")
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a friendly chatbot.",
    "You are chat-tui's small model. Answer briefly.",
    "你是一个乐于助人的助手。",
)
BUNDLED_DEFAULTS = SamplingParams(temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.1, max_new_tokens=64)


def corpus_conversations(languages: tuple[str, ...] | None = None) -> dict[str, list[list[Message]]]:
    root = chatterbot_corpus_dir()
    result = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if languages is not None and folder.name not in languages:
            continue
        conversations = []
        for path in sorted(folder.glob("*.yml")):
            conversations.extend(load_chatterbot_yaml(path))
        result[folder.name] = conversations
    return result


def with_system_prompts(conversations: list[list[Message]], rng: random.Random, share: float) -> list[list[Message]]:
    """Some copies get a system prompt, so the model learns to answer with or without one."""
    out = []
    for conversation in conversations:
        out.append(conversation)
        if rng.random() < share:
            out.append([Message("system", rng.choice(SYSTEM_PROMPTS)), *conversation])
    return out


def build_bundled(out: Path, *, pretrain_steps: int = 300, sft_steps: int = 700, sft2_steps: int = 600,
                  sft3_steps: int = 400, log: Callable[[str], None] = print) -> Path:
    """Train the bundled mini-GPT from scratch on the chatterbot corpus (all offline)."""
    rng = random.Random(1337)
    torch.manual_seed(1337)
    by_language = corpus_conversations()
    pretrain_text = [conversation_text(c) for convs in by_language.values() for c in convs]
    sft = [c for lang in BUNDLED_SFT_LANGUAGES for c in by_language[lang]]
    log(f"corpus: {sum(len(v) for v in by_language.values())} conversations in {len(by_language)} languages; "
        f"{len(sft)} for fine-tuning ({', '.join(BUNDLED_SFT_LANGUAGES)})")

    cfg = BUNDLED_CONFIG
    tokenizer = ChatTokenizer(train_tokenizer(pretrain_text, cfg.vocab_size))
    model = GPT(cfg)
    log(f"model: {model.num_params():,} parameters; tokenizer: {tokenizer.vocab_size} tokens")

    # 1. Pretraining: next-token prediction on the raw text of every conversation, all languages.
    ids: list[int] = []
    texts = pretrain_text[:]
    rng.shuffle(texts)
    for text in texts:
        ids.extend(tokenizer.encode(text))
    split = int(len(ids) * 0.95)
    train_stream = TokenStream(ids[:split], cfg.block_size, seed=1)
    val_stream = TokenStream(ids[split:], cfg.block_size, seed=2)
    log(f"pretraining on {split:,} tokens, validating on {len(ids) - split:,}")

    def val_loss() -> float:
        with torch.no_grad():
            losses = [model(*val_stream.batch(8)[:2])[1].item() for _ in range(4)]
        return sum(losses) / len(losses)

    def show(entry: dict) -> None:
        log("  " + "  ".join(f"{k} {v}" for k, v in entry.items()))

    log("pretraining")
    pre_metrics = train(model, train_stream, OptimConfig(steps=pretrain_steps, batch_size=8, lr=1e-3, warmup=100),
                        evaluate=val_loss, log=show)

    # 2. Fine-tuning on dialogues: loss on the replies only (a first round at a gentle rate).
    conversations = with_system_prompts(sft, rng, share=0.3)
    rendered = [tokenizer.render_conversation(c, add_generation_prompt=False)[:2] for c in conversations]
    log(f"fine-tuning on {len(rendered)} conversations ({sum(len(r[0]) for r in rendered):,} tokens)")
    packed = PackedConversations(rendered, cfg.block_size, seed=3)
    sft_metrics = train(model, packed, OptimConfig(steps=sft_steps, batch_size=8, lr=5e-4, min_lr=5e-5, warmup=50,
                                                   eval_every=10**9), log=show)
    log_data = {"config": asdict(cfg), "pretrain": pre_metrics, "sft": sft_metrics}
    # 3. A second, longer round that makes the replies stick, and 4. a gentler third one that also
    #    shows the prompts lower-cased and without end punctuation ("what is ai" as "What is AI?").
    #    Each round has its own seeds, so rounds 2-3 can also run on a saved checkpoint (`finish_bundled`).
    log_data["sft_round_2"] = finetune_round(model, tokenizer, sft, 2, sft2_steps, log=show)
    log_data["sft_round_3"] = finetune_round(model, tokenizer, sft, 3, sft3_steps, log=show)
    _save_bundled(out, model, tokenizer, log_data)
    log(f"saved {out}")
    return out


ROUNDS = {  # round: (learning rate, final rate, warm-up, system-prompt seed, packing seed, optimiser seed, casual)
    2: (1e-3, 1e-4, 30, 2, 4, 7, False),
    3: (5e-4, 5e-5, 30, 11, 11, 11, True),
}


def casual_variants(conversations: list[list[Message]]) -> list[list[Message]]:
    """Copies whose user turns are typed casually: lower-case, no final punctuation."""
    out = []
    for conversation in conversations:
        casual = [
            Message(m.role, m.content.lower().rstrip("?!.。？！ ")) if m.role == "user" else m
            for m in conversation
        ]
        if casual != conversation and all(m.content for m in casual):
            out.append(casual)
    return out


def finetune_round(model: GPT, tokenizer: ChatTokenizer, sft: list[list[Message]], round_: int, steps: int,
                   log: Callable[[dict], None] | None = None) -> list[dict]:
    lr, min_lr, warmup, prompt_seed, pack_seed, optim_seed, casual = ROUNDS[round_]
    conversations = sft + casual_variants(sft) if casual else sft
    conversations = with_system_prompts(conversations, random.Random(prompt_seed), share=0.3)
    rendered = [tokenizer.render_conversation(c, add_generation_prompt=False)[:2] for c in conversations]
    packed = PackedConversations(rendered, model.config.block_size, seed=pack_seed)
    return train(model, packed, OptimConfig(steps=steps, batch_size=8, lr=lr, min_lr=min_lr, warmup=warmup,
                                            eval_every=10**9, seed=optim_seed), log=log)


def finish_bundled(saved: Path, out: Path, *, rounds: tuple[int, ...] = (2, 3), steps: dict[int, int] | None = None,
                   log: Callable[[str], None] = print) -> Path:
    """Run the later fine-tuning rounds on a checkpoint saved after the earlier ones (same result as one go)."""
    steps = {2: 600, 3: 400, **(steps or {})}
    model, tokenizer, _ = load_model(saved)
    sft = [c for lang in BUNDLED_SFT_LANGUAGES for c in corpus_conversations(BUNDLED_SFT_LANGUAGES)[lang]]
    log_path = saved / "training_log.json"
    log_data = json.loads(log_path.read_text()) if log_path.is_file() else {}
    for round_ in rounds:
        log(f"fine-tuning round {round_}")
        log_data[f"sft_round_{round_}"] = finetune_round(
            model, tokenizer, sft, round_, steps[round_],
            log=lambda e: log("  " + "  ".join(f"{k} {v}" for k, v in e.items())),
        )
    _save_bundled(out, model, tokenizer, log_data)
    return out


def _save_bundled(out: Path, model: GPT, tokenizer: ChatTokenizer, log_data: dict) -> None:
    save_checkpoint(out, model, tokenizer, BUNDLED_DEFAULTS,
                    extra_config={"trained_by": "chat-tui train bundled", "data": "chatterbot-corpus"})
    (out / "training_log.json").write_text(json.dumps(log_data, indent=1) + "\n")
    load_model(out)  # prove the folder loads
