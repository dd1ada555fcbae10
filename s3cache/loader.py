"""Cache first, the source for misses, write-through; offline mode.

A :class:`Loader` turns items into decoded arrays. Hits come from the
:class:`~s3cache.store.ArrayStore`; misses are read through a :class:`~s3cache.source.Source`
(concurrently), decoded on a small thread pool (Pillow releases the GIL) and written to the store
as they arrive. :meth:`Loader.prefetch` starts the misses of batches the caller will need soon, so
S3 round trips overlap with training. Without a source the loader is offline: a miss is an error
that names the items.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from s3cache import codec
from s3cache.errors import DecodeError, NotCachedError
from s3cache.items import Item
from s3cache.keys import cache_key
from s3cache.source import Payload, Source
from s3cache.spec import ImageSpec
from s3cache.store import ArrayStore

Entry = np.ndarray | codec.Failure
Reading = concurrent.futures.Future[Entry]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FillProgress:
    """One item handled by :meth:`Loader.fill`."""

    item: Item
    hit: bool
    failed: bool


class Loader:
    """Serves decoded arrays for items through the cache.

    Args:
        spec: How images are decoded and resized.
        store: The array store.
        source: Where misses are read from; ``None`` means offline.
        on_error: ``"raise"`` or ``"skip"`` for items that cannot be decoded.
        decode_workers: Threads decoding fetched images (default: CPU count, at most 8).
    """

    def __init__(
        self,
        spec: ImageSpec,
        store: ArrayStore,
        source: Source | None,
        *,
        on_error: str = "raise",
        decode_workers: int | None = None,
    ) -> None:
        self.spec = spec
        self.store = store
        self.source = source
        self.on_error = on_error
        self._fingerprint = spec.fingerprint
        self._decode_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=decode_workers or min(8, os.cpu_count() or 1), thread_name_prefix="s3cache-decode"
        )
        self._pending: dict[str, concurrent.futures.Future[Entry]] = {}
        self._lock = threading.RLock()  # _start counts misses while callers hold it
        self._counts = {"hits": 0, "misses": 0, "skipped": 0}

    @property
    def offline(self) -> bool:
        """Whether misses are errors instead of S3 requests."""
        return self.source is None

    def key(self, item: Item, etag: str | None = None) -> str:
        """The store key of an item's array under this loader's spec."""
        return cache_key(self._fingerprint, item, etag)

    @property
    def stats(self) -> dict[str, int]:
        """Counters: cache hits and misses, skipped items, S3 requests, bytes and retries."""
        with self._lock:
            counts = dict(self._counts)
        if self.source is None:
            return counts | {"s3_requests": 0, "s3_bytes": 0, "retries": 0}
        return counts | self.source.counters.as_dict()

    # -- serving batches --------------------------------------------------------------------------

    def load(self, items: Sequence[Item]) -> list[np.ndarray | None]:
        """Arrays for the items, in order; ``None`` marks an item skipped by ``on_error="skip"``.

        Raises:
            NotCachedError: Offline, and some items are not cached.
            DecodeError: An item cannot be decoded and ``on_error="raise"``.
            S3CacheError: S3 failed for a miss (see :mod:`s3cache.errors`).
        """
        keys = [self.key(item) for item in items]
        with self._lock:
            waiting = {i: future for i, key in enumerate(keys) if (future := self._pending.pop(key, None))}
        entries: list[Entry | None] = [None] * len(items)
        stored = [i for i in range(len(items)) if i not in waiting]
        for index, entry in zip(stored, self.store.get_many([keys[i] for i in stored]), strict=True):
            entries[index] = entry
        missing = [i for i in stored if entries[i] is None]
        self._count("hits", len(stored) - len(missing))
        if missing:
            if self.source is None:
                raise NotCachedError.for_objects([items[i].url for i in missing])
            waiting.update(self._start_or_join({i: keys[i] for i in missing}, items))
        for index, future in waiting.items():
            entries[index] = future.result()
        with self._lock:
            for index in missing:
                if self._pending.get(keys[index]) is waiting[index]:
                    del self._pending[keys[index]]
        return [self._resolve(item, entry) for item, entry in zip(items, entries, strict=True)]

    def prefetch(self, items: Iterable[Item]) -> None:
        """Start reading the items that are neither cached nor already in flight."""
        if self.source is None:
            return
        with self._lock:
            wanted = {key: item for item in items if (key := self.key(item)) not in self._pending}
        cached = self.store.existing(list(wanted))
        with self._lock:
            # Decided and registered in one step: a load() on another thread either finds the read
            # pending or has started its own, never both.
            todo = {key: item for key, item in wanted.items() if key not in cached and key not in self._pending}
            self._pending.update(zip(todo, self._start(list(todo.values())), strict=True))

    def drop_prefetched(self) -> None:
        """Forget finished read-ahead results nobody asked for (their arrays are in the store)."""
        with self._lock:
            self._pending = {key: f for key, f in self._pending.items() if not f.done()}

    def fill(
        self,
        items: Sequence[Item],
        progress: Callable[[FillProgress], None] | None = None,
        window: int = 256,
    ) -> None:
        """Make sure every item is cached, reading at most ``window`` items ahead.

        Cached entries are read and checked, so damaged ones are fetched again. Decode failures
        are stored as failure records and reported through ``progress``; they do not stop the
        fill. Interrupting it (Ctrl-C) cancels what is queued; every entry stored so far stays
        valid.
        """
        todo = self._uncached(items, progress, window)
        if todo and self.source is None:
            raise NotCachedError.for_objects([item.url for item in todo])
        in_flight: dict[concurrent.futures.Future[Entry], Item] = {}
        queue = iter(todo)
        try:
            while True:
                for item in queue:
                    in_flight.update(zip(self._start([item]), [item], strict=True))
                    if len(in_flight) >= window:
                        break
                if not in_flight:
                    return
                done, _ = concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    item = in_flight.pop(future)
                    failed = isinstance(future.result(), codec.Failure)
                    if progress:
                        progress(FillProgress(item, hit=False, failed=failed))
        finally:
            for future in in_flight:
                future.cancel()

    def close(self) -> None:
        """Stop the decode threads and write back recency."""
        self._decode_pool.shutdown(wait=True, cancel_futures=True)
        self.store.recency.flush()

    # -- internals --------------------------------------------------------------------------------

    def _uncached(self, items: Sequence[Item], progress: Callable[[FillProgress], None] | None,
                  window: int) -> list[Item]:
        """The items without a valid entry; reading (not just probing) entries finds damaged ones."""
        todo: list[Item] = []
        for start in range(0, len(items), window):
            chunk = items[start:start + window]
            for item, entry in zip(chunk, self.store.get_many([self.key(i) for i in chunk]), strict=True):
                if entry is None:
                    todo.append(item)
                elif progress:
                    progress(FillProgress(item, hit=True, failed=False))
        self._count("hits", len(items) - len(todo))
        return todo

    def _count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] += amount

    def _start_or_join(self, keys: dict[int, str], items: Sequence[Item]) -> dict[int, Reading]:
        """Reads of the items at the given positions: joined if a read-ahead started them, else started now.

        Started reads are registered as pending (the caller removes them once served), so a read-ahead
        on another thread joins them instead of reading the same item again.
        """
        with self._lock:
            joined = {i: future for i, key in keys.items() if (future := self._pending.get(key))}
            fresh = [i for i in keys if i not in joined]
            started = dict(zip(fresh, self._start([items[i] for i in fresh]), strict=True))
            self._pending.update((keys[i], future) for i, future in started.items())
        return joined | started

    def _start(self, items: Sequence[Item]) -> list[concurrent.futures.Future[Entry]]:
        assert self.source is not None
        self._count("misses", len(items))
        return [self._read_then_decode(item) for item in items]

    def _read_then_decode(self, item: Item) -> concurrent.futures.Future[Entry]:
        """Read an item through the source, then decode and store it on the decode pool."""
        assert self.source is not None
        reading = self.source.read(item)
        result: concurrent.futures.Future[Entry] = concurrent.futures.Future()
        # Cancelling the result (a fill interrupted) cancels the read as well.
        result.add_done_callback(lambda done: reading.cancel() if done.cancelled() else None)

        def on_read(read: concurrent.futures.Future[Payload]) -> None:
            if read.cancelled():
                result.cancel()
            elif (error := read.exception()) is not None:
                _fail(result, error)
            else:
                try:
                    decoding = self._decode_pool.submit(self._decode_and_store, item, read.result())
                except RuntimeError as exc:  # the pool was shut down: the loader is closing
                    _fail(result, exc)
                    return
                decoding.add_done_callback(lambda done: _forward(done, result))

        reading.add_done_callback(on_read)
        return result

    def _decode_and_store(self, item: Item, payload: Payload) -> Entry:
        entry: Entry
        try:
            entry = self.spec.decode(payload.data, item.url)
            encoded = codec.encode_array(entry)
        except DecodeError as exc:
            entry = codec.Failure(str(exc))
            encoded = codec.encode_failure(entry.message)
            log.info("cannot decode %s: %s", item.url, exc)
        # Keyed by the ETag actually read: if the object changed since listing, this is its new version.
        self.store.put(self.key(item, payload.etag), encoded, tag=self._fingerprint)
        self.store.cull()
        return entry

    def _resolve(self, item: Item, entry: Entry | None) -> np.ndarray | None:
        if not isinstance(entry, codec.Failure):
            return entry
        if self.on_error == "raise":
            raise DecodeError(entry.message)
        self._count("skipped")
        warnings.warn(f"skipping {item.url}: {entry.message}", stacklevel=3)
        return None


def _fail(result: concurrent.futures.Future[Entry], error: BaseException) -> None:
    """Fail ``result``, unless the caller cancelled it meanwhile."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        result.set_exception(error)


def _forward(done: concurrent.futures.Future[Entry], result: concurrent.futures.Future[Entry]) -> None:
    """Give ``result`` the outcome of ``done``, unless the caller cancelled it meanwhile."""
    if done.cancelled():
        result.cancel()
    elif (error := done.exception()) is not None:
        _fail(result, error)
    else:
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            result.set_result(done.result())
