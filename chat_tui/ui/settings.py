"""The chat's settings as one immutable value: the sampling parameters, the preset, the system
prompt, whether the user touched them, and the reset that `u` can undo.

The app holds one `Settings` in one reactive; every change is a method here that returns the next
value, so each rule (what a reset keeps, what a preset brings) is written once and tested without
Textual.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from chat_tui.engine.params import SamplingParams

if TYPE_CHECKING:
    from chat_tui.config import Preset

# what a reset to neutral leaves as it was: they shape the reply's length and reproducibility, not
# its sampling
KEPT_BY_NEUTRAL = ("max_new_tokens", "seed", "stop", "top_candidates")


@dataclass(frozen=True)
class Settings:
    params: SamplingParams = SamplingParams()
    system_prompt: str = ""
    preset: str | None = None  # the preset loaded or saved last, if any
    # the user chose these settings (edited, a preset, neutral): a model that loads keeps them
    # instead of bringing its own defaults
    touched: bool = False
    label: str | None = None  # what the sampling pane's title names: a preset, "custom", "model defaults"…
    before_reset: Settings | None = None  # what the last reset replaced, while `u` can still undo it

    @property
    def edited_label(self) -> str:
        return f"{self.preset} (edited)" if self.preset else "custom"

    def _undo_point(self) -> Settings:
        return replace(self, before_reset=None)

    def edit(self, params: SamplingParams) -> Settings:
        """The user changed a sampling setting (in the pane, or the stop strings or order editor)."""
        return replace(self, params=params, touched=True, label=self.edited_label, before_reset=None)

    def with_system_prompt(self, text: str) -> Settings:
        """The user wrote a new system prompt: part of the settings, though not a sampling one."""
        return replace(self, system_prompt=text, label=self.edited_label, before_reset=None)

    def for_conversation(self, system_prompt: str) -> Settings:
        """Another conversation was opened: its own system prompt, the sampling settings stay."""
        return replace(self, system_prompt=system_prompt)

    def with_preset(self, preset: Preset) -> Settings:
        """`preset` loaded: its values over the current ones, and its system prompt where it has
        one; `system_prompt = ""` in the file is one too, an empty one (raises InvalidParameter)."""
        system_prompt = self.system_prompt if preset.system_prompt is None else preset.system_prompt
        return replace(self, params=preset.apply(self.params), system_prompt=system_prompt, preset=preset.name,
                       touched=True, label=preset.name, before_reset=None)

    def saved_as(self, name: str) -> Settings:
        """The settings were saved as the preset `name`."""
        return replace(self, preset=name, label=name)

    def model_defaults(self, defaults: SamplingParams) -> Settings:
        """The model's own defaults (generation_config.json), in force until the user chooses."""
        return replace(self, params=defaults, preset=None, touched=False, label="model defaults")

    def reset_to_neutral(self) -> Settings:
        """Every processor off, temperature 1; the length, seed, stop strings and candidates stay."""
        keep = {name: getattr(self.params, name) for name in KEPT_BY_NEUTRAL}
        return replace(self, params=SamplingParams.neutral().with_(**keep), preset=None, touched=True,
                       label="neutral", before_reset=self._undo_point())

    def reset_to_defaults(self, defaults: SamplingParams) -> Settings:
        """The model's defaults, chosen by the user (undoable, unlike those a model brings as it loads)."""
        return replace(self.model_defaults(defaults), before_reset=self._undo_point())

    def undo_reset(self) -> Settings | None:
        """The settings before the last reset (the system prompt as it is now); None: nothing to undo."""
        before = self.before_reset
        if before is None:
            return None
        return replace(before, system_prompt=self.system_prompt)

    def for_next_model(self) -> Settings:
        """Another model is asked for: it brings its own defaults unless the user chose a preset."""
        return replace(self, touched=self.touched and self.preset is not None)

    def as_chosen(self) -> Settings:
        """The settings count as the user's again (the load of another model failed: the one in use keeps them)."""
        return replace(self, touched=True)
