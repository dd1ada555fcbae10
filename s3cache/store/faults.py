"""Faults of a diskcache store: a full file system and a damaged database, told apart and reported.

* A full file system (``ENOSPC``/``EDQUOT``, ``SQLITE_FULL``, or an SQLite I/O error with almost no
  free space left): :func:`is_disk_full`. Writes then pause, with one warning per cache directory and
  process (:func:`warn_writes_paused`, :class:`CacheWritesPausedWarning`); what must write and cannot
  raises :class:`CacheFullError`.
* A damaged database (``SQLITE_CORRUPT``, ``SQLITE_NOTADB``): :func:`is_damaged`, reported as
  :class:`DamagedStoreError`, a :class:`~s3cache.errors.CacheError` naming the database and the
  repair (``s3cache verify --fix``).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sqlite3
import threading
import warnings
from pathlib import Path

from diskcache.core import DBNAME

from s3cache.errors import CacheError

log = logging.getLogger(__name__)

# SQLite primary result codes (``sqlite3.Error.sqlite_errorcode & 0xff``).
SQLITE_BUSY = 5
SQLITE_IOERR = 10
SQLITE_CORRUPT = 11
SQLITE_FULL = 13
SQLITE_NOTADB = 26
# Below this much free space, an SQLite I/O error (growing the WAL index, say) counts as a full disk.
LOW_SPACE = 1 << 20


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


def is_locked(exc: BaseException) -> bool:
    """Whether an SQLite error says another connection holds the lock the call needed (``SQLITE_BUSY``)."""
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    return isinstance(exc, sqlite3.OperationalError) and code == SQLITE_BUSY


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
