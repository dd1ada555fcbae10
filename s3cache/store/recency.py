"""Read recency as a logical clock: one generation per run, ordered by last use, written back in batches.

An entry's ``access_time`` column holds a *generation*: the id of the run that last read or stored
it. A *run* is one dataset being read: one :func:`~s3cache.image_dataset_from_s3` call (both subsets
of a validation split) or one ``warm``, named by a run key derived from its spec and listing
(:func:`s3cache.listing.run_key`). Keras worker threads and processes of a dataset, and any other
process reading the same dataset, share its run key and so its generation.

Generations live in the ``S3cacheGeneration`` table, each with an ``ord``: a counter value that says
when the run was last used, relative to the others. The LRU order of entries is the order of their
generations' ``ord``, whatever the clocks and timings of the processes involved:

* When a run starts, and at every epoch boundary, it checks whether another run was used since its
  own last use (a larger ``ord``). If so it takes the next ``ord``: one row written, and every entry
  it holds becomes newer than every entry of the other runs.
* Reading an entry stamped with another run's generation (datasets that share images) notes it;
  the next flush stamps it with the reader's generation, in batched ``UPDATE`` statements on a
  background thread. Entries a run stamped itself are never written again. Generations are
  numbered from :data:`FIRST_GEN`, so that every stamp has the same width and a write-back
  overwrites the stamp in place instead of rewriting the row with its array.

So repeated epochs of one dataset write nothing, and neither does reading dataset A again after B:
A's entries become newer than B's with one row written. Stored entries are stamped in the
transaction that stores them. Which entries an eviction removes is decided by
:mod:`s3cache.store.policy`, from the generations and their order.
"""

from __future__ import annotations

import concurrent.futures
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
# Entries of a cache created before generations get this one, the oldest.
LEGACY = 0
# Generations are numbered from here. SQLite writes a number in as few bytes as it fits, and changes an
# entry's row in place only when the row keeps its size; a stamp that grew from 1 to 2 bytes would rewrite
# the whole row, array included (about 10x the cost). From 2**23 up to WALL_CLOCK every stamp takes 4 bytes.
FIRST_GEN = 2**23

GENERATIONS = "S3cacheGeneration"
_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {GENERATIONS} ("
    " gen INTEGER PRIMARY KEY AUTOINCREMENT, run TEXT NOT NULL UNIQUE, ord INTEGER NOT NULL, taken REAL NOT NULL)",
    f"CREATE INDEX IF NOT EXISTS {GENERATIONS}_ord ON {GENERATIONS} (ord)",
)


@dataclass(frozen=True)
class Generation:
    """The generation a run stamps entries with, and whether evictions spare them.

    Attributes:
        run: The run key.
        gen: The stamp of the entries this run reads or stores.
        ord: When the run was last used, relative to the others (larger is more recent).
        protect: Whether evictions spare this run's entries. Off for a store used without a run
            (plain LRU).
    """

    run: str
    gen: int
    ord: int
    protect: bool


class RecencyLog:
    """The current run's generation, and batched write-back of reads of other runs' entries.

    Args:
        connections: The database's connections.
    """

    def __init__(self, connections: Connections) -> None:
        self.connections = connections
        self._lock = threading.Lock()  # guards _rowids, _flushing and _current
        # Held while noted rows are written: a flush returns only once everything noted before it is
        # written, a background one included. Reentrant: a flush may begin an anonymous run, which flushes.
        self._writing = threading.RLock()
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
        """Start (or continue) a run: its generation, made the most recently used if another run was used since.

        Args:
            run: The run key.
            protect: Whether evictions spare the run's own entries.
        """
        self.flush()  # what was read so far belongs to the previous run
        found = self.connections.reader().execute(
            f"SELECT gen, ord, ord >= (SELECT MAX(ord) FROM {GENERATIONS}) FROM {GENERATIONS} WHERE run = ?",
            (run,)).fetchone()
        if found is not None and found[2]:
            gen, order = int(found[0]), int(found[1])
        else:
            with self.connections.write_transaction() as con:
                order = int(con.execute(f"SELECT IFNULL(MAX(ord), 0) + 1 FROM {GENERATIONS}").fetchone()[0])
                row = con.execute(f"SELECT gen, ord FROM {GENERATIONS} WHERE run = ?", (run,)).fetchone()
                if row is None:
                    after = (f"(SELECT MAX(IFNULL(MAX(seq), 0) + 1, ?) FROM sqlite_sequence"
                             f" WHERE name = '{GENERATIONS}')")
                    gen = int(con.execute(f"INSERT INTO {GENERATIONS} (gen, run, ord, taken) VALUES ({after}, ?, ?, ?)",
                                          (FIRST_GEN, run, order, time.time())).lastrowid or 0)
                elif row[1] == order - 1:
                    gen, order = int(row[0]), int(row[1])  # another process of the run did it meanwhile
                else:
                    gen = int(row[0])
                    con.execute(f"UPDATE {GENERATIONS} SET ord = ?, taken = ? WHERE gen = ?", (order, time.time(), gen))
        current = Generation(run, gen, order, protect)
        with self._lock:
            self._current = current
        return current

    def refresh(self) -> Generation | None:
        """At an epoch boundary: make the run the most recently used again if another run was used since.

        Returns:
            The run's generation, or ``None`` if no run began.
        """
        current = self._current
        if current is None:
            return None
        latest = self.connections.reader().execute(f"SELECT MAX(ord) FROM {GENERATIONS}").fetchone()[0]
        if latest is not None and latest <= current.ord:
            return current
        return self.begin(current.run, protect=current.protect)

    def _ensure_schema(self) -> None:
        """Create the generation table; entries of a cache from before it get the oldest generation."""
        exists = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
        if self.connections.reader().execute(exists, (GENERATIONS,)).fetchone():
            return
        with self.connections.write_transaction() as con:
            if con.execute(exists, (GENERATIONS,)).fetchone():
                return
            for statement in _SCHEMA:
                con.execute(statement)
            con.execute(f"INSERT INTO {GENERATIONS} (gen, run, ord, taken) VALUES (?, 'legacy', 0, ?)",
                        (LEGACY, time.time()))
            con.execute("UPDATE Cache SET access_time = ?", (LEGACY,))

    # -- reads ----------------------------------------------------------------------------------

    def stamp_of_run(self) -> int | None:
        """The generation reads are stamped with: a read of an entry stamped otherwise is noted (``None``: all are)."""
        current = self._current
        return None if current is None else current.gen

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
        """Stamp the noted rows with the run's generation: one transaction, one statement per :data:`CHUNK` rows.

        Returns once every read noted before the call is written, by this call or by a background flush.
        """
        with self._writing:
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
