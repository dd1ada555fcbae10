"""The array store's size limit: kept in its database, read again before every admission and eviction.

* The limit is the store's: every process reads the stored limit again before admitting or evicting,
  so all processes sharing the store keep to the latest one set.
* ``size_limit`` is soft in diskcache (each ``set`` culls at most ``cull_limit`` rows, ``cull`` ten
  at a time), so the store sets ``cull_limit`` to 0 and :meth:`SizeLimit.cull`, called after writes,
  deletes just enough rows chosen by the eviction policy to get back under the limit. A new entry
  that does not fit is stored only if the policy admits it (:mod:`s3cache.store.policy`).
"""

from __future__ import annotations

from collections.abc import Sequence

from s3cache.store.connection import Connections
from s3cache.store.disk import SafeDisk
from s3cache.store.policy import EvictionPolicy
from s3cache.store.recency import RecencyLog

# Pages of the database plus the value files diskcache counts, and the stored limit.
_MEASURE = ("SELECT (SELECT page_count FROM pragma_page_count()) * (SELECT page_size FROM pragma_page_size())"
            " + (SELECT value FROM Settings WHERE key = 'size'), (SELECT value FROM Settings WHERE key = 'size_limit')")


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
        return self._measure()[1]

    def _measure(self) -> tuple[int, int]:
        """The store's volume (database plus value files) and size limit, in one query on this thread's connection."""
        volume, limit = self._connections.reader().execute(_MEASURE).fetchone()
        return int(volume), int(limit)

    def admits(self, size: int) -> bool:
        """Whether an entry of ``size`` bytes would be stored now: it fits, or the policy can make room."""
        return self.admitted([size])[0][0]

    def admitted(self, sizes: Sequence[int]) -> tuple[list[bool], int]:
        """Which entries of these sizes, stored in this order, would be stored now (see :meth:`admits`).

        Returns:
            The verdicts, and the bytes left under the limit once the admitted entries are stored
            (negative when the policy must make room).
        """
        volume, limit = self._measure()
        room, makes_room = limit - volume, None
        verdicts = []
        for size in sizes:
            if size <= room:
                room -= size
                verdicts.append(True)
                continue
            if makes_room is None:
                makes_room = self.policy.admits(self._connections.reader(), self.recency.current)
            verdicts.append(makes_room)
            room -= size if makes_room else 0
        return verdicts, room

    def cull(self, disk: SafeDisk) -> int:
        """Evict entries chosen by the policy until the store is within its size limit.

        Args:
            disk: The store's disk, which removes the evicted entries' value files.

        Returns:
            The number of entries removed.
        """
        removed = 0
        while True:
            volume, limit = self._measure()
            if volume <= limit:
                break
            self.recency.flush()
            with self._connections.write_transaction() as con:
                victims = self.policy.victims(con, volume - limit, self.recency.current)
                con.executemany("DELETE FROM Cache WHERE rowid = ?", [(v.rowid,) for v in victims])
            if not victims:
                break
            removed += len(victims)
            for victim in victims:
                if victim.filename:
                    disk.remove(victim.filename)
        return removed
