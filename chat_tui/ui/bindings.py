"""Helpers so that every key binding has an id (and can be remapped from config.toml)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from textual.binding import Binding


def with_ids(bindings: Iterable[Any], prefix: str) -> list[Binding]:
    """Copies of `bindings` with an id (`prefix.action`) where they had none."""
    out = []
    for binding in Binding.make_bindings(bindings):
        if binding.id is None:
            action = binding.action.split("(")[0].replace("app.", "").replace("screen.", "")
            binding = dataclasses.replace(binding, id=f"{prefix}.{action}")
        out.append(binding)
    return out
