"""The compare screen: columns of settings on the same random numbers, the divergence marked, Keep."""

from __future__ import annotations

import pytest

from chat_tui.engine import Message, load_engine
from chat_tui.engine.fake import FakeEngine
from chat_tui.engine.params import SamplingParams
from chat_tui.ui.compare import CompareScreen

from .conftest import press_now, ready, send, wait_for

PROMPT = "what is ai"


@pytest.fixture(scope="module")
def bundled():
    """The bundled mini-GPT in this process (numpy decoding): real sampling, so the random draws matter."""
    engine = load_engine(None, device="cpu")
    yield engine
    engine.close()


async def open_compare(pilot, app, params: SamplingParams, text: str = PROMPT) -> CompareScreen:
    await ready(pilot, app)
    app.params = params
    app.prompt_input.load_text(text)
    await press_now(pilot, "f9")  # Pilot's press would wait out the columns' streaming
    await wait_for(pilot, lambda: isinstance(app.screen, CompareScreen), what="the compare screen")
    screen = app.screen
    assert isinstance(screen, CompareScreen)
    await wait_for(pilot, lambda: len(screen.runs) == 2, what="two columns")
    return screen


async def finished(pilot, screen: CompareScreen) -> None:
    await wait_for(pilot, lambda: not screen.streaming and all(run.steps for run in screen.runs), timeout=30,
                   what="every column to finish")
    await pilot.pause()


async def set_column(pilot, screen: CompareScreen, column: int, line: str) -> None:
    """Focus the column, `e` to its settings line, write `line`, Enter."""
    screen.runs[column].widget.focus()
    await pilot.press("e")
    field = screen.runs[column].widget.query_one(".column-settings")
    await wait_for(pilot, lambda: screen.focused is field, what="the settings line")
    field.value = line
    await pilot.press("enter")


def ids(run) -> list[int]:
    return [step.token_id for step in run.steps]


async def test_identical_settings_give_identical_columns(make_app, bundled):
    app, _ = make_app(engine=bundled)
    async with app.run_test(size=(120, 40)) as pilot:
        params = bundled.default_params().with_(temperature=1.3, seed=3, max_new_tokens=30)
        screen = await open_compare(pilot, app, params)
        await set_column(pilot, screen, 1, "")  # column B: the chat's settings, as A
        await finished(pilot, screen)
        first, second = screen.runs
        assert first.params == second.params and first.params.seed == 3
        assert ids(first) == ids(second) and len(set(ids(first))) > 3
        for run in screen.runs:
            assert run.widget.divergence_index is None
            assert str(run.widget.query_one(".column-divergence").render()) == ""
        text = str(screen.query_one("#compare-crn").render())
        assert "Same seed, same random draws: any difference between the columns comes from the settings alone." in text


async def test_greedy_against_hot_marks_the_divergence_at_the_right_token(make_app, bundled):
    app, _ = make_app(engine=bundled)
    async with app.run_test(size=(120, 40)) as pilot:
        params = bundled.default_params().with_(temperature=0.0, seed=2, max_new_tokens=40)
        screen = await open_compare(pilot, app, params)
        await set_column(pilot, screen, 1, "temperature=1.5")
        await finished(pilot, screen)
        # the tokens each setting gives headless, on the same seed
        conversation = [Message("user", PROMPT)]
        assert screen.conversation == conversation
        greedy = [s.token_id for s in bundled.stream(conversation, params)]
        hot = [s.token_id for s in bundled.stream(conversation, params.with_(temperature=1.5))]
        expected = next(i for i, (a, b) in enumerate(zip(greedy + [-1] * 64, hot, strict=False)) if a != b)
        assert expected > 0 and ids(screen.runs[0]) == greedy and ids(screen.runs[1]) == hot
        cold, warm = (run.widget for run in screen.runs)
        assert cold.divergence_index == warm.divergence_index == expected
        cold_note = str(cold.query_one(".column-divergence").render())
        warm_note = str(warm.query_one(".column-divergence").render())
        assert f"diverges at token {expected}" in cold_note and f"diverges at token {expected}" in warm_note
        # each column says what it gave the other's token: greedy gave the hot column's choice nothing
        hot_token = screen.runs[1].steps[expected].token
        assert "B's" in cold_note and "→ 0.000" in cold_note.split("B's")[1]
        assert "A's" in warm_note and repr(hot_token.replace("\n", "⏎")) in warm_note.splitlines()[0]
        # the diverging token is the one drawn in reverse video in each column
        for run in screen.runs:
            reply = run.widget.reply
            marked = [reply.plain[span.start:span.end] for span in reply.spans if "reverse" in str(span.style)]
            assert marked == [run.steps[expected].text or f"⟨{run.steps[expected].token}⟩"]
        # the figures of each column
        stats = str(warm.query_one(".column-stats").render())
        assert f"{len(hot)} tokens" in stats and "log-p -" in stats and "ppl" in stats


def by_temperature(conversation, params: SamplingParams) -> str:
    return "The capital is Paris." if params.greedy else "The capital is a city of light."


async def test_keep_copies_the_reply_and_its_settings_into_the_conversation(make_app):
    app, engine = make_app(engine=FakeEngine([by_temperature], defaults=SamplingParams(seed=7)))
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await open_compare(pilot, app, SamplingParams(temperature=0.0, seed=7), text="capital?")
        await set_column(pilot, screen, 1, "temperature=0.9 top_k=5")
        await finished(pilot, screen)
        assert screen.runs[0].widget.divergence_index == screen.runs[1].widget.divergence_index == 3
        screen.runs[1].widget.focus()
        await pilot.press("k")
        await wait_for(pilot, lambda: not isinstance(app.screen, CompareScreen), what="back to the chat")
        items = app.conversation.items
        assert [(i.role, i.content) for i in items] == [("user", "capital?"),
                                                       ("assistant", "The capital is a city of light.")]
        kept = items[1]
        assert kept.params["temperature"] == 0.9 and kept.params["top_k"] == 5 and kept.seed == 7
        assert app.prompt_input.text == ""
        saved = app.store.messages(app.conversation_id)
        assert [m.content for m in saved] == ["capital?", "The capital is a city of light."]
        assert saved[1].parent_id == saved[0].id  # kept under the path it answered: a branch of the tree
        # the conversation goes on from the kept reply
        await send(pilot, app, "and then?")
        assert engine.records[-1].conversation[-2] == Message("assistant", "The capital is a city of light.")


async def test_columns_are_added_and_removed_between_two_and_four(make_app):
    app, _ = make_app(engine=FakeEngine(["a b c"], defaults=SamplingParams(seed=1)))
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await open_compare(pilot, app, SamplingParams(seed=1))
        for expected in (3, 4, 4):
            await pilot.press("a")
            await wait_for(pilot, lambda expected=expected: len(screen.runs) == expected, what="a column")
        assert [run.widget.label for run in screen.runs] == ["A", "B", "C", "D"]
        screen.runs[1].widget.focus()
        for expected in (3, 2, 2):
            await pilot.press("x")
            await wait_for(pilot, lambda expected=expected: len(screen.runs) == expected, what="a column less")
        assert [run.widget.label for run in screen.runs] == ["A", "B"]
        await finished(pilot, screen)


async def test_a_bad_settings_line_is_one_line_in_the_column(make_app):
    app, _ = make_app(engine=FakeEngine(["a b c"], defaults=SamplingParams(seed=1)))
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await open_compare(pilot, app, SamplingParams(seed=1))
        await finished(pilot, screen)
        before = screen.runs[1].params
        await set_column(pilot, screen, 1, "temperature=-1")
        error = str(screen.runs[1].widget.query_one(".column-error").render())
        assert error == "temperature = '-1' is invalid: allowed [0, 100]"
        assert screen.runs[1].params == before
        await pilot.press("escape")  # leaves the settings line, then the screen
        await pilot.press("escape")
        await wait_for(pilot, lambda: not isinstance(app.screen, CompareScreen), what="back to the chat")


async def test_compare_needs_a_prompt(make_app):
    app, _ = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await pilot.press("f9")
        await pilot.pause()
        assert not isinstance(app.screen, CompareScreen)


async def test_compare_is_in_the_palette_and_its_keys_in_f1(make_app):
    app, _ = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        assert "Compare" in [command.title for command in app.get_system_commands(app.screen)]
        ids = {row[3] for row in app.binding_rows()}
        assert {"compare", "compare_keep", "compare_add_column", "compare_remove_column", "compare_edit_settings",
                "compare_preset", "compare_model", "compare_run", "compare_close"} <= ids


async def test_the_columns_stream_at_the_same_time(make_app):
    reply = " ".join(f"word{i}" for i in range(30))
    app, _ = make_app(engine=FakeEngine([reply], token_delay=0.01, defaults=SamplingParams(seed=1)))
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await open_compare(pilot, app, SamplingParams(seed=1))
        # one after the other, a column would end before the next began
        await wait_for(pilot, lambda: all(len(run.steps) >= 3 and not run.job.done for run in screen.runs),
                       what="both columns streaming")
        await finished(pilot, screen)
        assert [len(run.steps) for run in screen.runs] == [31, 31]


async def test_a_column_gets_its_own_model(make_app, bundled, tiny_checkpoint):
    app, _ = make_app(engine=bundled)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await open_compare(pilot, app, bundled.default_params().with_(seed=4, max_new_tokens=12))
        await finished(pilot, screen)
        app.engine_factory, app.model_process = None, False  # open it as `chat-tui` with model_process = false
        screen.runs[1].widget.focus()
        await pilot.press("m")
        await wait_for(pilot, lambda: app.screen is not screen, what="the model dialog")
        app.screen.query_one("Input").value = str(tiny_checkpoint)
        await pilot.press("enter")
        await wait_for(pilot, lambda: screen.runs[1].engine.model_name == "tiny", timeout=30, what="the second model")
        await finished(pilot, screen)
        first, second = screen.runs
        assert first.engine is bundled and second.engine is not bundled and second.source == str(tiny_checkpoint)
        assert "tiny" in str(second.widget.query_one(".column-title").render())
        # each column is its model's own reply on the shared settings and seed
        alone = [s.token_id for s in second.engine.stream(screen.conversation, second.params)]
        assert ids(second) == alone
