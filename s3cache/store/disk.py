"""diskcache storage for ``str`` keys and ``bytes`` values that never unpickles and survives faults.

It survives a full disk, and names the repair of a damaged database.

Nothing read from a cache is trusted to be in the form s3cache writes:

* diskcache pickles any key or value that is not a plain ``str``/``bytes``/number and marks such
  rows ``raw = 0`` (keys) or ``mode = 3/4`` (text/pickled values); reading one back unpickles it. A
  row planted in a cache database could therefore run code. :class:`SafeDisk` refuses every
  (un)pickling path, and :class:`SafeCache` lists only rows in s3cache's own form (raw text keys,
  raw-bytes values), so iterating keys never even meets a planted row; ``verify`` reports them.
* Value file names come from the database: a planted row naming ``../../somewhere`` must not make
  a read, ``clear`` or an eviction read or delete a file outside the store. Only names of the form
  diskcache generates (``ab/cd/<28 hex>.val``) are read or removed.
* Settings come from the database too: diskcache applies every stored setting (``setattr`` on the
  cache, ``PRAGMA`` statements built from the value). Only known settings with plain values apply.

Faults:

* A full file system (``ENOSPC``/``EDQUOT``, ``SQLITE_FULL``): a write that fails leaves no partial
  value file or emptied directory behind; a store that cannot even be opened for writing (diskcache
  writes its settings on open) opens read-only instead (:class:`ReadOnlyCache`), so inspecting and
  repairing commands still work; writes warn once (:func:`warn_writes_paused`) and return ``False``.
* A damaged database (``SQLITE_CORRUPT``, ``SQLITE_NOTADB``) raises :class:`DamagedStoreError`, a
  :class:`~s3cache.errors.CacheError` naming the database and the repair (``s3cache verify --fix``).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import re
import shutil
import sqlite3
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import diskcache
from diskcache.core import DBNAME, DEFAULT_SETTINGS, ENOVAL, METADATA, MODE_BINARY, MODE_RAW, UNKNOWN

from s3cache.errors import CacheError

log = logging.getLogger(__name__)

# The names diskcache gives value files (``Disk.filename``): two levels of hex directories, 28 hex digits.
VALUE_FILE = re.compile(r"[0-9a-f]{2}[/\\][0-9a-f]{2}[/\\][0-9a-f]{28}\.val")
# The files SQLite keeps next to a database.
DATABASE_FILES = (DBNAME, DBNAME + "-wal", DBNAME + "-shm", DBNAME + "-journal")

# SQLite primary result codes (``sqlite3.Error.sqlite_errorcode & 0xff``).
SQLITE_IOERR = 10
SQLITE_CORRUPT = 11
SQLITE_FULL = 13
SQLITE_NOTADB = 26
# Below this much free space, an SQLite I/O error (growing the WAL index, say) counts as a full disk.
LOW_SPACE = 1 << 20

# The rows s3cache writes: raw text keys; raw values inline as blobs or in a value file.
SAFE_ROW = ("raw = 1 AND typeof(key) = 'text' AND (mode = 1 AND typeof(value) = 'blob'"
            " OR mode = 2 AND typeof(filename) = 'text' AND value IS NULL)")

_KNOWN_SETTINGS = {**DEFAULT_SETTINGS, **METADATA}
_PRAGMA_VALUE = re.compile(r"[A-Za-z0-9_]+")


class UnsafeEntryError(ValueError):
    """A stored key or value is not in a form s3cache writes (it would need unpickling)."""


class DamagedStoreError(CacheError):
    """A cache database is damaged (SQLite reports corruption, or the file is not a database)."""

    def __init__(self, directory: str | os.PathLike[str], cause: BaseException) -> None:
        database = Path(directory) / DBNAME
        root = Path(directory).parent
        super().__init__(
            f"the cache database {database} is damaged ({cause}). Run `s3cache verify --fix --cache-dir {root}` "
            f"to rebuild it (cached arrays are fetched from S3 again, listings are listed again), "
            f"or delete {root} to reset the cache."
        )


class CacheFullError(CacheError):
    """The cache's file system is full: what was asked needs to write and cannot."""


class CacheWritesPausedWarning(UserWarning):
    """Cache writes are paused because the cache's file system is full; reads and S3 go on."""


# -- classifying errors --------------------------------------------------------------------------------


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Free space, in bytes, on the file system holding ``path`` (a large number if unknown)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 1 << 62


def is_disk_full(exc: BaseException, path: str | os.PathLike[str] | None = None) -> bool:
    """Whether an error means the file system (or the user's quota) is full.

    SQLite reports a full disk as ``SQLITE_FULL``, but as a plain I/O error when it cannot grow
    the WAL index; with ``path`` given, an I/O error on a file system with almost no free space
    counts as well.
    """
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(exc, sqlite3.Error):
        code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
        if code == SQLITE_FULL or "database or disk is full" in str(exc):
            return True
        if code == SQLITE_IOERR and path is not None:
            return free_bytes(path) < LOW_SPACE
    return False


def is_damaged(exc: BaseException) -> bool:
    """Whether an SQLite error means the database file is damaged or not a database."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    return code in (SQLITE_CORRUPT, SQLITE_NOTADB) or "malformed" in str(exc) or "not a database" in str(exc)


_warned_roots: set[str] = set()
_warned_lock = threading.Lock()


def warn_writes_paused(directory: str | os.PathLike[str], cause: BaseException) -> None:
    """Warn, once per cache directory and process, that cache writes are paused by a full disk."""
    root = str(Path(directory).parent)
    with _warned_lock:
        first = root not in _warned_roots
        _warned_roots.add(root)
    if first:
        warnings.warn(
            f"s3cache: the file system holding the cache {root} is full ({cause}). Cache writes are paused: "
            "images are served from S3 (and from what is cached) and nothing more is cached until space "
            "is free again, when writes resume by themselves. Free some space, or lower cache_size_limit.",
            CacheWritesPausedWarning, stacklevel=2)
    else:
        log.info("cache writes to %s paused again: %s", root, cause)


# -- read-only connections ---------------------------------------------------------------------------------


def connect_readonly(database: Path) -> sqlite3.Connection:
    """A read-only connection to a database, usable from any thread.

    A reader of a WAL database needs the shared WAL index (``-shm``); on a full file system that
    file cannot be created or grown. Then the database file is read as it is, without the index
    (``immutable``): what a live writer has not checkpointed yet is not seen, but nothing is written.
    """
    uri = database.absolute().as_uri()
    con = sqlite3.connect(uri + "?mode=ro", uri=True, timeout=60, isolation_level=None, check_same_thread=False)
    try:
        con.execute("SELECT COUNT(*) FROM sqlite_master").fetchall()
    except sqlite3.OperationalError as exc:
        con.close()
        if not is_disk_full(exc, database.parent):
            raise
        log.info("reading %s without its WAL index: %s", database, exc)
        con = sqlite3.connect(uri + "?mode=ro&immutable=1", uri=True, timeout=60, isolation_level=None,
                              check_same_thread=False)
    return con


# -- the Disk --------------------------------------------------------------------------------------------------


class SafeDisk(diskcache.Disk):
    """A diskcache ``Disk`` for ``str`` keys and ``bytes`` values that never pickles or unpickles.

    Value files are written by :meth:`write_file`: owner-only (``0600`` in ``0700`` directories)
    unless :attr:`private` is off, and a failed write (a full disk) leaves nothing behind. Only value
    file names diskcache generates are read or removed.
    """

    #: Create value files and their directories owner-only; off for a shared cache (the umask decides).
    private = True

    def __init__(self, directory: str, min_file_size: int = 0, pickle_protocol: int = 0, **_unknown: Any) -> None:
        # Unknown ``disk_*`` settings in a database are ignored, not passed on or applied.
        super().__init__(directory, int(min_file_size), int(pickle_protocol))
        self._tracked = threading.local()

    def put(self, key: Any) -> tuple[Any, bool]:
        """Store keys as SQLite text."""
        if not isinstance(key, str):
            raise TypeError(f"cache keys must be str, got {type(key).__name__}")
        return key, True

    def get(self, key: Any, raw: bool) -> Any:
        """Return a stored key; refuse one stored pickled (``raw = 0``)."""
        if not raw or not isinstance(key, str):
            raise UnsafeEntryError("a cache key is stored pickled; s3cache never writes such keys")
        return key

    def store(self, value: Any, read: bool, key: Any = UNKNOWN) -> tuple[Any, ...]:
        """Store values as raw bytes (inline in SQLite when small, else in a new value file)."""
        if read or not isinstance(value, bytes):
            raise TypeError(f"cache values must be bytes, got {type(value).__name__}")
        if len(value) < self.min_file_size:
            return 0, MODE_RAW, None, sqlite3.Binary(value)
        filename, _ = self.filename(key, value)
        self.write_file(filename, value)
        written = getattr(self._tracked, "files", None)
        if written is not None:
            written.append(filename)
        return len(value), MODE_BINARY, filename, None

    @contextlib.contextmanager
    def tracking(self) -> Iterator[list[str]]:
        """Collect the value files this thread writes meanwhile (to remove them if the write fails)."""
        files: list[str] = []
        self._tracked.files = files
        try:
            yield files
        finally:
            self._tracked.files = None

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
        """Refuse any stored mode other than raw bytes (pickle and text modes included)."""
        if read or mode not in (MODE_RAW, MODE_BINARY):
            raise UnsafeEntryError(f"unexpected storage mode {mode} in an s3cache store")
        if mode == MODE_RAW and not isinstance(value, bytes):
            raise UnsafeEntryError(f"an inline value is stored as {type(value).__name__}, not bytes")
        if mode == MODE_BINARY and not is_value_file(filename):
            raise UnsafeEntryError(f"unexpected value file name {filename!r}")
        return super().fetch(mode, filename, value, read)

    def write_file(self, filename: str, data: bytes) -> None:
        """Write a new value file (relative name from :meth:`filename`).

        Raises:
            OSError: The file could not be written (a full disk); nothing is left behind.
        """
        full_path = os.path.join(self._directory, filename)
        for attempt in range(10):
            try:
                self._make_parents(filename)
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
                fd = os.open(full_path, flags, 0o600 if self.private else 0o666)
                break
            except FileNotFoundError:
                # Another process removed an emptied directory between mkdir and open: try again.
                if attempt == 9:
                    raise
            except BaseException:
                self._prune(filename)
                raise
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except BaseException:
            os.close(fd)
            self.remove(filename)
            raise
        os.close(fd)

    def remove(self, file_path: str) -> None:
        """Remove a value file and its emptied directories; names not of a value file are left alone."""
        if not is_value_file(file_path):
            log.warning("not removing %r: not a value file name", file_path)
            return
        with contextlib.suppress(OSError):
            os.remove(os.path.join(self._directory, file_path))
        self._prune(file_path)

    def _make_parents(self, filename: str) -> None:
        mode = 0o700 if self.private else 0o777
        first, second = os.path.split(os.path.dirname(filename))
        for part in (first, os.path.join(first, second)):
            with contextlib.suppress(FileExistsError):
                os.mkdir(os.path.join(self._directory, part), mode)

    def _prune(self, filename: str) -> None:
        """Remove the value file's two directory levels where they are empty."""
        first, second = os.path.split(os.path.dirname(filename))
        for part in (os.path.join(first, second), first):
            try:
                os.rmdir(os.path.join(self._directory, part))
            except OSError:
                return


def is_value_file(filename: object) -> bool:
    """Whether a stored file name has the form diskcache generates (no way out of the store)."""
    return isinstance(filename, str) and VALUE_FILE.fullmatch(filename) is not None


# -- the Cache ----------------------------------------------------------------------------------------------

_F = TypeVar("_F", bound=Callable[..., Any])


def _guarded(method: _F) -> _F:
    """Raise :class:`DamagedStoreError` for SQLite's corruption errors."""

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
    """A diskcache ``Cache`` over :class:`SafeDisk` that sees only rows in s3cache's own form.

    * Keys are listed by one query over rows in s3cache's form (:data:`SAFE_ROW`); other rows are
      skipped, never decoded, and ``get`` reads them as missing. ``verify`` reports them.
    * Only known settings with plain values are applied from the database.
    * Writes that fail for a full disk leave no value file behind, warn once and return ``False``.
    * Corruption raises :class:`DamagedStoreError`.
    """

    read_only = False

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


def open_diskcache(directory: Path, *, private: bool = True, **settings: Any) -> SafeCache:
    """Open a diskcache store with :class:`SafeDisk`.

    On a full file system an existing store opens read-only (:class:`ReadOnlyCache`) instead of
    failing, since diskcache writes its settings on every open.

    Args:
        directory: The store's directory.
        private: New value files owner-only (off for a shared cache).
        **settings: diskcache settings.

    Raises:
        DamagedStoreError: The database is damaged.
        CacheError: The store cannot be created or opened.
    """
    cache = SafeCache.__new__(SafeCache)
    try:
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


# -- writes that must work on a full disk -------------------------------------------------------------------------


def write_on_full_disk(database: Path, write: Callable[[sqlite3.Connection], None]) -> None:
    """Run ``write`` in one transaction; if the file system is full, run it again without the WAL index.

    A WAL database's writers share a 32 KB index file (``-shm``) that a full file system may not
    have room for. Locked for one connection alone (``locking_mode = EXCLUSIVE``), SQLite keeps
    that index in memory, and a small transaction (deleting rows, after their value files made
    room) fits where a normal one does not. That needs no other connection to the database.

    Raises:
        CacheFullError: It does not fit either way.
    """
    for exclusive in (False, True):
        con = sqlite3.connect(database, timeout=5 if exclusive else 60, isolation_level=None)
        try:
            if exclusive:
                con.execute("PRAGMA locking_mode = EXCLUSIVE")
            con.execute("BEGIN IMMEDIATE")
            try:
                write(con)
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        con.execute("ROLLBACK")
                raise
            return
        except (OSError, sqlite3.Error) as exc:
            if not is_disk_full(exc, database.parent):
                raise
            if exclusive:
                raise CacheFullError(f"cannot write to the cache database {database}: its file system is full "
                                     f"({exc}). Free some space, or run `s3cache clear`.") from exc
            log.info("writing %s again, locked exclusively: %s", database, exc)
        finally:
            con.close()


# -- whole-database checks and rebuilds -------------------------------------------------------------------------


def database_damage(directory: Path) -> str | None:
    """Why a store's database is unusable (SQLite's integrity check, tables), or ``None`` if it is fine or absent."""
    database = directory / DBNAME
    if not database.exists():
        return None
    try:
        con = connect_readonly(database)
        try:
            tables = {name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            rows = [row[0] for row in con.execute("PRAGMA integrity_check(20)")]
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        if isinstance(exc, sqlite3.OperationalError) and not is_damaged(exc):
            raise CacheError(f"cannot read the cache database {database}: {exc}") from exc
        return f"the database is damaged: {exc}"
    if rows != ["ok"]:
        return "the database is damaged: " + "; ".join(str(row) for row in rows)
    if not {"Cache", "Settings"} <= tables:
        return "the database is not an s3cache store (no Cache or Settings table)"
    return None


def read_setting(directory: Path, key: str) -> Any:
    """A stored setting of a store, or ``None`` when it cannot be read."""
    try:
        con = connect_readonly(directory / DBNAME)
        try:
            row = con.execute("SELECT value FROM Settings WHERE key = ?", (key,)).fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return None
    return None if row is None else row[0]


def rebuild_store(directory: Path) -> int:
    """Delete a store's database and value files, so that it opens empty; returns the value files removed.

    Only what diskcache creates is removed: the database files and the two-hex-digit value
    directories (a symlink among them is unlinked, never followed).
    """
    removed = 0
    for entry in os.scandir(directory):
        if entry.name in DATABASE_FILES:
            os.remove(entry.path)
        elif re.fullmatch(r"[0-9a-f]{2}", entry.name):
            if entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
                os.remove(entry.path)
                continue
            removed += sum(len(files) for _, _, files in os.walk(entry.path))
            shutil.rmtree(entry.path)
    return removed
