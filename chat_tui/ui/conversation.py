"""The conversation pane: one MessageView per message, replies streamed as Markdown."""

from __future__ import annotations

import functools
import gc
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from rich.style import Style
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Button, Static

from chat_tui.ui.state import ChatItem
from chat_tui.ui.text import clean, safe_text

STATUS_LABEL = {
    "generating": "generating…",
    "waiting": "waiting for the model…",
    "stopped": "stopped",
    "error": "error",
    "complete": "",
}


if TYPE_CHECKING:
    from markdown_it import MarkdownIt

    from chat_tui.ui.lens_gutter import LensGutter

# Markdown (markdown-it, the highlighter) loads with the first reply, not before the first frame.


def safe_parser() -> MarkdownIt:
    """GFM without raw HTML (HTML in a reply shows as text), and every line break the model wrote
    kept: a single newline is a hard break, not Markdown's soft one that joins the lines (verse,
    addresses and unmarked lists stay as written). Code blocks are not inline text: untouched."""
    from markdown_it import MarkdownIt

    parser = MarkdownIt("gfm-like", {"html": False})
    parser.core.ruler.push("hard_breaks", _hard_breaks)
    return parser


def _hard_breaks(state) -> None:  # noqa: ANN001 - markdown-it's StateCore, imported late
    for token in state.tokens:
        for child in token.children or ():
            if child.type == "softbreak":
                child.type = "hardbreak"


@functools.cache
def reply_markdown():  # noqa: ANN201 - a Textual class, made at the first reply (Markdown loads late)
    """Textual's Markdown widget, with code blocks highlighted only by the language they declare.

    Textual highlights a fence with no language by asking Pygments to guess it, which imports
    every lexer (some 250 modules, half a second the first time) and tries each on the code, again
    at every streamed update of the block: it took two thirds of the UI thread and halved the
    model's tokens/s while a reply with such a block streamed. An unknown or missing language is
    shown as plain text instead; a known one (```python) is highlighted as before.
    """
    from pygments.lexers._mapping import LEXERS
    from textual.widgets import Markdown
    from textual.widgets._markdown import MarkdownFence

    known = {alias for _module, _name, aliases, _files, _mimes in LEXERS.values() for alias in aliases}

    class ReplyFence(MarkdownFence):
        @classmethod
        def highlight(cls, code, language, ansi=False, dark=False):  # noqa: ANN001, ANN206
            return super().highlight(code, language if language and language.lower() in known else "text", ansi, dark)

    class ReplyMarkdown(Markdown):
        BLOCKS = {**Markdown.BLOCKS, "fence": ReplyFence, "code_block": ReplyFence}

    return ReplyMarkdown


UNKNOWN_PROB_STYLE = Style(color="rgb(140,140,140)", italic=True)
FORCED_STYLE = Style(reverse=True, bold=True)  # the token a fork forced, in the colour view


def prob_style(prob: float) -> Style:
    """Red for unlikely tokens through yellow to green for near-certain ones; grey italics for a
    probability that is no number (NaN from a broken checkpoint, or any engine's bad value)."""
    if math.isnan(prob):
        return UNKNOWN_PROB_STYLE
    p = min(max(prob, 0.0), 1.0)
    if p < 0.5:
        r, g = 230, int(60 + 340 * p)
    else:
        r, g = int(230 - 300 * (p - 0.5)), 230
    return Style(color=f"rgb({max(r, 60)},{min(g, 230)},70)")


# A message of yours longer than this shows its start and end only (wrapping 100,000 characters
# took half a second at every layout); the whole text is kept, sent and copied (c).
SHOWN_LIMIT = 6_000


def shown_text(text: str) -> str:
    """`text`, or its start and end with a line saying how much is not shown in between."""
    if len(text) <= SHOWN_LIMIT:
        return text
    head, tail = text[: SHOWN_LIMIT * 2 // 3], text[-(SHOWN_LIMIT // 3) :]
    hidden = len(text) - len(head) - len(tail)
    return f"{head}\n\n[… {hidden:,} more characters not shown; c copies the whole message …]\n\n{tail}"


def code_blocks(markdown: str) -> list[tuple[str, str]]:
    """The fenced code blocks of a reply as (language, code), in order."""
    parser = safe_parser()
    return [
        ((token.info or "").strip().split(" ")[0], token.content)
        for token in parser.parse(markdown)
        if token.type == "fence" or token.type == "code_block"
    ]


def release_removed_widgets() -> None:
    """Let removed widgets go. Textual 8's `StylesCache.get_inner_outer` is an `lru_cache` on a
    method: its 1,024 entries keep removed widgets' render caches (every line they last drew) alive,
    236 dead widgets after 30 replies. Emptying it after a removal (a few Style pairs to rebuild)
    frees them. A private module: a Textual without it needs nothing."""
    try:
        from textual._styles_cache import StylesCache

        StylesCache.get_inner_outer.cache_clear()
    except (ImportError, AttributeError):
        pass


class MessageView(Vertical, can_focus=False):
    """A message: who, the text (Markdown for replies), and a line of details under replies.

    Messages take the focus only when chosen (Ctrl+Up/Down, a click), so Tab does not walk
    through the whole conversation.
    """

    BINDINGS = [
        Binding("c", "copy_message", "Copy message", id="copy_message"),
        Binding("b", "copy_code", "Copy code block", id="copy_code"),
        Binding("i", "app.receipt", "Full receipt", id="message_receipt"),
        Binding("up", "app.focus_message(-1)", "Previous message", show=False, id="message_previous"),
        Binding("down", "app.focus_message(1)", "Next message", show=False, id="message_next"),
        Binding("enter", "app.focus_prompt", "Back to the prompt", show=False, id="message_to_prompt"),
        Binding("home", "edge('first')", "First message", show=False, id="message_first"),
        Binding("end", "edge('last')", "Last message", show=False, id="message_last"),
        Binding("left", "sibling(-1)", "Previous sibling (branch)", show=False, id="previous_sibling"),
        Binding("right", "sibling(1)", "Next sibling (branch)", show=False, id="next_sibling"),
        Binding("delete", "delete_branch", "Delete this version and what follows", show=False, id="delete_branch"),
        Binding("f", "fork_here", "Fork this reply at a token", show=False, id="fork_here"),
    ]

    class SiblingRequested(Message):
        """Show the branch through the sibling `delta` places from `item` (the app decides)."""

        def __init__(self, item: ChatItem, delta: int) -> None:
            super().__init__()
            self.item = item
            self.delta = delta

    def __init__(
        self,
        item: ChatItem,
        *,
        markdown: bool = True,
        show_probs: bool = False,
        meta: Text | None = None,
        lens_gutter: bool = False,
    ) -> None:
        super().__init__(classes=f"message -{item.role}")
        self._initial_meta = meta
        self.item = item
        self.use_markdown = markdown and item.role == "assistant"
        self.show_probs = show_probs
        self.show_lens_gutter = lens_gutter
        self._backlog = ""
        self._final: str | None = None
        self._busy = False
        self._code_index = -1
        self._prob_text: Text | None = None

    def compose(self) -> ComposeResult:
        yield Static(self._header(), classes="who")
        if self.use_markdown:
            yield reply_markdown()(clean(self.item.content) or None, parser_factory=safe_parser, open_links=False,
                                   classes="body")
        else:
            content = self.item.content if self.item.role == "assistant" else shown_text(self.item.content)
            yield Static(safe_text(content), classes="body plain")
        if self.item.role == "assistant":
            yield Static("", classes="probs")
            if self.show_lens_gutter:  # mounted when first shown: off, it costs nothing
                from chat_tui.ui.lens_gutter import LensGutter  # (and not imported before the first frame)

                yield LensGutter(self.item)
            yield Static(self._initial_meta or "", classes="meta")

    def on_mount(self) -> None:
        self._sync_probs()

    class DeleteRequested(Message):
        """Delete `item` and the messages below it, in every branch (the app asks first)."""

        def __init__(self, item: ChatItem) -> None:
            super().__init__()
            self.item = item

    class ForkRequested(Message):
        """Fork `item`, a reply, at one of its tokens (the app opens the inspector's fork picker)."""

        def __init__(self, item: ChatItem) -> None:
            super().__init__()
            self.item = item

    def action_fork_here(self) -> None:
        self.post_message(self.ForkRequested(self.item))

    def action_sibling(self, delta: int) -> None:
        self.post_message(self.SiblingRequested(self.item, delta))

    def action_delete_branch(self) -> None:
        self.post_message(self.DeleteRequested(self.item))

    async def action_edge(self, which: str) -> None:
        conversation = self.query_ancestor(ConversationView)
        await (conversation.show_first() if which == "first" else conversation.show_last())

    def take_focus(self, *, scroll: bool = True) -> None:
        """Focus this message; `scroll`: bring it into view (the caller may place the view itself)."""
        self.can_focus = True
        self.focus(scroll_visible=scroll)
        if scroll:
            self.scroll_visible(animate=False)

    def on_blur(self) -> None:
        self.can_focus = False

    def on_click(self) -> None:
        self.take_focus()

    def _header(self) -> Text:
        who = {"user": "You", "assistant": "Assistant", "system": "System"}.get(self.item.role, self.item.role)
        header = Text(who, style="bold")
        which, of = self.item.siblings
        if of > 1:  # other versions of this message: ← and → on it move between them
            header.append(f"  ‹ {which}/{of} ›", style="bold")
        label = STATUS_LABEL.get(self.item.status, "")
        if label:
            header.append(f"  {label}", style="italic")
        return header

    def refresh_header(self) -> None:
        self.query_one(".who", Static).update(self._header())
        self.set_class(self.item.status == "stopped", "-stopped")
        self.set_class(self.item.status == "error", "-error")

    def set_meta(self, text: Text) -> None:
        if self.item.role != "assistant":
            return
        meta = self.query_one(".meta", Static)
        width = max(meta.size.width, 1)
        lines = len(text.plain) // width
        meta.update(text, layout=lines != getattr(self, "_meta_lines", -1))
        self._meta_lines = lines

    # ------------------------------------------------------------------ streaming

    def stream_append(self, fragment: str) -> None:
        """Add already-cleaned text. Markdown is appended incrementally, never re-parsed whole."""
        if not fragment:
            return
        if not self.use_markdown:
            self.query_one(".body", Static).update(safe_text(self.item.content))
            return
        self._backlog += fragment
        self._kick()

    def finish(self, text: str) -> None:
        """The final full render of a reply (after any queued appends)."""
        if not self.use_markdown:
            self.query_one(".body", Static).update(safe_text(text))
            return
        self._final = clean(text)
        self._kick()

    def set_text(self, text: str) -> None:
        self.finish(text)

    def _kick(self) -> None:
        if not self._busy:
            self._busy = True
            self.run_worker(self._drain(), group="markdown", exit_on_error=False)

    async def _drain(self) -> None:
        from textual.widgets import Markdown

        markdown = self.query_one(".body", Markdown)
        try:
            while self._backlog or self._final is not None:
                if self._backlog:
                    fragment, self._backlog = self._backlog, ""
                    if self._final is None:
                        await markdown.append(fragment)
                        continue
                final, self._final = self._final, None
                await markdown.update(final)  # replaces the streamed blocks
                release_removed_widgets()
                if isinstance(self.parent, ConversationView):
                    self.parent.collect_removed()
        finally:
            self._busy = False

    @property
    def settled(self) -> bool:
        """No Markdown work queued (tests and benchmarks wait for this)."""
        return not self._busy and not self._backlog and self._final is None

    # ------------------------------------------------------------------ probability colours

    def add_token_probs(self, pairs: list[tuple[str, float]]) -> None:
        """`pairs` were just added to the item's token_probs (a streaming reply)."""
        if self._prob_text is not None:
            for text, prob in pairs:
                self._prob_text.append(clean(text), prob_style(prob))
        if self.show_probs and pairs:
            self._sync_probs()

    def set_show_probs(self, show: bool) -> None:
        self.show_probs = show
        self._sync_probs()

    def _sync_probs(self) -> None:
        if self.item.role != "assistant":
            return
        on_ = self.show_probs and bool(self.item.token_probs)
        if on_ and self._prob_text is None:  # built when first shown: most replies never are
            self._prob_text = Text(end="")
            fork = self.item.meta.get("fork")
            forced = fork.get("token_index", -1) if isinstance(fork, dict) else -1  # a fork's forced token
            for i, (text, prob) in enumerate(self.item.token_probs):
                self._prob_text.append(clean(text), prob_style(prob) + FORCED_STYLE if i == forced else prob_style(prob))
        probs = self.query_one(".probs", Static)
        probs.display = on_
        self.query_one(".body").display = not on_
        if on_:
            probs.update(self._prob_text)

    @property
    def lens_gutter(self) -> LensGutter | None:
        """The reply's lens gutter (None for other messages)."""
        found = self.query(".lens-gutter")
        return found.first() if found else None  # type: ignore[return-value]  # LensGutter's class

    def set_lens_gutter(self, show: bool) -> None:
        self.show_lens_gutter = show
        gutter = self.lens_gutter
        if gutter is not None:
            gutter.display = show
        elif show and self.item.role == "assistant":
            from chat_tui.ui.lens_gutter import LensGutter

            self.mount(LensGutter(self.item), before=self.query_one(".meta"))

    # ------------------------------------------------------------------ copy

    def action_copy_message(self) -> None:
        text = self.item.content
        self.app.copy_to_clipboard(text)
        who = "your message" if self.item.role == "user" else "the reply"
        lines = text.count("\n") + 1 if text else 0
        self.app.notify(f"Copied {who} ({len(text)} characters, {lines} lines)", markup=False)

    def action_copy_code(self) -> None:
        blocks = code_blocks(self.item.content)
        if not blocks:
            self.app.notify("This message has no code block", severity="warning", markup=False)
            return
        self._code_index = (self._code_index + 1) % len(blocks)
        language, code = blocks[self._code_index]
        self.app.copy_to_clipboard(code)
        lines = code.count("\n") + (0 if code.endswith("\n") else 1)
        what = f"{language} " if language else ""
        self.app.notify(
            f"Copied {what}code block {self._code_index + 1} of {len(blocks)} ({lines} lines)", markup=False
        )


class ConversationView(VerticalScroll, can_focus=False):
    """The messages of the open conversation, mounted a window at a time.

    A conversation opens with its newest `page` messages mounted; "Show earlier" (or Up on the
    first one) mounts the page before, "Show later" (or Down on the last) the page after, Home and
    End on a message jump to either end. At most `max_mounted` messages stay mounted: paging
    unmounts those at the other end, and each new message the oldest, so neither a long session
    nor a long conversation piles up widgets.
    """

    page = 24
    max_mounted = 2 * page

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.items: list[ChatItem] = []
        self.markdown = True
        self.show_probs = False
        self.lens_gutter = False  # the lens gutter under each reply (the `lens_gutter` binding)
        self._first_shown = 0  # the mounted window is items[_first_shown:_end_shown]
        self._end_shown = 0
        self._removed_since_collect = False
        self.meta_for: Callable[[ChatItem], Text] | None = None

    def compose(self) -> ComposeResult:
        yield Button("Show earlier messages", id="earlier", compact=True)
        yield Static(
            Text.assemble(
                ("Say something to start. ", "bold"),
                "Enter sends, Ctrl+J adds a line, Up recalls earlier prompts. "
                "F1 lists every key; Ctrl+P opens the command palette.",
            ),
            id="empty-hint",
        )
        yield Button("Show later messages", id="later", compact=True)

    def on_mount(self) -> None:
        self._sync_chrome()

    def _sync_chrome(self) -> None:
        earlier = self.query_one("#earlier", Button)
        earlier.display = self._first_shown > 0
        earlier.label = f"▲ Show {min(self.page, self._first_shown)} earlier of {self._first_shown}"
        later_count = len(self.items) - self._end_shown
        later = self.query_one("#later", Button)
        later.display = later_count > 0
        later.label = f"▼ Show {min(self.page, later_count)} later of {later_count}"
        self.query_one("#empty-hint").display = not self.items

    def _views(self) -> list[MessageView]:
        return list(self.query_children(MessageView))

    def view_for(self, item: ChatItem) -> MessageView | None:
        """The mounted view of `item`, or None (it is outside the mounted window)."""
        for view in self._views():
            if view.item is item:
                return view
        return None

    def _make(self, item: ChatItem) -> MessageView:
        meta = self.meta_for(item) if self.meta_for is not None and item.role == "assistant" else None
        return MessageView(item, markdown=self.markdown, show_probs=self.show_probs, meta=meta,
                           lens_gutter=self.lens_gutter)

    def position_of(self, item: ChatItem) -> int:
        """Where `item` (that very object) is in the conversation."""
        return next(i for i, it in enumerate(self.items) if it is item)

    async def _mount_window(self, start: int) -> list[MessageView]:
        """Unmount every message and mount items[start : start + page]."""
        await self._remove(self._views())
        self._first_shown = max(0, min(start, len(self.items)))
        self._end_shown = min(len(self.items), self._first_shown + self.page)
        views = [self._make(item) for item in self.items[self._first_shown : self._end_shown]]
        if views:
            await self.mount_all(views, before=self.query_one("#later"))
        self._sync_chrome()
        return views

    async def show(self, items: list[ChatItem], *, focus: int | None = None) -> None:
        """Replace everything with `items`, mounting only the newest page, or the page around
        items[focus], which takes the focus (another branch shown from one of its messages)."""
        self.items = items
        start = len(items) - self.page
        if focus is not None:
            start = min(start, focus - self.page // 2)
        await self._mount_window(start)
        if self._end_shown == len(items):
            self.scroll_end(animate=False, immediate=True)
            self.anchor()
        if focus is not None and 0 <= focus < len(items):
            view = self.view_for(items[focus])
            if view is not None:
                view.take_focus()

    async def show_first(self) -> None:
        """The oldest page, scrolled to its top, its first message focused (Home)."""
        views = await self._mount_window(0)
        self.anchor(False)
        self.scroll_home(animate=False, immediate=True)
        if views:
            # no scroll to the focus: it would go to where the message sat before the new window was laid
            # out (under the "Show earlier" button, now hidden), leaving the top lines hidden
            views[0].take_focus(scroll=False)
        self.call_after_refresh(self.scroll_home, animate=False, immediate=True)

    async def show_last(self) -> None:
        """The newest page, scrolled to the end, its last message focused (End)."""
        if self._end_shown < len(self.items):
            await self.show(self.items)
        self.scroll_end(animate=False, immediate=True)
        self.anchor()
        views = self._views()
        if views:
            views[-1].take_focus()

    async def add(self, item: ChatItem) -> MessageView:
        if self._end_shown < len(self.items):  # paged back: a new message brings the newest page back
            await self.show(self.items)
        self.items.append(item)
        view = self._make(item)
        await self.mount(view, before=self.query_one("#later"))
        self._end_shown = len(self.items)
        await self._unmount(oldest=True)
        self._sync_chrome()
        self.anchor()
        self.scroll_end(animate=False)
        return view

    async def _remove(self, views: list[MessageView]) -> None:
        await self.remove_children(views)
        release_removed_widgets()
        self._removed_since_collect = True

    def collect_removed(self) -> None:
        """A reply has just been rendered in full (a quiet moment): free the messages removed since.

        Removed widgets are reference cycles, so only the collector's full pass frees them, and
        the app's tuned collector (`tune_runtime`) runs that rarely: tens of MB of dead messages
        piled up between passes, and once freed they left pymalloc's arenas full of holes that are
        never handed back (RSS 171 MB after 100 replies, 53 MB of it free space; 101 MB when
        collected here)."""
        if self._removed_since_collect:
            self._removed_since_collect = False
            gc.collect()

    async def _unmount(self, *, oldest: bool) -> None:
        """Unmount the messages beyond `max_mounted`, at the top (oldest) or at the bottom."""
        views = self._views()
        excess = len(views) - self.max_mounted
        if excess <= 0:
            return
        if oldest:
            await self._remove(views[:excess])
            self._first_shown = self.position_of(views[excess].item)
        else:
            await self._remove(views[-excess:])
            self._end_shown = self.position_of(views[-excess].item)

    async def remove_from(self, item: ChatItem) -> None:
        """Remove `item` and every later message."""
        index = self.position_of(item)
        doomed = self.items[index:]
        del self.items[index:]
        views = [v for v in self._views() if any(v.item is d for d in doomed)]
        if views:
            await self._remove(views)
        self._first_shown = min(self._first_shown, len(self.items))
        self._end_shown = min(self._end_shown, len(self.items))
        self._sync_chrome()

    @on(Button.Pressed, "#earlier")
    async def show_earlier(self) -> None:
        """Mount the page before the first mounted message and focus the message just before it."""
        start = max(0, self._first_shown - self.page)
        views = [self._make(item) for item in self.items[start : self._first_shown]]
        if views:
            await self.mount_all(views, after=self.query_one("#earlier"))
        self._first_shown = start
        await self._unmount(oldest=False)
        self._sync_chrome()
        if views:
            views[-1].take_focus()

    @on(Button.Pressed, "#later")
    async def show_later(self) -> None:
        """Mount the page after the last mounted message and focus the message just after it."""
        end = min(len(self.items), self._end_shown + self.page)
        views = [self._make(item) for item in self.items[self._end_shown : end]]
        if views:
            await self.mount_all(views, before=self.query_one("#later"))
        self._end_shown = end
        await self._unmount(oldest=True)
        self._sync_chrome()
        if views:
            views[0].take_focus()

    async def step_focus(self, delta: int, focused: object) -> bool:
        """Move the focus `delta` messages from `focused`, mounting the next page at either end of the
        window; False when it moves past the newest message (the prompt is next)."""
        views = self._views()
        if not views:
            return True
        if isinstance(focused, MessageView) and focused in views:
            index = views.index(focused) + delta
            if index >= len(views):
                if self._end_shown < len(self.items):
                    await self.show_later()
                    return True
                return False
            if index < 0:
                if self._first_shown > 0:
                    await self.show_earlier()
                    return True
                index = 0
        else:
            index = len(views) - 1 if delta < 0 else 0
        views[index].take_focus()
        return True

    def set_lens_gutter(self, show: bool) -> None:
        self.lens_gutter = show
        for view in self._views():
            view.set_lens_gutter(show)

    def set_show_probs(self, show: bool) -> None:
        self.show_probs = show
        for view in self._views():
            view.set_show_probs(show)
