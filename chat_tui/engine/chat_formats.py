"""The text chat formats every backend offers (no torch here): ``plain`` and ``raw``.

- ``plain``: ``User: …`` / ``Assistant: …`` lines, for base models without chat tokens; a reply
  also stops where the model starts the user's next line (`PLAIN_STOP`);
- ``raw``: the messages' text exactly as typed, one after the other, nothing added: a base model
  continues it.

A backend renders the text with `render_text`, encodes it with its own tokenizer, and adds the
format's stop strings to the sampling settings with `with_stops`.
"""

from __future__ import annotations

from collections.abc import Sequence

from chat_tui.engine.params import SamplingParams
from chat_tui.engine.types import Message, ParamsSource, resolve_params

CHAT_FORMATS = ("template", "dialogpt", "plain", "raw")
TEXT_FORMATS = ("plain", "raw")
PLAIN_ROLES = {"system": "", "user": "User: ", "assistant": "Assistant: "}
PLAIN_STOP = "\nUser:"  # in the plain format a reply ends where the model starts the user's next line


def render_text(messages: Sequence[Message], *, plain: bool) -> tuple[str, list[int], list[tuple[int, int]]]:
    """The plain (or raw) format's text, where each message's part of it ends, and each message's own text.

    A last assistant message is left open (the reply continues it); otherwise plain ends with an
    open "Assistant:" line.
    """
    text = ""
    ends: list[int] = []
    contents: list[tuple[int, int]] = []
    for index, message in enumerate(messages):
        last = index == len(messages) - 1
        if plain:
            text += PLAIN_ROLES[message.role]
        start = len(text)
        text += message.content
        contents.append((start, len(text)))
        if plain and not (last and message.role == "assistant"):
            text += "\n\n" if message.role == "system" else "\n"
        ends.append(len(text))
    if plain and (not messages or messages[-1].role != "assistant"):
        text += PLAIN_ROLES["assistant"].rstrip()  # "Assistant:"; the reply brings its own space
    return text, ends, contents


def with_stops(params: ParamsSource, stops: tuple[str, ...]) -> ParamsSource:
    """`params` with the format's stop strings added (asked again at every token, as `params` is)."""
    if not stops:
        return params
    memo: dict[str, SamplingParams] = {}

    def current() -> SamplingParams:
        p = resolve_params(params)
        if memo.get("in") is not p:
            missing = tuple(s for s in stops if s not in p.stop)
            memo["in"], memo["out"] = p, (p.with_(stop=p.stop + missing) if missing else p)
        return memo["out"]

    return current
