"""Checking the array store, and fixing what is wrong: rows, entries, value files and counters.

Rows not in s3cache's form (a pickled key, a pickle- or text-mode value, a value file name
diskcache would not generate) are reported, never decoded. Entries must decode under their own
key (header, length, checksum). Files that no row names, rows whose file is missing, empty
directories and wrong counters are reported too. The database's own integrity is checked by
:func:`s3cache.store.repair.database_damage` (``s3cache verify`` runs it first).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from diskcache.core import MODE_PICKLE, MODE_TEXT

from s3cache import codec
from s3cache.store.connection import Connections
from s3cache.store.disk import DATABASE_FILES, DBNAME, SAFE_ROW, UnsafeEntryError, is_value_file
from s3cache.store.repair import write_on_full_disk
from s3cache.store.rows import ROW_COLUMNS, SELECT_CHUNK, Row, decode_row
from s3cache.store.safecache import SafeCache


@dataclass(frozen=True)
class Problem:
    """One damaged entry or inconsistency found by :class:`StoreCheck`.

    Attributes:
        key: The entry's key, or ``<...>`` for the database, its files, or a row that has no text key.
        reason: What is wrong.
        action: What fixing did about it, when that is more than removing it.
    """

    key: str
    reason: str
    action: str = ""



class StoreCheck:
    """Checks one array store and, if asked, fixes it (see the module's description).

    Args:
        directory: The store's directory.
        cache: The store's diskcache store: its value files are read and removed, and it is closed
            before a fix writes.
        connections: The store's connections, closed before a fix writes (they reopen on demand).
    """

    def __init__(self, directory: Path, cache: SafeCache, connections: Connections) -> None:
        self.directory = directory
        self._cache = cache
        self._connections = connections

    def run(self, fix: bool) -> list[Problem]:
        """Find the store's problems and, with ``fix``, remove what is damaged.

        Fixing removes unknown files and the damaged entries' files first (room on a full disk),
        then the damaged rows, then corrects the counters and removes empty directories.

        Returns:
            The problems found (before fixing).

        Raises:
            sqlite3.DatabaseError: The database cannot be read.
            CacheFullError: Fixing needs to write and the file system is still full.
        """
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
        while rows := con.execute(f"SELECT {ROW_COLUMNS} FROM Cache WHERE rowid > ? AND {SAFE_ROW} "
                                  f"ORDER BY rowid LIMIT {SELECT_CHUNK}", (last,)).fetchall():
            for row in map(Row._make, rows):
                last = row.rowid
                if row.filename is not None:
                    referenced.add(row.filename)
                try:
                    decode_row(row, self._cache.directory)
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


def _unsafe_reason(named: bool, mode: object, value_type: str) -> str:
    """Why a row is not in s3cache's form."""
    if not named:
        return "a key stored pickled (raw = 0) or not as text: s3cache never writes one, nor reads it"
    kind = {MODE_TEXT: "text", MODE_PICKLE: "pickled"}.get(mode)  # type: ignore[call-overload]
    if kind is not None:
        return f"a value stored {kind} (mode {mode}): s3cache never writes one, nor reads it"
    return f"a value stored in an unexpected form (mode {mode}, {value_type}): s3cache never reads it"
