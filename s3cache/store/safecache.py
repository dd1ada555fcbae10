"""A diskcache ``Cache`` that sees only rows in s3cache's own form, applies only known settings, and survives faults.

* Keys are listed by one query over rows in s3cache's form (:data:`~s3cache.store.disk.SAFE_ROW`);
  other rows are skipped, never decoded.
* Settings come from the database too: diskcache applies every stored setting (``setattr`` on the
  cache, ``PRAGMA`` statements built from the value). Only known settings with plain values apply.
* A full file system: a write that fails leaves no partial value file or emptied directory behind;
  a store that cannot even be opened for writing (diskcache writes its settings on open) opens
  read-only instead (:class:`ReadOnlyCache`), so inspecting and repairing commands still work;
  writes warn once (:func:`~s3cache.store.faults.warn_writes_paused`) and return ``False``.
* A damaged database raises :class:`~s3cache.store.faults.DamagedStoreError`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import diskcache
from diskcache.core import DBNAME, DEFAULT_SETTINGS, ENOVAL, METADATA

from s3cache import forksafe
from s3cache.errors import CacheError
from s3cache.store.connection import connect_readonly
from s3cache.store.disk import SAFE_ROW, SafeDisk, UnsafeEntryError
from s3cache.store.faults import (
    CacheFullError,
    DamagedStoreError,
    is_damaged,
    is_disk_full,
    is_locked,
    warn_writes_paused,
)

log = logging.getLogger(__name__)

_KNOWN_SETTINGS = {**DEFAULT_SETTINGS, **METADATA}
_PRAGMA_VALUE = re.compile(r"[A-Za-z0-9_]+")


_F = TypeVar("_F", bound=Callable[..., Any])


def _guarded(method: _F) -> _F:
    """Raise :class:`~s3cache.store.faults.DamagedStoreError` for SQLite's corruption errors."""

    @functools.wraps(method)
    def guarded(self: SafeCache, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as exc:
            if is_damaged(exc):
                raise DamagedStoreError(self.directory, exc) from exc
            raise

    return guarded  # type: ignore[return-value]


class SafeCache(diskcache.Cache):
    """A diskcache ``Cache`` over :class:`~s3cache.store.disk.SafeDisk` that sees only rows in s3cache's own form.

    * Keys are listed by one query over rows in s3cache's form (:data:`~s3cache.store.disk.SAFE_ROW`);
      other rows are skipped, never decoded, and ``get`` reads them as missing. ``verify`` reports them.
    * Only known settings with plain values are applied from the database.
    * Writes that fail for a full disk leave no value file behind, warn once and return ``False``.
    * Corruption raises :class:`~s3cache.store.faults.DamagedStoreError`.
    """

    read_only = False

    @property
    def _con(self) -> sqlite3.Connection:
        """This thread's connection, through :mod:`s3cache.forksafe` (diskcache opens plain ones).

        As diskcache does, a forked child opens its own, and a new connection applies the stored
        ``sqlite_`` settings (some pragmas hold per connection).
        """
        con = getattr(self._local, "con", None)
        if con is None or getattr(self._local, "pid", None) != os.getpid():
            if con is not None:
                self.close()
            con = self._local.con = forksafe.connect(Path(self._directory) / DBNAME, timeout=self._timeout,
                                                     isolation_level=None, check_same_thread=False)
            self._local.pid = os.getpid()
            with contextlib.suppress(sqlite3.OperationalError):  # no Settings table yet
                for key, value in con.execute("SELECT key, value FROM Settings").fetchall():
                    if key.startswith("sqlite_"):
                        self.reset(key, value, update=False)
        return con

    def create_tag_index(self) -> None:
        """As diskcache's, retried while another process holds the write lock (see :func:`retried_while_locked`)."""
        retried_while_locked(super().create_tag_index)

    def drop_tag_index(self) -> None:
        """As diskcache's, retried while another process holds the write lock (see :func:`retried_while_locked`)."""
        retried_while_locked(super().drop_tag_index)

    def reset(self, key: str, value: Any = ENOVAL, update: bool = True) -> Any:
        """Apply a setting; unknown ones (planted in a database) are ignored, odd values refused."""
        if key not in _KNOWN_SETTINGS:
            return None
        if value is ENOVAL:
            return _checked_setting(key, super().reset(key, value, update))
        return super().reset(key, _checked_setting(key, value), update)

    def iterkeys(self, reverse: bool = False) -> Iterator[str]:
        """Keys of rows in s3cache's form, in key order (one query per 1000 keys)."""
        order, compare = ("DESC", "<") if reverse else ("ASC", ">")
        last: str | None = None
        while True:
            after = "" if last is None else f" AND key {compare} ?"
            try:
                rows = self._sql(f"SELECT key FROM Cache WHERE {SAFE_ROW}{after} ORDER BY key {order} LIMIT 1000",
                                 () if last is None else (last,)).fetchall()
            except sqlite3.DatabaseError as exc:
                if is_damaged(exc):
                    raise DamagedStoreError(self.directory, exc) from exc
                raise
            if not rows:
                return
            for (key,) in rows:
                yield key
            last = rows[-1][0]

    def __iter__(self) -> Iterator[str]:
        return self.iterkeys()

    def __reversed__(self) -> Iterator[str]:
        return self.iterkeys(reverse=True)

    @_guarded
    def get(self, key: Any, default: Any = None, *args: Any, **kwargs: Any) -> Any:
        """A value; a row not in s3cache's form reads as missing (it is never decoded)."""
        try:
            return super().get(key, default, *args, **kwargs)
        except UnsafeEntryError as exc:
            log.warning("ignoring an entry not in s3cache's form in %s: %s", self.directory, exc)
            return default

    def set(self, key: Any, value: Any, *args: Any, **kwargs: Any) -> bool:
        """Store a value (see :meth:`_write`)."""
        return self._write(super().set, key, value, *args, **kwargs)

    def add(self, key: Any, value: Any, *args: Any, **kwargs: Any) -> bool:
        """Store a value unless the key exists (see :meth:`_write`)."""
        return self._write(super().add, key, value, *args, **kwargs)

    def _write(self, method: Callable[..., Any], key: Any, value: Any, *args: Any, **kwargs: Any) -> bool:
        """Run a diskcache write; if it fails, remove the value file it wrote (diskcache keeps it).

        Returns:
            What the write returned, or ``False`` when the disk is full (writes paused, warned once).
        """
        disk: SafeDisk = self._disk
        with disk.tracking() as written:
            try:
                return bool(method(key, value, *args, **kwargs))
            except BaseException as exc:
                for filename in written:
                    disk.remove(filename)
                if isinstance(exc, sqlite3.DatabaseError) and is_damaged(exc):
                    raise DamagedStoreError(self.directory, exc) from exc
                if isinstance(exc, OSError | sqlite3.Error) and is_disk_full(exc, self.directory):
                    warn_writes_paused(self.directory, exc)
                    return False
                raise

    __contains__ = _guarded(diskcache.Cache.__contains__)
    __len__ = _guarded(diskcache.Cache.__len__)
    volume = _guarded(diskcache.Cache.volume)
    delete = _guarded(diskcache.Cache.delete)
    evict = _guarded(diskcache.Cache.evict)
    clear = _guarded(diskcache.Cache.clear)


def _create_database(path: Path, page_size: int) -> None:
    """Create an empty WAL database with pages of ``page_size`` bytes, unless the database exists.

    diskcache switches a new database to WAL before it applies any other setting, and a WAL
    database keeps the page size and the auto-vacuum mode it has: so both are set here, first
    (auto-vacuum as diskcache sets it, so that deleting entries shrinks the database).
    """
    if path.exists():
        return
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)  # as diskcache would
    con = forksafe.connect(path, timeout=60, isolation_level=None)
    try:
        con.execute(f"PRAGMA page_size = {int(page_size)}")
        con.execute(f"PRAGMA auto_vacuum = {int(DEFAULT_SETTINGS['sqlite_auto_vacuum'])}")
        con.execute("PRAGMA journal_mode = WAL")
    finally:
        con.close()


def _checked_setting(key: str, value: Any) -> Any:
    """A setting's value if it has the expected kind (pragma values: a plain word or a number)."""
    if key.startswith("sqlite_") and not (isinstance(value, int | float)
                                          or (isinstance(value, str) and _PRAGMA_VALUE.fullmatch(value))):
        raise CacheError(f"unexpected value {value!r} of the cache setting {key}")
    if isinstance(_KNOWN_SETTINGS[key], int | float) and not isinstance(value, int | float):
        raise CacheError(f"unexpected value {value!r} of the cache setting {key}")
    if key == "eviction_policy" and value not in diskcache.core.EVICTION_POLICY:
        raise CacheError(f"unknown eviction policy {value!r} in the cache settings")
    return value


class ReadOnlyCache(SafeCache):
    """A store opened without writing anything, for a file system too full to open it for writing.

    Reads work as in :class:`SafeCache`. Writes first try to open the store for writing again
    (space may be free by then): ``set``/``add`` return ``False`` (writes paused, warned once) if it
    still cannot be, deletions raise :class:`~s3cache.errors.CacheError`.
    """

    read_only = True

    def __init__(self, directory: str | os.PathLike[str], private: bool = True) -> None:
        # diskcache's own __init__ writes every setting: read them instead.
        self._directory = str(directory)
        self._timeout = 60
        self._local = threading.local()
        self._txn_id = None
        self._private = private
        self._writable: SafeCache | None = None
        stored = dict(self._sql("SELECT key, value FROM Settings").fetchall())
        for key, default in _KNOWN_SETTINGS.items():
            setattr(self, key, _checked_setting(key, stored.get(key, default)))
        self.statistics = 0  # diskcache's statistics write on every read
        self._disk = SafeDisk(self._directory, self.disk_min_file_size, self.disk_pickle_protocol)
        self._disk.private = private
        ((self._page_size,),) = self._sql("PRAGMA page_size").fetchall()

    @property
    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None or getattr(self._local, "pid", None) != os.getpid():
            con = self._local.con = connect_readonly(Path(self._directory) / DBNAME)
            self._local.pid = os.getpid()
        return con

    def reset(self, key: str, value: Any = ENOVAL, update: bool = True) -> Any:
        """Read a setting (a read-only store changes none)."""
        if value is not ENOVAL:
            raise CacheError(f"the cache in {self._directory} is open read-only")
        return super().reset(key)

    def writable(self) -> SafeCache:
        """The same store opened for writing.

        Raises:
            CacheError: Still not possible (the disk is still full).
        """
        if self._writable is None:
            cache = open_diskcache(Path(self._directory), private=self._private)
            if cache.read_only:
                cache.close()
                raise CacheFullError(f"cannot write to the cache in {Path(self._directory).parent}: its file system "
                                 "is full. Free some space and try again.")
            self._writable = cache
        return self._writable

    def _write(self, method: Callable[..., Any], key: Any, value: Any, *args: Any, **kwargs: Any) -> bool:
        try:
            writable = self.writable()
        except CacheError as exc:
            warn_writes_paused(self._directory, exc)
            return False
        return bool(getattr(writable, method.__name__)(key, value, *args, **kwargs))

    def delete(self, key: Any, retry: bool = False) -> bool:
        """Delete a key through the store opened for writing (:meth:`writable`)."""
        return bool(self.writable().delete(key, retry))

    def evict(self, tag: str, retry: bool = False) -> int:
        """Evict a tag through the store opened for writing (:meth:`writable`)."""
        return int(self.writable().evict(tag, retry))

    def clear(self, retry: bool = False) -> int:
        """Clear through the store opened for writing (:meth:`writable`)."""
        return int(self.writable().clear(retry))

    def check(self, fix: bool = False, retry: bool = False) -> list[Any]:
        """Refused: diskcache's check writes (s3cache's ``verify`` does not need it)."""
        raise CacheError(f"the cache in {self._directory} is open read-only")

    def close(self) -> None:
        """Close the read-only connections and the writable store, if one was opened."""
        if self._writable is not None:
            self._writable.close()
            self._writable = None
        super().close()


LOCKED_RETRY_SECONDS = 60
"""How long a statement diskcache runs without a busy timeout is retried while the database is locked."""


def retried_while_locked(statement: Callable[[], None]) -> None:
    """Run ``statement``, again every millisecond while SQLite says the database is locked, for at most a minute.

    diskcache opens a store with no busy timeout and retries each statement of the opening by hand,
    except the one that creates (or drops) the tag index: without a retry, a process that opens the
    store while another one writes fails at once with "database is locked".
    """
    deadline = time.monotonic() + LOCKED_RETRY_SECONDS
    while True:
        try:
            return statement()
        except sqlite3.OperationalError as exc:
            if not is_locked(exc) or time.monotonic() > deadline:
                raise
        time.sleep(0.001)


def open_diskcache(directory: Path, *, private: bool = True, page_size: int | None = None,
                   **settings: Any) -> SafeCache:
    """Open a diskcache store with :class:`~s3cache.store.disk.SafeDisk`.

    On a full file system an existing store opens read-only (:class:`ReadOnlyCache`) instead of
    failing, since diskcache writes its settings on every open.

    Args:
        directory: The store's directory.
        private: New value files owner-only (off for a shared cache).
        page_size: The page size of a new database (SQLite's default if ``None``); an existing
            database keeps its own.
        **settings: diskcache settings.

    Raises:
        DamagedStoreError: The database is damaged.
        CacheError: The store cannot be created or opened.
    """
    cache = SafeCache.__new__(SafeCache)
    try:
        if page_size is not None:
            _create_database(directory / DBNAME, page_size)
        cache.__init__(str(directory), disk=SafeDisk, statistics=False, **settings)  # type: ignore[misc]
    except (OSError, sqlite3.Error) as exc:
        with contextlib.suppress(Exception):
            cache.close()  # the connection of a half-done open would hold its locks until collected
        if is_disk_full(exc, directory) and (directory / DBNAME).is_file():
            log.info("opening %s read-only: %s", directory, exc)
            read_only = ReadOnlyCache.__new__(ReadOnlyCache)
            try:
                read_only.__init__(directory, private)  # type: ignore[misc]
                return read_only
            except (OSError, sqlite3.Error) as again:
                with contextlib.suppress(Exception):
                    read_only.close()
                exc = again
        if isinstance(exc, sqlite3.DatabaseError) and is_damaged(exc):
            raise CacheError(
                f"cannot open the cache in {directory.parent}: {exc}. The cache database {directory / DBNAME} is "
                f"damaged: run `s3cache verify --fix --cache-dir {directory.parent}` to rebuild it, or delete the "
                "directory to reset it (arrays are fetched from S3 again)."
            ) from exc
        raise CacheError(
            f"cannot open the cache in {directory.parent}: {exc}. Check that it is a writable directory with free "
            f"space; if the cache is damaged, run `s3cache verify --fix`, or delete the directory to reset it "
            "(arrays are fetched from S3 again)."
        ) from exc
    cache.disk.private = private
    return cache

