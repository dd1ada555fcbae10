"""The loader against an in-memory source: cache first, one read per miss, write-through, read-ahead, offline."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import encode
from memory_source import MemorySource

from s3cache.errors import DecodeError, NotCachedError, ObjectNotFoundError
from s3cache.items import Item
from s3cache.loader import FillProgress, Loader
from s3cache.spec import ImageSpec
from s3cache.store import ArrayStore

SPEC = ImageSpec((8, 8))
PIXELS = np.random.default_rng(3).integers(0, 256, (6, 12, 16, 3), dtype=np.uint8)
OBJECTS = {("b", f"img/{i}.png"): encode(PIXELS[i], "PNG") for i in range(6)} | {("b", "img/broken.png"): b"nope"}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ArrayStore]:
    with ArrayStore(tmp_path / "arrays") as opened:
        yield opened


def items(source: MemorySource) -> list[Item]:
    return [item for item in source.list_prefix("s3://b/img/") if "broken" not in item.key]


def test_misses_are_read_once_then_served_from_the_store(store: ArrayStore) -> None:
    source = MemorySource(OBJECTS)
    loader = Loader(SPEC, store, source)
    wanted = items(source)
    first = loader.load(wanted)
    second = loader.load(wanted)
    loader.close()
    for a, b, i in zip(first, second, range(6), strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, SPEC.decode(OBJECTS["b", f"img/{i}.png"]))
    assert set(source.reads.values()) == {1}
    assert loader.stats | {"s3_bytes": 0} == {"hits": 6, "misses": 6, "shared": 0, "skipped": 0, "s3_requests": 7,
                                              "s3_bytes": 0, "retries": 0}


def test_prefetched_items_are_not_read_again(store: ArrayStore) -> None:
    gate = threading.Event()
    source = MemorySource(OBJECTS, gate=gate)
    loader = Loader(SPEC, store, source)
    wanted = items(source)
    loader.prefetch(wanted)
    loader.prefetch(wanted)  # already in flight: nothing new starts
    gate.set()
    loader.load(wanted)
    loader.close()
    assert set(source.reads.values()) == {1} and len(source.reads) == 6


def test_a_read_a_batch_waits_for_is_not_started_again_by_another_thread(store: ArrayStore) -> None:
    gate = threading.Event()
    source = MemorySource(OBJECTS, gate=gate)
    loader = Loader(SPEC, store, source)
    wanted = items(source)
    loader.prefetch(wanted)  # in flight, held at the gate
    loading = threading.Thread(target=loader.load, args=(wanted,))
    loading.start()
    deadline = time.monotonic() + 30
    while not loader._serving and time.monotonic() < deadline:  # the batch now waits for the reads
        time.sleep(0.001)
    loader.prefetch(wanted)  # another thread's read-ahead: the reads are still pending, so none starts
    gate.set()
    loading.join(timeout=30)
    loader.close()
    assert set(source.reads.values()) == {1} and len(source.reads) == 6
    assert loader.stats["misses"] == 6


def test_offline_loader_names_what_is_missing(store: ArrayStore) -> None:
    source = MemorySource(OBJECTS)
    Loader(SPEC, store, source).load(items(source)[:2])
    offline = Loader(SPEC, store, None)
    assert len(offline.load(items(source)[:2])) == 2
    with pytest.raises(NotCachedError, match=r"1 object\(s\) are not in the cache: s3://b/img/2.png"):
        offline.load(items(source)[:3])


def test_undecodable_items_are_remembered(store: ArrayStore) -> None:
    source = MemorySource(OBJECTS)
    broken = next(item for item in source.list_prefix("s3://b/img/") if "broken" in item.key)
    with pytest.raises(DecodeError, match="s3://b/img/broken.png"):
        Loader(SPEC, store, source).load([broken])
    skipping = Loader(SPEC, store, source, on_error="skip")
    with pytest.warns(UserWarning, match="skipping s3://b/img/broken.png"):
        assert skipping.load([broken]) == [None]
    assert source.reads[broken.url] == 1 and skipping.stats["skipped"] == 1


def test_source_errors_reach_the_caller(store: ArrayStore) -> None:
    source = MemorySource(OBJECTS)
    gone = Item("b", "img/gone.png", "e", 1)
    with pytest.raises(ObjectNotFoundError, match="s3://b/img/gone.png"):
        Loader(SPEC, store, source).load([gone])


def test_fill_reports_every_item_and_skips_cached_ones(store: ArrayStore) -> None:
    source = MemorySource(OBJECTS)
    everything = source.list_prefix("s3://b/img/")
    Loader(SPEC, store, source).load(items(source)[:2])
    events: list[FillProgress] = []
    Loader(SPEC, store, source).fill(everything, events.append, window=2)
    assert sorted((e.item.key, e.hit, e.failed) for e in events) == sorted(
        [(f"img/{i}.png", i < 2, False) for i in range(6)] + [("img/broken.png", False, True)])
    assert set(source.reads.values()) == {1}
