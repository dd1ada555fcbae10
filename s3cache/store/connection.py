"""s3cache's own SQLite connections to a diskcache database: per-thread readers and one writer.

Readers open read-only (:func:`connect_readonly`), and still read on a file system too full for the WAL index.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from s3cache import forksafe
from s3cache.store.faults import is_disk_full

log = logging.getLogger(__name__)

MMAP_SIZE = 2**31
"""Bytes of a database readers map into memory (SQLite caps it at its own maximum)."""


def connect_readonly(database: Path) -> sqlite3.Connection:
    """A read-only connection to a database, usable from any thread.

    A reader of a WAL database needs the shared WAL index (``-shm``); on a full file system that
    file cannot be created or grown. Then the database file is read as it is, without the index
    (``immutable``): what a live writer has not checkpointed yet is not seen, but nothing is written.
    """
    uri = database.absolute().as_uri()
    con = forksafe.connect(uri + "?mode=ro", uri=True, timeout=60, isolation_level=None, check_same_thread=False)
    try:
        con.execute("SELECT COUNT(*) FROM sqlite_master").fetchall()
    except sqlite3.OperationalError as exc:
        con.close()
        if not is_disk_full(exc, database.parent):
            raise
        log.info("reading %s without its WAL index: %s", database, exc)
        con = forksafe.connect(uri + "?mode=ro&immutable=1", uri=True, timeout=60, isolation_level=None,
                               check_same_thread=False)
    # Entries inline in the database are read through a memory map, not one read() per page.
    con.execute(f"PRAGMA mmap_size = {MMAP_SIZE}")
    return con


class Connections:
    """Read-only connections (one per thread) and one shared write connection to a database.

    Args:
        path: The SQLite database file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._readers = threading.local()
        self._all_readers: list[sqlite3.Connection] = []
        self._write_lock = threading.Lock()
        self._writer: sqlite3.Connection | None = None
        self._generation = 0

    def reader(self) -> sqlite3.Connection:
        """This thread's read-only connection (SQLite connections belong to one thread).

        On a full file system it may read the database file without the WAL index
        (:func:`connect_readonly`); :meth:`refresh_readers` replaces such
        connections once space is back.
        """
        con: sqlite3.Connection | None = getattr(self._readers, "con", None)
        if con is None or self._readers.generation != self._generation:
            con = self._readers.con = connect_readonly(self.path)
            self._readers.generation = self._generation
            self._all_readers.append(con)
        return con

    def refresh_readers(self) -> None:
        """Make every thread open a new read-only connection on its next read."""
        self._generation += 1

    @contextlib.contextmanager
    def write_transaction(self) -> Iterator[sqlite3.Connection]:
        """An immediate write transaction on the shared writer, serialized across threads."""
        with self._write_lock, immediate_transaction(self._open_writer()) as con:
            yield con

    def checkpoint(self) -> None:
        """Copy the write-ahead log's frames into the database file, as far as readers allow (``PASSIVE``).

        Waits for no reader or writer of any process, and is quick when nothing is left to copy.
        """
        with self._write_lock:
            self._open_writer().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _open_writer(self) -> sqlite3.Connection:
        """The shared write connection, opened on first use (caller holds the write lock)."""
        if self._writer is None:
            self._writer = forksafe.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            self._writer.execute("PRAGMA synchronous = NORMAL")
        return self._writer

    def close(self) -> None:
        """Close the writer and every reader."""
        with self._write_lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        for con in self._all_readers:
            con.close()
        self._all_readers.clear()
        self._readers = threading.local()


@contextlib.contextmanager
def immediate_transaction(con: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` on a connection in autocommit mode, rolled back on any error.

    A failed ``COMMIT`` (a full disk) may leave the transaction open: it is ended either way.
    """
    con.execute("BEGIN IMMEDIATE")
    try:
        yield con
        con.execute("COMMIT")
    except BaseException:
        if con.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                con.execute("ROLLBACK")
        raise
