"""The on-disk array store: diskcache underneath, raw bytes only, a true LRU.

Layout of a cache directory (created owner-only, ``0700``)::

    <cache_dir>/arrays/   diskcache.Cache of encoded arrays, size-limited, LRU-culled
    <cache_dir>/meta/     diskcache.Cache of listings and spec descriptions, never culled

Array entries are keyed ``"<spec fingerprint>/<etag>/<bucket>/<key>"`` and tagged with the
spec fingerprint. Three details make diskcache fit this job:

* :class:`RawDisk` stores ``bytes`` values and ``str`` keys only, so nothing is ever pickled.
* Reads do not write. diskcache's own LRU policy updates ``access_time`` on every ``get``
  (one SQLite write per image); our policy (:data:`LRU_POLICY`) culls by ``access_time`` but
  leaves it alone on reads. Reads are recorded in memory and written back in one
  transaction, on a background thread, every few hundred reads (and before every eviction);
  an entry whose recency was refreshed in the last 30 seconds is not written again.
  A batch of reads is one ``SELECT`` on a per-thread read-only connection.
* ``size_limit`` is soft in diskcache (each ``set`` culls at most ``cull_limit`` rows, and
  ``cull`` drops ten rows at a time), so we set ``cull_limit=0`` and evict ourselves in
  :meth:`ArrayStore.cull`, called after each write: just enough least-recently-used rows to
  get back under the limit. The store overshoots by at most the entries being written at once.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import sqlite3
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diskcache
import numpy as np

from s3cache import codec
from s3cache.errors import CacheError

# Our eviction policy for diskcache: index and cull by access_time (a true LRU), and never write
# on a diskcache get; s3cache maintains access_time itself, in batches.
LRU_POLICY = "s3cache-batched-lru"
diskcache.core.EVICTION_POLICY.setdefault(
    LRU_POLICY,
    {
        "init": "CREATE INDEX IF NOT EXISTS Cache_access_time ON Cache (access_time)",
        "get": None,
        "cull": "SELECT {fields} FROM Cache ORDER BY access_time LIMIT ?",
    },
)

# Reads recorded in memory before their recency is written back in one transaction.
TOUCH_FLUSH_EVERY = 512
# A read refreshes an entry's recency only if its last refresh (or store) is older than this.
RECENCY_RESOLUTION = 30.0
# Most rows one eviction round looks at (each round is one transaction).
CULL_ROWS = 256
# Keys per SELECT, under SQLite's limit on bound parameters.
SELECT_CHUNK = 500
# The columns an entry is decoded from (see ArrayStore._decode_row).
_ENTRY_COLUMNS = "key, mode, filename, size, value"

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: int | str) -> int:
    """Parse a byte count: an int, or a string such as ``"500MB"``, ``"10GB"``, ``"2GiB"``.

    Raises:
        ValueError: The value is negative or not understood.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        if not match or match.group(2).upper() not in _UNITS:
            raise ValueError(f"cannot parse size {value!r}: use bytes or a string like '500MB' or '10GB'")
        size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size < 0:
        raise ValueError(f"size must not be negative, got {value!r}")
    return size


def default_cache_dir() -> Path:
    """``$S3CACHE_DIR`` if set, else ``~/.cache/s3cache``."""
    return Path(os.environ.get("S3CACHE_DIR") or Path.home() / ".cache" / "s3cache")


class RawDisk(diskcache.Disk):
    """A diskcache ``Disk`` that accepts ``str`` keys and ``bytes`` values, and never pickles."""

    def put(self, key: Any) -> tuple[Any, bool]:
        """Store keys as SQLite text."""
        if not isinstance(key, str):
            raise TypeError(f"cache keys must be str, got {type(key).__name__}")
        return key, True

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> tuple[Any, ...]:
        """Store values as raw bytes (inline in SQLite when small, else in a file)."""
        if read or not isinstance(value, bytes):
            raise TypeError(f"cache values must be bytes, got {type(value).__name__}")
        return super().store(value, read, key=key)

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
        """Refuse any stored mode other than raw bytes."""
        if mode not in (diskcache.core.MODE_RAW, diskcache.core.MODE_BINARY) or read:
            raise codec.CorruptEntryError(f"unexpected storage mode {mode} in an s3cache store")
        return super().fetch(mode, filename, value, read)


def _read_file(path: str, size: int) -> bytes:
    """Read a value file of known size with the fewest system calls (a short read means damage)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, size + 1)  # one byte more than expected reveals a file that grew
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Problem:
    """One damaged entry or inconsistency found by :meth:`ArrayStore.verify`."""

    key: str
    reason: str


class ArrayStore:
    """Encoded image arrays under a size limit, plus the stored listings and specs.

    Safe to share between threads of one process and between processes on one directory.

    Args:
        directory: The cache directory (created ``0700`` if missing).
        size_limit: Upper bound for the arrays, in bytes; ``None`` keeps the stored limit
            (10 GB for a new directory).
        recency_resolution: Seconds within which a read does not refresh an entry's recency
            again (like ``relatime``): entries used within that window count as equally recent,
            and repeated epochs cost no database writes.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        size_limit: int | None = None,
        recency_resolution: float = RECENCY_RESOLUTION,
    ) -> None:
        self.directory = Path(directory).expanduser()
        self.recency_resolution = recency_resolution
        self._touch_lock = threading.Lock()  # guards _touches
        self._touches: set[int] = set()  # rowids read since the last flush
        self._write_lock = threading.Lock()  # guards _touch_con, our one writing connection
        self._touch_con: sqlite3.Connection | None = None
        self._readers = threading.local()
        # Recency is written back off the reading thread: a read never waits for a database write.
        self._flusher = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="s3cache-lru")
        self._flushing: concurrent.futures.Future[None] | None = None
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            settings: dict[str, Any] = {"eviction_policy": LRU_POLICY, "cull_limit": 0, "disk": RawDisk,
                                        "tag_index": True, "statistics": False}
            if size_limit is not None:
                settings["size_limit"] = size_limit
            elif not (self.directory / "arrays" / "cache.db").exists():
                settings["size_limit"] = parse_size("10GB")
            self._arrays = diskcache.Cache(str(self.directory / "arrays"), **settings)
            self._meta = diskcache.Cache(str(self.directory / "meta"), eviction_policy="none",
                                         disk=RawDisk, statistics=False)
        except (OSError, sqlite3.Error) as exc:
            # Not `s3cache clear`: it would have to open this same database.
            raise CacheError(
                f"cannot open the cache in {self.directory}: {exc}. Check that it is a writable directory; "
                "if the cache is damaged, delete the directory to reset it (arrays are fetched from S3 again)."
            ) from exc

    # -- arrays ---------------------------------------------------------------------------------

    @property
    def size_limit(self) -> int:
        """The array store's size limit in bytes."""
        return int(self._arrays.size_limit)

    def get(self, key: str) -> np.ndarray | codec.Failure | None:
        """Read one entry (see :meth:`get_many`)."""
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[str]) -> list[np.ndarray | codec.Failure | None]:
        """Read entries with one database query per batch, and record the reads for LRU.

        Missing keys read as ``None``. So do damaged entries (bad header, length or checksum, or a
        value file gone), which are deleted so that the caller's refetched array can be stored.
        """
        rows = self._select(_ENTRY_COLUMNS + ", rowid, access_time", keys)
        entries = [self._entry(key, rows.get(key)) for key in keys]
        stale_before = time.time() - self.recency_resolution
        self._record_touches([rows[key][4] for key, entry in zip(keys, entries, strict=True)
                              if entry is not None and rows[key][5] < stale_before])
        return entries

    def existing(self, keys: Sequence[str]) -> set[str]:
        """Which of the keys have entries (one query per batch, no read recorded)."""
        return set(self._select("key", keys))

    def _select(self, columns: str, keys: Sequence[str]) -> dict[str, tuple[Any, ...]]:
        """Rows of the given keys, ``{key: (columns...)}``, in one query per SELECT_CHUNK keys."""
        con = self._read_connection()
        rows: dict[str, tuple[Any, ...]] = {}
        for start in range(0, len(keys), SELECT_CHUNK):
            chunk = keys[start:start + SELECT_CHUNK]
            marks = ",".join("?" * len(chunk))
            cursor = con.execute(f"SELECT {columns} FROM Cache WHERE raw = 1 AND key IN ({marks})", chunk)
            rows.update((row[0], row[1:]) for row in cursor)
        return rows

    def _entry(self, key: str, row: tuple[Any, ...] | None) -> np.ndarray | codec.Failure | None:
        """Decode a row from :meth:`_select`; damaged or vanished entries are deleted and read as ``None``."""
        if row is None:
            return None
        try:
            return self._decode_row(row)
        except (OSError, codec.CorruptEntryError):
            self._arrays.delete(key)
            return None

    def _decode_row(self, row: tuple[Any, ...]) -> np.ndarray | codec.Failure:
        """Decode the :data:`_ENTRY_COLUMNS` of a row, reading its value file if it has one.

        Raises:
            OSError: The value file cannot be read.
            codec.CorruptEntryError: The entry is damaged or stored in an unexpected mode.
        """
        mode, filename, size, value = row[:4]
        if mode == diskcache.core.MODE_RAW and value is not None:
            return codec.decode(bytes(value))
        if mode == diskcache.core.MODE_BINARY and filename:
            return codec.decode(_read_file(os.path.join(self._arrays.directory, filename), size))
        raise codec.CorruptEntryError(f"unexpected storage mode {mode}")

    def _read_connection(self) -> sqlite3.Connection:
        """This thread's read-only connection to the array database (SQLite connections are per thread)."""
        con: sqlite3.Connection | None = getattr(self._readers, "con", None)
        if con is None:
            uri = (self.directory / "arrays" / "cache.db").absolute().as_uri() + "?mode=ro"
            con = self._readers.con = sqlite3.connect(uri, uri=True, timeout=60, isolation_level=None)
        return con

    def __contains__(self, key: str) -> bool:
        return key in self._arrays

    def put(self, key: str, entry: bytes, tag: str) -> bool:
        """Store an encoded entry unless another writer stored it first; returns whether it wrote."""
        return bool(self._arrays.add(key, entry, tag=tag))

    def cull(self) -> int:
        """Evict least-recently-used entries until the store is within its size limit.

        diskcache's own ``cull`` deletes ten rows per round whatever they weigh; this deletes
        just enough of the least recently used rows to cover the excess, one transaction per round.
        """
        removed = 0
        while (excess := self._arrays.volume() - self.size_limit) > 0:
            self.flush_touches()
            victims = self._delete_least_recent(excess)
            if not victims:
                break
            removed += len(victims)
            for filename in victims:
                if filename:
                    self._arrays.disk.remove(filename)
        return removed

    def _delete_least_recent(self, excess: int) -> list[str | None]:
        """Delete the least recently used rows whose sizes add up to ``excess``; return their files."""
        with self._write_lock, self._write_transaction() as con:
            rows = con.execute(
                "SELECT rowid, filename, MAX(size, IFNULL(LENGTH(value), 0)) FROM Cache"
                " ORDER BY access_time LIMIT ?", (CULL_ROWS,)).fetchall()
            chosen, covered = [], 0
            for row in rows:
                if covered >= excess:
                    break
                chosen.append(row)
                covered += row[2]
            con.executemany("DELETE FROM Cache WHERE rowid = ?", [(row[0],) for row in chosen])
        return [row[1] for row in chosen]

    def volume(self) -> int:
        """Bytes used by the array store on disk (database plus value files)."""
        return int(self._arrays.volume())

    def __len__(self) -> int:
        return len(self._arrays)

    def keys(self) -> Iterator[str]:
        """Iterate over every array key."""
        return self._arrays.iterkeys()

    def evict_tag(self, tag: str) -> int:
        """Remove every entry with this tag (one spec's namespace)."""
        return int(self._arrays.evict(tag))

    def delete(self, key: str) -> bool:
        """Remove one entry."""
        return bool(self._arrays.delete(key))

    def clear(self) -> int:
        """Remove every array entry (listings and specs stay)."""
        return int(self._arrays.clear())

    def verify(self, fix: bool = False) -> list[Problem]:
        """Check every entry's header, length and checksum, and the database against the files.

        Args:
            fix: Delete damaged entries and let diskcache repair file/database mismatches.

        Returns:
            The problems found (before fixing).
        """
        problems = self._check_database(fix)
        keys = list(self.keys())
        for start in range(0, len(keys), SELECT_CHUNK):
            for key, row in self._select(_ENTRY_COLUMNS, keys[start:start + SELECT_CHUNK]).items():
                try:
                    self._decode_row(row)
                except FileNotFoundError:
                    continue  # evicted meanwhile, or a missing file the database check reported
                except (codec.CorruptEntryError, OSError) as exc:
                    problems.append(Problem(key, str(exc)))
                    if fix:
                        self._arrays.delete(key)
        return problems

    def _check_database(self, fix: bool) -> list[Problem]:
        """Run diskcache's check of the database, and of the value files against it."""
        with warnings.catch_warnings():
            # diskcache reports through warnings: no filter of the caller's may hide them.
            warnings.simplefilter("always")
            problems = [Problem("<database>", str(w.message)) for w in self._arrays.check(fix=fix)]
            if fix and problems:
                # Removing a value file orphaned by a crash can empty its directory, then that one's
                # parent: each pass removes one level of emptied directories.
                for _ in range(2):
                    if not self._arrays.check(fix=True):
                        break
        return problems

    # -- recency --------------------------------------------------------------------------------

    def _record_touches(self, rowids: Sequence[int]) -> None:
        """Note reads of rows; every TOUCH_FLUSH_EVERY, write them back on a background thread."""
        if not rowids:
            return
        with self._touch_lock:
            self._touches.update(rowids)
            due = len(self._touches) >= TOUCH_FLUSH_EVERY
        if due:
            self.flush_touches_soon()

    def flush_touches_soon(self) -> None:
        """Write recorded reads back on the background thread (unless a flush is already queued)."""
        with self._touch_lock:
            if self._touches and (self._flushing is None or self._flushing.done()):
                self._flushing = self._flusher.submit(self.flush_touches)

    def flush_touches(self) -> None:
        """Write recorded reads to the database: one transaction, one statement per SELECT_CHUNK rows.

        All rows get the flush time: they were read since the last flush, well within the
        recency resolution. One statement per chunk (not one per row) keeps the GIL released
        while SQLite works, so the reading thread is not slowed down.
        """
        with self._write_lock:
            with self._touch_lock:
                rowids, self._touches = list(self._touches), set()
            if not rowids:
                return
            now = time.time()
            with self._write_transaction() as con:
                for start in range(0, len(rowids), SELECT_CHUNK):
                    chunk = rowids[start:start + SELECT_CHUNK]
                    con.execute(f"UPDATE Cache SET access_time = ? WHERE rowid IN ({','.join('?' * len(chunk))})",
                                (now, *chunk))

    @contextlib.contextmanager
    def _write_transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction on our own connection to diskcache's database (caller holds the write lock)."""
        if self._touch_con is None:
            path = self.directory / "arrays" / "cache.db"
            self._touch_con = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
            self._touch_con.execute("PRAGMA synchronous = NORMAL")
        con = self._touch_con
        con.execute("BEGIN IMMEDIATE")
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")

    # -- listings and specs -----------------------------------------------------------------------

    def put_listing(self, url: str, listing: dict[str, Any]) -> None:
        """Store the listing of a source URL (replacing any older one)."""
        self._meta.set(f"listing/{url}", json.dumps(listing).encode())

    def get_listing(self, url: str) -> dict[str, Any] | None:
        """The stored listing of a source URL, or ``None``."""
        data = self._meta.get(f"listing/{url}")
        return None if data is None else json.loads(data)

    def listing_urls(self) -> list[str]:
        """Every source URL with a stored listing."""
        return sorted(k.removeprefix("listing/") for k in self._meta.iterkeys() if k.startswith("listing/"))

    def delete_listing(self, url: str) -> bool:
        """Forget the listing of a source URL."""
        return bool(self._meta.delete(f"listing/{url}"))

    def put_spec(self, fingerprint: str, description: dict[str, Any]) -> None:
        """Record what a spec fingerprint stands for (for ``info`` and ``clear --spec``)."""
        key = f"spec/{fingerprint}"
        if key not in self._meta:
            self._meta.set(key, json.dumps(description).encode())

    def specs(self) -> dict[str, dict[str, Any]]:
        """Every recorded spec, by fingerprint."""
        return {k.removeprefix("spec/"): json.loads(self._meta[k])
                for k in self._meta.iterkeys() if k.startswith("spec/")}

    def delete_spec(self, fingerprint: str) -> bool:
        """Forget a spec description."""
        return bool(self._meta.delete(f"spec/{fingerprint}"))

    def __enter__(self) -> ArrayStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Flush recorded reads and close the databases."""
        self._flusher.shutdown(wait=True)
        self.flush_touches()
        with self._write_lock:
            if self._touch_con is not None:
                self._touch_con.close()
                self._touch_con = None
        self._arrays.close()
        self._meta.close()
