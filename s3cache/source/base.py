"""The contract between the loader and wherever image bytes come from."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from s3cache.items import Item

# Limits shared by the loader, the S3 source and CacheConfig (here, so that config imports nothing heavy).
DEFAULT_MAX_OBJECT_SIZE = 64 * 2**20
"""Objects listed larger than this are refused before any request (``on_error`` decides what follows)."""
DEFAULT_BYTES_IN_FLIGHT = 256 * 2**20
"""Listed bytes of the objects being fetched and decoded at once, per loader."""
DEFAULT_FETCH_TIMEOUT = 60.0
"""Seconds each attempt at fetching an object may take, plus its size at :data:`DEFAULT_MIN_RATE`."""
DEFAULT_MIN_RATE = 2**20
"""Bytes per second an object's body must arrive at, at least, to meet its deadline."""


@dataclass(frozen=True)
class Payload:
    """The bytes of one item and the version (ETag) they were read from."""

    data: bytes
    etag: str


class SourceCounters:
    """Requests, bytes and retries of a source, safe to update from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.bytes_received = 0
        self.retries = 0

    def add(self, *, requests: int = 0, bytes_received: int = 0, retries: int = 0) -> None:
        """Add to the counters."""
        with self._lock:
            self.requests += requests
            self.bytes_received += bytes_received
            self.retries += retries

    def as_dict(self) -> dict[str, int]:
        """The counters as ``s3_requests``, ``s3_bytes`` and ``retries``."""
        with self._lock:
            return {"s3_requests": self.requests, "s3_bytes": self.bytes_received, "retries": self.retries}


class Source(Protocol):
    """Lists and reads images.

    Implementations are used from several threads at once; :meth:`read` must not block the caller.
    """

    @property
    def counters(self) -> SourceCounters:
        """What this source has done so far."""
        ...

    def list_objects(self, url: str) -> list[Item]:
        """Every object under a prefix URL (a folder), in key order."""
        ...

    def resolve_urls(self, urls: Sequence[str]) -> list[Item]:
        """The items that a list of image URLs names, in the list's order."""
        ...

    def read(self, item: Item) -> concurrent.futures.Future[Payload]:
        """Start reading one item's bytes; the future holds them, or the error naming the item."""
        ...

    def close(self) -> None:
        """Release connections and threads."""
        ...
