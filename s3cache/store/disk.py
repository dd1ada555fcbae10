"""diskcache storage that holds ``str`` keys and ``bytes`` values only, and never unpickles.

diskcache pickles any key or value that is not a plain ``str``/``bytes``/number and marks such rows
``raw = 0``; reading one back unpickles it. A row planted in a cache database could therefore run
code when keys are iterated. :class:`SafeDisk` refuses both directions for keys and values: every
path through diskcache that would (un)pickle raises instead.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import diskcache

from s3cache.errors import CacheError


class UnsafeEntryError(ValueError):
    """A stored key or value is not in a form s3cache writes (it would need unpickling)."""


class SafeDisk(diskcache.Disk):
    """A diskcache ``Disk`` for ``str`` keys and ``bytes`` values that never pickles or unpickles."""

    def put(self, key: Any) -> tuple[Any, bool]:
        """Store keys as SQLite text."""
        if not isinstance(key, str):
            raise TypeError(f"cache keys must be str, got {type(key).__name__}")
        return key, True

    def get(self, key: Any, raw: bool) -> Any:
        """Return a stored key; refuse one stored pickled (``raw = 0``)."""
        if not raw or not isinstance(key, str):
            raise UnsafeEntryError("a cache key is stored pickled; s3cache never writes such keys")
        return key

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> tuple[Any, ...]:
        """Store values as raw bytes (inline in SQLite when small, else in a file)."""
        if read or not isinstance(value, bytes):
            raise TypeError(f"cache values must be bytes, got {type(value).__name__}")
        return super().store(value, read, key=key)

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
        """Refuse any stored mode other than raw bytes (pickle and text modes included)."""
        if mode not in (diskcache.core.MODE_RAW, diskcache.core.MODE_BINARY) or read:
            raise UnsafeEntryError(f"unexpected storage mode {mode} in an s3cache store")
        return super().fetch(mode, filename, value, read)


def open_diskcache(directory: Path, **settings: Any) -> diskcache.Cache:
    """Open a diskcache store with :class:`SafeDisk`.

    Raises:
        CacheError: The store cannot be created or opened.
    """
    try:
        return diskcache.Cache(str(directory), disk=SafeDisk, statistics=False, **settings)
    except (OSError, sqlite3.Error) as exc:
        raise CacheError(
            f"cannot open the cache in {directory.parent}: {exc}. Check that it is a writable directory; "
            "if the cache is damaged, run `s3cache verify --fix`, or delete the directory to reset it "
            "(arrays are fetched from S3 again)."
        ) from exc
