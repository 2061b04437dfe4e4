"""The inspector's list views as Rich Text: row, explain, heads overview, turns and candidates.

Every function takes plain data and a size, and returns at most `height` lines of at most `width`
cells (long lists start at `offset`). Token text is untrusted: it goes through `token_label` and is
only ever appended as plain text, never parsed as markup.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.cells import cell_len, set_cell_size
from rich.style import Style
from rich.text import Text

from chat_tui.engine.params import settings_summary
from chat_tui.ui.attention.render import LEVELS, ColorMode, level_color
from chat_tui.ui.attention.stats import HeadStats, order_for, turn_shares
from chat_tui.ui.text import token_label

if TYPE_CHECKING:
    from chat_tui.engine.explain import ChainReplay, Explanation
    from chat_tui.engine.params import SamplingParams
    from chat_tui.engine.types import Step

BAR = " ▏▎▍▌▋▊▉█"
# the candidates table's column of dropping stages: it has room for longer names than SHORT_NAMES
STAGE_SHORT = {
    "repetition": "rep-pen",
    "presence_frequency": "pres/freq",
    "temperature": "temp",
    "top_k": "top-k",
    "top_p": "top-p",
    "min_p": "min-p",
    "typical_p": "typical",
    "masked": "masked",
}
DIM = Style(dim=True)
BOLD = Style(bold=True)
CURSOR = Style(bold=True, color="bright_cyan")


def fit(text: str, width: int) -> str:
    """`text` cropped (with …) or padded to exactly `width` cells."""
    if width <= 0:
        return ""
    if cell_len(text) > width:
        return set_cell_size(text, width - 1) + "…"
    return set_cell_size(text, width)


def label(token: str, width: int) -> str:
    return fit(token_label(token), width)


def bar(fraction: float, width: int) -> str:
    if width <= 0 or not np.isfinite(fraction):
        return " " * max(width, 0)
    fraction = min(max(fraction, 0.0), 1.0)
    eighths = int(round(fraction * width * 8))
    full, rest = divmod(eighths, 8)
    return ("█" * full + (BAR[rest] if rest else "")).ljust(width)[:width]


def layer_label(layer: int, n_layers: int) -> str:
    """`layer 2/4` for the zero-based layer 1 of 4."""
    return f"layer {layer + 1}/{n_layers}"


def head_label(layer: int, head: int, n_layers: int, n_heads: int) -> str:
    """`layer 2/4 · head 3/4`, counted from 1."""
    return f"{layer_label(layer, n_layers)} · head {head + 1}/{n_heads}"


def weight_style(value: float, mode: ColorMode) -> Style:
    """The heatmap's colour for a value in [0, 1] (nothing in monochrome)."""
    if mode == "mono" or not np.isfinite(value):
        return Style()
    level = int(round(min(max(value, 0.0), 1.0) * (LEVELS - 1)))
    return Style(color=level_color(max(level, 100), mode))  # never darker than readable on a dark background


def cell_style(value: float, mode: ColorMode) -> Style:
    """A heat background for a value in [0, 1], with text that stays readable on it."""
    if mode == "mono" or not np.isfinite(value):
        return Style()
    level = int(round(min(max(value, 0.0), 1.0) * (LEVELS - 1)))
    return Style(bgcolor=level_color(level, mode), color="black" if level > 150 else "white")


def pct(p: float, width: int = 6) -> str:
    if not np.isfinite(p):
        return "—".rjust(width)
    if p >= 0.9995:
        return "100%".rjust(width)
    return f"{p * 100:.1f}%".rjust(width)


def window(lines: list[Text], height: int, offset: int, head: Sequence[Text] = ()) -> Text:
    """`head` lines, then lines[offset:] cut to `height` in all (with a ↓ marker when more follow)."""
    room = max(0, height - len(head))
    offset = max(0, min(offset, max(0, len(lines) - room)))
    shown = list(head) + lines[offset : offset + room]
    if offset + room < len(lines) and room > 1:
        # the last line says how many more follow instead
        more = len(lines) - offset - room + 1
        shown[-1] = Text(f"↓ {more} more (← → scroll)", style=DIM)
    if offset > 0 and room > 2:
        shown[len(head)] = Text(f"↑ {offset + 1} above", style=DIM)
    out = Text(no_wrap=True, overflow="crop", end="")
    for i, line in enumerate(shown[:height]):
        if i:
            out.append("\n")
        out.append_text(line)
    return out


def message(text: str, width: int, style: Style | str = DIM) -> Text:
    """A plain note, wrapped to `width` by the caller's widget."""
    return Text(text, style=style, end="")


# ----------------------------------------------------------------------------------------------------
# Row view


def row_view(
    weights: np.ndarray,
    tokens: Sequence[str],
    query: int,
    *,
    width: int,
    height: int,
    offset: int = 0,
    sort: bool = False,
    mode: ColorMode = "truecolor",
) -> Text:
    """One bar per context token: which tokens the query looks at, in sequence order or sorted."""
    w = np.asarray(weights, dtype=np.float64)
    top = float(w.max()) if w.size else 0.0
    pos_w = max(3, len(str(max(len(w) - 1, 0))))
    label_w = max(4, min(28, (width - pos_w - 8) // 2))
    bar_w = max(2, width - pos_w - 1 - label_w - 1 - 6 - 1)
    head = wrapped(f"{'by weight' if sort else 'in order'} · bars ÷ row max · s: {'order' if sort else 'sort'}", width)
    lines = []
    for j in order_for(w, sort).tolist():
        v = float(w[j])
        line = Text(end="")
        line.append(f"{j:>{pos_w}} ", style=CURSOR if j == query else DIM)
        line.append(label(tokens[j] if j < len(tokens) else "", label_w), style=CURSOR if j == query else Style())
        line.append(" ")
        line.append(pct(v), style=BOLD if v == top else Style())
        line.append(" ")
        line.append(bar(v / top if top > 0 else 0.0, bar_w), style=weight_style(v / top if top > 0 else 0.0, mode))
        lines.append(line)
    return window(lines, height, offset, head)


# ----------------------------------------------------------------------------------------------------
# Explain view


def explain_view(
    explanation: Explanation | None,
    stored: np.ndarray | None,
    tokens: Sequence[str],
    query: int,
    *,
    width: int,
    height: int,
    offset: int = 0,
    sort: bool = True,
    unavailable: str | None = None,
    pending: bool = False,
    head_note: str | None = None,
    mode: ColorMode = "truecolor",
) -> Text:
    """The computation of one weight: q·k, ÷ √d, softmax, and the weighted values' sizes."""
    head: list[Text] = []
    if head_note:
        head.extend(wrapped(head_note, width, "yellow"))
    if explanation is None:
        if pending:
            head.extend(wrapped("computing q·k for this token…", width))
        if unavailable:
            head.extend(wrapped("only the weights:", width))
            for part in _wrap(unavailable, width):
                head.append(Text(part, style="yellow"))
        if stored is None:
            return window([], height, 0, head)
        w = np.asarray(stored, dtype=np.float64)
        lines = []
        for j in order_for(w, sort).tolist():
            line = Text(end="")
            line.append(f"{j:>4} ", style=CURSOR if j == query else DIM)
            line.append(label(tokens[j] if j < len(tokens) else "", max(4, width - 12)))
            line.append(f"{w[j]:7.4f}", style=weight_style(w[j] / max(w.max(), 1e-12), mode))
            lines.append(line)
        head.append(Text(fit(" pos token" + " " * max(0, width - 17) + "      w", width), style=BOLD))
        return window(lines, height, offset, head)

    e = explanation
    d = e.head_dim
    # the formula, the sizes and the check wrap onto a second line rather than lose their ends
    formula = f"wⱼ = softmax(q·kⱼ ÷ √{d})  out = Σ wⱼvⱼ"
    formula_lines = [formula] if cell_len(formula) <= width else [f"wⱼ = softmax(q·kⱼ ÷ √{d})", "out = Σ wⱼvⱼ"]
    head.extend(Text(fit(line, width), style=BOLD) for line in formula_lines)
    summary = f"√{d} = {np.sqrt(d):.3g} · ‖q‖ {e.query_norm:.3g} · ‖out‖ {e.output_norm:.3g} · Σw {e.weights.sum():.4f}"
    head.extend(Text(line, style=DIM) for line in _wrap(summary, width))
    if stored is not None and stored.shape[0] == e.weights.shape[0]:
        diff = float(np.abs(e.weights - np.asarray(stored, dtype=np.float64)).max())
        check = f"matches the stored row to {diff:.1e} (stored as float16, a 16-bit number)"
        head.extend(Text(line, style=DIM) for line in _wrap(check, width))

    columns: list[tuple[str, int, Any]] = [
        ("w", 7, lambda j: f"{e.weights[j]:7.4f}"),
        ("÷√d", 8, lambda j: f"{e.scaled[j]:8.3f}"),
        ("q·k", 8, lambda j: f"{e.qk[j]:8.3f}"),
        ("‖wⱼvⱼ‖", 7, lambda j: f"{e.value_norms[j]:7.3f}"),
    ]
    fixed = 5  # position column
    label_w = 6
    chosen = []
    room = width - fixed - label_w
    for col in columns:
        if col[1] <= room:
            chosen.append(col)
            room -= col[1]
    label_w += max(0, min(room, 8))
    order = [c for c in ("q·k", "÷√d", "w", "‖wⱼvⱼ‖") if any(c == k[0] for k in chosen)]
    chosen.sort(key=lambda c: order.index(c[0]))
    header = Text(end="", style=BOLD)
    header.append(fit(" pos", fixed))
    header.append(fit("token", label_w))
    for name, cw, _ in chosen:
        header.append(name.rjust(cw))
    head.append(header)
    top = float(e.weights.max()) if e.weights.size else 1.0
    lines = []
    for j in order_for(e.weights, sort).tolist():
        line = Text(end="")
        line.append(f"{j:>4} ", style=CURSOR if j == query else DIM)
        line.append(label(tokens[j] if j < len(tokens) else "", label_w), style=CURSOR if j == query else Style())
        for name, _, cell in chosen:
            style = weight_style(e.weights[j] / top, mode) if name == "w" else Style()
            line.append(cell(j), style=style)
        lines.append(line)
    return window(lines, height, offset, head)


def wrapped(text: str, width: int, style: Style | str = DIM) -> list[Text]:
    """A sentence over as many lines of `width` as it needs (never cut with "…")."""
    return [Text(line.rstrip(), style=style) for line in _wrap(text, width)]


def _wrap(text: str, width: int) -> list[str]:
    words, lines, current = text.split(), [], ""
    for word in words:
        if current and cell_len(current) + 1 + cell_len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    if current:
        lines.append(current)
    return [fit(line, width) for line in lines]


# ----------------------------------------------------------------------------------------------------
# Heads overview


def heads_view(
    stats: HeadStats,
    layer: int,
    head: int,
    *,
    width: int,
    height: int,
    offset: int = 0,
    mode: ColorMode = "truecolor",
) -> Text:
    """Layers × heads grids of entropy, share on the first token and share on the previous token."""
    layers, heads = stats.entropy.shape
    cell = 6
    visible = max(1, (width - 4) // cell)
    h0 = 0 if heads <= visible else min(max(0, head - visible // 2), heads - visible)
    h1 = min(heads, h0 + visible)
    tables = [
        (f"entropy in bits: 0 = on one token, {stats.max_entropy:.1f} = spread evenly", stats.entropy,
         lambda v: f"{v:.2f}", lambda v: 1.0 - v / stats.max_entropy if stats.max_entropy > 0 else 0.0),
        ("share on the first token (the “sink”)", stats.first, lambda v: f"{v * 100:.0f}%", lambda v: v),
        ("share on the previous token", stats.previous, lambda v: "—" if not np.isfinite(v) else f"{v * 100:.0f}%",
         lambda v: v),
    ]
    lines: list[Text] = []
    for title, values, fmt, heat in tables:
        lines.extend(wrapped(title, width, BOLD))
        top = Text("    ", style=DIM, end="")
        for h in range(h0, h1):
            top.append(f"H{h + 1}".rjust(cell), style=CURSOR if h == head else DIM)  # counted from 1
        lines.append(top)
        for layer_i in range(layers):
            line = Text(end="")
            line.append(f"L{layer_i + 1}".ljust(4), style=CURSOR if layer_i == layer else DIM)
            for h in range(h0, h1):
                v = float(values[layer_i, h])
                style = cell_style(heat(v), mode) if np.isfinite(v) else Style()
                text = fmt(v).rjust(cell - 1)
                if layer_i == layer and h == head:
                    line.append("▸", style=CURSOR)
                    line.append(text, style=style + Style(bold=True, underline=True))
                else:
                    line.append(" ")
                    line.append(text, style=style)
            lines.append(line)
    if h1 - h0 < heads:
        lines.extend(wrapped(f"heads {h0 + 1}–{h1} of {heads} ({{ }} moves)", width))
    return window(lines, height, offset)


# ----------------------------------------------------------------------------------------------------
# Turns


def turns_view(
    weights: np.ndarray,
    owner: list[int],
    labels: Sequence[str],
    *,
    width: int,
    height: int,
    offset: int = 0,
    mode: ColorMode = "truecolor",
) -> Text:
    """The share of the query's attention that falls on each message of the conversation."""
    shares = turn_shares(weights, owner, len(labels))
    top = float(shares.max()) if shares.size else 0.0
    # room for the longest label ("other (special tokens)"), up to half the width
    label_w = max(6, min(max((cell_len(name) for name in labels), default=0) + 1, max(16, width // 2)))
    bar_w = max(2, width - label_w - 8)
    head = wrapped("share of attention by message", width)
    lines = []
    for name, share in zip(labels, shares.tolist(), strict=True):
        line = Text(end="")
        line.append(fit(name, label_w))
        line.append(pct(share, 7), style=BOLD if share == top else Style())
        line.append(" ")
        line.append(bar(share, bar_w), style=weight_style(share, mode))
        lines.append(line)
    return window(lines, height, offset, head)


# ----------------------------------------------------------------------------------------------------
# Candidates (sampling-chain X-ray)


def short_settings(params: SamplingParams | None) -> str:
    return "?" if params is None else settings_summary(params, short=True)


def _chain_cell(replay: ChainReplay, i: int, width: int) -> tuple[str, Style]:
    stage = replay.stage(i)
    if stage is not None:
        return STAGE_SHORT.get(stage, stage).rjust(width), Style(color="red", dim=True)
    return pct(float(replay.chain_probs[i]), width), Style()


def candidates_view(
    step: Step,
    as_sampled: ChainReplay | None,
    now: ChainReplay | None,
    *,
    width: int,
    height: int,
    offset: int = 0,
    mode: ColorMode = "truecolor",
    unavailable: str | None = None,
    texts: dict[int, str] | None = None,
    rows: int | None = None,
) -> Text:
    """The top candidates of one generated token: raw probability, after the chain, the dropping stage.

    `as_sampled`: the chain replayed with the step's own settings; `now`: with the current settings
    (None when they are the same). `rows`: how many candidates to list (the `candidates` setting;
    all that are stored when None), and the sampled token wherever it ranks.
    """
    # a server's sampler chose (no chain probability): the raw probability is all there is
    after = "" if step.chain_prob != step.chain_prob else f" → {step.chain_prob:.1%}"
    head = [
        *wrapped(f"sampled {step.prob:.1%}{after} with {short_settings(step.params)}", width),
    ]
    if unavailable:
        for part in _wrap(unavailable, width):
            head.append(Text(part, style="yellow"))
    if as_sampled is None:
        # no replay (yet): the candidates the step carries
        top = step.top
        # a server gives texts, not ids (-1): the candidates are then told apart by their text
        keys: list[int | str] = [c.id if c.id >= 0 else c.text for c in top]
        sampled: int | str = step.token_id if step.token_id >= 0 else step.token
        listed = _listed(keys, sampled, rows)
        header = Text(end="", style=BOLD)
        label_w = max(6, width - 2 - 14)
        header.append("  " + fit("token", label_w) + "   raw  chain")
        head.append(header)
        lines = []
        for key, text, prob, chain in ((keys[i], top[i].text, top[i].prob, top[i].chain_prob) for i in listed):
            chosen = key == sampled
            line = Text(end="")
            line.append("▶ " if chosen else "  ", style=CURSOR)
            line.append(label(text, label_w), style=CURSOR if chosen else Style())
            line.append(pct(prob, 7))
            line.append(pct(chain, 7), style=DIM if chain == 0 else Style())
            lines.append(line)
        return window(lines + _rank_note(keys, sampled, rows, width), height, offset, head)

    show_now = now is not None
    label_w = max(6, width - 2 - 7 - 9 - (9 if show_now else 0))
    header = Text(end="", style=BOLD)
    header.append("  " + fit("token", label_w) + "    raw" + "  sampled" + ("      now" if show_now else ""))
    head.append(header)
    if show_now:
        assert now is not None
        head[1:1] = wrapped(f"now: {short_settings(now.params)} (replayed, no regeneration)", width, "cyan")
    lines = []
    ids = as_sampled.ids.tolist()
    for i in _listed(ids, step.token_id, rows):
        cid = ids[i]
        chosen = cid == step.token_id
        line = Text(end="")
        line.append("▶ " if chosen else "  ", style=CURSOR)
        line.append(label(_token_text(step, cid, texts), label_w), style=CURSOR if chosen else Style())
        line.append(pct(float(as_sampled.raw_probs[i]), 7))
        text, style = _chain_cell(as_sampled, i, 9)
        line.append(text, style=style)
        if show_now:
            assert now is not None
            text, style = _chain_cell(now, i, 9)
            changed = (now.dropped_by[i] == -1) != (as_sampled.dropped_by[i] == -1)
            line.append(text, style=style + Style(bold=True, underline=True) if changed else style)
        lines.append(line)
    notes = []
    for replay in (as_sampled, now):
        if replay is not None:
            notes += [n for n in replay.notes if n not in notes]
    footer = [line for n in notes for line in wrapped(n, width, "yellow" if "approximate" in n else DIM)]
    lines = lines + _rank_note(ids, step.token_id, rows, width) + footer
    return window(lines, height, offset, head)


def _listed(ids: list[int] | list[int | str], chosen: int | str, rows: int | None) -> list[int]:
    """The indexes of the candidates to list: the first `rows`, and the sampled token's wherever it ranks."""
    if rows is None or rows >= len(ids):
        return list(range(len(ids)))
    listed = list(range(rows))
    if chosen in ids[rows:]:
        listed.append(ids.index(chosen))
    return listed


def _rank_note(ids: list[int] | list[int | str], chosen: int | str, rows: int | None, width: int) -> list[Text]:
    """A line saying where the sampled token ranks when it is listed below the `rows` most likely."""
    if rows is None or chosen not in ids[rows:]:
        return []
    return wrapped(f"▶ ranked {ids.index(chosen) + 1} of the {len(ids)} most likely", width)


def _token_text(step: Step, token_id: int, texts: dict[int, str] | None) -> str:
    if texts is not None and token_id in texts:
        return texts[token_id]
    for c in step.top:
        if c.id == token_id:
            return c.text
    return f"#{token_id}"
