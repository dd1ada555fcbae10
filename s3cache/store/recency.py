"""Read recency, recorded in memory and written back in batches on a background thread.

diskcache's own LRU writes SQLite on every read. Here a read only notes the row; every
:data:`FLUSH_EVERY` reads (and before every eviction, and at the end of an epoch) the noted rows get
the current time in one transaction, off the reading thread. Like ``relatime``, a row refreshed in the
last :data:`RESOLUTION` seconds is not noted again, so repeated epochs of a small dataset write nothing.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Sequence

from s3cache.store.connection import Connections

# Reads noted in memory before they are written back in one transaction.
FLUSH_EVERY = 512
# A read refreshes an entry's recency only if its last refresh (or store) is older than this.
RESOLUTION = 30.0
# Rows per UPDATE statement, under SQLite's limit on bound parameters.
CHUNK = 500


class RecencyLog:
    """Batched write-back of read recency.

    Args:
        connections: The database's connections.
        resolution: Seconds within which a read does not refresh an entry again.
    """

    def __init__(self, connections: Connections, resolution: float = RESOLUTION) -> None:
        self.connections = connections
        self.resolution = resolution
        self._lock = threading.Lock()  # guards _rowids and _flushing
        self._rowids: set[int] = set()
        self._flusher = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="s3cache-lru")
        self._flushing: concurrent.futures.Future[None] | None = None

    def stale_before(self) -> float:
        """Rows last refreshed before this time are noted when read."""
        return time.time() - self.resolution

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
        """Write noted reads to the database: one transaction, one statement per :data:`CHUNK` rows.

        Every row gets the flush time: each was read since the last flush, well within the
        resolution. One statement per chunk (not per row) keeps the GIL released while SQLite works.
        """
        with self._lock:
            rowids, self._rowids = list(self._rowids), set()
        if not rowids:
            return
        now = time.time()
        with self.connections.write_transaction() as con:
            for start in range(0, len(rowids), CHUNK):
                chunk = rowids[start:start + CHUNK]
                con.execute(f"UPDATE Cache SET access_time = ? WHERE rowid IN ({','.join('?' * len(chunk))})",
                            (now, *chunk))

    def close(self) -> None:
        """Finish queued flushes and write back what is left."""
        self._flusher.shutdown(wait=True)
        self.flush()
