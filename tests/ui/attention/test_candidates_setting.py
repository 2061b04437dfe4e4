"""The `candidates` setting (SamplingParams.top_candidates) is how many rows the candidates view lists,
though the model stores 256 logits per token for replaying the chain."""

from __future__ import annotations

from chat_tui.engine.params import SamplingParams
from chat_tui.engine.types import Message
from tests.ui.attention.harness import InspectorHarness
from tests.ui.attention.test_pane import canvas_text, settle


def candidate_rows(app: InspectorHarness) -> list[str]:
    """The listed candidates: the lines after the column header, up to the notes below them."""
    lines = canvas_text(app).splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("token"))
    rows = []
    for line in lines[header + 1:]:
        if not line.startswith(("▶ ", "  ")) or line.startswith("▶ ranked") or not line.strip():
            break
        rows.append(line)
    return rows


async def test_the_candidates_view_lists_as_many_rows_as_the_setting_says(tiny_engine):
    sampled_with = SamplingParams(temperature=0.9, top_k=20, seed=2, max_new_tokens=4, top_candidates=10)
    steps = list(tiny_engine.stream([Message("user", "Hello there")], sampled_with, inspect=True))
    last = steps[-1]
    assert len(last.top_ids) == 256  # what the view used to list, whatever the setting
    rank = last.top_ids.tolist().index(last.token_id)  # 0 = the most likely

    def expected(setting: int) -> int:
        """The setting's rows, and the sampled token's below them when it ranks lower."""
        return setting + (rank >= setting)

    app = InspectorHarness(tiny_engine, color_mode="truecolor")
    async with app.run_test(size=(110, 60)) as pilot:
        app.params = sampled_with  # the setting in force, read as ChatApp's `params`
        app.feed(steps)
        await pilot.press("6")
        await settle(pilot, app)
        text = canvas_text(app)
        assert "sampled" in text and "replay failed" not in text
        assert len(candidate_rows(app)) == expected(10)
        assert "more (← → scroll)" not in text
        assert (f"▶ ranked {rank + 1} of the 256 most likely" in text) == (rank >= 10)

        # a change of the setting shows at once, without a "now" column (the chain is the same)
        for setting in (3, 40, 1):
            app.params = sampled_with.with_(top_candidates=setting)
            await settle(pilot, app)
            rows = candidate_rows(app)
            assert len(rows) == expected(setting), setting
            assert any(row.startswith("▶ ") for row in rows)
            assert "now:" not in canvas_text(app)
