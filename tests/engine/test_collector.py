"""The garbage collector's settings for the app and the model's process: each call leaves the state it says."""

from __future__ import annotations

import gc
import weakref

import pytest

from chat_tui.engine.collector import THRESHOLDS, collection_paused, freeze_long_lived, tune_collection


@pytest.fixture
def restore_gc():
    enabled, thresholds = gc.isenabled(), gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)
    (gc.enable if enabled else gc.disable)()


def test_a_pause_turns_collection_back_on_only_if_it_was_on(restore_gc):
    gc.enable()
    with collection_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    with collection_paused():
        pass
    assert not gc.isenabled()


def test_tuning_freezes_what_exists_and_collects_rarely_from_then_on(restore_gc):
    gc.disable()
    tune_collection()
    assert gc.isenabled() and gc.get_threshold() == THRESHOLDS and gc.get_freeze_count() > 0


def test_freezing_after_a_collection_frees_the_garbage_first(restore_gc):
    class Node:
        pass

    gc.freeze()
    node = Node()
    node.self = node  # a cycle: only a collection frees it
    gone = weakref.ref(node)
    del node
    freeze_long_lived(collect_first=True)
    assert gone() is None, "the cycle was collected, not frozen"
    assert gc.get_freeze_count() > 0
