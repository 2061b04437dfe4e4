"""Untrusted text (model output, user input, files, titles) made safe to write to a terminal.

Every C0 and C1 control character except newline and tab is replaced by a visible stand-in
(U+2400 "control pictures" for C0 and DEL, U+FFFD for C1), so an escape sequence such as
``\\x1b]52;c;aGk=\\x07`` shows as ``␛]52;c;aGk=␇`` and can never reach the terminal. Plain
`str.translate`, no Rich or Textual: the app and `chat-tui ask` share it.
"""

from __future__ import annotations

_TABLE: dict[int, str] = {c: chr(0x2400 + c) for c in range(0x20) if c not in (0x09, 0x0A)}
_TABLE[0x7F] = "\u2421"
_TABLE.update({c: "\ufffd" for c in range(0x80, 0xA0)})
# bidi overrides and isolates can reorder what is shown; show them as U+FFFD too
_TABLE.update({c: "\ufffd" for c in (0x202A, 0x202B, 0x202C, 0x202D, 0x202E, 0x2066, 0x2067, 0x2068, 0x2069)})
_TABLE[0x0D] = "\u240d"

# JSON already escapes C0; the others it leaves raw (with ensure_ascii=False), and \\uXXXX reads back the same
_JSON_TABLE: dict[int, str] = {c: f"\\u{c:04x}" for c in _TABLE if c >= 0x20}


def clean(text: str) -> str:
    """`text` with every control character except \\n and \\t replaced by a visible stand-in."""
    return text.translate(_TABLE)


def clean_line(text: str) -> str:
    """`clean` for one-line places (titles, labels): newlines and tabs become spaces."""
    return clean(text).replace("\n", " ").replace("\t", " ")


def clean_json(line: str) -> str:
    """A line of JSON (from `json.dumps(..., ensure_ascii=False)`) that a terminal cannot act on and that
    decodes to the same values: the controls JSON leaves raw (DEL, C1, bidi overrides) become \\u escapes."""
    return line.translate(_JSON_TABLE)
