"""Read recency as a logical clock: generations handed out to runs, written back in batches.

An entry's ``access_time`` column holds a *generation*, not a wall-clock time. Generations are
integers from a counter in the database (the ``S3cacheGeneration`` table), so their order is the
order in which runs used the cache, whatever the clocks and timings of the processes involved.

A *run* is one dataset being read: one :func:`~s3cache.image_dataset_from_s3` call (both subsets
of a validation split), or one ``warm``, named by a run key derived from its spec and listing.
Keras worker threads and processes of a dataset, and any other process reading the same
dataset, share its run key. A run holds one generation at a time:

* When a run starts (or re-checks, at every epoch boundary), it keeps its latest generation if no
  other run has taken one since; otherwise it takes a new one from the counter.
* Its *floor* is one above the latest generation of any other run. Entries stamped below the floor
  were last used before some other run's latest use: reading one notes it, and the next flush
  stamps it with the run's generation. Entries at or above the floor are already in the right
  place, so reading them writes nothing.

So repeated epochs of one dataset write nothing at all; the first epoch after another dataset was
read writes each entry back once, in batched ``UPDATE`` statements on a background thread. Dataset
A read, then B, then A again leaves A's entries newer than B's, within seconds as within days.
Stored entries are stamped with the run's generation in the transaction that stores them.

Which entries an eviction removes is decided by :mod:`s3cache.store.policy`, from the generations.
"""

from __future__ import annotations

import concurrent.futures
import sqlite3
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from s3cache.store.connection import Connections

# Reads noted in memory before they are written back in one transaction.
FLUSH_EVERY = 512
# Rows per UPDATE statement, under SQLite's limit on bound parameters.
CHUNK = 500
# ``access_time`` values at or above this are wall-clock seconds (diskcache's own stamps), not generations.
WALL_CLOCK = 1e8
# Wall-clock stamps of a cache created before generations are divided by this on upgrade: they
# land below generation 1, oldest first, in their old order.
_LEGACY_SCALE = 1e10

GENERATIONS = "S3cacheGeneration"
_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {GENERATIONS} ("
    " gen INTEGER PRIMARY KEY AUTOINCREMENT, run TEXT NOT NULL, taken REAL NOT NULL)",
    f"CREATE INDEX IF NOT EXISTS {GENERATIONS}_run ON {GENERATIONS} (run, gen)",
)


@dataclass(frozen=True)
class Generation:
    """The generation a run stamps entries with, and what it may evict.

    Attributes:
        run: The run key.
        gen: The stamp given to entries this run reads or stores.
        floor: One above the latest generation of any other run: entries stamped below it are
            read by this run only after another run's use, and are noted when read.
        protect: Whether evictions spare this run's entries (stamped ``>= floor`` with one of its
            generations). Off for a store used without a run (plain LRU).
    """

    run: str
    gen: int
    floor: int
    protect: bool


class RecencyLog:
    """Generations of the current run, and batched write-back of read recency.

    Args:
        connections: The database's connections.
    """

    def __init__(self, connections: Connections) -> None:
        self.connections = connections
        self._lock = threading.Lock()  # guards _rowids, _flushing and _current
        self._rowids: set[int] = set()
        self._flusher = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="s3cache-lru")
        self._flushing: concurrent.futures.Future[None] | None = None
        self._current: Generation | None = None
        self._ensure_schema()

    # -- generations ----------------------------------------------------------------------------

    @property
    def current(self) -> Generation | None:
        """The run's generation; ``None`` until a run began or something was stamped."""
        return self._current

    def stamp(self) -> Generation:
        """The generation to stamp with now; a store used without a run gets an anonymous one."""
        current = self._current
        if current is None:
            current = self.begin(f"anonymous:{uuid.uuid4().hex}", protect=False)
        return current

    def begin(self, run: str, *, protect: bool = True) -> Generation:
        """Start (or continue) a run: keep its latest generation if no other run took one since, else take one.

        Args:
            run: The run key (see :func:`s3cache.listing.run_key`).
            protect: Whether evictions spare the run's own entries.
        """
        self.flush()  # what was read so far belongs to the previous generation
        current = self._choose(run, protect)
        with self._lock:
            self._current = current
        return current

    def refresh(self) -> Generation | None:
        """Re-check the run's generation (at epoch boundaries): take a new one if another run took one since.

        Returns:
            The (possibly new) generation, or ``None`` if no run began.
        """
        current = self._current
        if current is None:
            return None
        latest = self._latest(current.run)
        if latest == (current.gen, current.floor):
            return current
        return self.begin(current.run, protect=current.protect)

    def _latest(self, run: str) -> tuple[int | None, int]:
        """This run's latest generation (if it still leads) and its floor, read without writing."""
        mine, other = self.connections.reader().execute(
            f"SELECT MAX(CASE WHEN run = ?1 THEN gen END), MAX(CASE WHEN run != ?1 THEN gen END) FROM {GENERATIONS}",
            (run,)).fetchone()
        floor = (other or 0) + 1
        return (mine if mine is not None and mine >= floor else None), floor

    def _choose(self, run: str, protect: bool) -> Generation:
        gen, floor = self._latest(run)
        if gen is None:
            with self.connections.write_transaction() as con:
                mine, other = con.execute(
                    f"SELECT MAX(CASE WHEN run = ?1 THEN gen END), MAX(CASE WHEN run != ?1 THEN gen END)"
                    f" FROM {GENERATIONS}", (run,)).fetchone()
                floor = (other or 0) + 1
                if mine is not None and mine >= floor:
                    gen = mine  # another process of this run took it meanwhile
                else:
                    gen = con.execute(f"INSERT INTO {GENERATIONS} (run, taken) VALUES (?, ?)",
                                      (run, time.time())).lastrowid
                    self._prune(con)
        assert gen is not None
        return Generation(run, int(gen), floor, protect)

    @staticmethod
    def _prune(con: sqlite3.Connection) -> None:
        """Forget generations no entry holds any more, except each run's latest."""
        con.execute(
            f"DELETE FROM {GENERATIONS} WHERE gen < IFNULL((SELECT MIN(access_time) FROM Cache), 0)"
            f" AND gen NOT IN (SELECT MAX(gen) FROM {GENERATIONS} GROUP BY run)")

    def _ensure_schema(self) -> None:
        """Create the generation table; a cache from before it gets its wall-clock stamps below generation 1."""
        found = self.connections.reader().execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (GENERATIONS,)).fetchone()
        if found:
            return
        with self.connections.write_transaction() as con:
            if con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (GENERATIONS,)).fetchone():
                return
            for statement in _SCHEMA:
                con.execute(statement)
            con.execute("UPDATE Cache SET access_time = access_time / ? WHERE access_time >= 1", (_LEGACY_SCALE,))

    # -- reads ----------------------------------------------------------------------------------

    def stale_before(self) -> float:
        """Rows stamped below this are noted when read (the run's floor; every row before a run began)."""
        current = self._current
        return current.floor if current is not None else WALL_CLOCK

    def note(self, rowids: Sequence[int]) -> None:
        """Note reads of rows; every :data:`FLUSH_EVERY`, write them back on the background thread."""
        if not rowids:
            return
        with self._lock:
            self._rowids.update(rowids)
            due = len(self._rowids) >= FLUSH_EVERY
        if due:
            self.flush_soon()

    def flush_soon(self) -> None:
        """Write noted reads back on the background thread (unless a flush is already queued)."""
        with self._lock:
            if self._rowids and (self._flushing is None or self._flushing.done()):
                self._flushing = self._flusher.submit(self.flush)

    def flush(self) -> None:
        """Stamp the noted rows with the run's generation: one transaction, one statement per :data:`CHUNK` rows."""
        with self._lock:
            rowids, self._rowids = list(self._rowids), set()
        if not rowids:
            return
        gen = self.stamp().gen
        with self.connections.write_transaction() as con:
            for start in range(0, len(rowids), CHUNK):
                chunk = rowids[start:start + CHUNK]
                con.execute(f"UPDATE Cache SET access_time = ? WHERE rowid IN ({','.join('?' * len(chunk))})",
                            (gen, *chunk))

    def close(self) -> None:
        """Finish queued flushes and write back what is left."""
        self._flusher.shutdown(wait=True)
        self.flush()
