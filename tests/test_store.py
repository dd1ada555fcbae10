"""The array store: pickle-free entries, checksums, a true LRU with batched recency, a hard-ish size bound."""

from __future__ import annotations

import pickle
import sqlite3
from pathlib import Path

import diskcache
import numpy as np
import pytest
from helpers import FILE_SIDE, all_batches, dataset_options

import s3cache
from s3cache import codec
from s3cache.config import parse_size
from s3cache.store import ArrayStore
from s3cache.store.directory import CacheDirectory
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


def test_cache_stays_within_one_batch_of_its_limit(s3: LocalS3, bucket: str, cache_dir: Path) -> None:
    shape_bytes = 64 * 64 * 3 + codec.HEADER_SIZE
    limit = 12 * shape_bytes + 64 * 1024  # room for about a dozen entries besides the database
    ds = s3cache.image_dataset_from_s3(
        "s3://photos/train/", **dataset_options(s3, cache_dir, image_size=(64, 64), batch_size=6,
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
