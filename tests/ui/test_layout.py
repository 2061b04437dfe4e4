"""The layout a user sees: the compact sampling pane, resizing and maximising panes (issue 15)."""

from __future__ import annotations

from textual.widgets._footer import FooterKey

from chat_tui.config import load_config
from chat_tui.engine.params import SamplingParams
from chat_tui.ui.attention.state import VIEW_SUBTITLE
from chat_tui.ui.sampling import ROWS

from .conftest import inspector_ready, ready, send, wait_for


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
        await inspector_ready(pilot, app)
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
        header = inspector.query_one("#attn-header")
        await wait_for(pilot, lambda: VIEW_SUBTITLE["heatmap"] in str(header.render()),
                       what="the subtitle on one line of the whole width")
        await pilot.press("f6")
        await pilot.pause()
        assert app.screen.maximized is None
        titles = {command.title for command in app.get_system_commands(app.screen)}
        assert {"Maximize inspector", "Maximize conversation", "Restore panes"} <= titles
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
        await inspector_ready(pilot, app)
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
        await inspector_ready(pilot, again)
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


def _canvas_text(app) -> str:
    from rich.style import Style

    pane = app.inspector
    size = pane.query_one("#attn-canvas").content_size
    return "\n".join(strip.text for strip in pane.frame_strips(size.width, size.height, Style()))


async def test_the_heatmap_labels_its_rows_with_the_window_tokens_and_explains_its_colours(make_app):
    from chat_tui.ui.attention.help import ViewHelpScreen
    from chat_tui.ui.attention.pane import HEATMAP_LABEL_WIDTH
    from chat_tui.ui.attention.render import SCALE_MEANING
    from chat_tui.ui.attention.views import fit
    from chat_tui.ui.text import token_label

    app, _ = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await inspector_ready(pilot, app)
        await send(pilot, app, "Write an add function in Python")
        pane = app.inspector
        size = pane.query_one("#attn-canvas").content_size
        heatmap = pane.render_heatmap(size.width, size.height)
        rows, _, _ = pane.heatmap_window(size.width, size.height)
        tokens = pane.store.tokens
        assert heatmap.row_labels == [fit(token_label(tokens[p]), HEATMAP_LABEL_WIDTH - 1) for p in rows]
        assert len(rows) > 10
        text = _canvas_text(app)
        assert SCALE_MEANING["rowmax"] in text and "looks most at" in text
        header = pane.header_text(size.width).plain
        assert "layer 1/" in header and "head 1/" in header and "query ↓ attends to key →" in header
        pane.focus()
        await pilot.press("n")
        await wait_for(pilot, lambda: SCALE_MEANING["sqrt"] in _canvas_text(app), what="the legend to follow the scale")
        assert SCALE_MEANING["rowmax"] not in _canvas_text(app)
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: isinstance(app.screen, ViewHelpScreen), what="the view's explanation")
        shown = str(app.screen.query_one("#view-help-text").render())
        assert "softmax(q·kⱼ / √d)" in shown and "README" in shown and "sink" in shown
        await pilot.press("escape")
        await wait_for(pilot, lambda: not isinstance(app.screen, ViewHelpScreen), what="the explanation to close")


async def test_a_reply_has_one_receipt_line_and_i_shows_the_full_one(make_app):
    app, _ = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "hi")
        reply = app.conversation.items[-1]
        line = app.conversation.meta_for(reply)
        assert "\n" not in line.plain and "tok/s" in line.plain and "seed" not in line.plain
        await pilot.press("ctrl+up")
        await wait_for(pilot, lambda: getattr(app.focused, "item", None) is reply, what="the reply to be picked")
        await pilot.press("i")
        await wait_for(pilot, lambda: any("seed: 7" in n.message for n in app._notifications), what="the receipt")


async def test_the_explain_view_fits_every_column_at_120x40(home, tiny_checkpoint):
    from chat_tui.config import get_paths
    from chat_tui.ui.app import ChatApp

    app = ChatApp(str(tiny_checkpoint), paths=get_paths(), device="cpu")  # the real q·k, in the app's process
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await inspector_ready(pilot, app)
        await send(pilot, app, "hello there")
        pane = app.inspector
        pane.focus()
        await pilot.press("3")
        await wait_for(pilot, lambda: "q·k" in _canvas_text(app) and "computing" not in _canvas_text(app),
                       timeout=30, what="the explanation")
        lines = [*pane.header_text(pane.content_size.width).plain.splitlines(), *_canvas_text(app).splitlines()]
        for column in ("q·k", "÷√d", " w", "‖wⱼvⱼ‖"):
            assert any(column in line for line in lines), column
        assert "out = Σ wⱼvⱼ" in "\n".join(lines) and "matches the stored row" in "\n".join(lines)
        assert not [line for line in lines if line.rstrip().endswith("…")]
