"""UIBudget: redraws wait while the UI thread is busy, never longer than the gap."""

import time

from chat_tui.ui.budget import UIBudget


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_a_redraw_waits_while_the_ui_is_busy_but_never_longer_than_the_gap():
    budget = UIBudget(share=0.3, max_gap=0.25)
    assert budget.allow()
    busy(0.05)  # the UI thread used about all of the time since: over 30%
    assert not budget.allow()
    time.sleep(0.25)  # past the gap: allowed however busy it was
    assert budget.allow()
    time.sleep(0.05)  # idle since: allowed at once
    assert budget.allow()
