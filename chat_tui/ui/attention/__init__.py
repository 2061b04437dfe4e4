"""The live attention inspector (Textual/Rich side). Importing it never imports torch."""

from __future__ import annotations

from chat_tui.ui.attention.pane import REDRAW_HZ, InspectorPane
from chat_tui.ui.attention.render import SCALES, Heatmap
from chat_tui.ui.attention.state import VIEWS, InspectorState
from chat_tui.ui.attention.store import DEFAULT_CAP_BYTES, AttentionStore

__all__ = ["DEFAULT_CAP_BYTES", "REDRAW_HZ", "SCALES", "VIEWS", "AttentionStore", "Heatmap", "InspectorPane",
           "InspectorState"]
