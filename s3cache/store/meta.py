"""Metadata of a cache: stored listings, an index of every listed object, and spec descriptions. Never evicted.

The object index maps each listed image's URL to its ETag and size (the stored form of an
:class:`~s3cache.items.Item`). Every listing adds to it, so an offline run can resolve any URL that
some listing saw (a list of URLs, a manifest, a sub-prefix) without a stored listing of exactly
that list. It lives in its own table of the metadata database, beside diskcache's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from s3cache.items import Item
from s3cache.store.connection import Connections
from s3cache.store.safecache import open_diskcache

_LISTING = "listing/"
_SPEC = "spec/"
_OBJECTS = "S3cacheObject"
# URLs per SELECT, under SQLite's limit on bound parameters.
_LOOKUP_CHUNK = 500


class MetaStore:
    """Listings (by source URL or digest) and spec descriptions (by fingerprint), as JSON.

    Args:
        directory: The store's directory (``<cache_dir>/meta``); its parent must exist.

    Raises:
        CacheError: The store cannot be created or opened.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._cache = open_diskcache(self.directory, eviction_policy="none")
        self._connections = Connections(self.directory / "cache.db")
        exists = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
        if not self._connections.reader().execute(exists, (_OBJECTS,)).fetchone():
            with self._connections.write_transaction() as con:
                con.execute(f"CREATE TABLE IF NOT EXISTS {_OBJECTS} (url TEXT PRIMARY KEY, item TEXT NOT NULL)"
                            " WITHOUT ROWID")

    def put_listing(self, name: str, listing: dict[str, Any]) -> None:
        """Store a listing (replacing any older one of that name)."""
        self._cache.set(_LISTING + name, json.dumps(listing).encode())

    def get_listing(self, name: str) -> dict[str, Any] | None:
        """A stored listing, or ``None``."""
        data = self._cache.get(_LISTING + name)
        return None if data is None else json.loads(data)

    def listing_names(self) -> list[str]:
        """Every stored listing's name."""
        return sorted(k.removeprefix(_LISTING) for k in self._cache.iterkeys() if k.startswith(_LISTING))

    def delete_listing(self, name: str) -> bool:
        """Forget a listing."""
        return bool(self._cache.delete(_LISTING + name))

    def index_objects(self, items: Iterable[Item]) -> None:
        """Remember each item's ETag and size by URL (replacing what an older listing said)."""
        rows = [(item.url, json.dumps(item.to_json())) for item in items]
        with self._connections.write_transaction() as con:
            con.executemany(f"INSERT OR REPLACE INTO {_OBJECTS} (url, item) VALUES (?, ?)", rows)

    def lookup_objects(self, urls: Sequence[str]) -> dict[str, Item]:
        """The indexed items of those URLs that some listing saw, by URL."""
        con = self._connections.reader()
        found: dict[str, Item] = {}
        unique = list(dict.fromkeys(urls))
        for start in range(0, len(unique), _LOOKUP_CHUNK):
            chunk = unique[start:start + _LOOKUP_CHUNK]
            query = f"SELECT url, item FROM {_OBJECTS} WHERE url IN ({','.join('?' * len(chunk))})"
            found.update((url, Item.from_json(json.loads(item))) for url, item in con.execute(query, chunk).fetchall())
        return found

    def indexed_count(self) -> int:
        """How many objects the index knows."""
        return int(self._connections.reader().execute(f"SELECT COUNT(*) FROM {_OBJECTS}").fetchone()[0])

    def put_spec(self, fingerprint: str, description: dict[str, Any]) -> None:
        """Record what a spec fingerprint stands for (for ``info`` and ``clear --spec``)."""
        key = _SPEC + fingerprint
        if key not in self._cache:
            self._cache.set(key, json.dumps(description).encode())

    def specs(self) -> dict[str, dict[str, Any]]:
        """Every recorded spec description, by fingerprint."""
        return {k.removeprefix(_SPEC): json.loads(self._cache[k])
                for k in self._cache.iterkeys() if k.startswith(_SPEC)}

    def delete_spec(self, fingerprint: str) -> bool:
        """Forget a spec description."""
        return bool(self._cache.delete(_SPEC + fingerprint))

    def close(self) -> None:
        """Close the database."""
        self._connections.close()
        self._cache.close()
