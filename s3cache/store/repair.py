"""Repairs of a diskcache store: whole-database checks and rebuilds, and writes that must work on a full disk.

``s3cache verify`` checks a database with :func:`database_damage` before opening it, and ``verify
--fix`` rebuilds a damaged one with :func:`rebuild_store` (its arrays are fetched from S3 again).
Fixes and ``clear`` write through :func:`write_on_full_disk`, which fits a small transaction on a
file system too full for the WAL index.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diskcache.core import DBNAME

from s3cache import forksafe
from s3cache.errors import CacheError
from s3cache.store.connection import connect_readonly, immediate_transaction
from s3cache.store.disk import DATABASE_FILES
from s3cache.store.faults import CacheFullError, is_damaged, is_disk_full

# An SQLite database file starts with this, and its page size is the big-endian 16 bits after it.
_SQLITE_MAGIC = b"SQLite format 3\x00"
_HEADER_BYTES = 18

log = logging.getLogger(__name__)


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
        con = forksafe.connect(database, timeout=5 if exclusive else 60, isolation_level=None)
        try:
            if exclusive:
                con.execute("PRAGMA locking_mode = EXCLUSIVE")
            with immediate_transaction(con):
                write(con)
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


def header_page_size(directory: Path) -> int | None:
    """The page size a store's database file declares in its header (readable when the rest is damaged), if any."""
    try:
        with open(directory / DBNAME, "rb") as database:
            header = database.read(_HEADER_BYTES)
    except OSError:
        return None
    if len(header) < _HEADER_BYTES or not header.startswith(_SQLITE_MAGIC):
        return None
    size = int.from_bytes(header[16:18], "big")
    size = 65536 if size == 1 else size  # the header's way of writing 64 KiB
    return size if 512 <= size <= 65536 and size & (size - 1) == 0 else None


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
