"""What a token's bytes are, and how a token that is only part of a character is shown.

A byte-level BPE (GPT-2, Qwen, our mini-GPT) or SentencePiece's byte fallback (Llama, Mistral) can
split one character into tokens that are not UTF-8 on their own: "你" is E4 BD A0, often two or three
tokens. Decoded alone, each of those is U+FFFD, so every fragment would look the same. Here a
fragment is shown as its bytes, `<0xE4>`, and `label_bytes` reads such a label back (the OpenAI
server needs each token's real bytes for `logprobs`).
"""

from __future__ import annotations

import re


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet back to bytes (the printable stand-in of each byte)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    stand_in = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in stand_in:
            stand_in[b] = chr(256 + n)
            n += 1
    return {c: b for b, c in stand_in.items()}


_BYTE_LEVEL = _byte_level_decoder()
_BYTE_LEVEL_CHAR = {b: c for c, b in _BYTE_LEVEL.items()}
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_BYTE_LABEL = re.compile(r"(?:<0x[0-9A-F]{2}>)+")


def piece_bytes(piece: str, byte_level: bool) -> bytes:
    """The bytes a token's vocabulary string stands for: byte-level BPE's stand-ins, SentencePiece's
    `<0xE4>` byte fallback and ▁ for a space, else the string itself in UTF-8."""
    if byte_level and all(c in _BYTE_LEVEL for c in piece):
        return bytes(_BYTE_LEVEL[c] for c in piece)
    fallback = _BYTE_FALLBACK.fullmatch(piece)
    if fallback:
        return bytes([int(fallback.group(1), 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


def byte_level_string(data: bytes) -> str:
    """Bytes in GPT-2's byte-level alphabet (what `convert_ids_to_tokens` gives for a byte-level BPE)."""
    return "".join(_BYTE_LEVEL_CHAR[b] for b in data)


def is_byte_level(tokenizer: object) -> bool:
    """Whether a `tokenizers.Tokenizer` is a byte-level BPE (its vocabulary strings are byte stand-ins)."""
    parts = (getattr(tokenizer, "pre_tokenizer", None), getattr(tokenizer, "decoder", None))
    return any("ByteLevel" in type(part).__name__ for part in parts)


def fragment_label(data: bytes) -> str:
    """Bytes that are not a whole character, as `<0xE4><0xBD>`."""
    return "".join(f"<0x{b:02X}>" for b in data)


def bytes_label(data: bytes) -> str:
    """A token's bytes as text: the characters they are, or `<0xE4>` labels when they are not UTF-8 alone."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return fragment_label(data)


def token_label(decoded: str, piece: str | None, byte_level: bool) -> str:
    """A token's text for tables: `decoded` (the tokenizer's decode of it alone), unless that lost
    bytes to U+FFFD, in which case the token's own bytes (from its vocabulary `piece`) as `<0xE4>`."""
    if "\ufffd" not in decoded or piece is None:
        return decoded
    return bytes_label(piece_bytes(piece, byte_level))


def label_bytes(label: str) -> bytes:
    """A token label's bytes: `<0xE4><0xBD>` back to E4 BD, any other text in UTF-8."""
    if _BYTE_LABEL.fullmatch(label):
        return bytes(int(label[i + 3:i + 5], 16) for i in range(0, len(label), 6))
    return label.encode("utf-8", errors="replace")
