"""A small app that mounts only the InspectorPane, for Pilot and snapshot tests and the benchmark."""

from __future__ import annotations

from collections.abc import Iterable

from textual.app import App, ComposeResult

from chat_tui.engine.fake import FakeEngine
from chat_tui.engine.params import SamplingParams
from chat_tui.engine.types import Message, Step
from chat_tui.ui.attention import InspectorPane

QUICK_FOX = "The quick brown fox jumps over the lazy dog."
CONVERSATION = [
    Message("system", "You are terse."),
    Message("user", "Say the pangram."),
    Message("assistant", "The quick brown fox."),
    Message("user", "All of it, please."),
]


def fake_engine(reply: str = QUICK_FOX, **kwargs) -> FakeEngine:
    kwargs.setdefault("n_layer", 2)
    kwargs.setdefault("n_head", 4)
    return FakeEngine([reply], defaults=SamplingParams(temperature=0.8, top_k=5, seed=7), **kwargs)


def fake_steps(engine: FakeEngine, conversation=CONVERSATION, params: SamplingParams | None = None,
               inspect: bool = True) -> list[Step]:
    params = params or SamplingParams(temperature=0.8, top_k=5, seed=7)
    return list(engine.stream(conversation, params, inspect=inspect))


class InspectorHarness(App):
    CSS = """
    Screen { layout: horizontal; }
    #left { width: 1fr; }
    #inspector { width: 48; border-left: vkey $panel-lighten-2; padding: 0 1; }
    """

    def __init__(self, engine=None, *, width: int = 48, **pane_kwargs) -> None:
        super().__init__()
        self.engine = engine
        self.pane_kwargs = pane_kwargs
        self.pane_width = width
        self._params: SamplingParams | None = None
        self.token_text: tuple[str, str] | None = None  # (source, text) handed to the tokens view on `feed`

    def compose(self) -> ComposeResult:
        from textual.widgets import Static

        yield Static("conversation", id="left")
        pane = InspectorPane(id="inspector", engine=self.engine, **self.pane_kwargs)
        pane.styles.width = self.pane_width
        yield pane

    @property
    def pane(self) -> InspectorPane:
        return self.query_one(InspectorPane)

    def on_mount(self) -> None:
        self.pane.focus()

    @property
    def params(self) -> SamplingParams | None:
        """The settings in force; setting them tells the pane, as ChatApp's settings watcher does."""
        return self._params

    @params.setter
    def params(self, params: SamplingParams) -> None:
        self._params = params
        self.pane.params_changed(params)

    def feed(self, steps: Iterable[Step]) -> None:
        if self.token_text is not None:
            self.pane.set_token_text(*self.token_text)
        for step in steps:
            self.pane.add_step(step)
