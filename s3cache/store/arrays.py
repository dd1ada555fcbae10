"""The array store: encoded image arrays in diskcache, under a size limit, read in batches.

* Values are raw bytes and keys plain text (:class:`~s3cache.store.disk.SafeDisk`): nothing is
  pickled, nothing read back is unpickled.
* Reads do not write: a batch of keys is one ``SELECT`` on a per-thread read-only connection, and
  reads are noted for recency (:class:`~s3cache.store.recency.RecencyLog`), written back later.
* The size limit is the store's, kept in its database: ``size_limit=None`` keeps it, a value
  replaces it and evicts down to it at once. Every process reads the stored limit again before
  admitting or evicting, so all processes sharing the store keep to the latest one set.
* ``size_limit`` is soft in diskcache (each ``set`` culls at most ``cull_limit`` rows, ``cull``
  ten at a time), so ``cull_limit`` is 0 and :meth:`ArrayStore.cull`, called after writes, deletes
  just enough rows chosen by the eviction policy to get back under the limit. A new entry that
  does not fit is stored only if the policy admits it (:mod:`s3cache.store.policy`).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import diskcache
import numpy as np

from s3cache import codec
from s3cache.store.connection import Connections
from s3cache.store.disk import UnsafeEntryError, open_diskcache
from s3cache.store.policy import DISKCACHE_POLICY, EvictionPolicy, KeepCurrentRun
from s3cache.store.recency import Generation, RecencyLog

DEFAULT_SIZE_LIMIT = 10 * 10**9
# Keys per SELECT, under SQLite's limit on bound parameters.
SELECT_CHUNK = 500

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


_ROW_COLUMNS = ", ".join(Row._fields)


@dataclass(frozen=True)
class Problem:
    """One damaged entry or inconsistency found by :meth:`ArrayStore.verify`."""

    key: str
    reason: str


class ArrayStore:
    """Encoded image arrays under a size limit.

    Safe to share between threads of one process and between processes on one directory.

    Args:
        directory: The store's directory (``<cache_dir>/arrays``); its parent must exist.
        size_limit: Upper bound for the arrays, in bytes; ``None`` keeps the stored limit
            (:data:`DEFAULT_SIZE_LIMIT` for a new store). A value replaces the stored limit, and the
            store is evicted down to it at once.
        policy: Chooses what an eviction removes and whether a full store admits a new entry
            (default: :class:`~s3cache.store.policy.KeepCurrentRun`).

    Raises:
        CacheError: The store cannot be created or opened.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        size_limit: int | None = None,
        policy: EvictionPolicy | None = None,
    ) -> None:
        self.directory = Path(directory)
        settings: dict[str, object] = {"eviction_policy": DISKCACHE_POLICY, "cull_limit": 0, "tag_index": True}
        if size_limit is not None:
            settings["size_limit"] = size_limit
        elif not (self.directory / "cache.db").exists():
            settings["size_limit"] = DEFAULT_SIZE_LIMIT
        self._cache = open_diskcache(self.directory, **settings)
        self._connections = Connections(self.directory / "cache.db")
        self.recency = RecencyLog(self._connections)
        self.policy: EvictionPolicy = policy or KeepCurrentRun()
        if size_limit is not None:
            self.cull()

    def begin_run(self, run: str) -> Generation:
        """Read and store on behalf of a run (see :mod:`s3cache.store.recency`): its entries stay."""
        return self.recency.begin(run)

    # -- reading ------------------------------------------------------------------------------------

    @property
    def size_limit(self) -> int:
        """The store's size limit in bytes, as last set by any process."""
        return int(self._setting("size_limit"))

    def _setting(self, name: str) -> int:
        """A diskcache setting as stored now (read on this thread's own connection)."""
        row = self._connections.reader().execute("SELECT value FROM Settings WHERE key = ?", (name,)).fetchone()
        return int(row[0])

    def _volume(self) -> int:
        """:meth:`volume`, read on this thread's own connection (which :meth:`close` closes, whatever the thread)."""
        con = self._connections.reader()
        (pages,) = con.execute("PRAGMA page_count").fetchone()
        (page_size,) = con.execute("PRAGMA page_size").fetchone()
        return int(pages) * int(page_size) + self._setting("size")

    def get(self, key: str) -> Entry | None:
        """Read one entry (see :meth:`get_many`)."""
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[str]) -> list[Entry | None]:
        """Read entries with one database query per batch, and note the reads for recency.

        Missing keys read as ``None``. So do damaged entries (bad header, length or checksum, or a
        value file gone), which are deleted so that the caller's refetched array can be stored.
        """
        rows = self._select(keys)
        entries = [self._entry(key, rows.get(key)) for key in keys]
        stamp = self.recency.stamp_of_run()
        self.recency.note([rows[key].rowid for key, entry in zip(keys, entries, strict=True)
                           if entry is not None and rows[key].access_time != stamp])
        return entries

    def existing(self, keys: Sequence[str]) -> set[str]:
        """Which of the keys have entries (one query per batch, no read noted)."""
        return {row[0] for row in self._query("key", keys)}

    def _select(self, keys: Sequence[str]) -> dict[str, Row]:
        """Rows of the given keys, by key."""
        return {row[0]: Row(*row) for row in self._query(_ROW_COLUMNS, keys)}

    def _query(self, columns: str, keys: Sequence[str]) -> Iterator[tuple[object, ...]]:
        """Columns of the rows of the given keys, in one query per :data:`SELECT_CHUNK` keys."""
        con = self._connections.reader()
        for start in range(0, len(keys), SELECT_CHUNK):
            chunk = keys[start:start + SELECT_CHUNK]
            marks = ",".join("?" * len(chunk))
            yield from con.execute(f"SELECT {columns} FROM Cache WHERE raw = 1 AND key IN ({marks})", chunk)

    def _entry(self, key: str, row: Row | None) -> Entry | None:
        """Decode a row; damaged or vanished entries are deleted and read as ``None``."""
        if row is None:
            return None
        try:
            return self._decode(row)
        except (OSError, codec.CorruptEntryError, UnsafeEntryError):
            self._cache.delete(key)
            return None

    def _decode(self, row: Row) -> Entry:
        """Decode a row, reading its value file if it has one.

        Raises:
            OSError: The value file cannot be read.
            codec.CorruptEntryError: The entry is damaged or stored in an unexpected mode.
        """
        if row.mode == diskcache.core.MODE_RAW and row.value is not None:
            return codec.decode(bytes(row.value))
        if row.mode == diskcache.core.MODE_BINARY and row.filename:
            return codec.decode(_read_file(os.path.join(self._cache.directory, row.filename), row.size))
        raise codec.CorruptEntryError(f"unexpected storage mode {row.mode}")

    def __contains__(self, key: str) -> bool:
        return key in self._cache

    def __len__(self) -> int:
        return len(self._cache)

    def keys(self) -> Iterator[str]:
        """Iterate over every key."""
        return self._cache.iterkeys()

    def volume(self) -> int:
        """Bytes used on disk (database plus value files)."""
        return int(self._cache.volume())

    # -- writing ------------------------------------------------------------------------------------

    def put(self, key: str, entry: bytes, tag: str) -> bool:
        """Store an encoded entry, stamped with the run's generation; returns whether it wrote.

        Nothing is written if another writer stored the key first, or if the entry does not fit
        and the policy does not admit it (the caller still has the array it serves). The row is
        what diskcache's ``add`` writes (its triggers keep the count and size), inserted on the
        store's own writer so that no thread keeps a connection open after :meth:`close`.
        """
        if not self.admits(len(entry)):
            return False
        gen = self.recency.stamp().gen
        size, mode, filename, value = self._cache.disk.store(entry, False, key=key)
        with self._connections.write_transaction() as con:
            written = con.execute(
                "INSERT OR IGNORE INTO Cache (key, raw, store_time, expire_time, access_time, access_count, tag,"
                " size, mode, filename, value) VALUES (?, 1, ?, NULL, ?, 0, ?, ?, ?, ?, ?)",
                (key, time.time(), gen, tag, size, mode, filename, value)).rowcount == 1
        if not written and filename:
            self._cache.disk.remove(filename)
        return written

    def admits(self, size: int) -> bool:
        """Whether an entry of ``size`` bytes would be stored now: it fits, or the policy can make room."""
        if self._volume() + size <= self.size_limit:
            return True
        return self.policy.admits(self._connections.reader(), self.recency.current)

    def cull(self) -> int:
        """Evict entries chosen by the policy until the store is within its size limit.

        Returns:
            The number of entries removed.
        """
        removed = 0
        while (excess := self._volume() - self.size_limit) > 0:
            self.recency.flush()
            with self._connections.write_transaction() as con:
                victims = self.policy.victims(con, excess, self.recency.current)
                con.executemany("DELETE FROM Cache WHERE rowid = ?", [(v.rowid,) for v in victims])
            if not victims:
                break
            removed += len(victims)
            for victim in victims:
                if victim.filename:
                    self._cache.disk.remove(victim.filename)
        return removed

    def delete(self, key: str) -> bool:
        """Remove one entry."""
        return bool(self._cache.delete(key))

    def evict_tag(self, tag: str) -> int:
        """Remove every entry with this tag (one spec's namespace)."""
        return int(self._cache.evict(tag))

    def clear(self) -> int:
        """Remove every entry."""
        return int(self._cache.clear())

    # -- checking -----------------------------------------------------------------------------------

    def verify(self, fix: bool = False) -> list[Problem]:
        """Check every entry's header, length and checksum, and the database against the value files.

        Args:
            fix: Delete damaged entries and let diskcache repair file/database mismatches.

        Returns:
            The problems found (before fixing).
        """
        problems = self._check_database(fix)
        keys = list(self.keys())
        for start in range(0, len(keys), SELECT_CHUNK):
            for key, row in self._select(keys[start:start + SELECT_CHUNK]).items():
                try:
                    self._decode(row)
                except FileNotFoundError:
                    continue  # evicted meanwhile, or a missing file the database check reported
                except (codec.CorruptEntryError, UnsafeEntryError, OSError) as exc:
                    problems.append(Problem(key, str(exc)))
                    if fix:
                        self._cache.delete(key)
        return problems

    def _check_database(self, fix: bool) -> list[Problem]:
        """Run diskcache's check of the database, and of the value files against it."""
        with warnings.catch_warnings():
            # diskcache reports through warnings: no filter of the caller's may hide them.
            warnings.simplefilter("always")
            problems = [Problem("<database>", str(w.message)) for w in self._cache.check(fix=fix)]
            if fix and problems:
                # Removing a value file orphaned by a crash can empty its directory, then that one's
                # parent: each pass removes one level of emptied directories.
                for _ in range(2):
                    if not self._cache.check(fix=True):
                        break
        return problems

    def __enter__(self) -> ArrayStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Write back recency and close the database."""
        self.recency.close()
        self._connections.close()
        self._cache.close()


def _read_file(path: str, size: int) -> bytes:
    """Read a value file of known size with the fewest system calls (a short read means damage)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, size + 1)  # one byte more than expected reveals a file that grew
    finally:
        os.close(fd)
