"""Character-level tokenizers, expressed as ordinary `tokenizers` files.

A character vocabulary becomes a `tokenizers` BPE model with one token per character and no
merges (so encoding is one id per character) and a `Fuse` decoder (so decoding concatenates),
plus the five chat special tokens. The result is a normal `tokenizer.json`: `ChatTokenizer` loads
it like any other, so a character model chats and is inspected like a BPE one.

Characters the vocabulary has never seen are dropped when encoding (a character model cannot
represent them); training data always encodes completely, because the vocabulary is built from it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from tokenizers import Tokenizer, decoders, models

from chat_tui.engine.tokenizer import SPECIAL_TOKENS, ChatTokenizer

CHAR_TOKENIZER_MARK = "chat-tui-char"


def _build(vocab: dict[str, int]) -> ChatTokenizer:
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return ChatTokenizer(tokenizer)


def char_tokenizer(texts: Iterable[str]) -> ChatTokenizer:
    """Special tokens at ids 0..4, then every distinct character of `texts`, sorted."""
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(chars):
        vocab[ch] = len(vocab)
    return _build(vocab)


def char_tokenizer_from_itos(itos: Mapping[int, str]) -> ChatTokenizer:
    """nanoGPT's vocabulary kept at its own ids (0..n-1), the special tokens appended after it."""
    n = len(itos)
    if sorted(itos) != list(range(n)):
        raise ValueError("the character vocabulary's ids are not 0..n-1")
    vocab: dict[str, int] = {}
    for i in range(n):
        ch = itos[i]
        if not isinstance(ch, str) or len(ch) != 1:
            raise ValueError(f"vocabulary entry {i} is {ch!r}, not one character")
        if ch in vocab:
            raise ValueError(f"character {ch!r} appears twice in the vocabulary")
        vocab[ch] = i
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    return _build(vocab)


def is_char_tokenizer(tokenizer: ChatTokenizer) -> bool:
    """True for a tokenizer whose every ordinary token is exactly one character."""
    specials = set(SPECIAL_TOKENS)
    vocab = tokenizer.tokenizer.get_vocab(with_added_tokens=True)
    return all(len(token) == 1 for token in vocab if token not in specials)


class CharEncoder:
    """Fast encoding of large training texts with a character tokenizer (same ids as `encode`)."""

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        specials = set(SPECIAL_TOKENS)
        vocab = tokenizer.tokenizer.get_vocab(with_added_tokens=True)
        self.stoi = {token: i for token, i in vocab.items() if token not in specials}
        self.lookup = np.full(0x110000, -1, dtype=np.int64)
        for ch, i in self.stoi.items():
            self.lookup[ord(ch)] = i

    def encode(self, text: str) -> np.ndarray:
        codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = self.lookup[codepoints]
        return ids[ids >= 0]
