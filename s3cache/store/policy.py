"""Which entries an eviction removes.

diskcache learns about our policy through its ``EVICTION_POLICY`` table: it indexes and culls by
``access_time`` but never writes on a ``get`` (diskcache's own LRU writes SQLite on every read);
s3cache keeps ``access_time`` itself, in batches (:mod:`s3cache.store.recency`). The choice of
victims happens here, behind :class:`EvictionPolicy`, so that another policy can decide differently.
"""

from __future__ import annotations

import sqlite3
from typing import NamedTuple, Protocol

import diskcache

DISKCACHE_POLICY = "s3cache-batched-lru"
diskcache.core.EVICTION_POLICY.setdefault(
    DISKCACHE_POLICY,
    {
        "init": "CREATE INDEX IF NOT EXISTS Cache_access_time ON Cache (access_time)",
        "get": None,
        "cull": "SELECT {fields} FROM Cache ORDER BY access_time LIMIT ?",
    },
)

# Most rows one eviction round looks at (each round is one transaction).
CULL_ROWS = 256


class Victim(NamedTuple):
    """A row chosen for eviction."""

    rowid: int
    filename: str | None
    size: int


class EvictionPolicy(Protocol):
    """Chooses the rows to delete when the store is over its limit."""

    def victims(self, con: sqlite3.Connection, excess: int) -> list[Victim]:
        """Rows whose sizes add up to at least ``excess`` bytes (fewer if the store has no more)."""
        ...


class LeastRecentlyUsed:
    """Evict the entries read (or stored) longest ago."""

    def victims(self, con: sqlite3.Connection, excess: int) -> list[Victim]:
        """The least recently used rows covering ``excess`` bytes, at most :data:`CULL_ROWS` per round."""
        rows = con.execute(
            "SELECT rowid, filename, MAX(size, IFNULL(LENGTH(value), 0)) FROM Cache"
            " ORDER BY access_time LIMIT ?", (CULL_ROWS,))
        chosen, covered = [], 0
        for row in rows:
            if covered >= excess:
                break
            chosen.append(Victim(*row))
            covered += row[2]
        return chosen
