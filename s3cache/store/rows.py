"""The rows of the array store: selected in batches, decoded into entries, inserted and deleted with their files.

A row holds its entry inline (``mode = 1``, raw bytes) or names its value file (``mode = 2``); any
other form is never decoded. Reading and checking the store (:mod:`s3cache.store.verify`) decode
rows here alike. A row and its value file are written and deleted together: a failed insert
leaves no file behind, and a file goes only after its row.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
from diskcache.core import MODE_BINARY, MODE_RAW

from s3cache import codec
from s3cache.store.connection import Connections
from s3cache.store.disk import SAFE_ROW, SafeDisk, is_value_file
from s3cache.store.recency import RecencyLog

log = logging.getLogger(__name__)

# Keys per SELECT, under SQLite's limit on bound parameters.
SELECT_CHUNK = 500
# Value files larger than this are checked against their size before reading (see read_file).
LARGE_ENTRY = 64 * 2**20

Entry = np.ndarray | codec.Failure


class Row(NamedTuple):
    """The columns of a stored entry that reading it needs."""

    key: str
    mode: int
    filename: str | None
    size: int
    value: bytes | None
    rowid: int
    access_time: float



ROW_COLUMNS = ", ".join(Row._fields)


def select_rows(con: sqlite3.Connection, columns: str, keys: Sequence[str]) -> Iterator[tuple[object, ...]]:
    """Columns of the rows of the given keys, in one query per :data:`SELECT_CHUNK` keys."""
    for start in range(0, len(keys), SELECT_CHUNK):
        chunk = keys[start:start + SELECT_CHUNK]
        marks = ",".join("?" * len(chunk))
        # fetchall: one call into SQLite per chunk, not one per row (each call takes s3cache.forksafe's gate)
        yield from con.execute(f"SELECT {columns} FROM Cache WHERE raw = 1 AND key IN ({marks})", chunk).fetchall()


def safe_keys(con: sqlite3.Connection) -> Iterator[str]:
    """Every key of a row in s3cache's form (:data:`~s3cache.store.disk.SAFE_ROW`), one query per 1000 rows."""
    last = 0
    while True:
        rows = con.execute(f"SELECT rowid, key FROM Cache WHERE rowid > ? AND {SAFE_ROW} "
                           "ORDER BY rowid LIMIT 1000", (last,)).fetchall()
        if not rows:
            return
        for _, key in rows:
            yield key
        last = rows[-1][0]


def decode_row(row: Row, directory: str) -> Entry:
    """Decode a row, reading its value file (under ``directory``) if any; the entry must be bound to the row's key.

    Raises:
        OSError: The value file cannot be read.
        codec.CorruptEntryError: The entry is damaged, bound to another key, or stored in an unexpected form.
    """
    if row.mode == MODE_RAW and isinstance(row.value, bytes):
        return codec.decode(row.value, row.key)
    if row.mode == MODE_BINARY and row.value is None and is_value_file(row.filename):
        path = os.path.join(directory, row.filename)  # type: ignore[arg-type]
        return codec.decode(read_file(path, row.size), row.key)
    raise codec.CorruptEntryError(f"unexpected storage form (mode {row.mode}, file {row.filename!r})")


def read_file(path: str, size: int) -> bytes:
    """Read a value file of known size with the fewest system calls (a short read means damage).

    A size beyond :data:`LARGE_ENTRY` (a damaged or planted row) is checked against the file first,
    so that no huge buffer is allocated for it.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        if not 0 <= size <= LARGE_ENTRY:
            size = min(max(size, 0), os.fstat(fd).st_size)
        return os.read(fd, size + 1)  # one byte more than expected reveals a file that grew
    finally:
        os.close(fd)


def insert_rows(
    connections: Connections, disk: SafeDisk, recency: RecencyLog, entries: Sequence[tuple[str, bytes]], tag: str
) -> list[bool]:
    """Insert rows (and their value files) stamped with the run's generation, in one transaction.

    A key that exists already (another writer stored it first) keeps its row. A failure leaves none of
    the new files behind.

    Returns:
        Whether each entry's row was inserted.
    """
    stored = []
    try:
        for key, value in entries:
            stored.append(disk.store(value, False, key=key))
        now, gen = time.time(), recency.stamp().gen
        with connections.write_transaction() as con:
            taken = {row[0] for row in select_rows(con, "key", [key for key, _ in entries])}
            inserted = []
            for key, _ in entries:
                inserted.append(key not in taken)
                taken.add(key)  # a key twice in one batch: its first entry wins
            con.executemany(
                "INSERT INTO Cache(key, raw, store_time, expire_time, access_time, access_count, tag, size, mode,"
                " filename, value) VALUES (?, 1, ?, NULL, ?, 0, ?, ?, ?, ?, ?)",
                [(key, now, gen, tag, *columns)
                 for (key, _), columns, new in zip(entries, stored, inserted, strict=True) if new])
    except BaseException:
        for _, _, filename, _ in stored:
            if filename is not None:
                disk.remove(filename)
        raise
    for (_, _, filename, _), new in zip(stored, inserted, strict=True):
        if not new and filename is not None:
            disk.remove(filename)  # another writer won: its copy stays
    return inserted


def delete_rows(connections: Connections, disk: SafeDisk, rows: Sequence[tuple[int, str | None]]) -> None:
    """Delete rows by rowid and then their value files; on a full disk or a read-only store, leave them."""
    if not rows:
        return
    try:
        with connections.write_transaction() as con:
            con.executemany("DELETE FROM Cache WHERE rowid = ?", [(rowid,) for rowid, _ in rows])
    except (OSError, sqlite3.Error) as exc:
        log.info("cannot delete %d damaged cache entries now: %s", len(rows), exc)
        return
    for _, filename in rows:
        if filename is not None:
            disk.remove(filename)


def remove_value_files(con: sqlite3.Connection, disk: SafeDisk, condition: str, params: tuple[object, ...]) -> None:
    """Remove the value files of the rows matching an SQL condition, leaving the rows."""
    rows = con.execute(f"SELECT filename FROM Cache WHERE filename IS NOT NULL AND {condition}", params)
    for (filename,) in rows.fetchall():
        disk.remove(filename)  # only value file names are removed
