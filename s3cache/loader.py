"""Cache first, S3 for misses, write-through; offline mode (for listings and arrays alike).

A :class:`Loader` turns listed objects into decoded arrays. Hits come from the
:class:`~s3cache.store.ArrayStore`; misses are fetched concurrently on the S3 event loop,
decoded on a small thread pool (Pillow releases the GIL) and written to the store as
they arrive. :meth:`Loader.prefetch` starts the misses of batches the caller will need
soon, so S3 round trips overlap with training. Without a source the loader is offline:
a miss is an error that names the objects.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from s3cache import codec
from s3cache.errors import DecodeError, EmptyListingError, NotCachedError
from s3cache.source import DEFAULT_CONCURRENCY, S3Object, S3Source
from s3cache.spec import ImageSpec
from s3cache.store import ArrayStore

Entry = np.ndarray | codec.Failure
ON_ERROR_CHOICES = ("raise", "skip")


@dataclass(frozen=True)
class FillProgress:
    """One object handled by :meth:`Loader.fill`."""

    obj: S3Object
    hit: bool
    failed: bool


class Loader:
    """Serves decoded arrays for listed objects through the cache.

    Args:
        spec: How images are decoded and resized.
        store: The array store.
        source: Where misses are fetched from; ``None`` means offline.
        on_error: ``"raise"`` or ``"skip"`` for objects that cannot be decoded.
        decode_workers: Threads decoding fetched images (default: CPU count, at most 8).
    """

    def __init__(
        self,
        spec: ImageSpec,
        store: ArrayStore,
        source: S3Source | None,
        *,
        on_error: str = "raise",
        decode_workers: int | None = None,
    ) -> None:
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
        self.spec = spec
        self.store = store
        self.source = source
        self.on_error = on_error
        self._fingerprint = spec.fingerprint
        self._decode_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=decode_workers or min(8, os.cpu_count() or 1), thread_name_prefix="s3cache-decode"
        )
        self._pending: dict[str, concurrent.futures.Future[Entry]] = {}
        self._lock = threading.Lock()
        self._counts = {"hits": 0, "misses": 0, "skipped": 0}
        store.put_spec(self._fingerprint, spec.to_dict())

    @property
    def offline(self) -> bool:
        """Whether misses are errors instead of S3 requests."""
        return self.source is None

    def cache_key(self, obj: S3Object, etag: str | None = None) -> str:
        """The store key of an object's array under this loader's spec."""
        return f"{self._fingerprint}/{etag or obj.etag}/{obj.bucket}/{obj.key}"

    @property
    def stats(self) -> dict[str, int]:
        """Counters: cache hits and misses, skipped objects, S3 requests, bytes and retries."""
        source = self.source
        return dict(self._counts) | {
            "s3_requests": source.requests if source else 0,
            "s3_bytes": source.bytes_received if source else 0,
            "retries": source.retries if source else 0,
        }

    # -- serving batches --------------------------------------------------------------------------

    def load(self, objects: Sequence[S3Object]) -> list[np.ndarray | None]:
        """Arrays for the objects, in order; ``None`` marks an object skipped by ``on_error="skip"``.

        Raises:
            NotCachedError: Offline, and some objects are not cached.
            DecodeError: An object cannot be decoded and ``on_error="raise"``.
            S3CacheError: S3 failed for a miss (see :mod:`s3cache.errors`).
        """
        keys = [self.cache_key(obj) for obj in objects]
        with self._lock:
            waiting = {i: future for i, key in enumerate(keys) if (future := self._pending.pop(key, None))}
        entries: list[Entry | None] = [None] * len(objects)
        stored = [i for i in range(len(objects)) if i not in waiting]
        for index, entry in zip(stored, self.store.get_many([keys[i] for i in stored]), strict=True):
            entries[index] = entry
        missing = [i for i in stored if entries[i] is None]
        self._count("hits", len(stored) - len(missing))
        if missing:
            if self.source is None:
                raise NotCachedError.for_objects([objects[i].url for i in missing])
            waiting.update(zip(missing, self._start([objects[i] for i in missing]), strict=True))
        for index, future in waiting.items():
            entries[index] = future.result()
        return [self._resolve(obj, entry) for obj, entry in zip(objects, entries, strict=True)]

    def prefetch(self, objects: Iterable[S3Object]) -> None:
        """Start fetching the objects that are neither cached nor already in flight."""
        if self.source is None:
            return
        with self._lock:
            wanted = {key: obj for obj in objects if (key := self.cache_key(obj)) not in self._pending}
        cached = self.store.existing(list(wanted))
        todo = {key: obj for key, obj in wanted.items() if key not in cached}
        futures = self._start(list(todo.values()))
        with self._lock:
            self._pending.update(zip(todo, futures, strict=True))

    def drop_prefetched(self) -> None:
        """Forget finished read-ahead results nobody asked for (their arrays are in the store)."""
        with self._lock:
            self._pending = {key: f for key, f in self._pending.items() if not f.done()}

    def fill(
        self,
        objects: Sequence[S3Object],
        progress: Callable[[FillProgress], None] | None = None,
        window: int = 256,
    ) -> None:
        """Make sure every object is cached, fetching at most ``window`` objects ahead.

        Cached entries are read and checked, so damaged ones are fetched again. Decode failures
        are stored as failure records and reported through ``progress``; they do not stop the
        fill. Interrupting it (Ctrl-C) cancels what is queued; every entry stored so far stays
        valid.
        """
        todo: list[S3Object] = []
        for start in range(0, len(objects), window):
            # Reading (not just probing) the entries finds damaged ones, which are then fetched again.
            chunk = objects[start:start + window]
            for obj, entry in zip(chunk, self.store.get_many([self.cache_key(o) for o in chunk]), strict=True):
                if entry is None:
                    todo.append(obj)
                elif progress:
                    progress(FillProgress(obj, hit=True, failed=False))
        self._count("hits", len(objects) - len(todo))
        if todo and self.source is None:
            raise NotCachedError.for_objects([obj.url for obj in todo])
        in_flight: dict[concurrent.futures.Future[Entry], S3Object] = {}
        queue = iter(todo)
        try:
            while True:
                for obj in queue:
                    in_flight.update(zip(self._start([obj]), [obj], strict=True))
                    if len(in_flight) >= window:
                        break
                if not in_flight:
                    return
                done, _ = concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    obj = in_flight.pop(future)
                    failed = isinstance(future.result(), codec.Failure)
                    if progress:
                        progress(FillProgress(obj, hit=False, failed=failed))
        finally:
            for future in in_flight:
                future.cancel()

    def close(self) -> None:
        """Stop the decode threads and flush recency to the store."""
        self._decode_pool.shutdown(wait=True, cancel_futures=True)
        self.store.flush_touches()

    # -- internals --------------------------------------------------------------------------------

    def _count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] += amount

    def _start(self, objects: Sequence[S3Object]) -> list[concurrent.futures.Future[Entry]]:
        assert self.source is not None
        self._count("misses", len(objects))
        return [self.source.submit(self._fetch(obj)) for obj in objects]

    async def _fetch(self, obj: S3Object) -> Entry:
        assert self.source is not None
        data, etag = await self.source.get(obj)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._decode_pool, self._decode_and_store, obj, etag, data)

    def _decode_and_store(self, obj: S3Object, etag: str, data: bytes) -> Entry:
        entry: Entry
        try:
            entry = self.spec.decode(data, obj.url)
            encoded = codec.encode_array(entry)
        except DecodeError as exc:
            entry = codec.Failure(str(exc))
            encoded = codec.encode_failure(entry.message)
        # Keyed by the ETag actually read: if the object changed since listing, this is its new version.
        self.store.put(self.cache_key(obj, etag), encoded, tag=self._fingerprint)
        self.store.cull()
        return entry

    def _resolve(self, obj: S3Object, entry: Entry | None) -> np.ndarray | None:
        if not isinstance(entry, codec.Failure):
            return entry
        if self.on_error == "raise":
            raise DecodeError(entry.message)
        self._count("skipped")
        warnings.warn(f"skipping {obj.url}: {entry.message}", stacklevel=3)
        return None


@dataclass(frozen=True)
class CacheConfig:
    """Everything a process needs to open its own store and S3 client.

    Attributes:
        cache_dir: The cache directory.
        size_limit: Size limit of the array store, in bytes.
        storage_options: Options for ``s3fs.S3FileSystem``; ignored offline.
        offline: Never contact S3.
        on_error: ``"raise"`` or ``"skip"`` for undecodable objects.
        concurrency: Most S3 requests in flight per process.
    """

    cache_dir: str
    size_limit: int
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)  # may hold credentials
    offline: bool = False
    on_error: str = "raise"
    concurrency: int = DEFAULT_CONCURRENCY

    def open_loader(self, spec: ImageSpec) -> Loader:
        """Open the store and (unless offline) the S3 source, and build a loader over them."""
        source = None if self.offline else S3Source(self.storage_options, concurrency=self.concurrency)
        return Loader(spec, ArrayStore(self.cache_dir, self.size_limit), source, on_error=self.on_error)


def resolve_objects(directory: str | Sequence[str], store: ArrayStore, source: S3Source | None) -> list[S3Object]:
    """List the objects of a prefix or URL list (and store the listing), or read the stored one offline.

    Raises:
        EmptyListingError: No image objects.
        NotCachedError: Offline and no listing was stored for ``directory``.
    """
    name = listing_name(directory)
    if source is None:
        stored = store.get_listing(name)
        if stored is None:
            raise NotCachedError(f"offline mode: no stored listing for {name}. Run once with offline=False "
                                 "(or `s3cache warm`) to store it.")
        return [S3Object.from_json(row) for row in stored["objects"]]
    if isinstance(directory, str):
        objects = source.list_prefix(directory)
        if not objects:
            raise EmptyListingError(f"no image objects (.jpg .jpeg .png .bmp .gif) under {directory}")
    else:
        if not directory:
            raise EmptyListingError("the list of object URLs is empty")
        objects = source.head_many(list(directory))
    store.put_listing(name, {"url": name, "listed_at": time.time(), "objects": [o.to_json() for o in objects]})
    return objects


def listing_name(directory: str | Sequence[str]) -> str:
    """The name a listing is stored under: the prefix URL, or a digest of a URL list."""
    if isinstance(directory, str):
        return directory
    digest = hashlib.sha256("\n".join(directory).encode()).hexdigest()[:16]
    return f"urls:{digest}"
