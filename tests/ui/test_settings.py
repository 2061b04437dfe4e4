"""The settings value's transitions, without Textual: edits, resets and their undo, presets, models."""

from __future__ import annotations

import pytest

from chat_tui.config import Preset
from chat_tui.engine.params import InvalidParameter, SamplingParams
from chat_tui.ui.settings import Settings

DEFAULTS = SamplingParams(temperature=0.8, top_p=0.95, seed=7)


def test_an_edit_is_the_users_and_names_the_preset_it_changed():
    edited = Settings().edit(SamplingParams(temperature=0.5))
    assert edited.params.temperature == 0.5 and edited.touched and edited.label == "custom"
    from_preset = Settings(preset="greedy", label="greedy").edit(SamplingParams(temperature=0.1))
    assert from_preset.label == "greedy (edited)" and from_preset.preset == "greedy"


def test_a_new_system_prompt_marks_the_settings_edited_but_not_touched():
    settings = Settings().with_system_prompt("Be brief.")
    assert settings.system_prompt == "Be brief." and settings.label == "custom" and not settings.touched
    opened = Settings(label="neutral").for_conversation("Hello.")
    assert opened.system_prompt == "Hello." and opened.label == "neutral", "opening a chat edits nothing"


def test_neutral_keeps_length_seed_stops_and_candidates_and_can_be_undone():
    before = Settings(preset="creative", touched=True, label="creative (edited)", system_prompt="old").edit(
        SamplingParams(temperature=1.3, top_k=40, max_new_tokens=99, seed=3, stop=("END",), top_candidates=5)
    )
    neutral = before.reset_to_neutral()
    assert neutral.params == SamplingParams(max_new_tokens=99, seed=3, stop=("END",), top_candidates=5)
    assert neutral.preset is None and neutral.touched and neutral.label == "neutral"
    assert neutral.with_system_prompt("new").undo_reset() is None, "a later edit: nothing to undo any more"
    back = neutral.for_conversation("another chat").undo_reset()
    assert back is not None
    assert (back.params, back.preset, back.touched, back.label) == (
        before.params, before.preset, before.touched, before.label)
    assert back.system_prompt == "another chat", "an undo gives back the sampling, not the old system prompt"
    assert back.undo_reset() is None, "one reset, one undo"


def test_the_models_defaults_by_reset_are_undoable_and_as_it_loads_are_not_a_choice():
    edited = Settings().edit(SamplingParams(temperature=1.5))
    reset = edited.reset_to_defaults(DEFAULTS)
    assert reset.params == DEFAULTS and not reset.touched and reset.label == "model defaults"
    assert reset.undo_reset() == edited
    loaded = Settings().model_defaults(DEFAULTS)
    assert loaded.params == DEFAULTS and not loaded.touched and loaded.before_reset is None
    assert Settings().edit(DEFAULTS).edit(SamplingParams()).undo_reset() is None


def test_a_preset_applies_its_values_and_its_system_prompt_when_it_has_one():
    base = Settings(system_prompt="mine").reset_to_neutral()
    loaded = base.with_preset(Preset("terse", {"temperature": 0.2}, system_prompt="Be terse."))
    assert loaded.params == base.params.with_(temperature=0.2)
    assert (loaded.system_prompt, loaded.preset, loaded.label, loaded.touched) == ("Be terse.", "terse", "terse", True)
    assert loaded.before_reset is None, "a preset replaces what a reset could give back"
    assert base.with_preset(Preset("p", {})).system_prompt == "mine", "no system_prompt in the file: keep mine"
    assert base.with_preset(Preset("p", {}, system_prompt="")).system_prompt == "", "an empty one is one"
    with pytest.raises(InvalidParameter):
        base.with_preset(Preset("bad", {"temperature": -1}))


def test_saving_names_the_preset():
    saved = Settings().edit(SamplingParams(temperature=0.3)).saved_as("mine")
    assert saved.preset == "mine" and saved.label == "mine" and saved.touched


def test_another_model_brings_its_defaults_unless_a_preset_was_chosen():
    assert not Settings().edit(SamplingParams(temperature=0.3)).for_next_model().touched
    assert Settings().with_preset(Preset("greedy", {"temperature": 0})).for_next_model().touched
    kept = Settings(touched=True).for_next_model().as_chosen()
    assert kept.touched, "a failed load leaves the settings the user's"
