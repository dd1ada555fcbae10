"""The order items are served in, per epoch.

Items are shuffled afresh every epoch (seeded: reproducible). A cold pass over a packed dataset is
the exception: reading it in a full shuffle would fetch every chunk of every shard at once, so while
its arrays are not cached yet the shards come in a seeded random order and items are shuffled within
a window of ``window`` shards. Each window's chunks are then read once, in large ranges, and
held only while the window is served; from the next epoch on the cache serves any order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from s3cache.items import Item

DEFAULT_WINDOW = 4


def full_shuffle(count: int, seed: int, epoch: int) -> np.ndarray:
    """A seeded permutation of ``range(count)`` for an epoch."""
    return np.random.default_rng([seed, epoch]).permutation(count)


def shard_window_shuffle(items: Sequence[Item], seed: int, epoch: int, window: int = DEFAULT_WINDOW) -> np.ndarray:
    """Positions of ``items`` with shards in a seeded random order, shuffled within windows of ``window`` shards.

    Whole objects (items outside any shard) form one shard each; members of one shard keep no
    particular order among themselves.
    """
    rng = np.random.default_rng([seed, epoch, 1])
    shards: dict[tuple[str, str], list[int]] = {}
    for position, item in enumerate(items):
        shards.setdefault((item.bucket, item.key), []).append(position)
    groups = list(shards.values())
    order = rng.permutation(len(groups))
    positions: list[np.ndarray] = []
    for start in range(0, len(order), window):
        members = np.concatenate([np.asarray(groups[g]) for g in order[start:start + window]])
        positions.append(rng.permutation(members))
    return np.concatenate(positions) if positions else np.arange(0)
