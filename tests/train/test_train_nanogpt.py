"""`chat-tui import nanogpt`: a checkpoint built here in nanoGPT's own layout becomes a chat-tui model."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.nn import functional as F

from chat_tui.cli import main
from chat_tui.engine import Message, SamplingParams, collect, load_engine
from chat_tui.engine.checkpoint import load_model
from chat_tui.engine.tokenizer import train_tokenizer

SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # nanoGPT's 65


# --- nanoGPT's model, as in its model.py (bias optional, exact GELU, tied lm_head) ------------------------------


class LayerNorm(nn.Module):
    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class NanoAttention(nn.Module):
    def __init__(self, n_embd, n_head, block_size, bias):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.n_head, self.n_embd = n_head, n_embd
        # nanoGPT without flash attention keeps its causal mask as a buffer named "bias"
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        y = F.softmax(att, dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class NanoBlock(nn.Module):
    def __init__(self, n_embd, n_head, block_size, bias):
        super().__init__()
        self.ln_1 = LayerNorm(n_embd, bias)
        self.attn = NanoAttention(n_embd, n_head, block_size, bias)
        self.ln_2 = LayerNorm(n_embd, bias)
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(n_embd, 4 * n_embd, bias=bias),
                                      c_proj=nn.Linear(4 * n_embd, n_embd, bias=bias)))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x))))  # nn.GELU(): exact erf


class NanoGPT(nn.Module):
    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd, bias):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd),
            wpe=nn.Embedding(block_size, n_embd),
            h=nn.ModuleList([NanoBlock(n_embd, n_head, block_size, bias) for _ in range(n_layer)]),
            ln_f=LayerNorm(n_embd, bias),
        ))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        for p in self.parameters():
            nn.init.normal_(p, std=0.3)  # larger than nanoGPT's init, so a layout mistake shows in the logits

    def forward(self, idx):
        pos = torch.arange(idx.size(1))
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def nanogpt_checkpoint(folder: Path, *, bias: bool, vocab_size: int = 65, compiled: bool = True, meta: bool = True):
    torch.manual_seed(0)
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=bias, vocab_size=vocab_size, dropout=0.0)
    model = NanoGPT(vocab_size, 32, 2, 2, 32, bias)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    loss = model(torch.randint(0, vocab_size, (2, 8))).logsumexp(-1).mean()
    loss.backward()
    optimizer.step()
    state = model.state_dict()
    if compiled:  # nanoGPT saves torch.compile'd models with this prefix
        state = {f"_orig_mod.{k}": v for k, v in state.items()}
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "optimizer": optimizer.state_dict(), "model_args": args, "iter_num": 250,
                "best_val_loss": torch.tensor(1.4697), "config": {"dataset": "shakespeare_char", "batch_size": 12}},
               folder / "ckpt.pt")
    if meta:
        itos = dict(enumerate(SHAKESPEARE_CHARS))
        with open(folder / "meta.pkl", "wb") as f:
            pickle.dump({"vocab_size": 65, "itos": itos, "stoi": {c: i for i, c in itos.items()}}, f)
    return model


@pytest.mark.parametrize("bias", [False, True])
def test_import_gives_the_same_predictions_as_nanogpt(tmp_path, capsys, bias):
    reference = nanogpt_checkpoint(tmp_path / "out-shakespeare-char", bias=bias)
    out = tmp_path / "imported"
    code = main(["import", "nanogpt", str(tmp_path / "out-shakespeare-char" / "ckpt.pt"), str(out)])
    assert code == 0, capsys.readouterr().err
    model, tokenizer, _ = load_model(out)
    text = "ROMEO:\nBut soft, what light"
    ids = tokenizer.encode(text)
    assert ids == [SHAKESPEARE_CHARS.index(c) for c in text]  # nanoGPT's own character ids
    x = torch.tensor([ids])
    with torch.no_grad():
        ours = model(x)[0][0, :, :65]
        theirs = reference(x)[0]
    # the imported config keeps nanoGPT's exact (erf) GELU, so the logits are the same
    assert model.config.activation == "gelu"
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert model.config.vocab_size == 70 and tokenizer.vocab_size == 70  # 65 characters + 5 chat tokens


def test_an_imported_character_model_chats(tmp_path):
    nanogpt_checkpoint(tmp_path / "n", bias=False, compiled=False)
    out = tmp_path / "imported"
    assert main(["import", "nanogpt", str(tmp_path / "n" / "ckpt.pt"), "--meta", str(tmp_path / "n" / "meta.pkl"),
                 str(out)]) == 0
    engine = load_engine(out, device="cpu")
    steps = list(engine.stream([Message("user", "ROMEO:")], SamplingParams(max_new_tokens=10, seed=0)))
    assert steps and set("".join(s.text for s in steps)) <= set(SHAKESPEARE_CHARS)


def test_the_appended_chat_tokens_are_listed_as_untrained_and_the_model_talks_raw(tmp_path):
    nanogpt_checkpoint(tmp_path / "n", bias=False)
    out = tmp_path / "imported"
    assert main(["import", "nanogpt", str(tmp_path / "n" / "ckpt.pt"), str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["untrained_token_ids"] == [65, 66, 67, 68, 69]  # appended after nanoGPT's 65 characters
    assert sorted(load_model(out)[1].special_ids.values()) == [65, 66, 67, 68, 69]
    # a base model continues what you typed: the prompt is the typed characters, no roles, no chat tokens
    engine = load_engine(out, device="cpu")
    assert engine.chat_format == "raw"
    typed = "ROMEO:\nBut soft"
    reply = collect(engine.stream([Message("user", typed)], SamplingParams(max_new_tokens=2, seed=0)))
    assert reply.prompt.ids == [SHAKESPEARE_CHARS.index(c) for c in typed]


def test_a_fine_tune_trains_the_chat_tokens_so_its_checkpoint_drops_the_list(tmp_path):
    nanogpt_checkpoint(tmp_path / "n", bias=False)
    base = tmp_path / "imported"
    assert main(["import", "nanogpt", str(tmp_path / "n" / "ckpt.pt"), str(base)]) == 0
    dialogues = tmp_path / "chat.jsonl"
    lines = [{"messages": [{"role": "user", "content": f"Speak {i}"}, {"role": "assistant", "content": "Speak, speak."}]}
             for i in range(12)]
    dialogues.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    out = tmp_path / "sft"
    assert main(["train", "sft", "--from", str(base), "--data", str(dialogues), "--out", str(out), "--max-steps", "4",
                 "--eval-every", "2", "--eval-iters", "1", "--batch-size", "2", "--quiet"]) == 0
    for folder in (out, out / "best"):
        assert "untrained_token_ids" not in json.loads((folder / "config.json").read_text())
    assert load_engine(out, device="cpu").chat_format == "minigpt"  # it now talks in its chat tokens


def test_a_gpt2_token_model_imports_with_a_tokenizer_json(tmp_path, capsys):
    bpe = train_tokenizer(["the cat sat on the mat"] * 20, vocab_size=300)
    bpe.save(str(tmp_path / "tokenizer.json"))
    vocab = bpe.get_vocab_size() - 5 + 64  # like nanoGPT's 50304: padded past the tokenizer's own size
    nanogpt_checkpoint(tmp_path / "g", bias=True, vocab_size=vocab, meta=False)
    out = tmp_path / "imported"
    code = main(["import", "nanogpt", str(tmp_path / "g" / "ckpt.pt"), "--tokenizer", str(tmp_path / "tokenizer.json"),
                 str(out)])
    assert code == 0, capsys.readouterr().err
    model, tokenizer, _ = load_model(out)
    assert model.config.vocab_size == vocab  # the chat tokens fit in the padding rows
    assert tokenizer.decode(tokenizer.encode("the cat")) == "the cat"
    # the padding rows never learned the chat tokens either
    config = json.loads((out / "config.json").read_text())
    assert config["untrained_token_ids"] == sorted(tokenizer.special_ids.values())


def test_a_gpt2_token_model_without_a_vocabulary_is_one_clear_line(tmp_path, capsys, monkeypatch):
    from chat_tui.train import nanogpt

    monkeypatch.setattr(nanogpt, "_gpt2_tokenizer", lambda tokenizer: None)  # no GPT-2 tokenizer cached here
    nanogpt_checkpoint(tmp_path / "g", bias=True, vocab_size=320, meta=False)
    code = main(["import", "nanogpt", str(tmp_path / "g" / "ckpt.pt"), str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "--meta" in err and "--tokenizer" in err


class Boom:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/chat-tui-test-nanogpt-pwned")


def test_a_hostile_meta_pkl_is_refused_and_never_runs(tmp_path, capsys):
    MARKER.unlink(missing_ok=True)
    nanogpt_checkpoint(tmp_path / "n", bias=False, meta=False)
    hostile = tmp_path / "n" / "meta.pkl"
    with open(hostile, "wb") as f:
        pickle.dump({"vocab_size": 65, "itos": {0: "a"}, "evil": Boom()}, f)
    code = main(["import", "nanogpt", str(tmp_path / "n" / "ckpt.pt"), str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "refused" in err and "only dicts, strings and integers" in err and "os" in err
    assert not MARKER.exists()
    with open(hostile, "wb") as f:  # plain data of another type is refused too
        pickle.dump({"vocab_size": 65, "itos": {0: "a"}, "weights": [1.5, 2.5]}, f)
    assert main(["import", "nanogpt", str(tmp_path / "n" / "ckpt.pt"), str(tmp_path / "o")]) == 1
    assert "holds a list" in capsys.readouterr().err


class Payload:
    pass


def test_a_ckpt_that_needs_unpickling_code_is_refused(tmp_path, capsys):
    bad = tmp_path / "ckpt.pt"
    torch.save({"model": {"x": torch.zeros(1)}, "model_args": {"n_head": 1}, "extra": Payload()}, bad)
    code = main(["import", "nanogpt", str(bad), str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "refused" in err
    assert not (tmp_path / "o").exists()


def test_a_checkpoint_that_is_not_a_gpt_is_refused(tmp_path, capsys):
    odd = tmp_path / "ckpt.pt"
    torch.save({"model": {"encoder.weight": torch.zeros(4, 4)}, "model_args": {"n_head": 1}}, odd)
    assert main(["import", "nanogpt", str(odd), str(tmp_path / "o")]) == 1
    assert "not a nanoGPT GPT" in capsys.readouterr().err
