"""The array store: encoded image arrays in diskcache, under a size limit, read in batches.

* Values are raw bytes and keys plain text (:class:`~s3cache.store.disk.SafeDisk`): nothing is
  pickled, nothing read back is unpickled; rows in any other form are never decoded, and
  :meth:`ArrayStore.verify` reports them.
* Every entry is bound to its key (:func:`s3cache.codec.bind`): an entry read under another key
  (swapped files or rows) fails its checksum like a damaged one, is deleted and reads as missing.
* A full file system pauses writes (one warning, :func:`~s3cache.store.disk.warn_writes_paused`):
  :meth:`ArrayStore.put` returns ``False`` and leaves no file behind, until space is free again.
* A damaged database raises :class:`~s3cache.store.disk.DamagedStoreError`, which names the repair.
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

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
from diskcache.core import MODE_BINARY, MODE_PICKLE, MODE_RAW, MODE_TEXT

from s3cache import codec
from s3cache.errors import CacheError
from s3cache.store.connection import Connections
from s3cache.store.disk import (
    DATABASE_FILES,
    DBNAME,
    SAFE_ROW,
    CacheFullError,
    DamagedStoreError,
    SafeCache,
    UnsafeEntryError,
    free_bytes,
    is_damaged,
    is_disk_full,
    is_value_file,
    open_diskcache,
    warn_writes_paused,
    write_on_full_disk,
)
from s3cache.store.policy import DISKCACHE_POLICY, EvictionPolicy, KeepCurrentRun
from s3cache.store.recency import Generation, RecencyLog

log = logging.getLogger(__name__)

DEFAULT_SIZE_LIMIT = 10 * 10**9
# Keys per SELECT, under SQLite's limit on bound parameters.
SELECT_CHUNK = 500
# While writes are paused by a full disk: retry a write after this many seconds in any case, and
# sooner once the file system has this much more room than the entry needs (an eviction, a deletion).
WRITE_RETRY_SECONDS = 30.0
RESUME_MARGIN = 256 * 1024
SPACE_CHECK_SECONDS = 1.0
# A writer checks at most this often that the specs it writes under are still recorded.
RECORD_CHECK_SECONDS = 10.0
# Value files larger than this are checked against their size before reading (see _read_file).
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


_ROW_COLUMNS = ", ".join(Row._fields)


@dataclass(frozen=True)
class Problem:
    """One damaged entry or inconsistency found by :meth:`ArrayStore.verify`.

    Attributes:
        key: The entry's key, or ``<...>`` for the database, its files, or a row that has no text key.
        reason: What is wrong.
        action: What fixing did about it, when that is more than removing it.
    """

    key: str
    reason: str
    action: str = ""


class SpecRecorder(Protocol):
    """Records a spec again when entries are written under it and its record has gone.

    See :meth:`ArrayStore.record_specs`.
    """

    def __call__(self, fingerprint: str) -> None:
        """Make sure the spec with this fingerprint (an entry tag) is recorded."""
        ...

    def close(self) -> None:
        """Release what the recorder holds."""
        ...


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
        private: Create value files owner-only (off for a shared cache: the umask decides).

    Attributes:
        spec_recorder: Called (at most every :data:`RECORD_CHECK_SECONDS`, and on close) with the
            tags written under since its last call, so that a writer records its spec again after
            ``s3cache clear`` removed the record; ``None`` records nothing.

    Raises:
        CacheError: The store cannot be created or opened.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        size_limit: int | None = None,
        policy: EvictionPolicy | None = None,
        *,
        private: bool = True,
    ) -> None:
        self.directory = Path(directory)
        settings: dict[str, object] = {"eviction_policy": DISKCACHE_POLICY, "cull_limit": 0, "tag_index": True}
        if size_limit is not None:
            settings["size_limit"] = size_limit
        elif not (self.directory / "cache.db").exists():
            settings["size_limit"] = DEFAULT_SIZE_LIMIT
        self._settings = settings
        self._private = private
        # On a full file system this is a read-only store until a write finds space again.
        self._cache: SafeCache = open_diskcache(self.directory, private=private, **settings)
        self._connections = Connections(self.directory / "cache.db")
        self.recency = RecencyLog(self._connections)
        self.policy: EvictionPolicy = policy or KeepCurrentRun()
        self._state_lock = threading.Lock()  # guards the pause state, the cache swap and the written tags
        self._paused_since: float | None = None
        self._retry_at = self._space_check_at = 0.0
        self.spec_recorder: SpecRecorder | None = None
        self._written_tags: set[str] = set()
        self._record_check_at = time.monotonic() + RECORD_CHECK_SECONDS
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

    @property
    def writes_paused(self) -> bool:
        """Whether writes are paused because the file system is full."""
        return self._paused_since is not None

    def get(self, key: str) -> Entry | None:
        """Read one entry (see :meth:`get_many`)."""
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[str]) -> list[Entry | None]:
        """Read entries with one database query per batch, and note the reads for recency.

        Missing keys read as ``None``. So do damaged entries (bad header, length or checksum, an
        entry bound to another key, a row not in s3cache's form, or a value file gone), which are
        deleted so that the caller's refetched array can be stored.

        Raises:
            DamagedStoreError: The database is damaged.
            CacheError: The database cannot be read.
        """
        try:
            rows = self._select(keys)
        except sqlite3.Error as exc:
            raise self._read_error(exc) from exc
        entries = [self._entry(key, rows.get(key)) for key in keys]
        stamp = self.recency.stamp_of_run()
        self.recency.note([rows[key].rowid for key, entry in zip(keys, entries, strict=True)
                           if entry is not None and rows[key].access_time != stamp])
        return entries

    def existing(self, keys: Sequence[str]) -> set[str]:
        """Which of the keys have entries (one query per batch, no read noted)."""
        try:
            return {row[0] for row in self._query("key", keys)}  # type: ignore[misc]
        except sqlite3.Error as exc:
            raise self._read_error(exc) from exc

    def _select(self, keys: Sequence[str]) -> dict[str, Row]:
        """Rows of the given keys, by key."""
        return {row[0]: Row(*row) for row in self._query(_ROW_COLUMNS, keys)}  # type: ignore[misc]

    def _query(self, columns: str, keys: Sequence[str]) -> Iterator[tuple[object, ...]]:
        """Columns of the rows of the given keys, in one query per :data:`SELECT_CHUNK` keys."""
        con = self._connections.reader()
        for start in range(0, len(keys), SELECT_CHUNK):
            chunk = keys[start:start + SELECT_CHUNK]
            marks = ",".join("?" * len(chunk))
            yield from con.execute(f"SELECT {columns} FROM Cache WHERE raw = 1 AND key IN ({marks})", chunk)

    def _read_error(self, exc: sqlite3.Error) -> CacheError:
        if is_damaged(exc):
            return DamagedStoreError(self.directory, exc)
        return CacheError(f"cannot read the cache in {self.directory.parent}: {exc}")

    def _entry(self, key: str, row: Row | None) -> Entry | None:
        """Decode a row; damaged or vanished entries are deleted and read as ``None``."""
        if row is None:
            return None
        try:
            return self._decode(row)
        except (OSError, codec.CorruptEntryError, UnsafeEntryError) as exc:
            log.info("dropping cache entry %r: %s", key, exc)
            self._delete_rows([(row.rowid, row.filename)])
            return None

    def _decode(self, row: Row) -> Entry:
        """Decode a row, reading its value file if it has one; the entry must be bound to the row's key.

        Raises:
            OSError: The value file cannot be read.
            codec.CorruptEntryError: The entry is damaged, bound to another key, or stored in an unexpected form.
        """
        if row.mode == MODE_RAW and isinstance(row.value, bytes):
            return codec.decode(row.value, row.key)
        if row.mode == MODE_BINARY and row.value is None and is_value_file(row.filename):
            path = os.path.join(self._cache.directory, row.filename)  # type: ignore[arg-type]
            return codec.decode(_read_file(path, row.size), row.key)
        raise codec.CorruptEntryError(f"unexpected storage form (mode {row.mode}, file {row.filename!r})")

    def __contains__(self, key: str) -> bool:
        return bool(self.existing([key]))

    def __len__(self) -> int:
        return len(self._cache)

    def keys(self) -> Iterator[str]:
        """Iterate over every key of an entry in s3cache's form (one query per 1000 rows).

        Rows in another form (a pickled key, a pickle- or text-mode value) are not listed, so
        nothing that lists keys ever decodes them; :meth:`verify` reports them.
        """
        con = self._connections.reader()
        last = 0
        while True:
            try:
                rows = con.execute(f"SELECT rowid, key FROM Cache WHERE rowid > ? AND {SAFE_ROW} "
                                   "ORDER BY rowid LIMIT 1000", (last,)).fetchall()
            except sqlite3.Error as exc:
                raise self._read_error(exc) from exc
            if not rows:
                return
            for _, key in rows:
                yield key
            last = rows[-1][0]

    def usage(self) -> dict[str, tuple[int, int]]:
        """Entries and bytes (value files and inline values) per tag, i.e. per spec fingerprint."""
        con = self._connections.reader()
        try:
            rows = con.execute(f"SELECT tag, COUNT(*), SUM(MAX(size, IFNULL(LENGTH(value), 0))) FROM Cache "
                               f"WHERE {SAFE_ROW} GROUP BY tag").fetchall()
        except sqlite3.Error as exc:
            raise self._read_error(exc) from exc
        return {str(tag): (count, int(size or 0)) for tag, count, size in rows}

    def volume(self) -> int:
        """Bytes used on disk (database plus value files)."""
        return int(self._cache.volume())

    # -- writing ------------------------------------------------------------------------------------

    def put(self, key: str, entry: bytes, tag: str) -> bool:
        """Store an encoded entry, stamped with the run's generation; returns whether it wrote.

        Nothing is written if another writer stored the key first, or if the entry does not fit
        and the policy does not admit it (the caller still has the array it serves). The entry is
        bound to ``key`` (:func:`s3cache.codec.bind`) unless it was encoded bound.
        On a full file system nothing is stored (no file is left behind) and writes pause, with
        one warning: later calls return ``False`` at once until the file system has room again
        (checked at most every :data:`SPACE_CHECK_SECONDS`) or :data:`WRITE_RETRY_SECONDS` have
        passed, when a write is tried again.

        Raises:
            TypeError: ``entry`` is not bytes.
            DamagedStoreError: The database is damaged.
        """
        if not isinstance(entry, bytes):
            raise TypeError(f"cache values must be bytes, got {type(entry).__name__}")
        if not self.admits(len(entry)) or not self._may_write(len(entry)):
            return False
        value = codec.bind(entry, key)
        try:
            wrote = self._add(self._writable(), key, value, tag)
        except (OSError, sqlite3.Error) as exc:
            if isinstance(exc, sqlite3.DatabaseError) and is_damaged(exc):
                raise DamagedStoreError(self.directory, exc) from exc
            if not (isinstance(exc, CacheFullError) or is_disk_full(exc, self.directory)):
                raise
            self._pause(exc)
            return False
        self._resume()
        self._note_tag(tag)
        return wrote

    def _add(self, cache: SafeCache, key: str, value: bytes, tag: str) -> bool:
        """Insert a row (and its value file) unless the key exists; a failure leaves no file behind."""
        disk = cache.disk
        size, mode, filename, db_value = disk.store(value, False, key=key)
        try:
            now, gen = time.time(), self.recency.stamp().gen
            with self._connections.write_transaction() as con:
                exists = con.execute("SELECT 1 FROM Cache WHERE key = ? AND raw = 1", (key,)).fetchone()
                if exists is None:
                    con.execute(
                        "INSERT INTO Cache(key, raw, store_time, expire_time, access_time, access_count, tag, size,"
                        " mode, filename, value) VALUES (?, 1, ?, NULL, ?, 0, ?, ?, ?, ?, ?)",
                        (key, now, gen, tag, size, mode, filename, db_value))
        except BaseException:
            if filename is not None:
                disk.remove(filename)
            raise
        if exists is not None and filename is not None:
            disk.remove(filename)  # another writer won: its copy stays
        return exists is None

    def _writable(self) -> SafeCache:
        """The store opened for writing; a store opened read-only (full disk) is reopened first.

        Raises:
            CacheFullError: The file system is still full.
        """
        if not self._cache.read_only:
            return self._cache
        with self._state_lock:
            if self._cache.read_only:
                cache = open_diskcache(self.directory, private=self._private, **self._settings)
                if cache.read_only:
                    cache.close()
                    raise CacheFullError(f"cannot write to the cache in {self.directory.parent}: its file system "
                                         "is full. Free some space and try again.")
                old, self._cache = self._cache, cache
                old.close()
                self._connections.refresh_readers()
        return self._cache

    def _may_write(self, size: int) -> bool:
        """Whether to try a write now: always, unless writes are paused and no room or retry time has come."""
        if self._paused_since is None:
            return True
        now = time.monotonic()
        if now >= self._retry_at:
            return True
        if now >= self._space_check_at:
            self._space_check_at = now + SPACE_CHECK_SECONDS
            return free_bytes(self.directory) >= size + RESUME_MARGIN
        return False

    def _pause(self, exc: BaseException) -> None:
        now = time.monotonic()
        with self._state_lock:
            first = self._paused_since is None
            if first:
                self._paused_since = now
            self._retry_at = now + WRITE_RETRY_SECONDS
            self._space_check_at = now + SPACE_CHECK_SECONDS
        if first:
            warn_writes_paused(self.directory, exc)

    def _resume(self) -> None:
        if self._paused_since is None:
            return
        with self._state_lock:
            since, self._paused_since = self._paused_since, None
        if since is not None:
            log.warning("s3cache: cache writes to %s resumed after %.0f s", self.directory.parent,
                        time.monotonic() - since)

    def _note_tag(self, tag: str) -> None:
        if self.spec_recorder is None:
            return
        with self._state_lock:
            self._written_tags.add(tag)
        if time.monotonic() >= self._record_check_at:
            self.record_specs()

    def record_specs(self) -> None:
        """Pass the tags written under since the last call to :attr:`spec_recorder` (one check each)."""
        with self._state_lock:
            tags, self._written_tags = self._written_tags, set()
            self._record_check_at = time.monotonic() + RECORD_CHECK_SECONDS
        if self.spec_recorder is None:
            return
        for tag in tags:
            try:
                self.spec_recorder(tag)
            except (OSError, sqlite3.Error) as exc:  # CacheError included: a record is worth no failed batch
                log.warning("s3cache: cannot record spec %s in %s: %s", tag, self.directory.parent, exc)

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
        return bool(self._writable().delete(key))

    def evict_tag(self, tag: str) -> int:
        """Remove every entry with this tag (one spec's namespace)."""
        self._make_room("tag = ?", (tag,))
        return int(self._writable().evict(tag))

    def clear(self) -> int:
        """Remove every entry."""
        self._make_room("1", ())
        return int(self._writable().clear())

    def _make_room(self, condition: str, params: tuple[object, ...]) -> None:
        """On a full file system, remove the value files of the rows about to be deleted first.

        Deleting rows writes to the database, which a full file system cannot take; the rows'
        value files go first to make room (a reader meanwhile sees a missing file: a miss).
        """
        if not self._cache.read_only and free_bytes(self.directory) >= RESUME_MARGIN:
            return
        con = self._connections.reader()
        rows = con.execute(f"SELECT filename FROM Cache WHERE filename IS NOT NULL AND {condition}", params)
        for (filename,) in rows.fetchall():
            self._cache.disk.remove(filename)  # only value file names are removed

    def _delete_rows(self, rows: Sequence[tuple[int, str | None]]) -> None:
        """Delete rows by rowid and then their value files; on a full disk or a read-only store, leave them."""
        if not rows:
            return
        try:
            with self._connections.write_transaction() as con:
                con.executemany("DELETE FROM Cache WHERE rowid = ?", [(rowid,) for rowid, _ in rows])
        except (OSError, sqlite3.Error) as exc:
            log.info("cannot delete %d damaged cache entries now: %s", len(rows), exc)
            return
        for _, filename in rows:
            if filename is not None:
                self._cache.disk.remove(filename)

    # -- checking -----------------------------------------------------------------------------------

    def verify(self, fix: bool = False) -> list[Problem]:
        """Check every row and entry, the value files against the database, and the database's counters.

        Rows not in s3cache's form (a pickled key, a pickle- or text-mode value, a value file name
        diskcache would not generate) are reported, never decoded. Entries must decode under their
        own key (header, length, checksum). Files that no row names, rows whose file is missing,
        empty directories and wrong counters are reported too. The database's own integrity is
        checked by :func:`s3cache.store.disk.database_damage` (``s3cache verify`` runs it first).

        Args:
            fix: Remove what is damaged: unknown files and the damaged entries' files first (room
                on a full disk), then the damaged rows, then correct the counters and remove
                empty directories.

        Returns:
            The problems found (before fixing).

        Raises:
            DamagedStoreError: The database is damaged.
            CacheFullError: Fixing needs to write and the file system is still full.
        """
        try:
            return self._verify(fix)
        except sqlite3.DatabaseError as exc:
            if is_damaged(exc):
                raise DamagedStoreError(self.directory, exc) from exc
            raise

    def _verify(self, fix: bool) -> list[Problem]:
        con = self._connections.reader()
        problems: list[Problem] = []
        doomed: list[tuple[int, str | None]] = []
        referenced: set[str] = set()
        for rowid, key, raw, mode, filename, value_type in con.execute(
                f"SELECT rowid, key, raw, mode, filename, typeof(value) FROM Cache WHERE NOT ({SAFE_ROW})"):
            named = raw == 1 and isinstance(key, str)
            problems.append(Problem(key if named else f"<row {rowid}>", _unsafe_reason(named, mode, value_type)))
            own_file = filename if is_value_file(filename) else None
            doomed.append((rowid, own_file))
            if own_file is not None:
                referenced.add(own_file)
        last = 0
        while rows := con.execute(f"SELECT {_ROW_COLUMNS} FROM Cache WHERE rowid > ? AND {SAFE_ROW} "
                                  f"ORDER BY rowid LIMIT {SELECT_CHUNK}", (last,)).fetchall():
            for row in map(Row._make, rows):
                last = row.rowid
                if row.filename is not None:
                    referenced.add(row.filename)
                try:
                    self._decode(row)
                    continue
                except FileNotFoundError:
                    reason = f"file not found: {os.path.join(self._cache.directory, row.filename or '')}"
                except (OSError, codec.CorruptEntryError, UnsafeEntryError) as exc:
                    reason = str(exc)
                if con.execute("SELECT 1 FROM Cache WHERE rowid = ? AND key = ?", (row.rowid, row.key)).fetchone():
                    problems.append(Problem(row.key, reason))  # (not evicted meanwhile)
                    doomed.append((row.rowid, row.filename if is_value_file(row.filename) else None))
        unknown, empty = self._unknown_files(referenced)
        problems += [Problem("<files>", f"unknown file: {path}") for path in unknown]
        problems += [Problem("<files>", f"empty directory: {path}") for path in empty]
        counted, count, summed, size = con.execute(
            "SELECT (SELECT value FROM Settings WHERE key = 'count'), (SELECT COUNT(*) FROM Cache),"
            " (SELECT value FROM Settings WHERE key = 'size'), (SELECT COALESCE(SUM(size), 0) FROM Cache)").fetchone()
        counters_wrong = (counted, summed) != (count, size)
        if counted != count:
            problems.append(Problem("<database>", f"Settings.count != COUNT(Cache.key); {counted} != {count}"))
        if summed != size:
            problems.append(Problem("<database>", f"Settings.size != SUM(Cache.size); {summed} != {size}"))
        if fix and problems:
            self._fix(unknown, doomed, counters_wrong)
        return problems

    def _unknown_files(self, referenced: set[str]) -> tuple[list[str], list[str]]:
        """Files under the store that no row names (the database's own aside), and empty directories."""
        unknown, empty = [], []
        top = str(self.directory)
        for dirpath, dirnames, filenames in os.walk(top):
            if not dirnames and not filenames and dirpath != top:
                empty.append(dirpath)
            for name in filenames:
                if dirpath == top and name in DATABASE_FILES:
                    continue
                path = os.path.join(dirpath, name)
                if os.path.relpath(path, top) not in referenced:
                    unknown.append(path)
        return unknown, empty

    def _fix(self, unknown: list[str], doomed: list[tuple[int, str | None]], counters_wrong: bool) -> None:
        """Remove files first (room on a full disk), then rows, then correct counters and prune directories."""
        for path in unknown:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        for _, filename in doomed:
            if filename is not None:
                self._cache.disk.remove(filename)
        if doomed or counters_wrong:

            def write(con: sqlite3.Connection) -> None:
                con.executemany("DELETE FROM Cache WHERE rowid = ?", [(rowid,) for rowid, _ in doomed])
                con.execute("UPDATE Settings SET value = (SELECT COUNT(*) FROM Cache) WHERE key = 'count'")
                con.execute("UPDATE Settings SET value = (SELECT COALESCE(SUM(size), 0) FROM Cache) WHERE key = 'size'")

            # No connection of ours may hold the database (they reopen on demand).
            self._connections.close()
            self._cache.close()
            write_on_full_disk(self.directory / DBNAME, write)
        top = str(self.directory)
        for dirpath, _, _ in os.walk(top, topdown=False):
            if dirpath != top:
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)  # only empty ones go

    def __enter__(self) -> ArrayStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Record specs written under, write back recency and close the database."""
        if self.spec_recorder is not None:
            if self._written_tags:
                self.record_specs()
            self.spec_recorder.close()
            self.spec_recorder = None
        try:
            self.recency.close()
        except (OSError, sqlite3.Error) as exc:
            if not is_disk_full(exc, self.directory):
                raise
            log.info("recency not written back (file system full): %s", exc)
        self._connections.close()
        self._cache.close()


def _unsafe_reason(named: bool, mode: object, value_type: str) -> str:
    """Why a row is not in s3cache's form."""
    if not named:
        return "a key stored pickled (raw = 0) or not as text: s3cache never writes one, nor reads it"
    kind = {MODE_TEXT: "text", MODE_PICKLE: "pickled"}.get(mode)  # type: ignore[call-overload]
    if kind is not None:
        return f"a value stored {kind} (mode {mode}): s3cache never writes one, nor reads it"
    return f"a value stored in an unexpected form (mode {mode}, {value_type}): s3cache never reads it"


def _read_file(path: str, size: int) -> bytes:
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
