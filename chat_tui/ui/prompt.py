"""The prompt: a multi-line TextArea where Enter sends, Ctrl+J adds a line and Up recalls."""

from __future__ import annotations

from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.widgets import TextArea

from chat_tui.ui.bindings import with_ids

# The most a prompt takes from pastes, in characters: a megabyte froze the editor for seconds and
# sending it for twenty, and no model's context holds even this much (about 25,000 tokens of prose)
PROMPT_LIMIT = 100_000


class PromptInput(TextArea, inherit_bindings=False):
    """Enter sends; Ctrl+J (or Shift+Enter where the terminal reports it) inserts a newline.

    Up on the first line recalls earlier prompts, Down on the last line walks back to the draft.
    """

    BINDINGS = [
        Binding("enter", "submit", "Send", id="send", priority=True),
        Binding("ctrl+j,shift+enter", "newline", "New line", id="newline", priority=True),
        Binding("up", "history(-1)", "Earlier prompt", show=False, id="history_previous", priority=True),
        Binding("down", "history(1)", "Later prompt", show=False, id="history_next", priority=True),
        # TextArea's own editing keys, given ids so they can be remapped as well
        *[b for b in with_ids(TextArea.BINDINGS, "prompt") if b.key not in ("up", "down")],
    ]

    class Submitted(Message):
        def __init__(self, prompt: PromptInput, text: str) -> None:
            super().__init__()
            self.prompt = prompt
            self.text = text

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, soft_wrap=True, show_line_numbers=False, tab_behavior="focus", compact=True,
                         placeholder="Message · Enter sends · Ctrl+J new line · ↑ earlier prompts")
        self.prompt_history: list[str] = []
        self._browse: int | None = None  # index into history while recalling
        self._draft = ""

    def _on_paste(self, event: events.Paste) -> None:
        """A paste beyond PROMPT_LIMIT is cut there (TextArea inserts the rest), and a notice says so."""
        start, end = sorted(self.selection)
        room = max(0, PROMPT_LIMIT - len(self.text) + len(self.get_text_range(start, end)))
        pasted = len(event.text)
        if pasted <= room:
            return
        event.text = event.text[:room]
        self.notify(
            f"The paste was {pasted:,} characters: the first {room:,} went into the prompt and the last "
            f"{pasted - room:,} were left out (a prompt takes at most {PROMPT_LIMIT:,}).",
            severity="warning", timeout=10, markup=False,
        )

    def action_submit(self) -> None:
        # Enter is a priority binding: the app runs it on arrival, while keys typed just before it
        # in the same terminal write (a fast typist, a paste tool, tmux) still wait in this
        # widget's queue. Read the text after them.
        self.call_later(self._submit_typed)

    def _submit_typed(self) -> None:
        self.post_message(self.Submitted(self, self.text))

    def clear_sent(self, sent: str) -> None:
        """Clear `sent` from the prompt, keeping any keys typed after Enter that have arrived since."""
        rest = self.text[len(sent) :] if self.text.startswith(sent) else ""
        self.clear()
        if rest:
            self.insert(rest)

    def action_newline(self) -> None:
        start, end = self.selection
        self.replace("\n", start, end, maintain_selection_offset=False)

    def remember(self, text: str) -> None:
        if text.strip() and (not self.prompt_history or self.prompt_history[-1] != text):
            self.prompt_history.append(text)
        self._browse = None
        self._draft = ""

    def action_history(self, direction: int) -> None:
        row, _ = self.cursor_location
        last_row = self.document.line_count - 1
        if direction < 0 and row > 0:
            self.action_cursor_up()
            return
        if direction > 0 and row < last_row:
            self.action_cursor_down()
            return
        if not self.prompt_history:
            return
        if direction < 0:
            if self._browse is None:
                self._draft = self.text
                self._browse = len(self.prompt_history) - 1
            elif self._browse > 0:
                self._browse -= 1
            else:
                return
            self.load_text(self.prompt_history[self._browse])
            first_line = self.document.get_line(0)
            self.move_cursor((0, len(first_line)))
        else:
            if self._browse is None:
                return
            if self._browse < len(self.prompt_history) - 1:
                self._browse += 1
                self.load_text(self.prompt_history[self._browse])
            else:
                self._browse = None
                self.load_text(self._draft)
            self.move_cursor(self.document.end)
