"""Metadata of a cache: stored listings and the descriptions of spec fingerprints. Never evicted."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from s3cache.store.disk import open_diskcache

_LISTING = "listing/"
_SPEC = "spec/"


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
        self._cache.close()
