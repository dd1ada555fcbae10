"""The loader against an in-memory source: cache first, one read per miss, write-through, read-ahead, offline."""

from __future__ import annotations

import contextlib
import errno
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from helpers import encode
from memory_source import MemorySource

from s3cache.errors import CacheError, DecodeError, NotCachedError, ObjectNotFoundError
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


@contextlib.contextmanager
def writes_held(store: ArrayStore) -> Iterator[None]:
    """Hold the database's write lock from another connection: the store's writes wait until the block ends."""
    con = sqlite3.connect(store.directory / "cache.db", isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")
        yield
        con.execute("ROLLBACK")
    finally:
        con.close()


def test_misses_are_served_before_they_are_stored_and_never_read_twice(store: ArrayStore) -> None:
    source = MemorySource(OBJECTS)
    loader = Loader(SPEC, store, source)
    wanted = items(source)
    keys = [loader.key(item) for item in wanted]
    with writes_held(store):
        first = loader.load(wanted)  # served while the writes wait for the lock
        assert store.existing(keys) == set()
        again = loader.load(wanted)  # found in the loader, not read again
        loader.prefetch(wanted)  # nor read ahead again
    loader.flush()
    assert store.existing(keys) == set(keys)
    loader.close()
    assert set(source.reads.values()) == {1}
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert loader.stats["misses"] == 6 and loader.stats["hits"] == 6


class FailingStore(ArrayStore):
    """A store whose disk fails every write."""

    def put_many(self, entries: Sequence[tuple[str, bytes]], tag: str) -> list[bool]:
        raise OSError(errno.EIO, "Input/output error")


def test_a_write_that_fails_after_its_batch_was_served_is_raised_next(tmp_path: Path) -> None:
    source = MemorySource(OBJECTS)
    with FailingStore(tmp_path / "arrays") as store:
        loader = Loader(SPEC, store, source)
        wanted = items(source)
        assert len(loader.load(wanted[:2])) == 2
        with pytest.raises(CacheError, match=f"storing fetched images in the cache in {re.escape(str(tmp_path))} "
                                             "failed: .*Input/output error"):
            loader.flush()
        assert len(loader.load(wanted[:2])) == 2  # raised once; the batch is read again, and served
        loader.close()
    assert source.reads[wanted[0].url] == 2


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
    online = Loader(SPEC, store, source)
    online.load(items(source)[:2])
    online.flush()  # served as soon as decoded; stored behind
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
