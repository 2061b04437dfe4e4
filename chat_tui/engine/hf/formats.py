"""How a conversation becomes a Hugging Face model's token ids, with each message's span in them.

The formats (`HFEngine.chat_format`):

- ``template``: the tokenizer's own chat template (`apply_chat_template`), when it has one;
- ``dialogpt``: DialoGPT's turns joined by the end-of-text token (chosen for DialoGPT checkpoints);
- ``plain`` and ``raw``: the text formats every backend offers (`chat_tui.engine.chat_formats`).

A user's text is encoded with any special-token string in it kept as plain text, so typing
"<|im_end|>" cannot close a turn.
"""

from __future__ import annotations

import bisect
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from chat_tui.engine.chat_formats import CHAT_FORMATS, PLAIN_STOP, render_text
from chat_tui.engine.hf.errors import ChatTemplateError, MissingDependencyError
from chat_tui.engine.types import Conversation, Message, MessageSpan
from chat_tui.errors import first_line


@dataclass
class _Rendered:
    text: str
    ends: list[int]  # char offset where each message's part of the text ends
    start: int  # where the first message's part starts (after a template's preamble)
    contents: list[tuple[int, int] | None]  # each message's own text within `text`, when found
    protect: bool  # a message holds a special-token string: encode the messages' text as plain text


class ChatFormat:
    """One tokenizer's chat format: `render` a conversation, `encode` a user's text.

    Chosen from `override` (--chat-format), else the template when the tokenizer has one, else
    dialogpt when one of `names` (the model's name, hub id, folder) says DialoGPT, else plain.
    """

    def __init__(self, tokenizer: Any, *, model_name: str, override: str | None, names: Sequence[object]) -> None:
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.name = self._choose(override, names)
        if self.name == "template" and importlib.util.find_spec("jinja2") is None:
            raise MissingDependencyError(f"{model_name}: its chat template needs the jinja2 package: pip install jinja2")
        self.system_prompt = "native"  # "native", "merged" (into the first user message) or "ignored"
        self.stops: tuple[str, ...] = ()  # stop strings the format adds to the sampling settings
        self.turn_end: int | None = None  # the token a template closes an assistant turn with
        self._special_strings = sorted(
            {t for t in (getattr(tokenizer, "all_special_tokens", None) or []) if t}
            | {str(t) for t in (getattr(tokenizer, "get_added_vocab", dict)() or {}) if len(str(t)) > 1},
            key=len,
        )
        if self.name == "template":
            if not self._template_takes_system():
                self.system_prompt = "merged"
            self.turn_end = self._template_turn_end()
        elif self.name == "dialogpt":
            self.system_prompt = "ignored"
        elif self.name == "plain":
            self.stops = (PLAIN_STOP,)
        self._prefix_ids = self._auto_prefix() if self.name in ("plain", "raw") else []

    def render(self, conversation: Conversation) -> tuple[list[int], list[MessageSpan]]:
        messages = list(conversation)
        if self.name == "dialogpt":
            return self._render_dialogpt(messages)
        if self.name == "template":
            rendered, indices = self._render_template(messages)
            prefix: list[int] = []
        else:
            rendered, indices = self._render_text(messages)
            prefix = self._prefix_ids
        ids, cuts = self._encode_rendered(rendered)
        ids = prefix + ids
        shift = len(prefix)
        spans: list[MessageSpan] = []
        start = cuts[0]
        for k, index in enumerate(indices):
            end = cuts[k + 1]
            spans.append(MessageSpan(index, messages[index].role, start + shift, end + shift))
            start = end
        if cuts[-1] > start:  # the generation prompt
            spans.append(MessageSpan(-1, "assistant", start + shift, cuts[-1] + shift))
        return ids, spans

    def _choose(self, override: str | None, names: Sequence[object]) -> str:
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if override is not None:
            if override not in CHAT_FORMATS:
                raise ChatTemplateError(f"unknown chat format {override!r} (use {', '.join(CHAT_FORMATS)})")
            if override == "template" and not has_template:
                raise ChatTemplateError(f"{self.model_name}: the tokenizer has no chat template (use plain or raw)")
            if override == "dialogpt" and self.tokenizer.eos_token_id is None:
                raise ChatTemplateError(f"{self.model_name}: the dialogpt format needs an end-of-text token")
            return override
        if has_template:
            return "template"
        return self._without_template(names)

    def _without_template(self, names: Sequence[object]) -> str:
        joined = " ".join(str(n) for n in names)
        if "dialogpt" in joined.lower() and self.tokenizer.eos_token_id is not None:
            return "dialogpt"
        return "plain"

    def _auto_prefix(self) -> list[int]:
        """What the tokenizer puts before any text by itself (a BOS for Llama-style tokenizers)."""
        try:
            with_specials = self.tokenizer("a", add_special_tokens=True)["input_ids"]
            without = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        except Exception:  # noqa: BLE001
            return []
        n = len(with_specials) - len(without)
        if n > 0 and with_specials[n:n + len(without)] == without:
            return list(with_specials[:n])
        return []

    def encode(self, text: str, *, protect: bool) -> list[int]:
        kwargs: dict[str, Any] = {"add_special_tokens": False}
        if protect:
            kwargs["split_special_tokens"] = True
        return list(self.tokenizer(text, **kwargs)["input_ids"])

    def _render_dialogpt(self, messages: list[Message]) -> tuple[list[int], list[MessageSpan]]:
        eos = self.tokenizer.eos_token_id
        ids: list[int] = []
        spans: list[MessageSpan] = []
        for index, message in enumerate(messages):
            if message.role == "system":
                continue  # DialoGPT has no system prompt
            start = len(ids)
            ids.extend(self.encode(message.content, protect=True))
            if not (index == len(messages) - 1 and message.role == "assistant"):  # a last reply is continued
                ids.append(eos)
            spans.append(MessageSpan(index, message.role, start, len(ids)))
        return ids, spans

    def _render_text(self, messages: list[Message]) -> tuple[_Rendered, list[int]]:
        """The plain and raw formats, as text with known boundaries."""
        plain = self.name == "plain"
        text, ends, contents = render_text(messages, plain=plain)
        protect = plain and self._holds_special(messages)
        return _Rendered(text, ends, 0, list(contents), protect), list(range(len(messages)))

    def _holds_special(self, messages: Sequence[Message]) -> bool:
        return any(s in m.content for m in messages for s in self._special_strings)

    # -- chat templates

    def _template_messages(self, messages: list[Message]) -> tuple[list[dict[str, str]], list[int]]:
        """The messages as the template takes them (a system prompt merged when it has no place for one)."""
        out: list[dict[str, str]] = []
        indices: list[int] = []
        pending: list[str] = []
        for index, message in enumerate(messages):
            if message.role == "system" and self.system_prompt == "merged":
                pending.append(message.content)
                continue
            content = message.content
            if pending and message.role == "user":
                content = "\n\n".join([*pending, content])
                pending = []
            out.append({"role": message.role, "content": content})
            indices.append(index)
        return out, indices

    def _apply_template(self, conversation: list[dict[str, str]], *, prompt: bool) -> str:
        continue_final = prompt and bool(conversation) and conversation[-1]["role"] == "assistant"
        return self.tokenizer.apply_chat_template(
            conversation,
            tokenize=False,
            add_generation_prompt=prompt and not continue_final,
            continue_final_message=continue_final,
        )

    def _render_template(self, messages: list[Message]) -> tuple[_Rendered, list[int]]:
        conversation, indices = self._template_messages(messages)
        try:
            text = self._apply_template(conversation, prompt=True)
        except Exception as exc:  # noqa: BLE001 - jinja2 errors, raise_exception() in the template
            raise ChatTemplateError(f"the chat template of {self.model_name} refused this conversation: {first_line(exc)}") from None
        # where each message ends: the longest prefix the text shares with the conversation up to it
        ends: list[int] = []
        contents: list[tuple[int, int] | None] = []
        bos = getattr(self.tokenizer, "bos_token", None)
        start = len(bos) if bos and text.startswith(bos) else 0  # a leading BOS belongs to no message
        previous = start
        for k, message in enumerate(conversation):
            end = None
            if k == len(conversation) - 1 and message["role"] == "assistant":
                end = len(text)  # the reply being continued runs to the end
            else:
                try:
                    end = _common_prefix(self._apply_template(conversation[: k + 1], prompt=False), text)
                except Exception:  # noqa: BLE001 - e.g. a template that wants a user message last
                    end = None
            found = _find_content(text, message["content"], previous)
            if end is None or end < previous:
                end = found[1] if found is not None else previous
            contents.append(found)
            ends.append(end)
            previous = end
        protect = self._holds_special(messages)
        return _Rendered(text, ends, start, contents, protect), indices

    def _template_takes_system(self) -> bool:
        probe = "chat-tui system probe"
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": "system", "content": probe}, {"role": "user", "content": "hi"}],
                tokenize=False, add_generation_prompt=True,
            )
        except Exception:  # noqa: BLE001 - "System role not supported"
            return False
        return probe in text

    def _template_turn_end(self) -> int | None:
        """The token the template closes an assistant turn with (<|im_end|>, <|eot_id|>, <|end|>, ...)."""
        probe = "chat-tui reply probe"
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}], tokenize=False
            )
        except Exception:  # noqa: BLE001
            return None
        at = text.rfind(probe)
        if at < 0:
            return None
        tail = text[at + len(probe):].lstrip(" ")
        if not tail:
            return None
        ids = self.encode(tail, protect=False)
        special = set(getattr(self.tokenizer, "all_special_ids", None) or [])
        added = set((getattr(self.tokenizer, "get_added_vocab", dict)() or {}).values())
        for token in ids[:2]:
            if token in special or token in added:
                return int(token)
        return None

    # -- text to ids with message boundaries

    def _encode_rendered(self, r: _Rendered) -> tuple[list[int], list[int]]:
        """The ids of `r.text` and the token index of [start, each message end..., the end]."""
        cuts_chars = [r.start, *r.ends, len(r.text)]
        if not r.protect:
            try:
                enc = self.tokenizer(r.text, add_special_tokens=False, return_offsets_mapping=True)
                ids = list(enc["input_ids"])
                starts = [s for s, _ in enc["offset_mapping"]]
            except (NotImplementedError, ValueError, TypeError, KeyError):
                pass  # a slow tokenizer: no offsets, tokenize the pieces instead
            else:
                starts = _monotonic(starts)
                return ids, [bisect.bisect_left(starts, c) for c in cuts_chars]
        # Piece by piece, cut at every boundary: the format's own text with its special tokens, and
        # each message's content with any special-token string in it kept as plain text.
        contents = [c for c in r.contents if c is not None]
        bounds = sorted({0, len(r.text), *cuts_chars, *(x for c in contents for x in c)})
        ids = []
        at_char = {0: 0}
        for a, b in zip(bounds, bounds[1:], strict=False):
            inside = any(s <= a and b <= e for s, e in contents)
            ids.extend(self.encode(r.text[a:b], protect=inside and r.protect))
            at_char[b] = len(ids)
        return ids, [at_char[c] for c in cuts_chars]


def _monotonic(starts: list[int]) -> list[int]:
    out: list[int] = []
    high = 0
    for s in starts:
        high = max(high, s)
        out.append(high)
    return out


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n
    while lo < hi:  # the first position where they differ
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _find_content(text: str, content: str, start: int) -> tuple[int, int] | None:
    for candidate in (content, content.strip()):
        if candidate:
            at = text.find(candidate, start)
            if at >= 0:
                return at, at + len(candidate)
    return None
