"""Cache first, the source for misses, write-through; offline mode.

A :class:`Loader` turns items into decoded arrays. Hits come from the
:class:`~s3cache.store.ArrayStore`, one query per batch; misses go to a
:class:`~s3cache.fetcher.Fetcher`, which reads them through the source (concurrently, within a
byte budget, once across processes sharing the cache), decodes them and writes them to the store.
:meth:`Loader.prefetch` starts the misses of batches the caller will need soon, so S3 round trips
overlap with training. Without a source the loader is offline: a miss is an error that names the
items.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import threading
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from s3cache import codec
from s3cache.decoders import Decoder
from s3cache.errors import DecodeError, NotCachedError, ObjectTooLargeError
from s3cache.fetcher import DEFAULT_CLAIM_WAIT, Entry, Fetcher, FetchResult, Refused
from s3cache.items import Item
from s3cache.source import DEFAULT_BYTES_IN_FLIGHT, DEFAULT_MAX_OBJECT_SIZE, Source
from s3cache.source.ledger import FetchLedger
from s3cache.spec import ImageSpec
from s3cache.store import ArrayStore

_Reading = concurrent.futures.Future[FetchResult]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FillProgress:
    """One item handled by :meth:`Loader.fill`.

    ``hit`` means this process did not read it from S3 (it was cached, or another process sharing
    the cache fetched it meanwhile); ``failed`` that it cannot be served (undecodable, or refused
    as larger than ``max_object_size``).
    """

    item: Item
    hit: bool
    failed: bool


class Loader:
    """Serves decoded arrays for items through the cache.

    Args:
        spec: How images are decoded and resized.
        store: The array store.
        source: Where misses are read from; ``None`` means offline.
        on_error: ``"raise"`` or ``"skip"`` for items that cannot be decoded or are refused for their size.
        decode_workers: Threads decoding fetched images (default:
            :func:`~s3cache.fetcher.default_decode_workers`).
        decoder: ``"auto"``, ``"numpy"``, ``"tensorflow"`` (default ``$S3CACHE_DECODER``, else ``"auto"``)
            or a :class:`~s3cache.decoders.Decoder`: see :func:`s3cache.decoders.open_decoder`.
        max_object_size: Objects listed larger than this many bytes are refused without a request
            (:class:`~s3cache.errors.ObjectTooLargeError`); ``None`` accepts any size. A cached entry
            is served whatever its object's size.
        max_bytes_in_flight: Most listed bytes of objects being read or decoded at once; reads past
            it wait. An object larger than this is read alone.
        ledger: The cache directory's fetch ledger: ``True`` opens the one beside ``store`` (in its
            parent directory), ``False`` or ``None`` fetches without coordination.
        claim_wait: Seconds to wait for an object claimed by another live process before fetching it here.
    """

    def __init__(
        self,
        spec: ImageSpec,
        store: ArrayStore,
        source: Source | None,
        *,
        on_error: str = "raise",
        decode_workers: int | None = None,
        decoder: str | Decoder | None = None,
        max_object_size: int | None = DEFAULT_MAX_OBJECT_SIZE,
        max_bytes_in_flight: int = DEFAULT_BYTES_IN_FLIGHT,
        ledger: FetchLedger | bool | None = True,
        claim_wait: float = DEFAULT_CLAIM_WAIT,
    ) -> None:
        self.spec = spec
        self.store = store
        self.source = source
        self.on_error = on_error
        self._fetcher = Fetcher(spec, store, source, decode_workers=decode_workers, decoder=decoder,
                                max_object_size=max_object_size, max_bytes_in_flight=max_bytes_in_flight,
                                ledger=ledger, claim_wait=claim_wait)
        self._pending: dict[str, _Reading] = {}
        self._unserved: set[str] = set()  # keys read ahead by this process and dropped before being served
        self._serving: dict[str, int] = {}  # keys whose reads a load() waits for, and how many loads wait
        self._lock = threading.Lock()
        self._counts = {"hits": 0, "misses": 0, "shared": 0, "skipped": 0}

    @property
    def ledger(self) -> FetchLedger | None:
        """The cache directory's fetch ledger, through which processes sharing it fetch each item once."""
        return self._fetcher.ledger

    @property
    def decoder(self) -> str:
        """The decoder this loader's misses go through: ``"numpy"`` or ``"tensorflow"``."""
        return self._fetcher.decoder

    @property
    def offline(self) -> bool:
        """Whether misses are errors instead of S3 requests."""
        return self.source is None

    def key(self, item: Item, etag: str | None = None) -> str:
        """The store key of an item's array under this loader's spec."""
        return self._fetcher.key(item, etag)

    @property
    def stats(self) -> dict[str, int]:
        """Counters: hits, misses, shared, skipped, S3 requests, bytes and retries.

        Counted when an item is served, so that ``hits + misses + shared`` is the number of items
        served: ``misses`` were read from S3 by this process (perhaps ahead of time), ``shared`` by
        another process sharing the cache while this one waited for them.
        """
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
            DecodeError: An item cannot be decoded (or, as :class:`~s3cache.errors.ObjectTooLargeError`,
                is too large) and ``on_error="raise"``.
            S3CacheError: S3 failed for a miss (see :mod:`s3cache.errors`).
        """
        return self.load_with_hits(items)[0]

    def load_with_hits(self, items: Sequence[Item]) -> tuple[list[np.ndarray | None], list[bool]]:
        """As :meth:`load`, and for each item whether the store held its entry when the batch looked it up."""
        keys = [self._fetcher.lookup_key(item) for item in items]
        with self._lock:
            # Reads in flight stay pending while this batch waits for them, so that no other thread starts
            # them again before their entries are stored.
            waiting = {i: future for i, key in enumerate(keys) if (future := self._pending.get(key))}
            marked = [keys[i] for i in waiting]  # keys whose reads this load waits for (see drop_prefetched)
            self._mark_serving(marked)
        try:
            entries, fetch = self._lookup(items, keys, waiting)
            if fetch:
                if self.source is None:
                    raise NotCachedError.for_objects([items[i].url for i in fetch])
                started, filled = self._start_or_join({i: keys[i] for i in fetch}, items)
                marked += [keys[i] for i in started]
                waiting.update(started)
                for index, entry in filled.items():
                    entries[index] = entry
            results = {index: future.result() for index, future in waiting.items()}
        finally:  # served or failed: a later batch must start afresh, not join a failed read
            with self._lock:
                for index, future in waiting.items():
                    if self._pending.get(keys[index]) is future:
                        del self._pending[keys[index]]
                self._unmark_serving(marked)
        held = [entry is not None for entry in entries]
        for index, result in results.items():
            entries[index] = result.entry
        self._count_served(results.values())
        return [self._resolve(item, entry) for item, entry in zip(items, entries, strict=True)], held

    def _lookup(self, items: Sequence[Item], keys: Sequence[str],
                waiting: dict[int, _Reading]) -> tuple[list[Entry | None], list[int]]:
        """Entries of the items not waited for, from the store (hits counted), and the positions to fetch."""
        entries: list[Entry | None] = [None] * len(items)
        stored = [i for i in range(len(items)) if i not in waiting]
        for index, entry in zip(stored, self._fetcher.get_many([keys[i] for i in stored]), strict=True):
            entries[index] = entry
        missing = [i for i in stored if entries[i] is None]
        with self._lock:
            # Read ahead, then dropped before it was served (an epoch ended): a miss of the batch serving it.
            early = [keys[i] for i in stored if entries[i] is not None and keys[i] in self._unserved]
            self._unserved.difference_update(early)
            self._counts["misses"] += len(early)
            self._counts["hits"] += len(stored) - len(missing) - len(early)
        fetch = []
        for i in missing:
            if self._fetcher.too_large(items[i]):
                entries[i] = self._fetcher.refuse(items[i])
            else:
                fetch.append(i)
        return entries, fetch

    def prefetch(self, items: Iterable[Item]) -> None:
        """Start reading the items that are neither cached nor already in flight (nor refused for size)."""
        if self.source is None:
            return
        with self._lock:
            wanted = {key: item for item in items if (key := self._fetcher.lookup_key(item)) not in self._pending}
        if not wanted:  # a warm epoch: the dataset asks for nothing it saw held
            return
        cached = self.store.existing(list(wanted))
        with self._lock:
            # Decided and registered in one step: a load() on another thread either finds the read
            # pending or has started its own, never both.
            todo = {key: item for key, item in wanted.items()
                    if key not in cached and key not in self._pending and not self._fetcher.too_large(item)}
            self._pending.update(zip(todo, self._fetcher.start(list(todo.values()), list(todo)), strict=True))

    def drop_prefetched(self) -> None:
        """Forget finished read-ahead results nobody asked for (their arrays are in the store).

        Their keys are remembered, so that serving them later from the store counts as the miss it was.
        A result a load is waiting for is that load's to count, not a dropped one.
        """
        with self._lock:
            done = {key for key, f in self._pending.items() if f.done() and key not in self._serving}
            self._unserved.update(key for key in done if _fetched_here(self._pending[key]))
            self._pending = {key: f for key, f in self._pending.items() if key not in done}

    def fill(
        self,
        items: Sequence[Item],
        progress: Callable[[FillProgress], None] | None = None,
        window: int = 256,
    ) -> None:
        """Make sure every item is cached, reading at most ``window`` items ahead.

        Cached entries are read and checked, so damaged ones are fetched again. Decode failures
        are stored as failure records and reported through ``progress``, as are objects refused for
        their size (not stored); neither stops the fill. Interrupting it (Ctrl-C) cancels what is
        queued; every entry stored so far stays valid.
        """
        todo = []
        for item in self._uncached(items, progress, window):
            if self._fetcher.too_large(item):
                self._fetcher.refuse(item)
                if progress:
                    progress(FillProgress(item, hit=False, failed=True))
            else:
                todo.append(item)
        if todo and self.source is None:
            raise NotCachedError.for_objects([item.url for item in todo])
        in_flight: dict[concurrent.futures.Future[FetchResult], Item] = {}
        queue = iter(todo)
        try:
            while True:
                chunk = list(itertools.islice(queue, window - len(in_flight)))
                if chunk:
                    started = self._fetcher.start(chunk, [self._fetcher.lookup_key(i) for i in chunk])
                    in_flight.update(zip(started, chunk, strict=True))
                if not in_flight:
                    return
                done, _ = concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    item = in_flight.pop(future)
                    result = future.result()
                    self._count_served([result])
                    if progress:
                        progress(FillProgress(item, hit=not result.fetched,
                                              failed=isinstance(result.entry, codec.Failure)))
        finally:
            for future in in_flight:
                future.cancel()

    def close(self) -> None:
        """Stop the decode and waiting threads, give up claims, and write back recency."""
        self._fetcher.close()
        self.store.recency.flush()

    # -- internals --------------------------------------------------------------------------------

    def _uncached(self, items: Sequence[Item], progress: Callable[[FillProgress], None] | None,
                  window: int) -> list[Item]:
        """The items without a valid entry; reading (not just probing) entries finds damaged ones."""
        todo: list[Item] = []
        for start in range(0, len(items), window):
            chunk = items[start:start + window]
            entries = self._fetcher.get_many([self._fetcher.lookup_key(i) for i in chunk])
            for item, entry in zip(chunk, entries, strict=True):
                if entry is None:
                    todo.append(item)
                elif progress:
                    progress(FillProgress(item, hit=True, failed=False))
        self._count("hits", len(items) - len(todo))
        return todo

    def _count_served(self, results: Iterable[FetchResult]) -> None:
        """Count items served by a fetch: a miss this process read, or one another process read (shared)."""
        fetched = [result.fetched for result in results]
        with self._lock:
            self._counts["misses"] += sum(fetched)
            self._counts["shared"] += len(fetched) - sum(fetched)

    def _count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] += amount

    def _start_or_join(self, keys: dict[int, str],
                       items: Sequence[Item]) -> tuple[dict[int, _Reading], dict[int, Entry]]:
        """Reads of the items at the given positions: joined if a read-ahead started them, else started now.

        Started reads are registered as pending (the caller removes them once served), so a read-ahead
        on another thread joins them instead of reading the same item again. An item another thread's
        read-ahead stored since the caller looked (and whose read is no longer pending) is read from the
        store instead, and returned apart.
        """
        with self._lock:
            joined = {i: future for i, key in keys.items() if (future := self._pending.get(key))}
            fresh = [i for i in keys if i not in joined]
            found = self._fetcher.get_many([keys[i] for i in fresh]) if fresh else []
            filled = {i: entry for i, entry in zip(fresh, found, strict=True) if entry is not None}
            early = [keys[i] for i in filled if keys[i] in self._unserved]
            self._unserved.difference_update(early)
            self._counts["misses"] += len(early)
            self._counts["hits"] += len(filled) - len(early)
            fresh = [i for i in fresh if i not in filled]
            started = self._fetcher.start([items[i] for i in fresh], [keys[i] for i in fresh])
            self._pending.update((keys[i], future) for i, future in zip(fresh, started, strict=True))
            self._mark_serving([keys[i] for i in joined] + [keys[i] for i in fresh])
        return joined | dict(zip(fresh, started, strict=True)), filled

    def _mark_serving(self, keys: Iterable[str]) -> None:
        """Note that a load waits for these keys' reads (call with the lock held)."""
        for key in keys:
            self._serving[key] = self._serving.get(key, 0) + 1

    def _unmark_serving(self, keys: Iterable[str]) -> None:
        """Note that a load no longer waits for these keys' reads (call with the lock held)."""
        for key in keys:
            if key in self._serving:
                self._serving[key] -= 1
                if not self._serving[key]:
                    del self._serving[key]

    def _resolve(self, item: Item, entry: Entry | None) -> np.ndarray | None:
        if not isinstance(entry, codec.Failure):
            return entry
        if self.on_error == "raise":
            raise (ObjectTooLargeError if isinstance(entry, Refused) else DecodeError)(entry.message)
        self._count("skipped")
        log.info("skipping %s: %s", item.url, entry.message)
        warnings.warn(f"skipping {item.url}: {entry.message}", stacklevel=3)
        return None


def _fetched_here(future: _Reading) -> bool:
    """Whether a finished read-ahead read its item from S3 in this process."""
    return not future.cancelled() and future.exception() is None and future.result().fetched
