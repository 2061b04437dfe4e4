"""InspectorState without an app: the selection, the token cursor and the heatmap's window."""

from __future__ import annotations

import pytest

from chat_tui.engine.fake import FakeEngine
from chat_tui.engine.params import SamplingParams
from chat_tui.engine.types import Message
from chat_tui.ui.attention.state import VIEWS, InspectorState
from chat_tui.ui.attention.store import AttentionStore

PARAMS = SamplingParams(temperature=0.8, top_k=5, seed=7)


def reply_steps(reply: str = "word " * 40, layers: int = 2, heads: int = 4, inspect: bool = True):
    engine = FakeEngine([reply], defaults=PARAMS, n_layer=layers, n_head=heads)
    return list(engine.stream([Message("user", "Say it.")], PARAMS, inspect=inspect))


def state_with(steps) -> InspectorState:
    store = AttentionStore()
    state = InspectorState(store)
    for step in steps:
        if step.prompt is not None:
            state.new_reply()
        store.add_step(step)
    return state


def test_an_empty_state_has_no_position_and_says_why():
    state = InspectorState(AttentionStore())
    assert state.position is None
    assert not state.move_cursor(1) and not state.cursor_home()
    assert "No reply yet" in state.why_no_attention(None)
    assert "cannot give attention: no weights" in state.why_no_attention("no weights")
    assert state.header_text(40).plain.endswith("no tokens yet")


def test_the_cursor_follows_the_newest_token_until_moved():
    state = state_with(reply_steps())
    n = state.store.length
    assert state.position == n - 1 and state.follow
    state.move_cursor(-3)
    assert state.position == n - 4 and not state.follow
    state.move_cursor(-10 * n)  # stops at the first token
    assert state.position == 0
    state.cursor_end()
    assert state.position == n - 1 and state.follow
    state.toggle_follow()
    assert not state.follow and state.cursor == n - 1
    state.toggle_follow()
    assert state.follow and state.cursor is None


def test_a_new_reply_follows_again():
    steps = reply_steps()
    state = state_with(steps)
    state.move_cursor(-2)
    state.new_reply()
    assert state.follow and state.cursor is None and state.first_row == 0 and state.first_key == 0


def test_layers_and_heads_wrap_and_a_mean_goes_back_to_one_head():
    state = state_with(reply_steps(layers=3, heads=4))
    state.step_layer(-1)
    assert state.attn_layer == 2
    state.step_head(1)
    state.cycle_head_mode()
    assert state.head_mode == "mean" and state.selection_label() == "layer 3/3 · mean of 4 heads"
    state.step_head(1)  # from the mean, back to the head it came from
    assert state.head_mode == "single" and state.head == 1
    assert state.selection_label() == "layer 3/3 · head 2/4"  # counted from 1, out of how many


def test_another_model_keeps_the_selection_inside_it():
    state = InspectorState(AttentionStore())
    state.set_model(6, 8)
    state.attn_layer, state.head = 5, 7
    state.set_model(2, 4)
    assert (state.attn_layer, state.head) == (1, 3) and (state.n_layers, state.n_heads) == (2, 4)


def test_views_cycle_and_sort_resets_the_scroll():
    state = InspectorState(AttentionStore())
    seen = [state.view]
    for _ in VIEWS:
        state.cycle_view(1)
        seen.append(state.view)
    assert seen[:-1] == list(VIEWS) and seen[-1] == VIEWS[0]
    assert not state.show_view("nonsense") and state.view == VIEWS[0]
    assert state.show_view("row")
    state.pan(1, width=40, height=20)
    assert state.offsets["row"] == 17
    state.toggle_sort()
    assert state.sort_rows and state.offsets["row"] == 0
    state.show_view("explain")
    state.toggle_sort()
    assert not state.sort_explain and state.sort_rows


@pytest.mark.parametrize("rows_per_line", [1, 2])
def test_the_window_keeps_the_newest_token_in_view_with_room_for_more(rows_per_line):
    state = state_with(reply_steps("word " * 120))
    n = state.store.length
    width, height = 41, 21
    rows, c0, c1 = state.heatmap_window(width, height, rows_per_line)
    map_w = width - 1
    assert rows.stop == n and c1 == n
    assert n - 1 - c0 == map_w - 1 - map_w // 4  # a quarter of the width left for new tokens
    assert rows.start >= c0 - 1  # no blank rows above the first key shown
    assert rows.start % rows_per_line == 0
    assert state.page_rows == (height - 1) * rows_per_line - rows_per_line


def test_panning_by_hand_holds_the_window_until_the_cursor_moves():
    state = state_with(reply_steps("word " * 120))
    _, c0, _ = state.heatmap_window(41, 21)
    state.pan(-1, width=41, height=21)
    assert state.panned
    _, c0_panned, _ = state.heatmap_window(41, 21)
    assert c0_panned == c0 - 20  # half the map's width
    state.cursor_home()
    rows, c0_home, _ = state.heatmap_window(41, 21)
    assert not state.panned and rows.start == 0 and c0_home == 0


def test_the_notice_names_lost_attention_missing_layers_and_dropped_rows():
    state = state_with(reply_steps())
    assert state.notice_text(None, None) == ""
    assert state.notice_text(None, "layers 1, 3 have no attention") == "layers 1, 3 have no attention"
    assert state.notice_text("the model's process\nrestarted", None) == (
        "attention no longer captured: the model's process restarted")
    hidden = state_with(reply_steps(inspect=False))
    assert hidden.notice_text("gone", None) == ""  # the view itself says why it is empty
    assert "inspector was hidden" in hidden.why_no_attention(None)


def test_the_header_names_the_view_the_selection_and_the_token():
    state = state_with(reply_steps("one two"))
    header = state.header_text(60).plain.splitlines()
    assert header[0] == "Heatmap 1/6 · layer 1/2 · head 1/4"
    assert "query ↓ attends to key →" in header[1]  # what the view shows, in plain words
    assert header[3].startswith(f"▶{state.store.length - 1} ") and header[3].endswith("reply · ÷ row max · follow")


def test_each_view_says_what_it_shows_in_two_lines_at_the_default_width():
    from chat_tui.ui.attention.state import VIEW_SUBTITLE, subtitle_lines

    for view in VIEW_SUBTITLE:
        lines = subtitle_lines(view, 42)  # the inspector's 44 columns, less its padding
        assert " ".join(lines).split() == VIEW_SUBTITLE[view].split() and not lines[1].endswith("…")
