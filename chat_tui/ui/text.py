"""Untrusted text (model output, user input, files, titles) made safe to put on screen.

Control characters are replaced by `chat_tui.textsafe.clean` (shared with `chat-tui ask`). Text built
here is `rich.text.Text`, never markup, so ``[/bold]`` or ``[@click=app.quit]x[/]`` stays literal.
"""

from __future__ import annotations

from rich.text import Text

from chat_tui.textsafe import clean, clean_line


def safe_text(text: str, style: str = "", *, one_line: bool = False) -> Text:
    """A Text that shows `text` literally (no markup, no escape codes)."""
    return Text(clean_line(text) if one_line else clean(text), style=style, end="")


def token_label(token: str) -> str:
    """How a single token is shown in tables: whitespace made visible, controls replaced."""
    shown = clean(token).replace("\n", "\u21b5").replace("\t", "\u2192")
    if shown.strip() == "":
        shown = shown.replace(" ", "\u2423")
    return shown
