"""Tokenised training data: documents in, train/validation token arrays out, cached next to the run.

The split (documented in `chat-tui train pretrain --help` too):

- Pretraining. Every text file is one document, and so is every conversation of a JSONL or
  chatterbot file (as plain lines). With several documents their order is shuffled with the run's
  seed; the documents are tokenised and joined with `<|bos|>` between them, and the first
  (1 - val_fraction) of the tokens train while the last val_fraction validate. With one text file
  this is nanoGPT's split: the first 90% of the text trains, the last 10% validates.
- Fine-tuning. The conversations are shuffled with the seed; the last val_fraction of them
  (at least one) validate. Each conversation is rendered in the chat format with its loss mask
  (assistant tokens and their `<|end|>` only), cut to the context, and packed into rows.

Which windows or rows make up a batch is a pure function of (seed, step): a resumed run reads
exactly the batches the interrupted one would have read, and N processes reading their slices
of a step's global batch read exactly what one process would.

The tokenised arrays are cached beside the output folder, in OUT/../.chat-tui-data-cache/, keyed
by the files (path, size, mtime), the tokenizer and the split settings: a second run on the same
data (into the same or a sibling output folder, or resumed) starts at once.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chat_tui.engine.files import atomic_write_bytes
from chat_tui.engine.tokenizer import SPECIAL_TOKENS, ChatTokenizer, train_tokenizer
from chat_tui.train.data import (
    DataError,
    conversation_text,
    iter_files,
    load_chatterbot_yaml,
    load_conversations,
    load_jsonl_conversations,
    read_utf8,
)

CACHE_VERSION = 1
CACHE_DIR = ".chat-tui-data-cache"  # beside the output folder
MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS)


@dataclass
class PretrainData:
    tokenizer: ChatTokenizer
    train: np.ndarray  # 1-D token ids
    val: np.ndarray
    token_bytes: np.ndarray  # UTF-8 bytes each token id stands for (0 for special tokens)
    cache_dir: Path | None = None
    from_cache: bool = False
    documents: int = 0
    sources: list[str] = field(default_factory=list)


@dataclass
class SFTData:
    tokenizer: ChatTokenizer
    train_ids: np.ndarray  # (rows, block_size + 1), -1 where a row is padded
    train_mask: np.ndarray  # (rows, block_size + 1), 1 where the token is learned
    val_ids: np.ndarray
    val_mask: np.ndarray
    token_bytes: np.ndarray
    conversations: int = 0
    truncated: int = 0
    cache_dir: Path | None = None
    from_cache: bool = False


# --- reading documents ------------------------------------------------------------------------------


def read_documents(paths: list[str | Path]) -> list[tuple[Path, str]]:
    """(file, text) for every text file and every conversation (as plain lines)."""
    documents: list[tuple[Path, str]] = []
    for path in iter_files(paths):
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            documents.extend((path, conversation_text(c)) for c in load_jsonl_conversations(path))
        elif suffix in (".yml", ".yaml"):
            conversations = load_chatterbot_yaml(path)
            if not conversations:
                raise DataError(f"{path}: holds no conversations")
            documents.extend((path, conversation_text(c)) for c in conversations)
        else:
            documents.append((path, read_utf8(path)))
    if not documents:
        raise DataError("no training text in " + ", ".join(str(p) for p in paths))
    return documents


def _describe(paths: list[str | Path]) -> str:
    return str(paths[0]) if len(paths) == 1 else f"the data ({', '.join(str(p) for p in paths[:3])}{', …' if len(paths) > 3 else ''})"


def _fingerprint(paths: list[str | Path], **settings) -> str:
    files = []
    for path in iter_files(paths):
        stat = path.stat()
        files.append((str(path.resolve()), stat.st_size, stat.st_mtime_ns))
    blob = json.dumps({"version": CACHE_VERSION, "files": files, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _load_npy(path: Path) -> np.ndarray:
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65536 else np.uint32


def token_bytes(tokenizer: ChatTokenizer) -> np.ndarray:
    """How many bytes of UTF-8 text each token id stands for, for bits per byte."""
    from tokenizers import pre_tokenizers

    raw = tokenizer.tokenizer
    byte_level = json.loads(raw.to_str()).get("pre_tokenizer") or {}
    is_byte_level = byte_level.get("type") == "ByteLevel" or any(
        p.get("type") == "ByteLevel" for p in byte_level.get("pretokenizers", []) or []
    )
    alphabet = set(pre_tokenizers.ByteLevel.alphabet()) if is_byte_level else set()
    specials = set(SPECIAL_TOKENS)
    sizes = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for i in range(tokenizer.vocab_size):
        token = raw.id_to_token(i)
        if token is None or token in specials:
            continue
        if is_byte_level and all(ch in alphabet for ch in token):
            sizes[i] = len(token)  # one byte-level character per byte
        else:
            sizes[i] = len(token.encode("utf-8"))
    return sizes


# --- pretraining ------------------------------------------------------------------------------------


def make_tokenizer(kind: str, texts: list[str], vocab_size: int) -> ChatTokenizer:
    if kind == "char":
        from chat_tui.train.chartok import char_tokenizer

        return char_tokenizer(texts)
    if kind == "bpe":
        if vocab_size < MIN_BPE_VOCAB:
            raise DataError(f"--vocab-size {vocab_size} is too small for a byte-level BPE (at least {MIN_BPE_VOCAB})")
        return ChatTokenizer(train_tokenizer(texts, vocab_size))
    raise DataError(f"unknown tokenizer {kind!r} (use bpe or char)")


def encode_documents(tokenizer: ChatTokenizer, texts: list[str]) -> np.ndarray:
    """Token ids of the documents, `<|bos|>` between them."""
    from chat_tui.train.chartok import CharEncoder, is_char_tokenizer

    dtype = _token_dtype(tokenizer.vocab_size)
    parts: list[np.ndarray] = []
    char = CharEncoder(tokenizer) if is_char_tokenizer(tokenizer) else None
    for i, text in enumerate(texts):
        if i:
            parts.append(np.array([tokenizer.bos_id], dtype=dtype))
        if char is not None:
            parts.append(char.encode(text).astype(dtype))
        else:
            lines = text.splitlines(keepends=True)
            ids = [t for enc in tokenizer.tokenizer.encode_batch(lines, add_special_tokens=False) for t in enc.ids]
            parts.append(np.asarray(ids, dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def split_tokens(ids: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    n_train = int(len(ids) * (1.0 - val_fraction))
    return ids[:n_train], ids[n_train:]


def prepare_pretrain(
    paths: list[str | Path],
    *,
    tokenizer_kind: str = "bpe",
    vocab_size: int = 4096,
    block_size: int = 256,
    val_fraction: float = 0.1,
    seed: int = 1337,
    cache_root: Path | None = None,
    tokenizer: ChatTokenizer | None = None,
    log=None,
) -> PretrainData:
    """Read, tokenise (training a tokenizer unless one is given), split and cache the text."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"the validation fraction must be between 0 and 1, not {val_fraction}")
    paths = list(paths)
    if not paths:
        raise DataError("no data given (--data PATH…)")
    def key(tokenizer_key: str) -> str:
        return _fingerprint(paths, kind="pretrain", tokenizer=hashlib.sha256(tokenizer_key.encode()).hexdigest(),
                            val_fraction=val_fraction, seed=seed)

    # The cache of a fresh run is keyed by how its tokenizer is made; a resumed run passes the tokenizer
    # it saved, and reuses that cache only if it holds exactly that tokenizer.
    trained_key = key(f"{tokenizer_kind}:{vocab_size}")
    data = _load_pretrain_cache(cache_root / trained_key) if cache_root is not None else None
    cache_dir = cache_root / trained_key if cache_root is not None else None
    if tokenizer is not None and data is not None and data.tokenizer.tokenizer.to_str() != tokenizer.tokenizer.to_str():
        data = None
    if tokenizer is not None and data is None and cache_root is not None:
        cache_dir = cache_root / key(tokenizer.tokenizer.to_str())
        data = _load_pretrain_cache(cache_dir)
    if data is None:
        documents = read_documents(paths)
        texts = [text for _, text in documents]
        if len(texts) > 1:
            random.Random(seed).shuffle(texts)
        if tokenizer is None:
            if log:
                log(f"training a {tokenizer_kind} tokenizer on {sum(len(t) for t in texts):,} characters")
            tokenizer = make_tokenizer(tokenizer_kind, texts, vocab_size)
        ids = encode_documents(tokenizer, texts)
        train, val = split_tokens(ids, val_fraction)
        data = PretrainData(tokenizer, train, val, token_bytes(tokenizer), cache_dir, False, len(texts),
                            [str(p) for p in paths])
        if cache_dir is not None:
            _save_pretrain_cache(cache_dir, data)
    need = block_size + 1
    for name, split in (("training", data.train), ("validation", data.val)):
        if len(split) < need:
            raise DataError(
                f"{_describe(paths)}: the text is {len(data.train) + len(data.val):,} tokens, too short for a context of "
                f"{block_size} (the {name} split has {len(split):,}; each split needs at least {need}): "
                "use more text or a smaller --block-size"
            )
    return data


def _save_pretrain_cache(cache_dir: Path, data: PretrainData) -> None:
    atomic_write_bytes(cache_dir / "train.npy", _npy_bytes(np.ascontiguousarray(data.train)))
    atomic_write_bytes(cache_dir / "val.npy", _npy_bytes(np.ascontiguousarray(data.val)))
    atomic_write_bytes(cache_dir / "tokenizer.json", data.tokenizer.tokenizer.to_str().encode())
    meta = {"version": CACHE_VERSION, "documents": data.documents, "sources": data.sources}
    atomic_write_bytes(cache_dir / "meta.json", json.dumps(meta).encode())  # last: marks the cache complete


def _load_pretrain_cache(cache_dir: Path) -> PretrainData | None:
    try:
        meta = json.loads((cache_dir / "meta.json").read_text())
        if meta.get("version") != CACHE_VERSION:
            return None
        tokenizer = ChatTokenizer.from_file(cache_dir / "tokenizer.json")
        train, val = _load_npy(cache_dir / "train.npy"), _load_npy(cache_dir / "val.npy")
    except Exception:  # noqa: BLE001 - a missing or damaged cache is rebuilt
        return None
    return PretrainData(tokenizer, train, val, token_bytes(tokenizer), cache_dir, True, meta.get("documents", 0),
                        meta.get("sources", []))


# --- fine-tuning ------------------------------------------------------------------------------------


def pack_rows(rendered: list[tuple[list[int], list[int]]], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedily pack (ids, mask) sequences, in order, into rows of `width` tokens (-1 pads)."""
    rows: list[tuple[list[int], list[int]]] = []
    ids: list[int] = []
    mask: list[int] = []
    for item_ids, item_mask in rendered:
        if ids and len(ids) + len(item_ids) > width:
            rows.append((ids, mask))
            ids, mask = [], []
        ids = ids + item_ids
        mask = mask + item_mask
    if ids:
        rows.append((ids, mask))
    out_ids = np.full((len(rows), width), -1, dtype=np.int32)
    out_mask = np.zeros((len(rows), width), dtype=np.uint8)
    for r, (row_ids, row_mask) in enumerate(rows):
        out_ids[r, : len(row_ids)] = row_ids
        out_mask[r, : len(row_mask)] = row_mask
    return out_ids, out_mask


def prepare_sft(
    paths: list[str | Path],
    tokenizer: ChatTokenizer,
    *,
    block_size: int,
    val_fraction: float = 0.1,
    seed: int = 1337,
    cache_root: Path | None = None,
) -> SFTData:
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"the validation fraction must be between 0 and 1, not {val_fraction}")
    paths = list(paths)
    if not paths:
        raise DataError("no data given (--data PATH…)")
    key = _fingerprint(paths, kind="sft", tokenizer=hashlib.sha256(tokenizer.tokenizer.to_str().encode()).hexdigest(),
                       block_size=block_size, val_fraction=val_fraction, seed=seed)
    cache_dir = cache_root / key if cache_root is not None else None
    if cache_dir is not None:
        cached = _load_sft_cache(cache_dir, tokenizer)
        if cached is not None:
            return cached
    conversations = load_conversations(paths)
    if len(conversations) < 2:
        raise DataError(f"{_describe(paths)}: holds {len(conversations)} conversation; fine-tuning needs at least 2 "
                        "(one is kept for validation)")
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(order) * val_fraction))
    width = block_size + 1
    truncated = 0

    def render(indices: list[int]) -> list[tuple[list[int], list[int]]]:
        nonlocal truncated
        out = []
        for i in indices:
            ids, mask, _ = tokenizer.render_conversation(conversations[i], add_generation_prompt=False)
            if len(ids) > width:
                truncated += 1
                ids, mask = ids[:width], mask[:width]
            if any(mask[1:]):
                out.append((ids, mask))
        return out

    train_rendered = render(order[:-n_val])
    val_rendered = render(order[-n_val:])
    if not train_rendered or not val_rendered:
        raise DataError(f"{_describe(paths)}: after cutting to the context of {block_size} tokens no assistant reply "
                        "is left to learn from: use a longer context")
    train_ids, train_mask = pack_rows(train_rendered, width)
    val_ids, val_mask = pack_rows(val_rendered, width)
    data = SFTData(tokenizer, train_ids, train_mask, val_ids, val_mask, token_bytes(tokenizer),
                   len(conversations), truncated, cache_dir, False)
    if cache_dir is not None:
        for name in ("train_ids", "train_mask", "val_ids", "val_mask"):
            atomic_write_bytes(cache_dir / f"{name}.npy", _npy_bytes(getattr(data, name)))
        meta = {"version": CACHE_VERSION, "conversations": data.conversations, "truncated": truncated}
        atomic_write_bytes(cache_dir / "meta.json", json.dumps(meta).encode())
    return data


def _load_sft_cache(cache_dir: Path, tokenizer: ChatTokenizer) -> SFTData | None:
    try:
        meta = json.loads((cache_dir / "meta.json").read_text())
        if meta.get("version") != CACHE_VERSION:
            return None
        arrays = {name: _load_npy(cache_dir / f"{name}.npy") for name in ("train_ids", "train_mask", "val_ids", "val_mask")}
    except Exception:  # noqa: BLE001 - a missing or damaged cache is rebuilt
        return None
    return SFTData(tokenizer, token_bytes=token_bytes(tokenizer), conversations=meta.get("conversations", 0),
                   truncated=meta.get("truncated", 0), cache_dir=cache_dir, from_cache=True, **arrays)


# --- batches ----------------------------------------------------------------------------------------


class WindowSampler:
    """Random windows of block_size + 1 tokens; the windows of a step depend only on (seed, step)."""

    def __init__(self, data: np.ndarray, block_size: int, seed: int) -> None:
        self.data = data
        self.block_size = block_size
        self.seed = seed
        self.offsets = np.arange(block_size + 1)

    def rows(self, step: int, count: int) -> tuple[np.ndarray, np.ndarray | None]:
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.data) - self.block_size, size=count)
        return np.asarray(self.data[starts[:, None] + self.offsets], dtype=np.int64), None

    def fixed_rows(self, count: int, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The same windows every time (for evaluation)."""
        rng = np.random.default_rng([seed, 2**31 - 1])
        starts = rng.integers(0, len(self.data) - self.block_size, size=count)
        return np.asarray(self.data[starts[:, None] + self.offsets], dtype=np.int64), None


class RowSampler:
    """Packed conversation rows, in a fresh seeded order each epoch; a step's rows depend on (seed, step)."""

    def __init__(self, ids: np.ndarray, mask: np.ndarray, seed: int) -> None:
        self.ids = ids
        self.mask = mask
        self.seed = seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.ids))
        return self._perms[epoch]

    def rows(self, step: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.ids)
        picks = [self._perm(i // n)[i % n] for i in range(step * count, (step + 1) * count)]
        return np.asarray(self.ids[picks], dtype=np.int64), np.asarray(self.mask[picks], dtype=np.float32)

    def fixed_rows(self, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Every row up to `count` (for evaluation), in file order."""
        count = min(count, len(self.ids))
        return np.asarray(self.ids[:count], dtype=np.int64), np.asarray(self.mask[:count], dtype=np.float32)
