"""The array store: pickle-free entries, checksums, a true LRU with batched recency, a hard-ish size bound."""

from __future__ import annotations

import pickle
import sqlite3
import threading
import time
from pathlib import Path

import diskcache
import numpy as np
import pytest
from helpers import FILE_SIDE, all_batches, dataset_options, wal_frames

import s3cache
from s3cache import codec
from s3cache.config import parse_size
from s3cache.store import ArrayStore, layout
from s3cache.store.directory import CacheDirectory, verify_directory
from s3cache.store.safecache import open_diskcache
from s3cache.testing.locals3 import LocalS3

ENTRY = np.arange(128 * 128 * 3, dtype=np.uint32).astype(np.uint8).reshape(128, 128, 3)
FILE_ENTRY = np.zeros((FILE_SIDE, FILE_SIDE, 3), np.uint8)  # a value file
ENTRY_BYTES = len(codec.encode_array(ENTRY))


def access_times(directory: Path) -> dict[str, float]:
    with sqlite3.connect(directory / "arrays" / "cache.db") as con:
        return dict(con.execute("SELECT key, access_time FROM Cache").fetchall())


def test_codec_round_trip_and_damage_detection() -> None:
    data = codec.encode_array(ENTRY, key="k")
    np.testing.assert_array_equal(codec.decode(data, "k"), ENTRY)
    assert codec.decode(codec.encode_failure("bad", key="k"), "k") == codec.Failure("bad")
    assert codec.bind(codec.encode_array(ENTRY), "k") == data  # bound later by the store: the same bytes
    flipped = bytearray(data)
    flipped[1000] ^= 0xFF
    for damaged in (bytes(flipped), data[:-1], data[:10], b"PK" + data[2:]):
        with pytest.raises(codec.CorruptEntryError):
            codec.decode(damaged, "k")


def test_parse_size() -> None:
    assert parse_size("500MB") == 500 * 10**6 and parse_size("2GiB") == 2 * 2**30 and parse_size(42) == 42
    assert parse_size("1.5 kb") == 1500
    with pytest.raises(ValueError, match="10 parsecs"):
        parse_size("10 parsecs")


def test_store_refuses_pickle_and_keeps_raw_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = CacheDirectory(tmp_path / "cache", parse_size("1GB"))
    store = cache.arrays
    store.put("small", codec.encode_array(ENTRY[:8, :8]), tag="t")
    store.put("large", codec.encode_array(FILE_ENTRY), tag="t")
    with pytest.raises(TypeError):
        store.put("object", {"not": "bytes"}, tag="t")  # type: ignore[arg-type]

    def no_unpickling(*args: object, **kwargs: object) -> None:
        raise AssertionError("the store unpickled something")

    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    np.testing.assert_array_equal(store.get("large"), FILE_ENTRY)
    cache.close()
    with sqlite3.connect(tmp_path / "cache" / "arrays" / "cache.db") as con:
        modes = {mode for (mode,) in con.execute("SELECT mode FROM Cache")}
    assert modes == {diskcache.core.MODE_RAW, diskcache.core.MODE_BINARY}
    assert ((tmp_path / "cache").stat().st_mode & 0o777) == 0o700


def test_reads_refresh_recency_in_batches_and_lru_evicts_least_recently_used(tmp_path: Path) -> None:
    empty = ArrayStore(tmp_path / "arrays", parse_size("1GB"))
    base = empty.volume()
    empty.close()
    store = ArrayStore(tmp_path / "arrays", base + int(10.5 * ENTRY_BYTES))
    store.begin_run("first")
    for i in range(10):
        store.put(f"k{i}", codec.encode_array(ENTRY), tag="t")
    stored = access_times(tmp_path)
    store.begin_run("second")  # another dataset: what it reads becomes newer than the rest
    assert store.get("k0") is not None
    assert access_times(tmp_path) == stored  # a read alone writes nothing to the database
    store.put("k10", codec.encode_array(ENTRY), tag="t")
    store.cull()  # flushes recorded reads first, then evicts by last use
    assert "k0" in store and "k1" not in store and "k10" in store
    assert store.volume() <= store.size_limit


@pytest.mark.parametrize("side", [64, 128])  # database pages of 4 and 16 KiB
def test_cache_stays_within_one_batch_of_its_limit(s3: LocalS3, bucket: str, cache_dir: Path, side: int) -> None:
    shape_bytes = codec.entry_size((side, side, 3))
    database = layout.empty_store_bytes(layout.page_size_for(shape_bytes)) + 16 * 1024
    limit = 12 * shape_bytes + database  # room for about a dozen entries besides the database
    ds = s3cache.image_dataset_from_s3(
        "s3://photos/train/", **dataset_options(s3, cache_dir, image_size=(side, side), batch_size=6,
                                                cache_size_limit=limit, concurrency=4))
    store = ds.loader.store
    for _ in range(2):
        for index in range(len(ds)):
            ds[index]
            assert store.volume() <= limit + 6 * shape_bytes
        ds.on_epoch_end()
    assert 0 < len(store) < 24


def test_epochs_read_through_a_cache_smaller_than_the_dataset(s3: LocalS3, bucket: str, cache_dir: Path) -> None:
    ds = s3cache.image_dataset_from_s3("s3://photos/train/", **dataset_options(s3, cache_dir, cache_size_limit=0))
    first, second = all_batches(ds), all_batches(ds)
    for (x1, y1), (x2, y2) in zip(first, second, strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)


def test_an_epoch_end_copies_the_write_ahead_log_into_the_database(s3: LocalS3, bucket: str, cache_dir: Path) -> None:
    ds = s3cache.image_dataset_from_s3("s3://photos/train/", **dataset_options(s3, cache_dir))
    database = cache_dir / "arrays" / "cache.db"
    for index in range(len(ds)):
        ds[index]
    frames, copied = wal_frames(database)
    assert frames > 0 and copied < frames  # far below SQLite's own checkpoint threshold
    ds.on_epoch_end()
    after, copied = wal_frames(database)
    assert after >= frames and copied == after  # readers of the next epoch can skip the log


@pytest.mark.timeout(30)  # a checkpoint that waited for the reader would wait out the store's 60 s busy timeout
def test_a_checkpoint_waits_for_no_reader(tmp_path: Path) -> None:
    store = ArrayStore(tmp_path / "arrays", parse_size("1GB"))
    store.begin_run("a")
    store.put("k1", codec.encode_array(ENTRY), tag="t")
    database = tmp_path / "arrays" / "cache.db"
    reader = sqlite3.connect(database, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM Cache").fetchall()  # a read transaction on the log as it is now
    seen, _ = wal_frames(database)
    store.put("k2", codec.encode_array(ENTRY), tag="t")
    store.checkpoint()  # copies what the reader allows, and returns
    frames, copied = wal_frames(database)
    assert copied == seen < frames
    reader.execute("COMMIT")
    store.checkpoint()
    assert wal_frames(database) == (frames, frames)
    assert store.get("k2") is not None
    reader.close()
    store.close()


def test_opening_creates_the_tag_index_while_another_process_writes(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    cache = open_diskcache(tmp_path / "arrays", tag_index=False)  # a store another process is still creating
    cache.close()
    cache._timeout = 0  # as while diskcache opens a store: no busy timeout, statements retried by hand
    holder = sqlite3.connect(tmp_path / "arrays" / "cache.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process is writing
    retrying, finished, errors = threading.Event(), threading.Event(), []
    pause = time.sleep
    monkeypatch.setattr(time, "sleep", lambda seconds: (retrying.set(), pause(seconds)))

    def create_index() -> None:
        try:
            cache.create_tag_index()
        except sqlite3.Error as exc:
            errors.append(exc)
        finally:
            finished.set()

    thread = threading.Thread(target=create_index)
    thread.start()
    while not (retrying.is_set() or finished.is_set()):
        retrying.wait(0.01)
    holder.execute("COMMIT")
    thread.join()
    assert not errors and retrying.is_set()
    holder.close()
    cache.close()


def test_recency_is_written_once_per_run_and_not_at_all_by_the_run_that_stored(tmp_path: Path) -> None:
    store = ArrayStore(tmp_path / "arrays", parse_size("1GB"))
    store.begin_run("a")
    store.put("k", codec.encode_array(ENTRY), tag="t")
    stored = access_times(tmp_path)["k"]
    store.get("k")
    store.recency.flush()
    assert access_times(tmp_path)["k"] == stored  # stored by this run: no write needed
    store.begin_run("b")
    store.get("k")
    store.recency.flush()
    refreshed = access_times(tmp_path)["k"]
    assert refreshed > stored
    store.get("k")
    store.recency.flush()
    assert access_times(tmp_path)["k"] == refreshed  # once per run, however often it is read


def test_page_size_is_picked_for_the_entries_and_kept_by_the_store(tmp_path: Path) -> None:
    sizes = {side: layout.page_size_for(codec.entry_size((side, side, 3))) for side in (32, 64, 96, 128, 224, 320)}
    # Larger pages only where rows span overflow pages without wasting room (a 12 KB row would fill a 16 KiB page).
    assert sizes == {32: 4096, 64: 4096, 96: 8192, 128: 16384, 224: 16384, 320: 4096}
    array = np.zeros((128, 128, 3), np.uint8)
    store = ArrayStore(tmp_path / "arrays", parse_size("1GB"), page_size=16384)
    empty = store.volume()
    store.put_many([(f"k{i}", codec.encode_array(array, key=f"k{i}")) for i in range(8)], tag="t")
    full = store.volume()
    assert store.page_size == 16384 and full - empty == pytest.approx(8 * layout.footprint(len(
        codec.encode_array(array, key="k0")), 2, 16384), rel=0.1)
    for i in range(8):
        store.delete(f"k{i}")
    assert store.volume() < empty + (full - empty) / 4  # deleted rows' pages are given back (auto-vacuum)
    store.close()
    with ArrayStore(tmp_path / "arrays", page_size=4096) as reopened:
        assert reopened.page_size == 16384


def test_a_damaged_store_is_rebuilt_with_its_page_size(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    with CacheDirectory(cache_dir, page_size=16384) as cache:
        cache.arrays.put_many([(f"k{i}", codec.encode_array(ENTRY, key=f"k{i}")) for i in range(8)], tag="t")
    database = cache_dir / "arrays" / "cache.db"
    data = bytearray(database.read_bytes())
    data[16384:] = bytes(len(data) - 16384)  # every page after the first zeroed: the tables are gone
    database.write_bytes(bytes(data))
    problems = verify_directory(cache_dir, fix=True)
    assert [problem.key for problem in problems] == ["<arrays database>"] and "rebuilt" in problems[0].action
    with ArrayStore(cache_dir / "arrays") as rebuilt:
        assert len(rebuilt) == 0 and rebuilt.page_size == 16384


def test_a_read_stamped_back_rewrites_no_array(tmp_path: Path) -> None:
    store = ArrayStore(tmp_path / "arrays", parse_size("1GB"), page_size=16384)
    entries = [(f"k{i}", codec.encode_array(ENTRY, key=f"k{i}")) for i in range(64)]
    assert store.begin_run("first").gen == store.begin_run("first").gen >= 2**23  # stamps of one width
    store.put_many(entries, tag="t")
    store.close()
    wal = tmp_path / "arrays" / "cache.db-wal"
    store = ArrayStore(tmp_path / "arrays")  # the last close folded the log into the database
    store.begin_run("second")  # another dataset: each read is stamped back
    size_before = wal.stat().st_size
    assert all(entry is not None for entry in store.get_many([key for key, _ in entries]))
    store.recency.flush()
    # In place: about a leaf page per 8 rows and the index, not the 64 arrays' 3 MB.
    assert set(access_times(tmp_path).values()) == {store.recency.current.gen}
    assert wal.stat().st_size - size_before < len(entries) * ENTRY_BYTES / 8
    store.close()
