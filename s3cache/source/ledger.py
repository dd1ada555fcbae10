"""Fetch claims and versions read, shared by the processes that use one cache directory.

A small SQLite database, ``<cache_dir>/fetches.db``, beside the stores:

* ``claims``: a process about to fetch a cache key claims it first (an insert, or a takeover of a
  claim that expired or whose owner process is gone). A process that finds a live claim waits for the
  entry instead of fetching the object again. Owners renew their claims every ``ttl / 3`` seconds
  while they live, so a crashed or frozen claimer blocks nobody for longer than ``ttl``, and a claim
  of a process on this host that has exited is taken over at once.
* ``versions``: when the version read (its ETag) differs from the version listed, the key built
  from the listing points to the key the array was stored under. Offline runs over the stored
  listing look there when the listed key misses.

Everything here is advisory. If the database cannot be opened or written (a read-only cache
directory, a full disk), the ledger switches itself off with one log line: every process then
fetches what it misses, as if it were alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from s3cache import forksafe

FILENAME = "fetches.db"
DEFAULT_TTL = 15.0
_CHUNK = 500  # keys per statement, under SQLite's limit on bound parameters

_SCHEMA = """
CREATE TABLE IF NOT EXISTS claims (
    key TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    token TEXT NOT NULL,
    expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS claims_token ON claims (token);
CREATE TABLE IF NOT EXISTS versions (
    listed_key TEXT PRIMARY KEY,
    read_key TEXT NOT NULL,
    recorded REAL NOT NULL
);
"""

log = logging.getLogger(__name__)


class FetchLedger:
    """Claims on cache keys being fetched, and the keys that changed objects were stored under.

    Safe to use from several threads; one instance per process (SQLite connections do not survive a fork).

    Args:
        path: The database file (created unless ``read_only``).
        ttl: Seconds a claim lives without renewal.
        read_only: Never write (offline use): claims are off, versions are only read.
    """

    def __init__(self, path: str | os.PathLike[str], *, ttl: float = DEFAULT_TTL, read_only: bool = False) -> None:
        if not ttl > 0:
            raise ValueError(f"ttl must be positive, got {ttl}")
        self.path = Path(path)
        self.ttl = float(ttl)
        self.read_only = read_only
        self.token = uuid.uuid4().hex
        self._host = socket.gethostname()
        self._pid = os.getpid()
        self._lock = threading.RLock()
        self._con: sqlite3.Connection | None = None
        self._off = False
        self._held: set[str] = set()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    @classmethod
    def in_directory(cls, directory: str | os.PathLike[str], **kwargs: object) -> FetchLedger:
        """The ledger of a cache directory."""
        return cls(Path(directory) / FILENAME, **kwargs)  # type: ignore[arg-type]

    @property
    def enabled(self) -> bool:
        """Whether claims coordinate with other processes (false when read-only or switched off)."""
        return not self.read_only and not self._off and not self._stop.is_set()

    # -- claims ---------------------------------------------------------------------------------

    def claim(self, keys: Sequence[str]) -> set[str]:
        """Claim the keys that no live owner holds, in one transaction; returns the keys now ours.

        With the ledger off, every key is "claimed": the caller fetches it, as without a ledger.
        """
        if not keys:
            return set()
        if not self.enabled:
            return set(keys)
        now = time.time()
        try:
            with self._transaction() as con:
                if con is None:
                    return set(keys)
                live = {row[0] for row in self._select(con, "key, host, pid, token, expires", "claims", "key", keys)
                        if row[3] != self.token and not self._stale(row, now)}
                mine = [key for key in dict.fromkeys(keys) if key not in live]
                con.executemany("INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?, ?)",
                                [(key, self._host, self._pid, self.token, now + self.ttl) for key in mine])
        except sqlite3.Error as exc:
            self._switch_off(exc)
            return set(keys)
        with self._lock:
            self._held.update(mine)
        self._start_heartbeat()
        return set(mine)

    def unclaimed(self, keys: Sequence[str]) -> set[str]:
        """The keys that no live owner other than this ledger holds (no transaction, no write)."""
        if not self.enabled:
            return set(keys)
        now = time.time()
        try:
            with self._lock:
                con = self._connection()
                if con is None:
                    return set(keys)
                live = {row[0] for row in self._select(con, "key, host, pid, token, expires", "claims", "key", keys)
                        if row[3] != self.token and not self._stale(row, now)}
        except sqlite3.Error as exc:
            self._switch_off(exc)
            return set(keys)
        return set(keys) - live

    def release(self, key: str, stored_key: str | None = None) -> None:
        """Give up a claim; with ``stored_key``, also note where the array of ``key`` was stored.

        Args:
            key: The claimed key (built from the listed version).
            stored_key: The key the entry was stored under: a different one records that the object
                changed since listing; the same one forgets any such record; ``None`` (the fetch
                failed) records nothing.
        """
        self.release_many([(key, stored_key)])

    def release_many(self, releases: Sequence[tuple[str, str | None]]) -> None:
        """Give up claims in one transaction: ``(key, stored_key)`` pairs as :meth:`release` takes them."""
        with self._lock:
            held = {key for key, _ in releases if key in self._held}
            self._held.difference_update(held)
        releases = [(key, stored) for key, stored in releases if key in held or stored is not None]
        if not self.enabled or not releases:
            return
        try:
            with self._transaction() as con:
                if con is None:
                    return
                con.executemany("DELETE FROM claims WHERE key = ? AND token = ?",
                                [(key, self.token) for key, _ in releases])
                now = time.time()
                con.executemany("INSERT OR REPLACE INTO versions VALUES (?, ?, ?)",
                                [(key, stored, now) for key, stored in releases if stored not in (None, key)])
                con.executemany("DELETE FROM versions WHERE listed_key = ?",
                                [(key,) for key, stored in releases if stored == key])
        except sqlite3.Error as exc:
            self._switch_off(exc)

    # -- versions -------------------------------------------------------------------------------

    def stored_keys(self, keys: Sequence[str], since: float | None = None) -> dict[str, str]:
        """For listed keys whose object was read in another version: the key its entry was stored under.

        Args:
            keys: Keys built from listed versions.
            since: Only records made at or after this time (seconds since the epoch).
        """
        if not keys or self._off:
            return {}
        try:
            with self._lock:
                con = self._connection()
                if con is None:
                    return {}
                rows = self._select(con, "listed_key, read_key, recorded", "versions", "listed_key", keys)
                return {row[0]: row[1] for row in rows if since is None or row[2] >= since}
        except sqlite3.Error as exc:
            self._switch_off(exc)
            return {}

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop renewing, drop this ledger's remaining claims and close the database."""
        writable = self.enabled
        self._stop.set()
        if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
            self._heartbeat.join(timeout=5)
        with self._lock:
            held, self._held = self._held, set()
            con, self._con = self._con, None
        if con is None:
            return
        with contextlib.suppress(sqlite3.Error):
            if held and writable and os.getpid() == self._pid:
                con.execute("DELETE FROM claims WHERE token = ?", (self.token,))
        con.close()

    # -- internals ------------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection | None:
        """The open connection (call with the lock held), or ``None`` when there is nothing to read."""
        if self._off or self._stop.is_set():  # switched off, or closed
            return None
        if self._con is None:
            if self.read_only:
                if not self.path.exists():
                    return None
                con = forksafe.connect(self.path.absolute().as_uri() + "?mode=ro", uri=True, timeout=30,
                                       isolation_level=None, check_same_thread=False)
            else:
                con = forksafe.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
                try:
                    con.execute("PRAGMA journal_mode = WAL")
                    con.execute("PRAGMA synchronous = NORMAL")
                    con.executescript(_SCHEMA)
                except BaseException:
                    con.close()
                    raise
            self._con = con
        return self._con

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection | None]:
        with self._lock:
            con = self._connection()
            if con is None:
                yield None
                return
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    @staticmethod
    def _select(con: sqlite3.Connection, columns: str, table: str, column: str,
                keys: Iterable[str]) -> list[tuple[object, ...]]:
        keys = list(keys)
        rows: list[tuple[object, ...]] = []
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start:start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            rows += con.execute(f"SELECT {columns} FROM {table} WHERE {column} IN ({marks})", chunk).fetchall()
        return rows

    def _stale(self, row: tuple[object, ...], now: float) -> bool:
        """Whether a claim row has expired or belongs to a process of this host that is gone."""
        _, host, pid, _, expires = row
        if float(expires) < now:  # type: ignore[arg-type]
            return True
        return host == self._host and not _alive(int(pid))  # type: ignore[call-overload]

    def _switch_off(self, exc: BaseException) -> None:
        with self._lock:
            if self._off:
                return
            self._off = True
            con, self._con = self._con, None
            self._held.clear()
        if con is not None:
            with contextlib.suppress(sqlite3.Error):
                con.close()
        if self.read_only:  # offline: only versions read elsewhere are lost, and only for objects rewritten
            log.debug("cannot read %s (%s): objects rewritten since their listing may read as not cached",
                      self.path, exc)
        else:
            log.warning("fetch coordination through %s is off (%s): processes sharing this cache may fetch "
                        "the same objects", self.path, exc)

    def _start_heartbeat(self) -> None:
        with self._lock:
            if self._heartbeat is not None or self._stop.is_set():
                return
            self._heartbeat = threading.Thread(target=self._renew, name="s3cache-claims", daemon=True)
            self._heartbeat.start()

    def _renew(self) -> None:
        """Push this ledger's claims' expiry forward every ``ttl / 3`` seconds while it holds any."""
        while not self._stop.wait(self.ttl / 3):
            with self._lock:
                if not self._held or not self.enabled:
                    continue
            try:
                with self._transaction() as con:
                    if con is not None:
                        con.execute("UPDATE claims SET expires = ? WHERE token = ?",
                                    (time.time() + self.ttl, self.token))
            except sqlite3.Error as exc:
                self._switch_off(exc)


def _alive(pid: int) -> bool:
    """Whether a process of this host with that id exists."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, but belongs to someone else
    return True
