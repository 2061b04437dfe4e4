"""The lens gutter under replies (F10, binding id `lens_gutter`): each token's commitment layer as a
digit and its surprisal as a shade, from the FakeEngine's lens (whose commitment layer is known)."""

from __future__ import annotations

from chat_tui.ui.lens_gutter import LEGEND, LensGutter, cell, shade
from tests.ui.conftest import ready, send, wait_for

REPLY = "The quick brown fox jumps over the lazy dog."


def gutter_cells(gutter: LensGutter) -> str:
    return str(gutter.render()).split("\n", 1)[1]


async def shows_the_fakes_commitment_layers(pilot, gutter: LensGutter, item, engine) -> None:
    """Wait until every cell is known (a cell stays blank until then, and the strip is redrawn a moment
    later), then check each digit is the layer the fake engine commits at for that token, from 1."""
    n = len(item.token_probs)
    await wait_for(pilot, lambda: len(gutter_cells(gutter)) == n and " " not in gutter_cells(gutter),
                   what="the commitment layers")
    prompt_length = len(gutter._lens_ids) - n
    expected = "".join(str(engine.fake_commit_layer(gutter._lens_ids[: prompt_length + i]) + 1) for i in range(n))
    assert gutter_cells(gutter) == expected


async def test_the_gutter_shows_each_tokens_commitment_layer_while_on(make_app):
    app, engine = make_app([REPLY, REPLY])
    async with app.run_test(size=(160, 40)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "first")
        view = app.conversation.view_for(app.conversation.items[-1])
        assert view is not None and view.lens_gutter is None  # off: not even mounted
        await pilot.press("f10")
        assert app.conversation.lens_gutter
        await send(pilot, app, "second")
        item = app.conversation.items[-1]
        gutter = app.conversation.view_for(item).lens_gutter
        assert gutter is not None and gutter.display
        await shows_the_fakes_commitment_layers(pilot, gutter, item, engine)
        assert LEGEND in str(gutter.render())
        assert [r.lens for r in engine.records] == [False, True]  # asked of the stream only while on
        await pilot.press("f10")
        assert not gutter.display


async def test_commitment_layers_that_come_with_the_tokens_are_not_asked_again(make_app):
    app, engine = make_app([REPLY])
    engine.lens_in_stream = True  # as the mini-GPT's decode loop: Step.commit_layer is filled
    async with app.run_test(size=(160, 40)) as pilot:
        await ready(pilot, app)
        await pilot.press("f10")
        await send(pilot, app, "first")
        item = app.conversation.items[-1]
        gutter = app.conversation.view_for(item).lens_gutter
        await shows_the_fakes_commitment_layers(pilot, gutter, item, engine)
        assert engine.lens_calls == 0  # no second pass over the prefix for any token


def test_cells_and_shades():
    assert cell(None, False) == " " and cell(None, True) == "–" and cell(0, True) == "1" and cell(12, True) == "+"
    sure, surprising = shade(0.99), shade(0.001)
    assert sure.bgcolor is not None and surprising.bgcolor is not None
    assert sure.bgcolor.get_truecolor()[0] < surprising.bgcolor.get_truecolor()[0]  # light = surprising

