"""The conversation list and the presets list show what is in them (issue 15)."""

from __future__ import annotations

from textual.widgets import OptionList

from chat_tui.config import get_paths
from chat_tui.store import Store
from chat_tui.ui.screens import ConversationListScreen, PresetScreen

from .conftest import ready, wait_for


def _prompts(screen) -> list[str]:
    options = screen.query_one("#conversation-list", OptionList)
    return [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)]


async def test_the_list_shows_model_date_count_and_a_preview_and_typing_filters_it(make_app, home):
    store = Store(get_paths().database)
    for title, last in (("Sourdough starter", "feed it flour and water daily"), ("Lisbon trip", "take tram 28")):
        cid = store.create_conversation(title, model="tiny-gpt")
        store.add_messages(cid, [("user", title), ("assistant", last)])
    store.close()
    app, _ = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: isinstance(app.screen, ConversationListScreen), what="the list")
        screen = app.screen
        shown = _prompts(screen)
        lisbon = next(p for p in shown if p.startswith("Lisbon trip"))
        assert "tiny-gpt" in lisbon and "2 messages" in lisbon and "take tram 28" in lisbon
        assert any(c.isdigit() for c in lisbon.splitlines()[1])  # the date
        await pilot.press("t", "r", "a", "m")  # "t" starts the filter; the rest are typed into it
        await wait_for(pilot, lambda: screen.search == "tram", what="the filter")
        assert [p.splitlines()[0] for p in _prompts(screen)] == ["Lisbon trip"]
        await pilot.press("enter")
        await wait_for(pilot, lambda: not isinstance(app.screen, ConversationListScreen), what="it to open")
        assert app.conversation.items[0].content == "Lisbon trip"


async def test_presets_show_what_they_change(make_app):
    app, _ = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await pilot.press("f5", "p")  # p in the sampling pane
        await wait_for(pilot, lambda: isinstance(app.screen, PresetScreen) and app.screen.query(OptionList),
                       what="the presets")
        options = app.screen.query_one(OptionList)
        prompts = [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)]
        assert prompts and all(len(p.splitlines()) == 2 for p in prompts)
        assert any("T " in p or "top-" in p for p in prompts)
