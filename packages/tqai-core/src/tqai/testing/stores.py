"""Helpers for tests of the backends' caches over a :class:`tqai.kvstore.KVStore`."""

from __future__ import annotations

from typing import Any

__all__ = ["TIERED_PIPELINE", "stored_widths"]

TIERED_PIPELINE = {
    "scorer": "palm",
    "strategy": "tiered",
    "strategy_kwargs": {"fraction": 0.25, "high_bits": 4, "low_bits": 2},
}
"""A tiered pipeline (a quarter of the tokens at 4 bits, the rest at 2) the torch and mlx cache
tests share."""


def stored_widths(store: Any, stream: int) -> list[int]:
    """Per history position of ``store``, the width its key (``stream`` 0) or value (1) is
    stored at (0 where no tier holds it)."""
    widths = [0] * store.history_length
    for spec, tier in store.tiers.items():
        for p in tier.positions():
            widths[p] = spec[stream].n_bits
    return widths
