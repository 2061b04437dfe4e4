"""`?` on the inspector: every view, the six inside-the-next-token views too, has its explanation."""

from __future__ import annotations

from chat_tui.ui.attention.help import INSIDE_SECTION, README_SECTION, VIEW_HELP, ViewHelpScreen
from chat_tui.ui.attention.state import VIEWS


def test_every_view_has_what_it_shows_a_formula_and_how_to_read_it():
    assert set(VIEW_HELP) == set(VIEWS)
    for view, (what, formula, reading) in VIEW_HELP.items():
        assert what and formula and reading, view


async def test_the_help_of_an_inside_view_points_to_its_readme_section():
    from textual.app import App

    class Host(App):
        pass

    app = Host()
    async with app.run_test(size=(100, 30)) as pilot:
        for view, section in (("lens", INSIDE_SECTION), ("heatmap", README_SECTION)):
            await app.push_screen(ViewHelpScreen(view, view.title()))
            await pilot.pause()
            text = str(app.screen.query_one("#view-help-text").render())
            assert VIEW_HELP[view][1] in text and section in text
            app.pop_screen()
            await pilot.pause()
