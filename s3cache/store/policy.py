"""Which entries an eviction removes, and whether a new entry is admitted into a full store.

diskcache learns about our policy through its ``EVICTION_POLICY`` table: it indexes ``access_time``
but never writes on a ``get`` and never culls by itself (``cull_limit`` is 0). s3cache keeps
``access_time`` itself, as generations (:mod:`s3cache.store.recency`). The choices happen here,
behind :class:`EvictionPolicy`, so that another policy can decide differently.

The default, :class:`KeepCurrentRun`, is an LRU between runs (datasets) that keeps what the current
run holds:

* Entries last used by other runs go first, those used longest ago first (an LRU between
  datasets and experiments).
* The current run's own entries are never evicted to make room for more of its own: once they
  fill the store, a new array is served to its batch but not stored (:meth:`~EvictionPolicy.admits`
  says no). A shuffled epoch over a dataset that does not fit then hits the fraction of it that
  the store holds, every epoch, where an LRU would cycle through the dataset and hit far less
  (``c + (1 - c) ln(1 - c)`` for a store holding a fraction ``c``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from typing import NamedTuple, Protocol

import diskcache

from s3cache.store.layout import footprint
from s3cache.store.recency import GENERATIONS, WALL_CLOCK, Generation

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

_COLUMNS = "rowid, filename, MAX(size, IFNULL(LENGTH(value), 0)), LENGTH(key)"
_Row = tuple[int, str | None, int, int]


class Victim(NamedTuple):
    """A row chosen for eviction, and about how many bytes of the store's volume removing it frees."""

    rowid: int
    filename: str | None
    size: int


class EvictionPolicy(Protocol):
    """Chooses the rows to delete when the store is over its limit, and whether a full store admits more."""

    def admits(self, con: sqlite3.Connection, current: Generation | None) -> bool:
        """Whether a new entry may be stored when it does not fit without evicting something."""
        ...

    def victims(self, con: sqlite3.Connection, excess: int, current: Generation | None) -> list[Victim]:
        """Rows whose sizes add up to at least ``excess`` bytes (fewer if the store has no more)."""
        ...


class LeastRecentlyUsed:
    """Evict the entries used longest ago; always admit."""

    def admits(self, con: sqlite3.Connection, current: Generation | None) -> bool:
        """Always: some older entry can make room."""
        return True

    def victims(self, con: sqlite3.Connection, excess: int, current: Generation | None) -> list[Victim]:
        """The least recently used rows covering ``excess`` bytes, at most :data:`CULL_ROWS` per round."""
        return _cover(con, excess, _by_recency(con, None, CULL_ROWS))


class KeepCurrentRun:
    """LRU between runs; the current run's own entries stay, and its new arrivals wait for room."""

    def admits(self, con: sqlite3.Connection, current: Generation | None) -> bool:
        """Whether some entry that is not the current run's can make room."""
        if current is None or not current.protect:
            return True
        others = ("SELECT 1 FROM Cache WHERE access_time < ?1"
                  " UNION ALL SELECT 1 FROM Cache WHERE access_time > ?1 LIMIT 1")
        return con.execute(others, (current.gen,)).fetchone() is not None

    def victims(self, con: sqlite3.Connection, excess: int, current: Generation | None) -> list[Victim]:
        """Other runs' entries, least recently used first; the run's newest entries only as a last resort.

        The last resort covers concurrent writers that were admitted at once and overshot the limit
        together: the newest entries of the run go, as if they had not been admitted.
        """
        if current is None or not current.protect:
            return LeastRecentlyUsed().victims(con, excess, current)
        chosen = _cover(con, excess, _by_recency(con, current.gen, CULL_ROWS))
        if not chosen:
            chosen = _cover(con, excess, con.execute(
                f"SELECT {_COLUMNS} FROM Cache WHERE access_time = ? ORDER BY rowid DESC LIMIT ?",
                (current.gen, CULL_ROWS)))
        return chosen


def _by_recency(con: sqlite3.Connection, spared: int | None, limit: int) -> Iterator[_Row]:
    """Rows least recently used first, except those of generation ``spared``.

    First rows with a wall-clock stamp (written by something other than this version of s3cache),
    then each generation's rows in the order of the generations' last use, oldest stored first
    within one. Every query walks the ``access_time`` index; the generation table is small.
    """
    yield from con.execute(f"SELECT {_COLUMNS} FROM Cache WHERE access_time >= ? ORDER BY access_time LIMIT ?",
                           (WALL_CLOCK, limit))
    generations = [gen for (gen,) in con.execute(f"SELECT gen FROM {GENERATIONS} ORDER BY ord")]
    for gen in generations:
        if gen != spared:
            yield from con.execute(f"SELECT {_COLUMNS} FROM Cache WHERE access_time = ? ORDER BY rowid LIMIT ?",
                                   (gen, limit))


def _cover(con: sqlite3.Connection, excess: int, rows: Iterable[_Row]) -> list[Victim]:
    """The first rows whose footprints add up to at least ``excess`` (all of them if they do not).

    Weighing rows by what removing them frees, not by their values' length, keeps an eviction from
    removing more entries than the limit asks for (a 48 KB value spans whole overflow pages).
    """
    ((page_size,),) = con.execute("PRAGMA page_size").fetchall()
    chosen: list[Victim] = []
    covered = 0
    for rowid, filename, size, key in rows:
        if covered >= excess or len(chosen) >= CULL_ROWS:
            break
        freed = footprint(size, key or 0, page_size, in_file=filename is not None)
        chosen.append(Victim(rowid, filename, freed))
        covered += freed
    return chosen
