"""The layout a user sees: the compact sampling pane, resizing and maximising panes (issue 15)."""

from __future__ import annotations

from textual.widgets._footer import FooterKey

from chat_tui.config import load_config
from chat_tui.engine.params import SamplingParams
from chat_tui.ui.sampling import ROWS

from .conftest import ready, send, wait_for


async def test_the_sampling_pane_lists_only_what_differs_until_it_has_the_focus(make_app):
    app, _ = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        table = app.sampling.table
        assert table.shown_rows() == [table.cursor]  # at the model's defaults: the selected row only
        compact_width = app.query_one("#sampling").size.width
        app.settings = app.settings.edit(app.params.with_(top_k=40))
        await pilot.pause()
        assert [ROWS[i].label for i in table.shown_rows()] == ["temperature", "top-k"]
        assert "top-k" in str(table.render())
        await pilot.press("f5")
        await wait_for(pilot, lambda: app.sampling.expanded, what="the full table")
        await pilot.pause()
        assert len(table.shown_rows()) == table.get_content_height(None, None, 30) > 10
        assert app.query_one("#sampling").size.width > compact_width  # room for the ranges
        app.prompt_input.focus()
        await wait_for(pilot, lambda: not app.sampling.expanded, what="the compact pane")


async def test_maximise_and_restore_the_inspector(make_app):
    app, _ = make_app()
    async with app.run_test(size=(200, 50)) as pilot:
        await ready(pilot, app)
        await wait_for(pilot, lambda: app._inspector_pane() is not None, what="the inspector")
        await send(pilot, app, "hi")
        inspector = app.inspector
        normal = inspector.size.width
        app.action_maximize("inspector")
        await pilot.pause()
        assert app.screen.maximized is inspector
        assert inspector.outer_size.width == 200  # the whole width, not its 44 columns
        assert inspector.outer_size.height > 40
        canvas = inspector.query_one("#attn-canvas")
        assert canvas.size.width > 150
        await pilot.press("f6")
        await pilot.pause()
        assert app.screen.maximized is None
        assert inspector.size.width == normal
        app.conversation.focus() if app.conversation.can_focus else app.prompt_input.focus()
        app.action_maximize("conversation")
        await pilot.pause()
        assert app.conversation.outer_size.width == 200
        assert app.prompt_input.display  # the prompt stays under a maximised conversation


async def test_resize_keys_change_the_widths_and_they_persist(make_app, home):
    app, _ = make_app()
    async with app.run_test(size=(160, 40)) as pilot:
        await ready(pilot, app)
        await wait_for(pilot, lambda: app._inspector_pane() is not None, what="the inspector")
        before = app.query_one("#inspector").outer_size.width
        app.inspector.focus()
        await pilot.press("f8")
        await pilot.pause()
        assert app.query_one("#inspector").outer_size.width == before + 4
        app.prompt_input.focus()  # from the conversation, the key grows the conversation
        await pilot.press("f8", "f8")
        await pilot.pause()
        assert app.query_one("#inspector").outer_size.width == before - 4
    assert load_config().pane_widths["inspector"] == before - 4
    again, _ = make_app()
    async with again.run_test(size=(160, 40)) as pilot:
        await ready(pilot, again)
        await wait_for(pilot, lambda: again._inspector_pane() is not None, what="the inspector")
        await pilot.pause()
        assert again.query_one("#inspector").outer_size.width == before - 4


async def test_the_footer_keeps_f1_keys_at_80_columns(make_app):
    app, _ = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot, app)
        await wait_for(pilot, lambda: bool(app.query(FooterKey)), what="the footer")
        await pilot.pause()
        keys = [k for k in app.query(FooterKey) if k.description == "Keys"]
        assert keys and keys[0].region.right <= 80 and keys[0].region.width > 0


async def test_defaults_come_from_the_model(make_app):
    app, engine = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        assert app.model_defaults == engine.default_params() == app.sampling.table.defaults
        assert isinstance(app.model_defaults, SamplingParams)
