"""The inspector's "inside the next token" views as Rich Text: lens, attribution, rollout, knock-out,
tokens and block (issue #14).

Like views.py, every function takes plain data (the shapes of `chat_tui.engine.inside`) and a size
and returns at most `height` lines of at most `width` cells. Each starts with a one-line description
in plain words. Layers and heads are shown counted from 1 (`layer 2/4 · head 3/4`). Token text is
untrusted: it goes through `token_label` and is only appended as plain text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from rich.cells import cell_len
from rich.style import Style
from rich.text import Text

from chat_tui.engine.inside import head_name
from chat_tui.engine.token_bytes import fragment_label
from chat_tui.ui.attention.render import ColorMode
from chat_tui.ui.attention.views import (
    BOLD,
    CURSOR,
    DIM,
    bar,
    fit,
    head_label,
    label,
    layer_label,
    pct,
    weight_style,
    window,
    wrapped,
)

if TYPE_CHECKING:
    from chat_tui.engine.inside import Attribution, BlockTrace, Head, KnockOut, Lens, Rollout, TokenPiece

# why one Chinese character can be several tokens (the tokens view's last line)
BYTES_NOTE = ("Why: a byte-level BPE reads UTF-8 bytes; a Chinese character is 3 bytes (你 = E4 BD A0), "
              "and when no merge covers all three it is 2–3 tokens, shown <0xE4>.")
POSITIVE = Style(color="green")
NEGATIVE = Style(color="red")
CHECK_TOLERANCE = 1e-4
SHADES = (Style(bgcolor="grey35"), Style(bgcolor="grey23"))  # alternate tokens of the cut text


def note_view(note: str, width: int, height: int, style: Style | str = DIM) -> Text:
    """A note (unavailable, pending, nothing to show); the view's description is in the header above."""
    return window([], height, 0, wrapped(note, width, style))


def _token(text: str) -> str:
    return f'"{label(text, 18).rstrip()}"'


# ----------------------------------------------------------------------------------------------------
# Lens


def commit_line(lens: Lens, n_layers: int) -> str:
    if lens.commit_layer is None:
        return "commitment layer: none (the chosen token is not the model's top-1: sampling picked it)"
    return f"commitment layer: {layer_label(lens.commit_layer, n_layers)} (top-1 from there on)"


def lens_view(lens: Lens, token: str, *, width: int, height: int, offset: int = 0,
              mode: ColorMode = "truecolor") -> Text:
    """Per layer, the top next tokens through the final norm and output head; the commitment layer marked."""
    n = len(lens.layers)
    head = [
        *wrapped(f"predicting {_token(token)} · surprisal {lens.surprisal_bits:.2f} bits", width),
        *wrapped(commit_line(lens, n), width, BOLD),
    ]
    lines = []
    for row in lens.layers:
        committed = lens.commit_layer is not None and row.layer == lens.commit_layer
        line = Text(end="")
        line.append(f"{'◆' if committed else ' '}L{row.layer + 1:<3}", style=CURSOR if committed else DIM)
        entries = []
        for top in row.top[:3]:
            entry = Text(end="")
            entry.append(label(top.text, 12).rstrip() or "␣", style=CURSOR if top.id == lens.token_id else Style())
            entry.append(f" {top.prob * 100:.0f}%", style=weight_style(top.prob, mode))
            entries.append(entry)
        if row.chosen_rank >= len(row.top[:3]):
            entries.append(Text(f"(chosen #{row.chosen_rank + 1}, {row.chosen_prob * 100:.1f}%)", style=DIM, end=""))
        # the entries side by side, going on under the layer's name when the pane is narrow
        for entry in entries:
            if line.cell_len > 5 and line.cell_len + 2 + entry.cell_len > width:
                lines.append(line)
                line = Text("     ", end="")
            elif line.cell_len > 5:
                line.append("  ")
            line.append_text(entry)
        lines.append(line)
    lines.extend(wrapped("◆ the commitment layer: from it on the chosen token stays first", width))
    return window(lines, height, offset, head)


# ----------------------------------------------------------------------------------------------------
# Attribution


def check_line(attribution: Attribution) -> tuple[str, bool]:
    error = attribution.residual_error
    ok = error <= CHECK_TOLERANCE
    return f"components + bias = the logit, to 1e-4: error {error:.1e} {'✓' if ok else '✗'}", ok


def attribution_view(attribution: Attribution, token: str, n_heads: int, *, width: int,
                     height: int, offset: int = 0, top: int = 5) -> Text:
    """The largest contributions to the token's logit, for and against, then every head and MLP by layer."""
    check, ok = check_line(attribution)
    head = [
        *wrapped(f"logit of {_token(token)} {attribution.logit:+.3f} · bias {attribution.bias:+.3f}", width),
        *wrapped(check, width, POSITIVE if ok else "bold red"),
    ]
    components = attribution.components
    scale = max((abs(c.value) for c in components), default=1.0) or 1.0
    bar_w = max(2, width - 20)
    lines = []

    def contributor(name: str, value: float) -> Text:
        line = Text(end="")
        line.append(fit(f"  {name}", 10))
        line.append(f"{value:+8.3f} ", style=POSITIVE if value >= 0 else NEGATIVE)
        line.append(bar(abs(value) / scale, bar_w), style=POSITIVE if value >= 0 else NEGATIVE)
        return line

    ranked = sorted(components, key=lambda c: -c.value)
    lines.append(Text("pushed up", style=BOLD))
    lines += [contributor(c.name, c.value) for c in ranked[:top] if c.value > 0]
    lines.append(Text("pushed down", style=BOLD))
    lines += [contributor(c.name, c.value) for c in reversed(ranked[-top:]) if c.value < 0]
    # every head and MLP, one line a layer
    lines.extend(wrapped("by layer: heads H1…, then the MLP", width, BOLD))
    by_layer: dict[int, dict[int | None, float]] = {}
    for c in components:
        if c.layer is not None:
            by_layer.setdefault(c.layer, {})[c.head] = c.value
    for layer in sorted(by_layer):
        line = Text(end="")
        line.append(f"L{layer + 1:<3}", style=DIM)
        for h in range(n_heads):
            value = by_layer[layer].get(h)
            if value is not None:
                line.append(f"{value:+6.2f}", style=POSITIVE if value >= 0 else NEGATIVE)
        mlp = by_layer[layer].get(None)
        if mlp is not None:
            line.append(f" MLP{mlp:+6.2f}", style=POSITIVE if mlp >= 0 else NEGATIVE)
        lines.append(line)
    embed = next((c.value for c in components if c.layer is None), None)
    if embed is not None:
        lines.append(Text(fit(f"embeddings {embed:+.3f}", width), style=DIM))
    return window(lines, height, offset, head)


# ----------------------------------------------------------------------------------------------------
# Rollout


def rollout_view(rollout: Rollout, tokens: Sequence[str], query: int, *, width: int, height: int,
                 offset: int = 0, mode: ColorMode = "truecolor") -> Text:
    """A bar per context token: attention rollout beside the last layer's raw attention (heads averaged)."""
    rolled = np.asarray(rollout.rollout, dtype=np.float64)
    raw = np.asarray(rollout.last_layer, dtype=np.float64)
    start = max(0, query + 1 - len(rolled))  # the rows cover the last len(rolled) positions
    pos_w = max(3, len(str(query)))
    label_w = max(4, min(16, (width - pos_w) // 4))
    bar_w = max(2, (width - pos_w - 1 - label_w - 2 * 7 - 2) // 2)
    head = [
        Text(fit(f"{'pos':>{pos_w}} {fit('token', label_w)} {'rollout':>{7 + bar_w}} {'last layer':>{7 + bar_w}}",
                 width), style=BOLD),
    ]
    top_r = float(rolled.max()) if rolled.size else 1.0
    top_a = float(raw.max()) if raw.size else 1.0
    lines = []
    for j in range(len(rolled)):
        pos = start + j
        line = Text(end="")
        line.append(f"{pos:>{pos_w}} ", style=CURSOR if pos == query else DIM)
        line.append(label(tokens[pos] if pos < len(tokens) else "", label_w), style=CURSOR if pos == query else Style())
        for values, top in ((rolled, top_r), (raw, top_a)):
            v = float(values[j]) if j < len(values) else 0.0
            line.append(" ")
            line.append(pct(v, 7))
            line.append(bar(v / top if top > 0 else 0.0, bar_w), style=weight_style(v / top if top > 0 else 0.0, mode))
        lines.append(line)
    return window(lines, height, offset, head)


# ----------------------------------------------------------------------------------------------------
# Knock-out


def heads_list(heads: frozenset[Head] | set[Head]) -> str:
    return ", ".join(head_name(layer, head) for layer, head in sorted(heads))


def knockout_view(result: KnockOut | None, heads: frozenset[Head], selected: str, *, width: int, height: int,
                  offset: int = 0, pending: bool = False, can_continue: bool = True) -> Text:
    """The next-token distribution before and after switching the chosen heads off, and their KL."""
    head: list[Text] = []
    off = heads_list(heads) if heads else "none"
    head += wrapped(f"heads off: {off} · k: switch {selected} · K: none", width, BOLD)
    if not heads:
        head += wrapped("Choose a head with [ ] { } (or in the heads overview) and press k.", width)
        return window([], height, 0, head)
    if result is None:
        head.append(Text(fit("computing the distribution with these heads off…" if pending else "", width),
                         style=DIM))
        return window([], height, 0, head)
    label_w = max(6, width - 2 - 16)
    lines = [Text("  " + fit("next token", label_w) + "  before   after", style=BOLD)]
    for token, before, after in result.rows:
        line = Text(end="")
        mark = "▶ " if token.id == result.top_before else "▷ " if token.id == result.top_after else "  "
        line.append(mark, style=CURSOR)
        line.append(label(token.text, label_w), style=CURSOR if token.id == result.top_before else Style())
        line.append(pct(before, 8))
        changed = abs(after - before) > 1e-9
        line.append(pct(after, 8), style=BOLD if changed else DIM)
        lines.append(line)
    texts = {t.id: t.text for t, _, _ in result.rows}
    if result.top_after != result.top_before:
        change = (f"the top token changes: {_token(texts.get(result.top_before, '?'))} → "
                  f"{_token(texts.get(result.top_after, '?'))}")
    else:
        change = "the top token stays the same"
    lines += wrapped(f"KL {result.kl_bits:.4f} bits · {change}", width, BOLD)
    if can_continue:
        lines += wrapped("c: Continue with these heads off (the reply from this token on)", width, "cyan")
    return window(lines, height, offset, head)


# ----------------------------------------------------------------------------------------------------
# Tokens


def piece_label(piece: TokenPiece) -> str:
    """A token's text, or its bytes as `<0xE4>` when they are part of a character (not UTF-8 alone)."""
    try:
        text = piece.data.decode("utf-8")
    except UnicodeDecodeError:
        return fragment_label(piece.data)
    return label(text or piece.text, 40).rstrip()


def tokens_view(pieces: Sequence[TokenPiece], source: str, context_length: int | None, *, width: int,
                height: int, offset: int = 0) -> Text:
    """Each token's place in the text, id and bytes; the count against the context window."""
    count = len(pieces)
    room = f" of {context_length:,} in the context window" if context_length else ""
    head = [
        *wrapped(f"{source}: {count} token{'s' if count != 1 else ''}{room}", width, BOLD),
    ]
    # the text cut at the token boundaries, alternate tokens shaded, wrapped between tokens
    lines: list[Text] = []
    line = Text(end="")
    for i, piece in enumerate(pieces):
        shown = fit(piece_label(piece), width) if cell_len(piece_label(piece)) > width else piece_label(piece)
        if line.cell_len + cell_len(shown) > width:
            lines.append(line)
            line = Text(end="")
        line.append(shown, style=SHADES[i % 2])
    if line.cell_len:
        lines.append(line)
    id_w = max(3, len(str(max((p.id for p in pieces), default=0))))
    lines.append(Text(fit(f"{'#':>4} {'chars':>9} {'id':>{id_w}}  {'bytes':<12} token", width), style=BOLD))
    for i, piece in enumerate(pieces):
        line = Text(end="")
        line.append(f"{i + 1:>4} ", style=DIM)
        line.append(f"{piece.start:>4}–{piece.end:<4}", style=DIM)
        line.append(f"{piece.id:>{id_w}}  ")
        line.append(fit(piece.data.hex(" ").upper(), 12) + " ", style=DIM)
        line.append(fit(piece_label(piece), max(1, width - 30 - id_w)))
        lines.append(line)
    lines += wrapped(BYTES_NOTE, width)
    return window(lines, height, offset, head)


# ----------------------------------------------------------------------------------------------------
# Block


def block_view(trace: BlockTrace, token: str, n_layers: int, n_heads: int, *, width: int, height: int,
               offset: int = 0) -> Text:
    """A decoder block's rows for one token: each vector's norm, and q and k's first entries for the head."""
    head = [
        *wrapped(f"{_token(token)} · {head_label(trace.layer, trace.head, n_layers, n_heads)} ([ ] {{ }} move)",
                 width, BOLD),
    ]
    top = max((r.norm for r in trace.rows), default=1.0) or 1.0
    name_w = 22
    bar_w = max(2, min(16, width - name_w - 10))
    lines = []
    for row in trace.rows:
        line = Text(end="")
        shown = f"{row.name} (head {trace.head + 1})" if row.name in ("q", "k", "v") else row.name
        line.append(fit(shown, name_w), style=BOLD if row.name.startswith("residual") else Style())
        line.append(f"‖{row.norm:7.3f}‖ ")
        line.append(bar(row.norm / top, bar_w), style=DIM)
        lines.append(line)
        if row.first:
            entries = " ".join(f"{v:+.3f}" for v in row.first)
            lines.append(Text(fit(f"    first entries: {entries}", width), style=DIM))
    lines.extend(wrapped("‖x‖: the vector's length; the residual rows are what the next block reads", width))
    return window(lines, height, offset, head)
