"""Cache first, the source for misses, write-through; offline mode.

A :class:`Loader` turns items into decoded arrays. Hits come from the
:class:`~s3cache.store.ArrayStore`; misses are read through a :class:`~s3cache.source.Source`
(concurrently), decoded on a small thread pool (Pillow releases the GIL) and written to the store
as they arrive. :meth:`Loader.prefetch` starts the misses of batches the caller will need soon, so
S3 round trips overlap with training. Without a source the loader is offline: a miss is an error
that names the items.

What bucket content can do to memory is bounded here: an object listed larger than
``max_object_size`` is refused before any request (skipped or raised like an undecodable one), and
the listed bytes of the objects being read and decoded at once never exceed ``max_bytes_in_flight``
(further reads wait their turn). Processes sharing a cache directory fetch each object once: a
miss is claimed in the directory's :class:`~s3cache.source.ledger.FetchLedger`, and a process that
finds it claimed by a live process waits for the entry instead. An object rewritten between listing
and reading is stored under the version read, and served from there to later epochs (and, through
the ledger, to offline runs over the stored listing).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import itertools
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from s3cache import codec
from s3cache.errors import DecodeError, NotCachedError, ObjectTooLargeError
from s3cache.items import Item
from s3cache.keys import cache_key
from s3cache.source import DEFAULT_BYTES_IN_FLIGHT, DEFAULT_MAX_OBJECT_SIZE, Payload, Source
from s3cache.source.ledger import FetchLedger
from s3cache.spec import ImageSpec
from s3cache.store import ArrayStore

Entry = np.ndarray | codec.Failure

DEFAULT_CLAIM_WAIT = 120.0
"""Seconds a loader waits for an object another live process claimed before fetching it itself."""
_POLL_FIRST, _POLL_MAX = 0.01, 0.25

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


@dataclass(frozen=True)
class _Refused(codec.Failure):
    """An object refused for its size: served like a decode failure, never stored."""


@dataclass(frozen=True)
class _Result:
    """The outcome of one miss: the entry, whether this process read it, and where it was stored."""

    entry: Entry
    fetched: bool
    stored_key: str | None = None


_Reading = concurrent.futures.Future[_Result]


@dataclass
class _Wait:
    """A miss claimed by another process, waited for."""

    item: Item
    result: concurrent.futures.Future[_Result]
    since: float  # time.time() when the wait began
    give_up: float  # time.monotonic() past which this process fetches the item itself


class Loader:
    """Serves decoded arrays for items through the cache.

    Args:
        spec: How images are decoded and resized.
        store: The array store.
        source: Where misses are read from; ``None`` means offline.
        on_error: ``"raise"`` or ``"skip"`` for items that cannot be decoded or are refused for their size.
        decode_workers: Threads decoding fetched images (default: CPU count, at most 8).
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
        max_object_size: int | None = DEFAULT_MAX_OBJECT_SIZE,
        max_bytes_in_flight: int = DEFAULT_BYTES_IN_FLIGHT,
        ledger: FetchLedger | bool | None = True,
        claim_wait: float = DEFAULT_CLAIM_WAIT,
    ) -> None:
        if max_object_size is not None and max_object_size < 1:
            raise ValueError(f"max_object_size must be positive, got {max_object_size}")
        if max_bytes_in_flight < 1:
            raise ValueError(f"max_bytes_in_flight must be positive, got {max_bytes_in_flight}")
        self.spec = spec
        self.store = store
        self.source = source
        self.on_error = on_error
        self.max_object_size = max_object_size
        self.claim_wait = claim_wait
        self._fingerprint = spec.fingerprint
        self._decode_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=decode_workers or min(8, os.cpu_count() or 1), thread_name_prefix="s3cache-decode"
        )
        self._budget = _ByteBudget(max_bytes_in_flight)
        if ledger is True:
            ledger = FetchLedger.in_directory(store.directory.parent, read_only=source is None)
        self.ledger: FetchLedger | None = ledger or None
        self._pending: dict[str, concurrent.futures.Future[_Result]] = {}
        # Listed key -> key of the version actually read, for objects rewritten since listing.
        self._versions: dict[str, str] = {}
        self._waits: dict[str, _Wait] = {}
        self._waiter: threading.Thread | None = None
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.RLock()  # misses are started (and counted) while callers hold it
        self._counts = {"hits": 0, "misses": 0, "skipped": 0, "shared": 0}

    @property
    def offline(self) -> bool:
        """Whether misses are errors instead of S3 requests."""
        return self.source is None

    def key(self, item: Item, etag: str | None = None) -> str:
        """The store key of an item's array under this loader's spec."""
        return cache_key(self._fingerprint, item, etag)

    @property
    def stats(self) -> dict[str, int]:
        """Counters: hits, misses, shared, skipped, S3 requests, bytes and retries.

        ``misses`` are items this process read from S3; ``shared`` items another process sharing the
        cache read while this one waited for them.
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
        keys = [self._key(item) for item in items]
        with self._lock:
            waiting = {i: future for i, key in enumerate(keys) if (future := self._pending.pop(key, None))}
        entries: list[Entry | None] = [None] * len(items)
        stored = [i for i in range(len(items)) if i not in waiting]
        for index, entry in zip(stored, self._get_many([keys[i] for i in stored]), strict=True):
            entries[index] = entry
        missing = [i for i in stored if entries[i] is None]
        self._count("hits", len(stored) - len(missing))
        fetch = []
        for i in missing:
            if self._too_large(items[i]):
                entries[i] = self._refuse(items[i])
            else:
                fetch.append(i)
        if fetch:
            if self.source is None:
                raise NotCachedError.for_objects([items[i].url for i in fetch])
            waiting.update(self._start_or_join({i: keys[i] for i in fetch}, items))
        for index, future in waiting.items():
            entries[index] = future.result().entry
        with self._lock:
            for index in fetch:
                if self._pending.get(keys[index]) is waiting[index]:
                    del self._pending[keys[index]]
        return [self._resolve(item, entry) for item, entry in zip(items, entries, strict=True)]

    def prefetch(self, items: Iterable[Item]) -> None:
        """Start reading the items that are neither cached nor already in flight (nor refused for size)."""
        if self.source is None:
            return
        with self._lock:
            wanted = {key: item for item in items if (key := self._key(item)) not in self._pending}
        cached = self.store.existing(list(wanted))
        with self._lock:
            # Decided and registered in one step: a load() on another thread either finds the read
            # pending or has started its own, never both.
            todo = {key: item for key, item in wanted.items()
                    if key not in cached and key not in self._pending and not self._too_large(item)}
            self._pending.update(zip(todo, self._start(list(todo.values()), list(todo)), strict=True))

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
        are stored as failure records and reported through ``progress``, as are objects refused for
        their size (not stored); neither stops the fill. Interrupting it (Ctrl-C) cancels what is
        queued; every entry stored so far stays valid.
        """
        todo = []
        for item in self._uncached(items, progress, window):
            if self._too_large(item):
                self._refuse(item)
                if progress:
                    progress(FillProgress(item, hit=False, failed=True))
            else:
                todo.append(item)
        if todo and self.source is None:
            raise NotCachedError.for_objects([item.url for item in todo])
        in_flight: dict[concurrent.futures.Future[_Result], Item] = {}
        queue = iter(todo)
        try:
            while True:
                chunk = list(itertools.islice(queue, window - len(in_flight)))
                if chunk:
                    in_flight.update(zip(self._start(chunk, [self._key(i) for i in chunk]), chunk, strict=True))
                if not in_flight:
                    return
                done, _ = concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    item = in_flight.pop(future)
                    result = future.result()
                    if progress:
                        progress(FillProgress(item, hit=not result.fetched,
                                              failed=isinstance(result.entry, codec.Failure)))
        finally:
            for future in in_flight:
                future.cancel()

    def close(self) -> None:
        """Stop the decode and waiting threads, give up claims, and write back recency."""
        self._closed.set()
        self._wake.set()
        if self._waiter is not None and self._waiter is not threading.current_thread():
            self._waiter.join(timeout=5)
        with self._lock:
            waits, self._waits = self._waits, {}
        for wait in waits.values():
            wait.result.cancel()
        self._decode_pool.shutdown(wait=True, cancel_futures=True)
        if self.ledger is not None:
            self.ledger.close()
        self.store.recency.flush()

    # -- internals --------------------------------------------------------------------------------

    def _key(self, item: Item) -> str:
        """The key to look an item up under: the listed version's, or the version this loader read."""
        key = self.key(item)
        return self._versions.get(key, key)

    def _get_many(self, keys: Sequence[str]) -> list[Entry | None]:
        """Entries by key; offline, a miss is also looked up under the version another run read."""
        entries = self.store.get_many(keys)
        if self.source is not None or self.ledger is None or all(e is not None for e in entries):
            return entries
        missing = [key for key, entry in zip(keys, entries, strict=True) if entry is None]
        moved = self.ledger.stored_keys(missing)
        if moved:
            found = dict(zip(moved, self.store.get_many(list(moved.values())), strict=True))
            entries = [found.get(key) if entry is None else entry for key, entry in zip(keys, entries, strict=True)]
        return entries

    def _uncached(self, items: Sequence[Item], progress: Callable[[FillProgress], None] | None,
                  window: int) -> list[Item]:
        """The items without a valid entry; reading (not just probing) entries finds damaged ones."""
        todo: list[Item] = []
        for start in range(0, len(items), window):
            chunk = items[start:start + window]
            for item, entry in zip(chunk, self._get_many([self._key(i) for i in chunk]), strict=True):
                if entry is None:
                    todo.append(item)
                elif progress:
                    progress(FillProgress(item, hit=True, failed=False))
        self._count("hits", len(items) - len(todo))
        return todo

    def _count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] += amount

    def _start_or_join(self, keys: dict[int, str], items: Sequence[Item]) -> dict[int, _Reading]:
        """Reads of the items at the given positions: joined if a read-ahead started them, else started now.

        Started reads are registered as pending (the caller removes them once served), so a read-ahead
        on another thread joins them instead of reading the same item again.
        """
        with self._lock:
            joined = {i: future for i, key in keys.items() if (future := self._pending.get(key))}
            fresh = [i for i in keys if i not in joined]
            started = self._start([items[i] for i in fresh], [keys[i] for i in fresh])
            self._pending.update((keys[i], future) for i, future in zip(fresh, started, strict=True))
        return joined | dict(zip(fresh, started, strict=True))

    def _too_large(self, item: Item) -> bool:
        return self.max_object_size is not None and item.size > self.max_object_size

    def _refuse(self, item: Item) -> _Refused:
        log.info("refusing %s: listed at %d bytes, more than max_object_size (%d bytes)", item.url, item.size,
                 self.max_object_size)
        return _Refused(f"{item.url} is {item.size} bytes, larger than max_object_size ({self.max_object_size} "
                        "bytes); raise max_object_size to read it")

    def _start(self, items: Sequence[Item], keys: Sequence[str]) -> list[concurrent.futures.Future[_Result]]:
        """Start the misses: claim them, then fetch what this process claimed and wait for the rest."""
        assert self.source is not None
        if self.ledger is None or not self.ledger.enabled:
            return [self._fetch(item, key) for item, key in zip(items, keys, strict=True)]
        claimed = self.ledger.claim(keys)
        # Claim, then look: an entry stored by a claimer that finished just before must not be fetched again.
        ours = [key for key in keys if key in claimed]
        already = {key: entry for key, entry in zip(ours, self.store.get_many(ours), strict=True) if entry is not None}
        futures = []
        for item, key in zip(items, keys, strict=True):
            if key in already:
                self.ledger.release(key)
                self._count("shared")
                futures.append(_done(_Result(already[key], fetched=False)))
            elif key in claimed:
                futures.append(self._fetch(item, key))
            else:
                futures.append(self._wait_for(item, key))
        return futures

    def _fetch(self, item: Item, key: str,
               result: concurrent.futures.Future[_Result] | None = None) -> concurrent.futures.Future[_Result]:
        """Read, decode and store an item once its bytes fit the budget; ``result`` receives the outcome."""
        self._count("misses")
        result = result or concurrent.futures.Future()
        if self.ledger is not None:
            ledger = self.ledger

            def release(done: concurrent.futures.Future[_Result]) -> None:
                ok = not done.cancelled() and done.exception() is None
                ledger.release(key, done.result().stored_key if ok else None)

            result.add_done_callback(release)
        size = self._budget.weigh(item.size)

        def start() -> None:
            result.add_done_callback(lambda _: self._budget.release(size))
            if not result.cancelled():
                self._read_then_decode(item, key, result)

        self._budget.submit(size, result, start)
        return result

    def _read_then_decode(self, item: Item, key: str, result: concurrent.futures.Future[_Result]) -> None:
        """Read an item through the source, then decode and store it on the decode pool."""
        assert self.source is not None
        try:
            reading = self.source.read(item)
        except Exception as exc:  # the source could not even start (e.g. no event loop any more)
            _fail(result, exc)
            return
        # Cancelling the result (a fill interrupted) cancels the read as well. The link is cut once the read
        # is done: futures keep their callbacks, and the read's bytes must not live as long as the result.
        link = [reading]
        result.add_done_callback(lambda done: link[0].cancel() if done.cancelled() and link else None)

        def on_read(read: concurrent.futures.Future[Payload]) -> None:
            link.clear()
            if read.cancelled():
                result.cancel()
            elif isinstance(error := read.exception(), ObjectTooLargeError):
                log.info("refusing %s: %s", item.url, error)
                _set(result, _Result(_Refused(str(error)), fetched=True))
            elif error is not None:
                _fail(result, error)
            else:
                try:
                    decoding = self._decode_pool.submit(self._decode_and_store, item, key, read.result())
                except RuntimeError as exc:  # the pool was shut down: the loader is closing
                    _fail(result, exc)
                    return
                decoding.add_done_callback(lambda done: _forward(done, result))

        reading.add_done_callback(on_read)

    def _decode_and_store(self, item: Item, key: str, payload: Payload) -> _Result:
        # Keyed by the ETag actually read: if the object changed since listing, this is its new version,
        # and this loader looks the listed item up there from now on.
        stored_key = self.key(item, payload.etag)
        entry: Entry
        try:
            entry = self.spec.decode(payload.data, item.url)
            encoded = codec.encode_array(entry, key=stored_key)  # bound now: no second checksum pass
        except DecodeError as exc:
            entry = codec.Failure(str(exc))
            encoded = codec.encode_failure(entry.message, key=stored_key)
            log.info("cannot decode %s: %s", item.url, exc)
        if stored_key != key:
            log.info("%s changed since it was listed (ETag %s listed, %s read): serving the version read",
                     item.url, item.etag, payload.etag)
            self._versions[self.key(item)] = stored_key
        self.store.put(stored_key, encoded, tag=self._fingerprint)
        self.store.cull()
        return _Result(entry, fetched=True, stored_key=stored_key)

    def _resolve(self, item: Item, entry: Entry | None) -> np.ndarray | None:
        if not isinstance(entry, codec.Failure):
            return entry
        if self.on_error == "raise":
            raise (ObjectTooLargeError if isinstance(entry, _Refused) else DecodeError)(entry.message)
        self._count("skipped")
        log.info("skipping %s: %s", item.url, entry.message)
        warnings.warn(f"skipping {item.url}: {entry.message}", stacklevel=3)
        return None

    # -- waiting for other processes ------------------------------------------------------------

    def _wait_for(self, item: Item, key: str) -> concurrent.futures.Future[_Result]:
        """A future for an item another process claimed, resolved by the waiting thread."""
        with self._lock:
            if key in self._waits:
                return self._waits[key].result
            wait = self._waits[key] = _Wait(item, concurrent.futures.Future(), time.time(),
                                            time.monotonic() + self.claim_wait)
            if self._waiter is None:
                self._waiter = threading.Thread(target=self._wait_loop, name="s3cache-claim-wait", daemon=True)
                self._waiter.start()
        log.debug("%s is being fetched by another process sharing the cache: waiting for it", item.url)
        self._wake.set()
        return wait.result

    def _wait_loop(self) -> None:
        """Poll the store (with backoff) for the entries waited for; fetch those whose claim lapsed."""
        interval = _POLL_FIRST
        while not self._closed.is_set():
            woken = self._wake.wait(interval)
            self._wake.clear()
            interval = _POLL_FIRST if woken else min(interval * 2, _POLL_MAX)
            with self._lock:
                waits = {key: wait for key, wait in self._waits.items() if not wait.result.done()}
                self._waits = dict(waits)
            if not waits or self._closed.is_set():
                continue
            try:
                self._poll(waits)
            except Exception as exc:  # the store or the ledger failed: the callers see why
                with self._lock:
                    for key in waits:
                        self._waits.pop(key, None)
                for wait in waits.values():
                    _fail(wait.result, exc)

    def _poll(self, waits: dict[str, _Wait]) -> None:
        assert self.ledger is not None
        keys = list(waits)
        found = {key: entry for key, entry in zip(keys, self.store.get_many(keys), strict=True) if entry is not None}
        rest = [key for key in keys if key not in found]
        # A claimer that read a newer version stored it elsewhere, and said where when it released the claim.
        moved = self.ledger.stored_keys(rest, since=min(waits[key].since for key in rest)) if rest else {}
        if moved:
            entries = self.store.get_many(list(moved.values()))
            for (key, stored_key), entry in zip(moved.items(), entries, strict=True):
                if entry is not None:
                    found[key] = entry
                    self._versions[key] = stored_key
        rest = [key for key in rest if key not in found]
        now = time.monotonic()
        lapsed = [key for key in rest if now > waits[key].give_up]
        free = self.ledger.unclaimed([key for key in rest if now <= waits[key].give_up])
        claimed = self.ledger.claim(sorted(free)) if free else set()
        if claimed:  # claim, then look, as in _start
            ours = sorted(claimed)
            found.update((key, entry) for key, entry in zip(ours, self.store.get_many(ours), strict=True)
                         if entry is not None)
        with self._lock:
            for key in [*found, *lapsed, *claimed]:
                self._waits.pop(key, None)
        for key, entry in found.items():
            if key in claimed:
                self.ledger.release(key)
            self._count("shared")
            _set(waits[key].result, _Result(entry, fetched=False))
        for key in lapsed:
            log.info("%s: still claimed by another process after %.0f s; fetching it here as well",
                     waits[key].item.url, self.claim_wait)
            self._fetch(waits[key].item, key, waits[key].result)
        for key in sorted(claimed - found.keys()):
            log.info("%s: the process that claimed it is gone or gave up; fetching it here", waits[key].item.url)
            self._fetch(waits[key].item, key, waits[key].result)


class _ByteBudget:
    """Admits work in order while the sum of its sizes stays within a capacity."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self._queue: collections.deque[tuple[int, concurrent.futures.Future[_Result], Callable[[], None]]] = (
            collections.deque())
        self._lock = threading.Lock()

    def weigh(self, size: int) -> int:
        """What an object of ``size`` bytes counts for: its size, at most the whole budget."""
        return max(0, min(size, self.capacity))

    def submit(self, size: int, result: concurrent.futures.Future[_Result], start: Callable[[], None]) -> None:
        """Call ``start`` now if ``size`` fits (and nobody waits), else once enough has been released."""
        with self._lock:
            admitted = not self._queue and self.in_use + size <= self.capacity
            if admitted:
                self.in_use += size
            else:
                self._queue.append((size, result, start))
        if admitted:
            start()

    def release(self, size: int) -> None:
        """Give back ``size`` and start what now fits, in order (skipping work cancelled while queued)."""
        starts = []
        with self._lock:
            self.in_use -= size
            while self._queue:
                head, result, start = self._queue[0]
                if result.cancelled():
                    self._queue.popleft()
                elif self.in_use + head <= self.capacity:
                    self._queue.popleft()
                    self.in_use += head
                    starts.append(start)
                else:
                    break
        for start in starts:
            start()


def _done(result: _Result) -> concurrent.futures.Future[_Result]:
    future: concurrent.futures.Future[_Result] = concurrent.futures.Future()
    future.set_result(result)
    return future


def _set(future: concurrent.futures.Future[_Result], result: _Result) -> None:
    """Resolve ``future``, unless the caller cancelled it meanwhile."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        future.set_result(result)


def _fail(result: concurrent.futures.Future[_Result], error: BaseException) -> None:
    """Fail ``result``, unless the caller cancelled it meanwhile."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        result.set_exception(error)


def _forward(done: concurrent.futures.Future[_Result], result: concurrent.futures.Future[_Result]) -> None:
    """Give ``result`` the outcome of ``done``, unless the caller cancelled it meanwhile."""
    if done.cancelled():
        result.cancel()
    elif (error := done.exception()) is not None:
        _fail(result, error)
    else:
        _set(result, done.result())
