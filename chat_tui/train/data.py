"""Training data: plain text, JSONL conversations, chatterbot-corpus YAML.

Every problem with a file is a DataError naming the file (and line or byte offset).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from chat_tui.engine.types import ROLES, Message
from chat_tui.errors import first_line

TEXT_SUFFIXES = {".txt", ".md", ".text", ""}
CONVERSATION_SUFFIXES = {".jsonl", ".yml", ".yaml"}


class DataError(ValueError):
    """Bad training data, with one line that names the file and what is wrong."""


def iter_files(paths: Iterable[str | Path], suffixes: set[str] | None = None) -> Iterator[Path]:
    """Files named directly, and files inside named folders (sorted, so runs are reproducible)."""
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise DataError(f"{path}: no such file or folder")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            if suffixes is not None:
                found = [p for p in found if p.suffix.lower() in suffixes]
            if not found:
                raise DataError(f"{path}: folder holds no usable files")
            yield from found
        else:
            yield path


def read_utf8(path: Path) -> str:
    data = path.read_bytes()
    if not data.strip():
        raise DataError(f"{path}: file is empty")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (bad byte 0x{data[exc.start]:02x} at offset {exc.start})") from None


def read_texts(paths: Iterable[str | Path]) -> list[tuple[Path, str]]:
    return [(p, read_utf8(p)) for p in iter_files(paths)]


def load_jsonl_conversations(path: Path) -> list[list[Message]]:
    conversations = []
    for number, line in enumerate(read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not JSON ({exc.msg})") from None
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages:
            raise DataError(f'{path}:{number}: not a conversation (expected {{"messages": [{{"role": …, "content": …}}]}})')
        conversation = []
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"{path}:{number}: each message needs a role ({', '.join(ROLES)}) and a string content")
            conversation.append(Message(m["role"], m["content"]))
        if not any(m.role == "assistant" for m in conversation):
            raise DataError(f"{path}:{number}: conversation has no assistant message to learn from")
        conversations.append(conversation)
    return conversations


def load_chatterbot_yaml(path: Path) -> list[list[Message]]:
    """A chatterbot-corpus file: each conversation alternates user, assistant, user, …"""
    import yaml

    try:
        data = yaml.safe_load(read_utf8(path))
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: not valid YAML ({first_line(exc)})") from None
    if not isinstance(data, dict) or not isinstance(data.get("conversations"), list):
        raise DataError(f"{path}: not a chatterbot-corpus file (no 'conversations' list)")
    conversations = []
    for turns in data["conversations"]:
        if not isinstance(turns, list):
            continue
        texts = [str(t).strip() for t in turns if t is not None and str(t).strip()]
        if len(texts) < 2:
            continue
        conversations.append([Message("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(texts)])
    return conversations


def load_conversations(paths: Iterable[str | Path]) -> list[list[Message]]:
    conversations: list[list[Message]] = []
    for path in iter_files(paths, CONVERSATION_SUFFIXES):
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            conversations.extend(load_jsonl_conversations(path))
        elif suffix in (".yml", ".yaml"):
            conversations.extend(load_chatterbot_yaml(path))
        else:
            raise DataError(f"{path}: unknown conversation format (use .jsonl or chatterbot .yml)")
    if not conversations:
        raise DataError("no conversations found in " + ", ".join(str(p) for p in paths))
    return conversations


def chatterbot_corpus_dir() -> Path:
    try:
        import chatterbot_corpus
    except ImportError:
        raise DataError("the chatterbot-corpus package is not installed: pip install 'chat-tui[train]'") from None
    return Path(chatterbot_corpus.__file__).resolve().parent / "data"


def conversation_text(conversation: list[Message]) -> str:
    """A conversation as plain lines, for pretraining on raw text."""
    return "\n".join(m.content for m in conversation) + "\n"
