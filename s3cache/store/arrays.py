"""The array store: encoded image arrays in diskcache, under a size limit, read in batches.

* Values are raw bytes and keys plain text (:class:`~s3cache.store.disk.SafeDisk`): nothing is
  pickled, nothing read back is unpickled; rows in any other form are never decoded (see
  :mod:`s3cache.store.rows`), and :meth:`ArrayStore.verify` reports them (:mod:`s3cache.store.verify`).
* Every entry is bound to its key (:func:`s3cache.codec.bind`): an entry read under another key
  (swapped files or rows) fails its checksum like a damaged one, is deleted and reads as missing.
* A full file system pauses writes (one warning, :mod:`s3cache.store.writepause`):
  :meth:`ArrayStore.put` returns ``False`` and leaves no file behind, until space is free again.
* A damaged database raises :class:`~s3cache.store.faults.DamagedStoreError`, which names the repair.
* Reads do not write: a batch of keys is one ``SELECT`` on a per-thread read-only connection, and
  reads are noted for recency (:class:`~s3cache.store.recency.RecencyLog`), written back later.
* The size limit is the store's, kept in its database: ``size_limit=None`` keeps it, a value
  replaces it and evicts down to it at once. Every process keeps to the latest one set, evicting
  just enough rows chosen by the eviction policy (:mod:`s3cache.store.limit`).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from s3cache import codec
from s3cache.errors import CacheError
from s3cache.store.connection import Connections
from s3cache.store.disk import SAFE_ROW, UnsafeEntryError
from s3cache.store.faults import CacheFullError, DamagedStoreError, free_bytes, is_damaged, is_disk_full
from s3cache.store.layout import INLINE_LIMIT
from s3cache.store.limit import SizeLimit
from s3cache.store.policy import DISKCACHE_POLICY, EvictionPolicy, KeepCurrentRun
from s3cache.store.recency import Generation, RecencyLog
from s3cache.store.rows import (
    ROW_COLUMNS,
    Entry,
    Row,
    decode_row,
    delete_rows,
    insert_rows,
    remove_value_files,
    safe_keys,
    select_rows,
)
from s3cache.store.safecache import SafeCache, open_diskcache
from s3cache.store.spectags import SpecRecorder, WrittenTags
from s3cache.store.verify import Problem, StoreCheck
from s3cache.store.writepause import RESUME_MARGIN, WritePause

log = logging.getLogger(__name__)

DEFAULT_SIZE_LIMIT = 10 * 10**9

# A batch is taken to need at most 1 + 1/_ROOM_SLACK times its bytes of room (pages, index, directories).
_ROOM_SLACK = 4


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
        inline_limit: Entries smaller than this many bytes are stored inside the database, larger
            ones in value files (see :data:`~s3cache.store.layout.INLINE_LIMIT`).
        page_size: The page size of a new store's database (SQLite's default if ``None``; see
            :func:`~s3cache.store.layout.page_size_for`). An existing store keeps its own.

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
        inline_limit: int = INLINE_LIMIT,
        page_size: int | None = None,
    ) -> None:
        self.directory = Path(directory)
        settings: dict[str, object] = {"eviction_policy": DISKCACHE_POLICY, "cull_limit": 0, "tag_index": True,
                                       "disk_min_file_size": inline_limit}
        if size_limit is not None:
            settings["size_limit"] = size_limit
        elif not (self.directory / "cache.db").exists():
            settings["size_limit"] = DEFAULT_SIZE_LIMIT
        self._settings = settings
        self._private = private
        # On a full file system this is a read-only store until a write finds space again.
        self._cache: SafeCache = open_diskcache(self.directory, private=private, page_size=page_size, **settings)
        self._connections = Connections(self.directory / "cache.db")
        self.recency = RecencyLog(self._connections)
        self._limit = SizeLimit(self._connections, self.recency, policy or KeepCurrentRun())
        self._state_lock = threading.Lock()  # guards the cache swap
        self._write_pause = WritePause(self.directory)
        self._written_tags = WrittenTags(self.directory)
        if size_limit is not None:
            self.cull()

    def begin_run(self, run: str) -> Generation:
        """Read and store on behalf of a run (see :mod:`s3cache.store.recency`): its entries stay."""
        return self.recency.begin(run)

    # -- reading ------------------------------------------------------------------------------------

    @property
    def size_limit(self) -> int:
        """The store's size limit in bytes, as last set by any process."""
        return self._limit.size_limit

    @property
    def policy(self) -> EvictionPolicy:
        """Chooses what an eviction removes and whether a full store admits a new entry."""
        return self._limit.policy

    @property
    def writes_paused(self) -> bool:
        """Whether writes are paused because the file system is full."""
        return self._write_pause.paused

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
            return {row[0] for row in select_rows(self._connections.reader(), "key", keys)}  # type: ignore[misc]
        except sqlite3.Error as exc:
            raise self._read_error(exc) from exc

    def _select(self, keys: Sequence[str]) -> dict[str, Row]:
        """Rows of the given keys, by key."""
        return {row[0]: Row(*row)  # type: ignore[misc]
                for row in select_rows(self._connections.reader(), ROW_COLUMNS, keys)}

    def _read_error(self, exc: sqlite3.Error) -> CacheError:
        if is_damaged(exc):
            return DamagedStoreError(self.directory, exc)
        return CacheError(f"cannot read the cache in {self.directory.parent}: {exc}")

    def _entry(self, key: str, row: Row | None) -> Entry | None:
        """Decode a row; damaged or vanished entries are deleted and read as ``None``."""
        if row is None:
            return None
        try:
            return decode_row(row, self._cache.directory)
        except (OSError, codec.CorruptEntryError, UnsafeEntryError) as exc:
            log.info("dropping cache entry %r: %s", key, exc)
            delete_rows(self._connections, self._cache.disk, [(row.rowid, row.filename)])
            return None

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
        try:
            yield from safe_keys(con)
        except sqlite3.Error as exc:
            raise self._read_error(exc) from exc

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

    @property
    def page_size(self) -> int:
        """The page size of the store's database."""
        try:
            ((size,),) = self._connections.reader().execute("PRAGMA page_size").fetchall()
        except sqlite3.Error as exc:
            raise self._read_error(exc) from exc
        return int(size)

    # -- writing ------------------------------------------------------------------------------------

    def put(self, key: str, entry: bytes, tag: str) -> bool:
        """Store one encoded entry (see :meth:`put_many`); returns whether it wrote."""
        return self.put_many([(key, entry)], tag)[0]

    def put_many(self, entries: Sequence[tuple[str, bytes]], tag: str) -> list[bool]:
        """Store encoded entries under their keys in one transaction, stamped with the run's generation.

        Returns whether each was written: nothing is written for a key another writer stored first,
        nor for an entry that does not fit when the policy does not admit it (the caller still has
        the array it serves). Entries are bound to their keys (:func:`s3cache.codec.bind`) unless
        they were encoded bound. A batch that may have taken the store past its size limit is
        followed by an eviction (:meth:`cull`). On a full file system what fits is stored (one entry
        at a time once the batch does not fit; no file of a failed write is left behind) and writes
        pause, with one warning: later calls write nothing at once until the
        file system has room again (checked at most every
        :data:`~s3cache.store.writepause.SPACE_CHECK_SECONDS`) or
        :data:`~s3cache.store.writepause.WRITE_RETRY_SECONDS` have passed, when a write is tried again.

        Raises:
            TypeError: An entry is not bytes.
            DamagedStoreError: The database is damaged.
        """
        for _, entry in entries:
            if not isinstance(entry, bytes):
                raise TypeError(f"cache values must be bytes, got {type(entry).__name__}")
        admitted, room = self._limit.admitted([len(entry) for _, entry in entries])
        wanted = [i for i, (_, entry) in enumerate(entries)
                  if admitted[i] and self._write_pause.may_write(len(entry))]
        written = [False] * len(entries)
        if not wanted:
            return written
        inserted, full = self._insert_what_fits(
            [(entries[i][0], codec.bind(entries[i][1], entries[i][0])) for i in wanted], tag)
        if any(inserted):
            self._written_tags.note(tag)
        for i, wrote in zip(wanted, inserted, strict=True):
            written[i] = wrote
        if full:
            return written  # an eviction would need room to write as well; the next write after the pause culls
        self._write_pause.resume()
        # Rows and value files take somewhat more room than their bytes: evict unless the batch surely fitted.
        if room < sum(len(entries[i][1]) for i in wanted) // _ROOM_SLACK:
            self.cull()
        return written

    def checkpoint(self) -> None:
        """Fold the write-ahead log into the database file, so that reads go straight through the memory map.

        While the log holds frames not yet copied, a reader looks every page up in it and reads the
        pages it finds there with a system call each; once every frame is copied, readers skip the log.
        SQLite copies after every 16 MB of writes or so, which leaves up to that much of a cold epoch
        behind: :class:`~s3cache.dataset.S3ImageDataset` calls this at the end of each epoch. It waits
        for nobody (``PASSIVE``). A full file system, or a store opened read-only, leaves the log as it is.

        Raises:
            DamagedStoreError: The database is damaged.
        """
        if self._cache.read_only:
            return
        try:
            self._connections.checkpoint()
        except sqlite3.Error as exc:
            if is_damaged(exc):
                raise DamagedStoreError(self.directory, exc) from exc
            log.info("write-ahead log of %s not checkpointed: %s", self.directory, exc)

    def _insert_what_fits(self, entries: Sequence[tuple[str, bytes]], tag: str) -> tuple[list[bool], bool]:
        """Insert bound entries in one transaction; on a full file system, as many as fit, then pause writes.

        A batch can overflow a disk that still has room for some of its entries: those are then stored one
        at a time, up to the first that does not fit.

        Returns:
            Whether each entry's row was inserted, and whether the file system turned out full.

        Raises:
            DamagedStoreError: The database is damaged.
        """
        try:
            return self._insert(entries, tag), False
        except (OSError, sqlite3.Error) as exc:
            self._raise_unless_full(exc)
            if len(entries) == 1:
                self._write_pause.pause(exc)
                return [False], True
        inserted: list[bool] = []
        for entry in entries:
            try:
                inserted += self._insert([entry], tag)
            except (OSError, sqlite3.Error) as exc:
                self._raise_unless_full(exc)
                self._write_pause.pause(exc)
                return inserted + [False] * (len(entries) - len(inserted)), True
        return inserted, False

    def _insert(self, entries: Sequence[tuple[str, bytes]], tag: str) -> list[bool]:
        return insert_rows(self._connections, self._writable().disk, self.recency, entries, tag)

    def _raise_unless_full(self, exc: OSError | sqlite3.Error) -> None:
        """Re-raise a failed write's error unless it says the file system is full (a damaged database as such)."""
        if isinstance(exc, sqlite3.DatabaseError) and is_damaged(exc):
            raise DamagedStoreError(self.directory, exc) from exc
        if not (isinstance(exc, CacheFullError) or is_disk_full(exc, self.directory)):
            raise exc

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

    @property
    def spec_recorder(self) -> SpecRecorder | None:
        """Records the specs entries are written under again, after ``s3cache clear`` removed their records.

        Called (at most every :data:`~s3cache.store.spectags.RECORD_CHECK_SECONDS`, and on close) with
        the tags written under since its last call; ``None`` records nothing.
        """
        return self._written_tags.recorder

    @spec_recorder.setter
    def spec_recorder(self, recorder: SpecRecorder | None) -> None:
        self._written_tags.recorder = recorder

    def record_specs(self) -> None:
        """Pass the tags written under since the last call to :attr:`spec_recorder` (one check each)."""
        self._written_tags.record()

    def admits(self, size: int) -> bool:
        """Whether an entry of ``size`` bytes would be stored now: it fits, or the policy can make room."""
        return self._limit.admits(size)

    def cull(self) -> int:
        """Evict entries chosen by the policy until the store is within its size limit; returns how many."""
        return self._limit.cull(self._cache.disk)

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
        remove_value_files(self._connections.reader(), self._cache.disk, condition, params)

    def verify(self, fix: bool = False) -> list[Problem]:
        """Check every row and entry, the value files against the database, and the database's counters.

        What is checked and how it is fixed: :mod:`s3cache.store.verify`.

        Args:
            fix: Remove what is damaged (in an order that works on a full disk).

        Returns:
            The problems found (before fixing).

        Raises:
            DamagedStoreError: The database is damaged.
            CacheFullError: Fixing needs to write and the file system is still full.
        """
        try:
            return StoreCheck(self.directory, self._cache, self._connections).run(fix)
        except sqlite3.DatabaseError as exc:
            if is_damaged(exc):
                raise DamagedStoreError(self.directory, exc) from exc
            raise

    def __enter__(self) -> ArrayStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Record specs written under, write back recency and close the database."""
        self._written_tags.close()
        try:
            self.recency.close()
        except (OSError, sqlite3.Error) as exc:
            if not is_disk_full(exc, self.directory):
                raise
            log.info("recency not written back (file system full): %s", exc)
        self._connections.close()
        self._cache.close()

