"""The array store's size limit: kept in its database, read again before every admission and eviction.

* The limit is the store's: every process reads the stored limit again before admitting or evicting,
  so all processes sharing the store keep to the latest one set.
* ``size_limit`` is soft in diskcache (each ``set`` culls at most ``cull_limit`` rows, ``cull`` ten
  at a time), so the store sets ``cull_limit`` to 0 and :meth:`SizeLimit.cull`, called after writes,
  deletes just enough rows chosen by the eviction policy to get back under the limit. A new entry
  that does not fit is stored only if the policy admits it (:mod:`s3cache.store.policy`).
"""

from __future__ import annotations

from s3cache.store.connection import Connections
from s3cache.store.disk import SafeDisk
from s3cache.store.policy import EvictionPolicy
from s3cache.store.recency import RecencyLog


class SizeLimit:
    """Keeps a store within the size limit stored in its database.

    Args:
        connections: The store's connections.
        recency: The store's recency log (written back before an eviction, which the policy chooses by it).
        policy: Chooses what an eviction removes and whether a full store admits a new entry.
    """

    def __init__(self, connections: Connections, recency: RecencyLog, policy: EvictionPolicy) -> None:
        self._connections = connections
        self.recency = recency
        self.policy = policy

    @property
    def size_limit(self) -> int:
        """The store's size limit in bytes, as last set by any process."""
        return int(self._setting("size_limit"))

    def _setting(self, name: str) -> int:
        """A diskcache setting as stored now (read on this thread's own connection)."""
        row = self._connections.reader().execute("SELECT value FROM Settings WHERE key = ?", (name,)).fetchone()
        return int(row[0])

    def _volume(self) -> int:
        """The store's volume (database plus value files), read on this thread's own connection."""
        con = self._connections.reader()
        (pages,) = con.execute("PRAGMA page_count").fetchone()
        (page_size,) = con.execute("PRAGMA page_size").fetchone()
        return int(pages) * int(page_size) + self._setting("size")

    def admits(self, size: int) -> bool:
        """Whether an entry of ``size`` bytes would be stored now: it fits, or the policy can make room."""
        if self._volume() + size <= self.size_limit:
            return True
        return self.policy.admits(self._connections.reader(), self.recency.current)

    def cull(self, disk: SafeDisk) -> int:
        """Evict entries chosen by the policy until the store is within its size limit.

        Args:
            disk: The store's disk, which removes the evicted entries' value files.

        Returns:
            The number of entries removed.
        """
        removed = 0
        while (excess := self._volume() - self.size_limit) > 0:
            self.recency.flush()
            with self._connections.write_transaction() as con:
                victims = self.policy.victims(con, excess, self.recency.current)
                con.executemany("DELETE FROM Cache WHERE rowid = ?", [(v.rowid,) for v in victims])
            if not victims:
                break
            removed += len(victims)
            for victim in victims:
                if victim.filename:
                    disk.remove(victim.filename)
        return removed
