"""The tokens view for a model on a server (issue #14): the server keeps the model, but its tokenizer
can often still be read.

1. The server's own `POST /tokenize` (vLLM's; `chat-tui serve` has it too), asked with
   `return_token_strs`: the ids and each token's vocabulary string, whose bytes are read back as a
   byte-level BPE's or SentencePiece's and checked to add up to the text.
2. Else the model's tokenizer where it is on this machine: the server's model id is an absolute
   folder (`transformers serve FOLDER`) or a hub id in the local Hugging Face cache. Loaded offline,
   without remote code.
3. Else one line saying why not.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from chat_tui.engine.inside import TokenPiece
from chat_tui.engine.token_bytes import bytes_label, is_byte_level, piece_bytes, token_label

Tokenize = Callable[[str], list[TokenPiece]]


def server_root(base_url: str) -> str:
    """The server's root, where vLLM puts /tokenize: the base URL without its /v1."""
    return re.sub(r"/v1/?$", "", base_url.rstrip("/"))


def pieces_from_strings(text: str, ids: Sequence[int], strings: Sequence[str]) -> list[TokenPiece] | None:
    """TokenPieces from a server's ids and vocabulary strings, if their bytes add up to `text` read as a
    byte-level BPE's (GPT-2, Qwen, Llama 3) or as SentencePiece's (▁ for a space, `<0xE4>` bytes; its
    leading space is the tokenizer's own and is dropped). None if neither reading gives the text."""
    target = text.encode("utf-8")
    for byte_level in (True, False):
        data = [piece_bytes(s, byte_level) for s in strings]
        joined = b"".join(data)
        if not byte_level and joined == b" " + target and data and data[0].startswith(b" "):
            data[0] = data[0][1:]
            joined = joined[1:]
        if joined == target:
            return _with_offsets(target, list(ids), data)
    return None


def _with_offsets(target: bytes, ids: list[int], data: list[bytes]) -> list[TokenPiece]:
    """Each token's characters: those its bytes fall in (a byte of a character covers that character)."""
    char_of_byte = [i for i, char in enumerate(target.decode("utf-8")) for _ in char.encode("utf-8")]
    pieces, at = [], 0
    for token_id, chunk in zip(ids, data, strict=True):
        if chunk:
            start, end = char_of_byte[at], char_of_byte[at + len(chunk) - 1] + 1
        else:
            start = end = char_of_byte[at] if at < len(char_of_byte) else len(target.decode("utf-8"))
        pieces.append(TokenPiece(id=int(token_id), text=bytes_label(chunk), data=chunk, start=start, end=end))
        at += len(chunk)
    return pieces


def local_tokenizer(model: str) -> Tokenize | None:
    """The tokens of `model`'s own tokenizer, if it is on this machine (an absolute folder, or a hub id in
    the Hugging Face cache) and `transformers` is installed; None otherwise. Never downloads."""
    folder = Path(model)
    if folder.is_absolute():
        if not (folder / "tokenizer_config.json").is_file() and not (folder / "tokenizer.json").is_file():
            return None
    elif not re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        return None  # "minigpt", "gpt-4o-mini": a server's own name, not a hub id
    try:
        from huggingface_hub import try_to_load_from_cache
        from transformers import AutoTokenizer
    except ImportError:
        return None
    if not folder.is_absolute() and not isinstance(try_to_load_from_cache(model, "tokenizer_config.json"), str):
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model), local_files_only=True, trust_remote_code=False)
    except Exception:  # noqa: BLE001 - a broken or partial cache: the view says why not instead
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    byte_level = is_byte_level(backend)

    def text_of(token_id: int) -> str:
        return token_label(tokenizer.decode([token_id]), tokenizer.convert_ids_to_tokens(token_id), byte_level)

    def tokenize(text: str) -> list[TokenPiece]:
        from chat_tui.engine.inside_maths import token_pieces

        return token_pieces(backend, text, text_of)

    return tokenize


def parse_tokenize_answer(text: str, answer: Any) -> list[TokenPiece] | None:
    """A /tokenize answer (`tokens`, `token_strs`) as TokenPieces, or None if it is not one we can read."""
    if not isinstance(answer, dict):
        return None
    ids, strings = answer.get("tokens"), answer.get("token_strs")
    if not (isinstance(ids, list) and isinstance(strings, list) and len(ids) == len(strings)):
        return None
    if not all(isinstance(i, int) for i in ids) or not all(isinstance(s, str) for s in strings):
        return None
    return pieces_from_strings(text, ids, strings)
