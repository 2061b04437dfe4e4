"""Snapshots of each view of the inspector, on deterministic data (FakeEngine with a fixed seed).

Update with `pytest tests/ui/attention/test_snapshots.py --snapshot-update` after a deliberate change,
and look at the SVGs before committing them.
"""

from __future__ import annotations

import pytest

from chat_tui.engine.params import SamplingParams
from chat_tui.ui.attention import REDRAW_HZ
from tests.ui.attention.harness import InspectorHarness, fake_engine, fake_steps

SIZE = (90, 32)


def harness(**kwargs) -> InspectorHarness:
    engine = fake_engine(n_layer=3, n_head=4)
    app = InspectorHarness(engine, color_mode=kwargs.pop("color_mode", "truecolor"), **kwargs)
    app.steps = fake_steps(engine, params=SamplingParams(temperature=0.8, top_k=5, seed=7))
    return app


def before(*keys: str, params: SamplingParams | None = None):
    async def run(pilot) -> None:
        app = pilot.app
        app.feed(app.steps)
        await pilot.pause(2 / REDRAW_HZ)
        if keys:
            await pilot.press(*keys)
        if params is not None:
            app.pane.params_changed(params)
        for _ in range(3):  # a view may start a worker (replay), which redraws when done
            await pilot.pause(2 / REDRAW_HZ)
            await app.workers.wait_for_complete()
        await pilot.pause(2 / REDRAW_HZ)

    return run


VIEWS = {
    "heatmap": (),
    "heatmap_mean_nosink": ("m", "n", "n", "up", "up", "up"),
    "heatmap_max_sqrt_layer": ("m", "m", "n", "]"),
    "row": ("2", "up", "up"),
    "row_sorted": ("2", "s"),
    "explain_weights_only": ("3",),
    "heads": ("4", "]", "}"),
    "turns": ("5",),
    "candidates": ("6", "up"),
}


@pytest.mark.parametrize("name", list(VIEWS))
def test_view_snapshot(snap_compare, name):
    assert snap_compare(harness(), terminal_size=SIZE, run_before=before(*VIEWS[name]))


def test_candidates_with_new_settings_snapshot(snap_compare):
    assert snap_compare(harness(), terminal_size=SIZE,
                        run_before=before("6", "up", params=SamplingParams(temperature=0.8, top_k=2)))


@pytest.mark.parametrize("mode", ["256", "mono"])
def test_heatmap_fallback_snapshot(snap_compare, mode):
    assert snap_compare(harness(color_mode=mode), terminal_size=SIZE, run_before=before())
