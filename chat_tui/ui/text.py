"""Untrusted text (model output, user input, files, titles) made safe to put on screen.

Every C0 and C1 control character except newline and tab is replaced by a visible stand-in
(U+2400 "control pictures" for C0 and DEL, U+FFFD for C1), so an escape sequence such as
``\\x1b]52;c;aGk=\\x07`` shows as ``␛]52;c;aGk=␇`` and can never reach the terminal. Text built
here is `rich.text.Text`, never markup, so ``[/bold]`` or ``[@click=app.quit]x[/]`` stays literal.
"""

from __future__ import annotations

from rich.text import Text

_TABLE: dict[int, str] = {c: chr(0x2400 + c) for c in range(0x20) if c not in (0x09, 0x0A)}
_TABLE[0x7F] = "\u2421"
_TABLE.update({c: "\ufffd" for c in range(0x80, 0xA0)})
# bidi overrides and isolates can reorder what is shown; show them as U+FFFD too
_TABLE.update({c: "\ufffd" for c in (0x202A, 0x202B, 0x202C, 0x202D, 0x202E, 0x2066, 0x2067, 0x2068, 0x2069)})
_TABLE[0x0D] = "\u240d"


def clean(text: str) -> str:
    """`text` with every control character except \\n and \\t replaced by a visible stand-in."""
    return text.translate(_TABLE)


def clean_line(text: str) -> str:
    """`clean` for one-line places (titles, labels): newlines and tabs become spaces."""
    return clean(text).replace("\n", " ").replace("\t", " ")


def safe_text(text: str, style: str = "", *, one_line: bool = False) -> Text:
    """A Text that shows `text` literally (no markup, no escape codes)."""
    return Text(clean_line(text) if one_line else clean(text), style=style, end="")


def token_label(token: str) -> str:
    """How a single token is shown in tables: whitespace made visible, controls replaced."""
    shown = clean(token).replace("\n", "\u21b5").replace("\t", "\u2192")
    if shown.strip() == "":
        shown = shown.replace(" ", "\u2423")
    return shown
