"""An in-memory implementation of s3cache's own ``Source`` protocol, for loader unit tests.

It is an honest implementation of our interface (it reads from a dict and counts what it did), not a
patch of boto or s3fs: every claim about S3 itself is proven against the local endpoint instead.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import threading
from collections import Counter
from collections.abc import Sequence

from s3cache.errors import ObjectNotFoundError
from s3cache.items import Item
from s3cache.source import Payload, SourceCounters
from s3cache.urls import is_image_key, prefix_of, split_url


def etag_of(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


class MemorySource:
    """Objects held in a dict ``{(bucket, key): bytes}``; reads run on a small thread pool.

    Args:
        objects: The objects.
        gate: When given, every read waits for this event first (to hold reads in flight).
    """

    def __init__(self, objects: dict[tuple[str, str], bytes], gate: threading.Event | None = None) -> None:
        self.objects = dict(objects)
        self.gate = gate
        self.reads: Counter[str] = Counter()
        self._counters = SourceCounters()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4)

    @property
    def counters(self) -> SourceCounters:
        return self._counters

    def list_objects(self, url: str) -> list[Item]:
        bucket, prefix = prefix_of(url)
        self._counters.add(requests=1)
        return sorted((Item(b, k, etag_of(data), len(data)) for (b, k), data in self.objects.items()
                       if b == bucket and k.startswith(prefix)), key=lambda i: i.key)

    def list_prefix(self, url: str) -> list[Item]:
        return [item for item in self.list_objects(url) if is_image_key(item.key)]

    def resolve_urls(self, urls: Sequence[str]) -> list[Item]:
        items = []
        for url in urls:
            bucket, key = split_url(url)
            self._counters.add(requests=1)
            if (bucket, key) not in self.objects:
                raise ObjectNotFoundError(f"{url}: no such object")
            data = self.objects[bucket, key]
            items.append(Item(bucket, key, etag_of(data), len(data)))
        return items

    def read(self, item: Item) -> concurrent.futures.Future[Payload]:
        return self._pool.submit(self._read, item)

    def _read(self, item: Item) -> Payload:
        if self.gate is not None:
            self.gate.wait(timeout=30)
        self._counters.add(requests=1)
        self.reads[item.url] += 1
        data = self.objects.get((item.bucket, item.key))
        if data is None:
            raise ObjectNotFoundError(f"{item.url}: no such object")
        etag = etag_of(data)
        if item.offset is not None:
            if item.etag != etag:
                raise ValueError(f"{item.url}: the object changed since it was listed")
            data = data[item.offset:item.offset + item.size]
        self._counters.add(bytes_received=len(data))
        return Payload(data, etag)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
