"""Numbers the views show, from one stored query row (numpy only)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class HeadStats:
    """Per (layer, head), for one query token."""

    entropy: np.ndarray  # bits, (layers, heads)
    max_entropy: float  # log2 of the number of keys
    first: np.ndarray  # share of the attention on the first token
    previous: np.ndarray  # share on the token just before the query (NaN for the first token)


def head_stats(row: np.ndarray) -> HeadStats:
    """`row`: (layers, heads, keys) weights of one query token."""
    w = np.asarray(row, dtype=np.float64)
    n = w.shape[-1]
    safe = np.where(w > 0, w, 1.0)
    entropy = -(w * np.log2(safe)).sum(axis=-1)
    first = w[..., 0]
    previous = w[..., n - 2] if n >= 2 else np.full(w.shape[:-1], np.nan)
    return HeadStats(entropy=entropy, max_entropy=float(np.log2(n)) if n > 0 else 0.0, first=first, previous=previous)


def turn_shares(weights: np.ndarray, owner: list[int], groups: int) -> np.ndarray:
    """Share of one query row's attention on each group of positions (owner[i] = group of position i)."""
    w = np.asarray(weights, dtype=np.float64)
    own = np.asarray(owner[: w.size], dtype=np.int64)
    valid = own >= 0
    return np.bincount(own[valid], weights=w[: own.size][valid], minlength=groups)[:groups]


def order_for(weights: np.ndarray, sort: bool) -> np.ndarray:
    """Key indices in sequence order, or by weight (largest first, ties in sequence order)."""
    if not sort:
        return np.arange(weights.shape[0])
    return np.argsort(-np.asarray(weights, dtype=np.float64), kind="stable")
