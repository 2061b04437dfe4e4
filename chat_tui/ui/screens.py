"""Modal screens: help, confirmations, one-line and multi-line editors, the chain order, presets
and the conversation list."""

from __future__ import annotations

import time
from collections.abc import Iterable

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Input, OptionList, Static, TextArea
from textual.widgets.option_list import Option

from chat_tui.engine.params import STAGES
from chat_tui.store import ConversationInfo, Store
from chat_tui.ui.text import clean, clean_line


class ConversationRenamed(Message):
    def __init__(self, conversation_id: int, title: str) -> None:
        super().__init__()
        self.conversation_id = conversation_id
        self.title = title


class ConversationDeleted(Message):
    def __init__(self, conversation_id: int) -> None:
        super().__init__()
        self.conversation_id = conversation_id


class HelpScreen(ModalScreen[None]):
    """Every key binding, with its id (for `[keymap]` in config.toml) and its keys."""

    BINDINGS = [Binding("escape,f1,q", "dismiss", "Close", id="help_close")]

    def __init__(self, rows: Iterable[tuple[str, str, str, str]], config_file: str) -> None:
        super().__init__()
        self.rows = list(rows)  # (where, description, keys, id)
        self.config_file = config_file

    def compose(self) -> ComposeResult:
        with Vertical(id="help-box", classes="dialog"):
            yield Static(Text("Keys", style="bold"), classes="dialog-title")
            table: DataTable = DataTable(id="help-table", cursor_type="row", zebra_stripes=True)
            yield table
            note = Text("Remap any key in ", style="dim")
            note.append(clean_line(self.config_file), style="dim bold")
            note.append(' under [keymap], e.g. regenerate = "ctrl+r". Esc closes.', style="dim")
            yield Static(note, id="help-note")

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("Where", "Action", "Keys", "Binding id")
        for where, description, keys, binding_id in self.rows:
            table.add_row(Text(where), Text(description), Text(keys, style="bold"), Text(binding_id, style="dim"))
        table.focus()


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS = [
        Binding("escape,n", "answer(False)", "No", id="confirm_no"),
        Binding("y", "answer(True)", "Yes", id="confirm_yes"),
    ]

    def __init__(self, question: str, detail: str = "", yes: str = "Yes") -> None:
        super().__init__()
        self.question = question
        self.detail = detail
        self.yes = yes

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog small"):
            yield Static(Text(clean_line(self.question), style="bold"), classes="dialog-title")
            if self.detail:
                yield Static(Text(clean(self.detail)), classes="dialog-detail")
            with Horizontal(classes="buttons"):
                yield Button(f"{self.yes} (y)", id="yes", variant="primary", compact=True)
                yield Button("Cancel (n)", id="no", compact=True)

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)

    @on(Button.Pressed)
    def pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class InputScreen(ModalScreen[str | None]):
    """Ask for one line of text (a title, a path, a preset name)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="input_cancel")]

    def __init__(self, title: str, value: str = "", placeholder: str = "", hint: str = "") -> None:
        super().__init__()
        self.title_text = title
        self.value = value
        self.placeholder = placeholder
        self.hint = hint

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog small"):
            yield Static(Text(self.title_text, style="bold"), classes="dialog-title")
            yield Input(clean_line(self.value), placeholder=self.placeholder, id="input")
            yield Static(Text(self.hint or "Enter accepts · Esc cancels", style="dim"), classes="dialog-detail")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    @on(Input.Submitted)
    def submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)


class TextEditScreen(ModalScreen[str | None]):
    """Edit a longer text (the system prompt, the stop strings)."""

    BINDINGS = [
        Binding("ctrl+s", "save", "Apply", id="editor_apply", priority=True),
        # priority: a TextArea that indents with Tab takes Esc to move focus on (here, back onto itself)
        Binding("escape", "cancel", "Cancel", id="editor_cancel", priority=True),
    ]

    def __init__(self, title: str, text: str, hint: str = "") -> None:
        super().__init__()
        self.title_text = title
        self.text = text
        self.hint = hint

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(Text(self.title_text, style="bold"), classes="dialog-title")
            yield TextArea(clean(self.text), id="editor", soft_wrap=True, tab_behavior="indent")
            yield Static(
                Text((self.hint + " · " if self.hint else "") + "Ctrl+S applies · Esc cancels", style="dim"),
                classes="dialog-detail",
            )

    def on_mount(self) -> None:
        self.query_one(TextArea).focus()

    def action_save(self) -> None:
        self.dismiss(self.query_one(TextArea).text)

    def action_cancel(self) -> None:
        self.dismiss(None)


def encode_stops(stops: Iterable[str]) -> str:
    """One stop string per line, with \\n, \\t and \\\\ written as escapes."""
    return "\n".join(s.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t") for s in stops)


def decode_stops(text: str) -> tuple[str, ...]:
    out: list[str] = []
    for line in text.split("\n"):
        if not line:
            continue
        decoded, i = [], 0
        while i < len(line):
            ch = line[i]
            if ch == "\\" and i + 1 < len(line):
                nxt = line[i + 1]
                decoded.append({"n": "\n", "t": "\t", "\\": "\\"}.get(nxt, "\\" + nxt))
                i += 2
            else:
                decoded.append(ch)
                i += 1
        out.append("".join(decoded))
    return tuple(out)


class OrderScreen(ModalScreen[tuple[str, ...] | None]):
    """Reorder the sampling chain: Up/Down choose a stage, Shift+Up/Down (or [ and ]) move it."""

    BINDINGS = [
        Binding("shift+up,left_square_bracket", "move(-1)", "Move up", id="order_up"),
        Binding("shift+down,right_square_bracket", "move(1)", "Move down", id="order_down"),
        Binding("r", "reset", "Default order", id="order_reset"),
        Binding("enter,ctrl+s", "save", "Apply", id="order_apply", priority=True),
        Binding("escape", "cancel", "Cancel", id="order_cancel"),
    ]

    def __init__(self, order: tuple[str, ...]) -> None:
        super().__init__()
        self.order = list(order)

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog small"):
            yield Static(Text("Sampling chain order", style="bold"), classes="dialog-title")
            yield OptionList(*self.order, id="order-list")
            yield Static(
                Text("↑/↓ choose · Shift+↑/↓ or [ ] move · r default · Enter applies · Esc cancels", style="dim"),
                classes="dialog-detail",
            )

    def on_mount(self) -> None:
        options = self.query_one(OptionList)
        options.highlighted = 0
        options.focus()

    def _refresh(self, highlight: int) -> None:
        options = self.query_one(OptionList)
        options.clear_options()
        options.add_options(self.order)
        options.highlighted = highlight

    def action_move(self, delta: int) -> None:
        options = self.query_one(OptionList)
        i = options.highlighted or 0
        j = i + delta
        if 0 <= j < len(self.order):
            self.order[i], self.order[j] = self.order[j], self.order[i]
            self._refresh(j)

    def action_reset(self) -> None:
        self.order = list(STAGES)
        self._refresh(0)

    def action_save(self) -> None:
        self.dismiss(tuple(self.order))

    def action_cancel(self) -> None:
        self.dismiss(None)


class PresetScreen(ModalScreen[tuple[str, str] | None]):
    """Pick a preset: Enter loads it, Delete removes a saved one, s saves the current settings."""

    BINDINGS = [
        Binding("delete,d", "delete", "Delete", id="preset_delete"),
        Binding("s", "save", "Save current as…", id="preset_save"),
        Binding("escape", "cancel", "Close", id="preset_close"),
    ]

    def __init__(self, names: list[str], shipped: Iterable[str], summaries: dict[str, str] | None = None) -> None:
        super().__init__()
        self.names = names
        self.shipped = set(shipped)
        self.summaries = summaries or {}  # by name: what the preset changes from the model's defaults

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog small"):
            yield Static(Text("Presets", style="bold"), classes="dialog-title")
            yield OptionList(
                *[
                    Option(Text.assemble((clean_line(n), "bold"), (" (shipped)" if n in self.shipped else "", "dim"),
                                         ("\n  " + clean_line(self.summaries[n]) if n in self.summaries else "", "dim")),
                           id=n)
                    for n in self.names
                ],
                id="preset-list",
            )
            yield Static(
                Text("Enter loads · s saves current settings · Delete removes · Esc closes", style="dim"),
                classes="dialog-detail",
            )

    def on_mount(self) -> None:
        self.query_one(OptionList).focus()

    @on(OptionList.OptionSelected)
    def selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(("load", str(event.option.id)))

    def action_delete(self) -> None:
        options = self.query_one(OptionList)
        if options.highlighted is None:
            return
        option = options.get_option_at_index(options.highlighted)
        self.dismiss(("delete", str(option.id)))

    def action_save(self) -> None:
        self.dismiss(("save", ""))

    def action_cancel(self) -> None:
        self.dismiss(None)


class PickScreen(ModalScreen[str | None]):
    """Pick one of `names` (a server's models): Enter picks, Esc cancels."""

    BINDINGS = [Binding("escape", "cancel", "Close", id="pick_close")]

    def __init__(self, title: str, names: list[str], hint: str = "Enter picks · Esc cancels") -> None:
        super().__init__()
        self.title_text = title
        self.names = names
        self.hint = hint

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog small"):
            yield Static(Text(clean_line(self.title_text), style="bold"), classes="dialog-title")
            yield OptionList(*[Option(Text(clean_line(n)), id=str(i)) for i, n in enumerate(self.names)],
                             id="pick-list")
            yield Static(Text(self.hint, style="dim"), classes="dialog-detail")

    def on_mount(self) -> None:
        self.query_one(OptionList).focus()

    @on(OptionList.OptionSelected)
    def selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.names[int(str(event.option.id))])

    def action_cancel(self) -> None:
        self.dismiss(None)


def conversation_label(info: ConversationInfo) -> Text:
    """Three lines: the title; the model, date, message count (and branches, where the store counts
    them); the start of the newest message."""
    title = clean_line(info.title) or "(untitled)"
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.updated_at))
    text = Text(title, style="bold", no_wrap=True, overflow="ellipsis")
    details = [f"#{info.id}", clean_line(info.model) if info.model else "no model yet", when,
               f"{info.messages} message{'s' if info.messages != 1 else ''}"]
    if info.branches > 1:
        details.append(f"{info.branches} branches")
    text.append("\n" + " · ".join(details), style="dim")
    preview = " ".join(clean_line(info.preview).split())
    text.append("\n" + (preview[:160] or "(empty)"), style="italic dim")
    return text


class ConversationListScreen(ModalScreen[tuple[str, int | None] | None]):
    """Saved conversations, newest first, loaded a page at a time as the list is scrolled."""

    BINDINGS = [
        Binding("r", "rename", "Rename", id="list_rename"),
        Binding("delete,d", "delete", "Delete", id="list_delete"),
        Binding("n", "new", "New", id="list_new"),
        Binding("escape", "cancel", "Close", id="list_close"),
    ]
    PAGE = 50

    def __init__(self, store: Store, current: int | None = None) -> None:
        super().__init__()
        self.store = store
        self.current = current
        self._last: tuple[float, int] | None = None
        self._exhausted = False
        self._infos: dict[int, ConversationInfo] = {}
        self.search = ""

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="conversations-box"):
            yield Static(Text("Conversations", style="bold"), classes="dialog-title")
            yield Input(placeholder="type to filter (title or any message)", id="conversation-filter",
                        select_on_focus=False, compact=True)
            yield OptionList(id="conversation-list")
            yield Static(
                Text("Enter opens · type to filter · ↓ the list · r renames · Delete removes · n new · Esc closes",
                     style="dim"),
                classes="dialog-detail",
            )

    def on_mount(self) -> None:
        self._load_page()
        options = self.query_one(OptionList)
        if options.option_count:
            options.highlighted = 0
        options.focus()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """While the filter has the focus, r, d and n are letters of the filter, not commands."""
        if action in ("rename", "delete", "new") and self.focused is self.query_one("#conversation-filter"):
            return False
        return True

    def on_key(self, event) -> None:  # noqa: ANN001
        """On the list, a character no key is bound to starts the filter (r, d and n stay commands)."""
        field = self.query_one("#conversation-filter", Input)
        if self.focused is field:
            if event.key == "down":
                event.stop()
                self.query_one(OptionList).focus()
            return
        char = event.character
        if char and char.isprintable() and not char.isspace() and char not in "rdn":
            event.stop()
            field.focus()
            field.insert_text_at_cursor(char)

    @on(Input.Changed, "#conversation-filter")
    def filter_changed(self, event: Input.Changed) -> None:
        self.search = event.value
        self._last, self._exhausted, self._infos = None, False, {}
        self.query_one(OptionList).clear_options()
        self._load_page()
        options = self.query_one(OptionList)
        if options.option_count:
            options.highlighted = 0

    @on(Input.Submitted, "#conversation-filter")
    def filter_submitted(self) -> None:
        cid = self._highlighted_id()
        if cid is not None:
            self.dismiss(("open", cid))

    def _load_page(self) -> None:
        if self._exhausted:
            return
        page = self.store.list_conversations(self.PAGE, before=self._last, search=self.search)
        if len(page) < self.PAGE:
            self._exhausted = True
        if page:
            self._last = (page[-1].updated_at, page[-1].id)
        options = self.query_one(OptionList)
        for info in page:
            self._infos[info.id] = info
        options.add_options([Option(conversation_label(info), id=str(info.id)) for info in page])
        if not options.option_count:
            empty = f"No conversation holds “{clean_line(self.search)}”." if self.search else "No saved conversations yet."
            options.add_option(Option(Text(empty, style="dim"), id="none", disabled=True))

    @on(OptionList.OptionHighlighted)
    def highlighted(self, event: OptionList.OptionHighlighted) -> None:
        if event.option_index >= event.option_list.option_count - 5:
            self._load_page()

    @on(OptionList.OptionSelected)
    def selected(self, event: OptionList.OptionSelected) -> None:
        if event.option.id and event.option.id != "none":
            self.dismiss(("open", int(event.option.id)))

    def _highlighted_id(self) -> int | None:
        options = self.query_one(OptionList)
        if options.highlighted is None:
            return None
        option = options.get_option_at_index(options.highlighted)
        return int(option.id) if option.id and option.id != "none" else None

    def action_rename(self) -> None:
        cid = self._highlighted_id()
        if cid is None:
            return
        info = self._infos[cid]

        def done(title: str | None) -> None:
            if title is None or not title.strip():
                return
            self.store.rename_conversation(cid, title)
            info.title = self.store.get_conversation(cid).title  # type: ignore[union-attr]
            self.query_one(OptionList).replace_option_prompt(str(cid), conversation_label(info))
            self.app.post_message(ConversationRenamed(cid, info.title))

        self.app.push_screen(InputScreen("Rename conversation", info.title), done)

    def action_delete(self) -> None:
        cid = self._highlighted_id()
        if cid is None:
            return
        info = self._infos[cid]

        def done(yes: bool | None) -> None:
            if not yes:
                return
            self.store.delete_conversation(cid)
            self.query_one(OptionList).remove_option(str(cid))
            self.app.post_message(ConversationDeleted(cid))
            self.notify(f"Deleted conversation #{cid}", markup=False)

        self.app.push_screen(ConfirmScreen(f"Delete “{clean_line(info.title) or 'untitled'}”?",
                                           f"{info.messages} messages will be lost.", yes="Delete"), done)

    def action_new(self) -> None:
        self.dismiss(("new", None))

    def action_cancel(self) -> None:
        self.dismiss(None)
