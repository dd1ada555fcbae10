"""Epoch orders: full shuffles, and shard windows for a cold pass over a packed dataset."""

from __future__ import annotations

import numpy as np

from s3cache.items import Item
from s3cache.order import full_shuffle, shard_window_shuffle

SHARDS, PER_SHARD = 12, 25
ITEMS = [Item("b", f"p/shard-{s}.tar", "e", 10, member=f"{s}/{m}.jpg", offset=512 * m)
         for s in range(SHARDS) for m in range(PER_SHARD)]


def test_full_shuffle_is_seeded_and_differs_per_epoch() -> None:
    assert (full_shuffle(100, 1, 0) == full_shuffle(100, 1, 0)).all()
    assert not (full_shuffle(100, 1, 0) == full_shuffle(100, 1, 1)).all()


def test_shard_windows_cover_every_item_once_and_touch_few_shards_at_a_time() -> None:
    order = shard_window_shuffle(ITEMS, seed=3, epoch=0, window=4)
    assert sorted(order.tolist()) == list(range(len(ITEMS)))
    shards = np.array([int(ITEMS[i].key.split("-")[1].split(".")[0]) for i in order])
    windows = shards.reshape(SHARDS // 4, 4 * PER_SHARD)
    assert all(len(set(w.tolist())) == 4 for w in windows)  # each window: exactly four shards, all their items
    assert len({tuple(sorted(set(w.tolist()))) for w in windows}) == SHARDS // 4
    assert (shard_window_shuffle(ITEMS, 3, 0, 4) == order).all()
    assert not (shard_window_shuffle(ITEMS, 3, 1, 4) == order).all()


def test_windows_mix_shards_within_a_batch() -> None:
    order = shard_window_shuffle(ITEMS, seed=5, epoch=0, window=4)
    first_batch = {ITEMS[i].key for i in order[:32]}
    assert len(first_batch) == 4  # a batch of 32 draws from all four shards of its window
