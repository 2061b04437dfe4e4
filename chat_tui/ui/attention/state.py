"""What the inspector shows, without Textual: the view, layer, head, colour scale, token cursor, and
which part of the heatmap is in the window. The pane (pane.py) holds one and draws from it; its
actions are one call here each, so the rules are unit-tested without an app.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from functools import lru_cache

from rich.text import Text

from chat_tui.engine.inside import INSIDE_VIEWS, Head
from chat_tui.ui.attention.render import SCALE_LABEL, SCALES, Scale
from chat_tui.ui.attention.store import AttentionStore, HeadMode
from chat_tui.ui.attention.views import fit, layer_label
from chat_tui.ui.text import clean_line, token_label

ATTENTION_VIEWS = ("heatmap", "row", "explain", "heads", "turns", "candidates")
VIEWS = ATTENTION_VIEWS + INSIDE_VIEWS  # then the views inside the next token (issue #14)
VIEW_TITLE = {
    "heatmap": "Heatmap",
    "row": "Row",
    "explain": "Explain",
    "heads": "Heads",
    "turns": "Turns",
    "candidates": "Candidates",
    "lens": "Lens",
    "attribution": "Attribution",
    "rollout": "Rollout",
    "knockout": "Knock-out",
    "tokens": "Tokens",
    "block": "Block",
}
HEAD_MODES: tuple[HeadMode, ...] = ("single", "mean", "max")
# one line (two at most in the pane) under each view's title: what it shows, in plain words
VIEW_SUBTITLE = {
    "heatmap": "query ↓ attends to key →: a cell is how much a token looked at an earlier one",
    "row": "how much the selected token looked at each earlier token",
    "explain": "why those weights: query·key scores, scaled, softmax; what each value adds",
    "heads": "every head of the layer: how spread out its attention is and where it goes",
    "turns": "how much of the selected token's attention went to each message",
    "candidates": "the likeliest next tokens; which the sampling settings kept or dropped",
    "lens": "what each layer would predict next, if the model stopped there (the logit lens)",
    "attribution": "how much each head and MLP pushed this token's score up or down",
    "rollout": "where the token's information came from through all layers, beside the last layer",
    "knockout": "switch heads off and see how the choice of this token changes",
    "tokens": "how the tokenizer cuts text into the pieces (tokens) the model reads",
    "block": "one decoder block for this token, top to bottom, with the model's own numbers",
}
HEADER_LINES = 4  # the title, the subtitle (two lines at most), the selected token


@lru_cache(maxsize=64)
def subtitle_lines(view: str, width: int) -> tuple[str, str]:
    """The view's subtitle wrapped to `width`: two lines (the second may be empty)."""
    lines = textwrap.wrap(VIEW_SUBTITLE.get(view, ""), max(width, 10))  # a view without one: two blank lines
    if len(lines) > 2:  # too narrow for the whole sentence: the first two lines, the second cut
        lines[1] = fit(lines[1] + " " + " ".join(lines[2:]), width)
    return (lines + ["", ""])[0], (lines + ["", ""])[1]


@dataclass
class InspectorState:
    """The selection over an AttentionStore; `model_layers`/`model_heads` count until rows arrive."""

    store: AttentionStore
    view: str = "heatmap"
    attn_layer: int = 0
    head: int = 0
    head_mode: HeadMode = "single"
    scale: Scale = "rowmax"
    cursor: int | None = None  # the selected position while not following
    follow: bool = True
    sort_rows: bool = False
    sort_explain: bool = True
    offsets: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VIEWS, 0))  # list views' scroll
    model_layers: int = 1
    model_heads: int = 1
    # why the store is empty when a reply is on screen (`forget(why)`: a branch shown of replies whose
    # attention this session did not keep); None: no reply yet
    empty_note: str | None = None
    first_row: int = 0  # the heatmap window: its first query row and first key
    first_key: int = 0
    panned: bool = False  # the keys were panned by hand: the window no longer follows the cursor
    page_rows: int = 10  # query rows a page moves (the heatmap's height, from the last window)
    knocked: frozenset[Head] = frozenset()  # the heads the knock-out view switches off

    # ------------------------------------------------------------------ derived

    @property
    def position(self) -> int | None:
        """The selected token's position (the newest when following); None with no tokens."""
        n = self.store.length
        if n == 0:
            return None
        if self.follow or self.cursor is None:
            return n - 1
        return min(max(self.cursor, 0), n - 1)

    @property
    def n_layers(self) -> int:
        return self.store.n_layers or self.model_layers

    @property
    def n_heads(self) -> int:
        return self.store.n_heads or self.model_heads

    def selection_label(self) -> str:
        """The layer and head, counted from 1 as people count (`layer 1/4 · head 2/4`)."""
        if self.n_layers <= 0:  # a model with no attention to show (one on a server)
            return "no layers"
        head = {"single": f"head {self.head + 1}/{self.n_heads}", "mean": f"mean of {self.n_heads} heads",
                "max": f"max of {self.n_heads} heads"}[self.head_mode]
        return f"{layer_label(self.attn_layer, self.n_layers)} · {head}"

    # ------------------------------------------------------------------ what the pane is told

    def set_model(self, n_layer: int, n_head: int) -> None:
        """Another model: keep the layer and head inside it."""
        self.model_layers, self.model_heads = n_layer, n_head
        self.attn_layer = min(self.attn_layer, max(0, n_layer - 1))
        self.head = min(self.head, max(0, n_head - 1))

    def new_reply(self) -> None:
        """A reply starts (its prompt arrived): the window starts over and the cursor follows it."""
        self.first_row = self.first_key = 0
        self.panned = False
        if not self.follow:
            self.cursor = None
            self.follow = True

    def forget(self, why: str | None = None) -> None:
        """The reply is gone (another conversation, another branch): follow whatever comes next. `why`:
        what the empty views say meanwhile (a reply is on screen, its attention is not here)."""
        self.cursor = None
        self.follow = True
        self.empty_note = why

    # ------------------------------------------------------------------ the user's moves

    def cycle_view(self, delta: int) -> None:
        self.view = VIEWS[(VIEWS.index(self.view) + delta) % len(VIEWS)]

    def show_view(self, name: str) -> bool:
        if name not in VIEWS:
            return False
        self.view = name
        return True

    def step_layer(self, delta: int) -> None:
        self.attn_layer = (self.attn_layer + delta) % max(1, self.n_layers)

    def step_head(self, delta: int) -> None:
        """The next head; from a mean or max of heads, back to the single head first."""
        if self.head_mode != "single":
            self.head_mode = "single"
        else:
            self.head = (self.head + delta) % max(1, self.n_heads)

    def toggle_knocked(self) -> None:
        """Switch the selected head (layer, head) off for the knock-out view, or back on."""
        selected = (self.attn_layer, self.head)
        self.knocked = self.knocked ^ {selected}

    def cycle_head_mode(self) -> None:
        self.head_mode = HEAD_MODES[(HEAD_MODES.index(self.head_mode) + 1) % len(HEAD_MODES)]

    def cycle_scale(self) -> None:
        self.scale = SCALES[(SCALES.index(self.scale) + 1) % len(SCALES)]

    def toggle_sort(self) -> None:
        if self.view == "explain":
            self.sort_explain = not self.sort_explain
        else:
            self.sort_rows = not self.sort_rows
        self.offsets[self.view] = 0

    def move_cursor(self, delta: int) -> bool:
        """Select `delta` tokens on (stops following); False with no tokens."""
        pos = self.position
        if pos is None:
            return False
        self.follow = False
        self.cursor = min(max(pos + delta, 0), self.store.length - 1)
        self.panned = False
        return True

    def move_page(self, delta: int) -> bool:
        return self.move_cursor(delta * self.page_rows)

    def cursor_home(self) -> bool:
        if not self.store.length:
            return False
        self.follow = False
        self.cursor = 0
        self.panned = False
        return True

    def cursor_end(self) -> None:
        """The newest token, and follow the reply from there."""
        self.follow = True
        self.cursor = None
        self.panned = False

    def toggle_follow(self) -> None:
        self.follow = not self.follow
        self.cursor = self.position if not self.follow else None
        self.panned = False

    def pan(self, delta: int, width: int, height: int) -> None:
        """Pan the heatmap's keys by half its width, or scroll a list view by a page (of a width × height view)."""
        if self.view == "heatmap":
            map_w = max(1, width - 1)
            self.first_key = max(0, self.first_key + delta * max(1, map_w // 2))
            self.panned = True
        else:
            page = max(1, height - 3)
            self.offsets[self.view] = max(0, self.offsets[self.view] + delta * page)

    # ------------------------------------------------------------------ the heatmap's window

    def heatmap_window(self, width: int, height: int, rows_per_line: int = 2) -> tuple[range, int, int]:
        """(query rows, first key, end key) of the heatmap at this size; follows the cursor."""
        n = self.store.length
        pos = self.position or 0
        step = rows_per_line
        map_w = max(1, width - 1)
        rows_visible = max(1, height - 1) * step
        self.page_rows = max(1, rows_visible - step)
        # keys: the cursor's column stays in view; on leaving it the window jumps so that the cursor
        # sits near the right edge with a quarter of the width free for the next tokens (until then
        # a new token changes only its own line)
        free = max(1, map_w // 4)
        if n <= map_w:
            c0 = 0
        else:
            c0 = self.first_key
            if not self.panned and (pos < c0 or pos >= c0 + map_w):
                c0 = pos - (map_w - 1 - free)
            c0 = max(0, min(c0, n - 1 if self.panned else n - 1 - free))
        self.first_key = c0
        # query rows: likewise, a quarter of the map free below the newest row when following
        r0 = self.first_row
        if n <= rows_visible:
            r0 = 0
        elif self.follow and pos >= r0 + rows_visible:
            r0 = pos - (3 * rows_visible) // 4
        elif pos < r0:
            r0 = pos
        elif pos >= r0 + rows_visible:
            r0 = pos - rows_visible + 1
        # rows above the first key shown would be blank (row i sees keys 0..i): start at that key
        if not self.panned:
            r0 = max(r0, min(c0, pos))
        r0 = max(0, min(r0, pos))
        if step == 2 and r0 % 2:  # even rows on top: the pairs in each cell stay the same as it scrolls
            r0 = r0 + 1 if pos >= r0 + 1 else r0 - 1
        self.first_row = max(0, r0)
        return range(self.first_row, min(n, self.first_row + rows_visible)), c0, min(n, c0 + map_w)

    # ------------------------------------------------------------------ the text around the view

    def header_text(self, width: int) -> Text:
        """HEADER_LINES lines: the view and the selection; what the view shows, in plain words (two
        lines at most); the selected token and how it is shown."""
        title = Text(end="")
        title.append(VIEW_TITLE[self.view], style="bold")
        if self.view in INSIDE_VIEWS:
            title.append(f" inside {INSIDE_VIEWS.index(self.view) + 1}/{len(INSIDE_VIEWS)}", style="dim")
        else:
            title.append(f" {VIEWS.index(self.view) + 1}/{len(ATTENTION_VIEWS)}", style="dim")
        if self.view in ("heatmap", "row", "explain", "heads", "turns"):
            title.append(" · " + self.selection_label(), style="bold cyan")
        title.truncate(width)
        sub_lines = [Text(line, style="italic dim") for line in subtitle_lines(self.view, width)]
        line2 = Text(end="")
        pos = self.position
        if pos is None:
            line2.append("no tokens yet", style="dim")
        else:
            kind = "reply" if pos >= self.store.prompt_length else "prompt"
            line2.append(f"▶{pos} ", style="bold bright_cyan")
            line2.append(fit(token_label(self.store.tokens[pos]), 12).rstrip(), style="bold")
            line2.append(f" {kind}", style="dim")
            if self.view == "heatmap":
                line2.append(f" · {SCALE_LABEL[self.scale]}", style="dim")
            if self.follow:
                line2.append(" · follow", style="green")
        line2.truncate(width)
        out = Text(end="")
        out.append_text(title)
        for line in sub_lines:
            out.append("\n")
            out.append_text(line)
        out.append("\n")
        out.append_text(line2)
        return out

    def notice_text(self, unavailable: str | None, note: str | None) -> str:
        """The line under the view: attention lost mid-reply (`unavailable`), layers without any
        (`note`, both from the engine), rows dropped for the memory cap."""
        store = self.store
        notes = []
        if unavailable:
            if store.has_attention:  # lost after what is shown (else the view itself says why it is empty)
                notes.append(f"attention no longer captured: {clean_line(unavailable)}")
        elif note:  # some layers have none (state-space, linear)
            notes.append(clean_line(note))
        if store.dropped_rows:
            notes.append(
                f"{store.dropped_rows} oldest rows dropped to stay under "
                f"{store.cap_bytes / 2**20:.0f} MB of attention"
            )
        return " · ".join(notes)

    def why_no_attention(self, unavailable: str | None) -> str | None:
        """Why the attention views are empty (None when there is attention to show)."""
        if self.store.has_attention:
            return None
        if unavailable:
            return f"This backend cannot give attention: {unavailable}"
        if self.store.length == 0:
            return self.empty_note or "No reply yet. Attention shows here, row by row, while the model answers."
        return (
            "Attention was not captured for this reply: the inspector was hidden when it started. "
            "It is captured from the next reply on while the pane is open."
        )
