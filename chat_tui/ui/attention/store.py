"""The attention of the current reply, kept row by row as the engine streams it (numpy only).

One row per context position: the float16 (layers, heads, position + 1) query row of that token.
The prompt's rows come from the first Step's `PromptInfo.attention` (copied row by row, so that
dropping one frees it); each generated token adds its own row. Nothing is ever recomputed.

Memory is bounded: rows are counted in bytes, and past `cap_bytes` (256 MB by default, per
conversation, since only the latest reply's attention is kept; a new reply re-reads the whole
conversation in its own prompt) the oldest rows are dropped and `dropped_rows` says how many.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np

from chat_tui.engine.types import MessageSpan, PromptInfo, Step

DEFAULT_CAP_BYTES = 256 * 1024 * 1024  # 256 MB of float16 rows per conversation

HeadMode = Literal["single", "mean", "max"]


class AttentionStore:
    """Tokens, message spans, attention rows and sampling records of the reply being inspected."""

    def __init__(self, cap_bytes: int = DEFAULT_CAP_BYTES) -> None:
        self.cap_bytes = int(cap_bytes)
        self.epoch = 0
        self.reset()

    def reset(self) -> None:
        self.epoch += 1  # a new reply (for caches keyed by position)
        self.tokens: list[str] = []
        self.ids: list[int] = []
        self.spans: list[MessageSpan] = []
        self.prompt_length = 0
        self.n_layers = 0
        self.n_heads = 0
        self._rows: list[np.ndarray | None] = []
        self._steps: dict[int, Step] = {}
        self.nbytes = 0
        self.first_kept = 0  # rows before this were dropped for the memory cap
        self.dropped_rows = 0
        self.missing_rows = 0  # positions that arrived without attention
        self.kept_rows = 0  # rows held now
        self.version = 0  # bumped on every change (for caches)
        self.seed: int | None = None

    # ------------------------------------------------------------------ feeding

    def begin(self, prompt: PromptInfo) -> None:
        """A new reply: forget the previous one and take in the prompt (and its attention, if any)."""
        self.reset()
        self.tokens = list(prompt.tokens)
        self.ids = list(prompt.ids)
        self.spans = list(prompt.spans)
        self.prompt_length = len(prompt.ids)
        self.seed = prompt.seed
        p = self.prompt_length
        att = prompt.attention
        self._rows = [None] * p
        if att is None or att.ndim != 4 or att.shape[2] < p or att.shape[3] < p:
            self.missing_rows = p
            self.version += 1
            return
        self.n_layers, self.n_heads = int(att.shape[0]), int(att.shape[1])
        per_key = self.n_layers * self.n_heads * 2  # bytes per key of a float16 row
        # keep the newest rows that fit under the cap (no copy of a row that would be dropped)
        total, start = 0, p
        while start > 0 and total + per_key * start <= self.cap_bytes:
            total += per_key * start
            start -= 1
        for i in range(start, p):
            self._rows[i] = np.ascontiguousarray(att[:, :, i, : i + 1], dtype=np.float16)
        self.nbytes = total
        self.kept_rows = p - start
        self.first_kept = start
        self.dropped_rows = start
        self.version += 1

    def add_step(self, step: Step) -> bool:
        """Take in one generated token; True when it brought an attention row."""
        if step.prompt is not None:
            self.begin(step.prompt)
        pos = step.position
        while len(self._rows) < pos:  # a gap (should not happen): leave those rows empty
            self._rows.append(None)
            self.tokens.append("")
            self.ids.append(-1)
            self.missing_rows += 1
        if len(self._rows) > pos:  # the same position again: replace
            for old in self._rows[pos:]:
                if old is not None:
                    self.nbytes -= old.nbytes
                    self.kept_rows -= 1
            del self._rows[pos:], self.tokens[pos:], self.ids[pos:]
        self.tokens.append(step.token)
        self.ids.append(step.token_id)
        # keep the sampling record, not the attention (that lives in _rows, under the cap)
        self._steps[pos] = dataclasses.replace(step, attention=None, prompt=None)
        row = step.attention
        ok = row is not None and row.ndim == 3 and row.shape[2] == pos + 1
        if ok:
            assert row is not None
            if self.n_layers == 0:
                self.n_layers, self.n_heads = int(row.shape[0]), int(row.shape[1])
            row = np.ascontiguousarray(row, dtype=np.float16)
            self._rows.append(row)
            self.nbytes += row.nbytes
            self.kept_rows += 1
            self._enforce_cap()
        else:
            self._rows.append(None)
            self.missing_rows += 1
        self.version += 1
        return ok

    def _enforce_cap(self) -> None:
        while self.nbytes > self.cap_bytes and self.first_kept < len(self._rows) - 1:
            old = self._rows[self.first_kept]
            if old is not None:
                self.nbytes -= old.nbytes
                self._rows[self.first_kept] = None
                self.dropped_rows += 1
                self.kept_rows -= 1
            self.first_kept += 1

    # ------------------------------------------------------------------ reading

    @property
    def length(self) -> int:
        """Context positions known (prompt + generated)."""
        return len(self.tokens)

    @property
    def generated(self) -> int:
        return self.length - self.prompt_length

    @property
    def has_attention(self) -> bool:
        return self.n_layers > 0 and self.kept_rows > 0

    def row(self, position: int) -> np.ndarray | None:
        """float16 (layers, heads, position + 1), or None when not captured or dropped."""
        if 0 <= position < len(self._rows):
            return self._rows[position]
        return None

    def head_row(self, position: int, layer: int, head: int, mode: HeadMode = "single") -> np.ndarray | None:
        """float32 (position + 1,): one head's weights, or the mean or max over the layer's heads."""
        row = self.row(position)
        if row is None:
            return None
        if mode == "single":
            return row[layer, head].astype(np.float32)
        if mode == "mean":
            return row[layer].astype(np.float32).mean(axis=0)
        return row[layer].max(axis=0).astype(np.float32)

    def step_at(self, position: int) -> Step | None:
        """The sampling record of a generated token (its attention stripped)."""
        return self._steps.get(position)

    def context_ids(self, position: int) -> list[int]:
        """The ids before `position` (what the sampling penalties of that token looked at)."""
        return self.ids[:position]

    def message_of(self) -> list[int]:
        """For every position, the index into `turn_labels()` of the part it belongs to."""
        return self.groups()[0]

    def turn_labels(self) -> list[str]:
        return self.groups()[1]

    def groups(self) -> tuple[list[int], list[str]]:
        labels: list[str] = []
        owner = [-1] * self.length
        counts: dict[str, int] = {}
        for span in sorted(self.spans, key=lambda s: s.start):
            if span.message_index < 0:
                label = "reply header"
            else:
                counts[span.role] = counts.get(span.role, 0) + 1
                name = "reply" if span.role == "assistant" else span.role
                label = name if span.role == "system" else f"{name} {counts[span.role]}"
            labels.append(label)
            for i in range(max(span.start, 0), min(span.end, self.prompt_length)):
                owner[i] = len(labels) - 1
        if any(o == -1 for o in owner[: self.prompt_length]):
            labels.append("other (specials)")
            other = len(labels) - 1
            owner[: self.prompt_length] = [other if o == -1 else o for o in owner[: self.prompt_length]]
        if self.length > self.prompt_length:
            labels.append("this reply")
            mine = len(labels) - 1
            owner[self.prompt_length :] = [mine] * (self.length - self.prompt_length)
        return owner, labels

    def dense(self, positions: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(positions int64 (R,), float16 (layers, heads, R, length)): kept rows, zero-padded to the right."""
        if positions is None:
            positions = [i for i, r in enumerate(self._rows) if r is not None]
        pos = np.asarray(list(positions), dtype=np.int64)
        out = np.zeros((self.n_layers, self.n_heads, pos.size, self.length), dtype=np.float16)
        for j, p in enumerate(pos.tolist()):
            row = self._rows[p]
            if row is not None:
                out[:, :, j, : row.shape[2]] = row
        return pos, out
