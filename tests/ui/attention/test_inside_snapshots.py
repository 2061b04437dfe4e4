"""Snapshots of the inside-the-next-token views (issue #14) at 120×40, on the FakeEngine's made-up numbers.

Update with `pytest tests/ui/attention/test_inside_snapshots.py --snapshot-update` after a deliberate
change, and look at the SVGs before committing them.
"""

from __future__ import annotations

import pytest

from tests.ui.attention.test_snapshots import before, harness

SIZE = (120, 40)

VIEWS = {
    "lens": ("7", "up"),
    "attribution": ("8", "up"),
    "rollout": ("9", "home", "down", "down", "down", "down"),
    "knockout": ("0", "]", "]", "}", "k"),
    "tokens": ("t",),
    "block": ("b", "]", "}"),
}


@pytest.mark.parametrize("name", list(VIEWS))
def test_inside_view_snapshot(snap_compare, name):
    app = harness()
    app.pane_width = 76
    if name == "tokens":
        app.token_text = ("input box", "Hello 你好, naïve world")
    assert snap_compare(app, terminal_size=SIZE, run_before=before(*VIEWS[name]))
