"""Batched store writes: one transaction per batch of arrivals, entries stored before callers hear so."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from helpers import FILE_SIDE

from s3cache import codec
from s3cache.source.ledger import FetchLedger
from s3cache.store import ArrayStore
from s3cache.writer import BatchWriter

ENTRY = np.arange(FILE_SIDE**2 * 3, dtype=np.uint32).astype(np.uint8).reshape(FILE_SIDE, FILE_SIDE, 3)  # value files


def encoded(key: str) -> bytes:
    return codec.encode_array(ENTRY, key=key)


def value_files(directory: Path) -> list[str]:
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*.val"))


def store_times(directory: Path) -> dict[str, float]:
    with sqlite3.connect(directory / "cache.db") as con:
        return dict(con.execute("SELECT key, store_time FROM Cache").fetchall())


def test_put_many_writes_a_batch_in_one_transaction(tmp_path: Path) -> None:
    with ArrayStore(tmp_path / "arrays") as store:
        assert store.put("old", encoded("old"), tag="t")
        keys = ["a", "old", "b", "a"]
        assert store.put_many([(key, encoded(key)) for key in keys], tag="t") == [True, False, True, False]
        times = store_times(tmp_path / "arrays")
        assert times["a"] == times["b"] != times["old"]  # one transaction, one timestamp
        for key in ("a", "b", "old"):
            np.testing.assert_array_equal(store.get(key), ENTRY)
        # The entries that lost (a key stored before, a key twice in the batch) leave no value file.
        assert len(value_files(tmp_path / "arrays")) == 3


def test_put_many_refuses_bad_values_before_writing(tmp_path: Path) -> None:
    with ArrayStore(tmp_path / "arrays") as store:
        with pytest.raises(TypeError, match="must be bytes"):
            store.put_many([("a", encoded("a")), ("b", "text")], tag="t")  # type: ignore[list-item]
        assert len(store) == 0 and value_files(tmp_path / "arrays") == []


def test_put_many_admits_what_fits_under_the_limit(tmp_path: Path) -> None:
    size = len(encoded("a"))
    with ArrayStore(tmp_path / "arrays", size_limit=10**6) as store:
        volume = store.volume()
    with ArrayStore(tmp_path / "arrays", size_limit=volume + 2 * size + size // 2) as store:
        store.begin_run("run")  # a run's own entries are never evicted for each other
        assert store.put_many([(key, encoded(key)) for key in "abcd"], tag="t") == [True, True, False, False]


class GatedStore(ArrayStore):
    """An array store whose first batch write waits for a gate, and which records every batch's keys."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.entered, self.gate = threading.Event(), threading.Event()
        self.batches: list[list[str]] = []

    def put_many(self, entries: Sequence[tuple[str, bytes]], tag: str) -> list[bool]:
        if not self.batches:
            self.entered.set()
            self.gate.wait(timeout=30)
        self.batches.append([key for key, _ in entries])
        return super().put_many(entries, tag)


def test_arrivals_during_a_write_go_in_one_batch(tmp_path: Path) -> None:
    with GatedStore(tmp_path / "arrays") as store:
        writer = BatchWriter(store, tag="t", max_batch=8)
        first = writer.submit("k0", encoded("k0"))
        assert store.entered.wait(timeout=30)
        rest = [writer.submit(f"k{i}", encoded(f"k{i}")) for i in range(1, 11)]
        store.gate.set()
        assert all(future.result(timeout=30) for future in [first, *rest])
        writer.close()
        # The first write went alone; the ten that arrived while it waited went in batches of at most 8.
        assert [len(batch) for batch in store.batches] == [1, 8, 2]
        assert sorted(store.existing([f"k{i}" for i in range(11)])) == sorted(f"k{i}" for i in range(11))


def test_a_write_is_stored_and_its_claim_released_before_it_completes(tmp_path: Path) -> None:
    ledger = FetchLedger(tmp_path / "fetches.db")
    other = FetchLedger(tmp_path / "fetches.db")
    with ArrayStore(tmp_path / "arrays") as store:
        assert ledger.claim(["listed", "same"]) == {"listed", "same"}
        writer = BatchWriter(store, tag="t", ledger=ledger)
        seen = {}

        def look(key: str) -> object:
            return lambda _: seen.update({key: (key in store, other.unclaimed([key]))})

        writer.submit("read", encoded("read"), claimed="listed").add_done_callback(look("read"))
        writer.submit("same", encoded("same"), claimed="same").add_done_callback(look("same"))
        writer.close()
        assert seen == {"read": (True, {"read"}), "same": (True, {"same"})}
        assert other.unclaimed(["listed"]) == {"listed"}
        # The object behind "listed" was read in another version: the ledger says where it went.
        assert other.stored_keys(["listed", "same"]) == {"listed": "read"}
    for each in (ledger, other):
        each.close()


def test_a_failed_batch_fails_its_callers_and_a_closed_writer_refuses(tmp_path: Path) -> None:
    with ArrayStore(tmp_path / "arrays") as store:
        writer = BatchWriter(store, tag="t")
        with pytest.raises(TypeError):
            writer.submit("k", "not bytes").result(timeout=30)  # type: ignore[arg-type]
        writer.close()
        with pytest.raises(RuntimeError, match="closed"):
            writer.submit("k", encoded("k"))
