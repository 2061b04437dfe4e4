"""The mini-GPT's tokenizer and chat format.

A byte-level BPE trained with Hugging Face `tokenizers` (any text round-trips: Chinese, emoji,
text that looks like markup or escape codes), plus explicit special tokens for the chat format:

    <|bos|><|system|>You are terse.<|end|><|user|>Hello<|end|><|assistant|>Hi!<|end|>

`render_conversation` returns the ids and a loss mask that is 1 only on the assistant's tokens
and their `<|end|>`, so fine-tuning learns the replies and never the prompts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from chat_tui.engine.token_bytes import token_label
from chat_tui.engine.types import Message, MessageSpan

BOS, SYSTEM, USER, ASSISTANT, END = "<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [BOS, SYSTEM, USER, ASSISTANT, END]
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on `texts`; the special tokens get ids 0..4."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: nothing is ever unknown
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


class ChatTokenizer:
    """Encode/decode text and render conversations in the mini-GPT chat format."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        # Text is always text: a user typing "<|end|>" must not forge a turn boundary.
        tokenizer.encode_special_tokens = True
        ids = {tok: tokenizer.token_to_id(tok) for tok in SPECIAL_TOKENS}
        missing = [tok for tok, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {', '.join(missing)}")
        self.special_ids: dict[str, int] = ids  # type: ignore[assignment]
        self.bos_id, self.end_id = ids[BOS], ids[END]
        self.role_ids = {role: ids[tok] for role, tok in ROLE_TOKENS.items()}
        self._token_texts: list[str] | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> ChatTokenizer:
        return cls(Tokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        self.tokenizer.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Plain text to ids. Special-token strings typed by a user stay plain text."""
        return self.tokenizer.encode(text, add_special_tokens=False, is_pretokenized=False).ids if text else []

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        """One token's own text; a piece of a multi-byte character shows as its bytes, `<0xE4>`."""
        if self._token_texts is None:
            self._token_texts = [
                token_label(self.tokenizer.decode([i], skip_special_tokens=False), self.tokenizer.id_to_token(i), True)
                for i in range(self.vocab_size)
            ]
        if 0 <= token_id < len(self._token_texts):
            return self._token_texts[token_id]
        return "\ufffd"

    def render_conversation(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = True
    ) -> tuple[list[int], list[int], list[MessageSpan]]:
        """Ids, loss mask and message spans for a conversation.

        With `add_generation_prompt`, a conversation that ends with a user (or system) message gets
        an open `<|assistant|>` header; one that ends with an assistant message is left open
        (no `<|end|>`), so generation continues that reply.
        """
        ids: list[int] = [self.bos_id]
        mask: list[int] = [0]
        spans: list[MessageSpan] = []
        for index, message in enumerate(messages):
            is_last = index == len(messages) - 1
            start = len(ids)
            body = self.encode(message.content)
            learn = 1 if message.role == "assistant" else 0
            ids.append(self.role_ids[message.role])
            mask.append(0)  # the role header is given, not learned
            ids.extend(body)
            mask.extend([learn] * len(body))
            open_reply = is_last and add_generation_prompt and message.role == "assistant"
            if not open_reply:
                ids.append(self.end_id)
                mask.append(learn)  # learning <|end|> teaches the model to stop
            spans.append(MessageSpan(index, message.role, start, len(ids)))
        if add_generation_prompt and (not messages or messages[-1].role != "assistant"):
            spans.append(MessageSpan(-1, "assistant", len(ids), len(ids) + 1))
            ids.append(self.role_ids["assistant"])
            mask.append(0)
        return ids, mask, spans

    def render_prompt(self, messages: Sequence[Message]) -> tuple[list[int], list[MessageSpan]]:
        ids, _, spans = self.render_conversation(messages, add_generation_prompt=True)
        return ids, spans
