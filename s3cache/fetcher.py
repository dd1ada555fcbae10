"""Misses: read through the source, decoded, stored; shared between processes; bounded in memory.

A :class:`Fetcher` does the work behind a cache miss of the :class:`~s3cache.loader.Loader`: it
reads the item through a :class:`~s3cache.source.Source`, decodes what arrived meanwhile in one
batch (:mod:`s3cache.decoders`; the members of a tar-shard chunk arrive together) and hands the
entries to a :class:`~s3cache.writer.BatchWriter`, which stores arrivals in batches. What
bucket content can do to memory is bounded here: an object listed larger than ``max_object_size`` is
refused before any request, and the listed bytes of the objects being read and decoded at once never
exceed ``max_bytes_in_flight`` (further reads wait their turn). Processes sharing a cache directory
fetch each object once: a miss is claimed in the directory's
:class:`~s3cache.source.ledger.FetchLedger`, and a process that finds it claimed by a live process
waits for the entry instead. An object rewritten between listing and reading is stored under the
version read, and looked up there from then on (and, through the ledger, by offline runs over the
stored listing).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from s3cache import codec
from s3cache.batching import Batcher
from s3cache.decoders import Decoded, Decoder, open_decoder
from s3cache.errors import DecodeError, ObjectTooLargeError
from s3cache.futures import ByteBudget, done_future, fail, resolve
from s3cache.items import Item
from s3cache.keys import cache_key
from s3cache.source import DEFAULT_BYTES_IN_FLIGHT, DEFAULT_MAX_OBJECT_SIZE, Payload, Source
from s3cache.source.ledger import FetchLedger
from s3cache.spec import ImageSpec
from s3cache.store import ArrayStore
from s3cache.writer import BatchWriter

Entry = np.ndarray | codec.Failure

MAX_DECODE_BATCH = 64
"""Most images decoded in one batch."""
DECODE_LINGER = 0.01
"""Seconds a decode batch waits for more arrivals after its first: objects read one by one arrive a few ms
apart, and TensorFlow's cost per call (about 1 ms) is then shared; tar-shard members arrive by the chunk."""
DEFAULT_CLAIM_WAIT = 120.0
"""Seconds to wait for an object another live process claimed before fetching it here."""
_POLL_FIRST, _POLL_MAX = 0.01, 0.25

log = logging.getLogger(__name__)


def default_decode_workers() -> int:
    """Decode threads by default: one per two CPUs, at most four.

    TensorFlow spreads each batch over every core by itself. NumPy's Keras-equal colour and resize
    arithmetic is many short steps that mostly hold the GIL: measured on two cores, two decode threads
    passing it back and forth cost 30-40% more CPU per image than one, for no more images per second.
    """
    return max(1, min(4, (os.cpu_count() or 1) // 2))


@dataclass(frozen=True)
class Refused(codec.Failure):
    """An object refused for its size: served like a decode failure, never stored."""


@dataclass(frozen=True)
class FetchResult:
    """The outcome of one miss: the entry, whether this process read it, and where it was stored."""

    entry: Entry
    fetched: bool
    stored_key: str | None = None


@dataclass(frozen=True)
class _Decode:
    """A read item waiting for its batch to be decoded."""

    item: Item
    key: str  # the key the miss was claimed under (the listed version's)
    payload: Payload
    result: concurrent.futures.Future[FetchResult]


@dataclass
class _Wait:
    """A miss claimed by another process, waited for."""

    item: Item
    result: concurrent.futures.Future[FetchResult]
    since: float  # time.time() when the wait began
    give_up: float  # time.monotonic() past which this process fetches the item itself


def _fail_decodes(batch: list[_Decode], error: BaseException) -> None:
    """Decoding a batch failed outside any one image (the decoder itself broke): every caller hears why."""
    for job in batch:
        fail(job.result, error)


class Fetcher:
    """Reads, decodes and stores the items that missed the cache.

    Args:
        spec: How images are decoded and resized.
        store: The array store entries are written to.
        source: Where items are read from; ``None`` means offline (nothing is fetched).
        decode_workers: Threads decoding fetched images (default: :func:`default_decode_workers`).
        decoder: ``"auto"``, ``"numpy"``, ``"tensorflow"`` (default ``$S3CACHE_DECODER``, else ``"auto"``)
            or a :class:`~s3cache.decoders.Decoder`: see :func:`s3cache.decoders.open_decoder`.
        max_object_size: Objects listed larger than this many bytes are refused without a request;
            ``None`` accepts any size.
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
        decode_workers: int | None = None,
        decoder: str | Decoder | None = None,
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
        self.max_object_size = max_object_size
        self.claim_wait = claim_wait
        self._fingerprint = spec.fingerprint
        # Offline, nothing is decoded: never import TensorFlow for it.
        self._decoder = open_decoder(spec, decoder if source is not None else "numpy")
        self._decoding: Batcher[_Decode] = Batcher(self._decode_batch, _fail_decodes, name="s3cache-decode",
                                                   threads=decode_workers or default_decode_workers(),
                                                   max_batch=MAX_DECODE_BATCH, linger=DECODE_LINGER)
        self._budget = ByteBudget(max_bytes_in_flight)
        if ledger is True:
            ledger = FetchLedger.in_directory(store.directory.parent, read_only=source is None)
        self.ledger: FetchLedger | None = ledger or None
        self._writer = BatchWriter(store, self._fingerprint, self.ledger)
        # Listed key -> key of the version actually read, for objects rewritten since listing.
        self._versions: dict[str, str] = {}
        self._waits: dict[str, _Wait] = {}
        self._waiter: threading.Thread | None = None
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()

    @property
    def decoder(self) -> str:
        """The decoder misses go through: ``"numpy"`` or ``"tensorflow"``."""
        return self._decoder.name

    def key(self, item: Item, etag: str | None = None) -> str:
        """The store key of an item's array under this spec (and the given version)."""
        return cache_key(self._fingerprint, item, etag)

    def lookup_key(self, item: Item) -> str:
        """The key to look an item up under: the listed version's, or the version this loader read."""
        key = self.key(item)
        return self._versions.get(key, key)

    def get_many(self, keys: Sequence[str]) -> list[Entry | None]:
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

    def too_large(self, item: Item) -> bool:
        """Whether an item is listed larger than ``max_object_size`` (it is then never read)."""
        return self.max_object_size is not None and item.size > self.max_object_size

    def refuse(self, item: Item) -> Refused:
        """The failure an item too large to read is served as (never stored: the limit may change)."""
        log.info("refusing %s: listed at %d bytes, more than max_object_size (%d bytes)", item.url, item.size,
                 self.max_object_size)
        return Refused(f"{item.url} is {item.size} bytes, larger than max_object_size ({self.max_object_size} "
                        "bytes); raise max_object_size to read it")

    def start(self, items: Sequence[Item], keys: Sequence[str]) -> list[concurrent.futures.Future[FetchResult]]:
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
                futures.append(done_future(FetchResult(already[key], fetched=False)))
            elif key in claimed:
                futures.append(self._fetch(item, key))
            else:
                futures.append(self._wait_for(item, key))
        return futures

    def _fetch(self, item: Item, key: str,
               result: concurrent.futures.Future[FetchResult] | None = None) -> concurrent.futures.Future[FetchResult]:
        """Read, decode and store an item once its bytes fit the budget; ``result`` receives the outcome."""
        result = result or concurrent.futures.Future()
        if self.ledger is not None:
            ledger = self.ledger

            def release(done: concurrent.futures.Future[FetchResult]) -> None:
                # A stored entry's claim was released by the writer, before the result was resolved.
                if done.cancelled() or done.exception() is not None or done.result().stored_key is None:
                    ledger.release(key)

            result.add_done_callback(release)
        size = self._budget.weigh(item.size)

        def start() -> None:
            result.add_done_callback(lambda _: self._budget.release(size))
            if not result.cancelled():
                self._read_then_decode(item, key, result)

        self._budget.submit(size, result, start)
        return result

    def _read_then_decode(self, item: Item, key: str, result: concurrent.futures.Future[FetchResult]) -> None:
        """Read an item through the source, then decode and store it on the decode pool."""
        assert self.source is not None
        try:
            reading = self.source.read(item)
        except Exception as exc:  # the source could not even start (e.g. no event loop any more)
            fail(result, exc)
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
                resolve(result, FetchResult(Refused(str(error)), fetched=True))
            elif error is not None:
                fail(result, error)
            else:
                try:
                    self._decoding.submit(_Decode(item, key, read.result(), result))
                except RuntimeError as exc:  # the decoders were closed: the loader is closing
                    fail(result, exc)

        reading.add_done_callback(on_read)

    def _decode_batch(self, batch: list[_Decode]) -> None:
        """Decode the reads that arrived together, then hand their entries to the writer."""
        batch = [job for job in batch if not job.result.cancelled()]  # a fill interrupted meanwhile
        decoded = self._decoder.decode_many([job.payload.data for job in batch], [job.item.url for job in batch])
        for job, outcome in zip(batch, decoded, strict=True):
            self._store(job, *self._encode(job, outcome))

    def _encode(self, job: _Decode, outcome: Decoded) -> tuple[FetchResult, bytes]:
        """A decoded item: the result to serve and the encoded entry to store."""
        item, payload = job.item, job.payload
        # Keyed by the ETag actually read: if the object changed since listing, this is its new version,
        # and this loader looks the listed item up there from now on.
        stored_key = self.key(item, payload.etag)
        entry: Entry
        if isinstance(outcome, DecodeError):
            entry = codec.Failure(str(outcome))
            encoded = codec.encode_failure(entry.message, key=stored_key)
            log.info("cannot decode %s: %s", item.url, outcome)
        else:
            entry, encoded = outcome, codec.encode_array(outcome, key=stored_key)  # bound now: one checksum pass
        if stored_key != job.key:
            log.info("%s changed since it was listed (ETag %s listed, %s read): serving the version read",
                     item.url, item.etag, payload.etag)
            self._versions[self.key(item)] = stored_key
        return FetchResult(entry, fetched=True, stored_key=stored_key), encoded

    def _store(self, job: _Decode, fetched: FetchResult, encoded: bytes) -> None:
        """Hand a decoded entry to the store writer; the job's result is resolved once the entry is stored."""
        assert fetched.stored_key is not None
        result = job.result
        try:
            writing = self._writer.submit(fetched.stored_key, encoded, claimed=job.key)
        except RuntimeError as exc:  # the writer was closed: the loader is closing
            fail(result, exc)
            return

        def on_written(done: concurrent.futures.Future[bool]) -> None:
            if (error := done.exception()) is not None:
                fail(result, error)
            else:
                resolve(result, fetched)

        writing.add_done_callback(on_written)

    # -- waiting for other processes ------------------------------------------------------------

    def _wait_for(self, item: Item, key: str) -> concurrent.futures.Future[FetchResult]:
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
                    fail(wait.result, exc)

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
            resolve(waits[key].result, FetchResult(entry, fetched=False))
        for key in lapsed:
            log.info("%s: still claimed by another process after %.0f s; fetching it here as well",
                     waits[key].item.url, self.claim_wait)
            self._fetch(waits[key].item, key, waits[key].result)
        for key in sorted(claimed - found.keys()):
            log.info("%s: the process that claimed it is gone or gave up; fetching it here", waits[key].item.url)
            self._fetch(waits[key].item, key, waits[key].result)


    def close(self) -> None:
        """Stop the decode and waiting threads and give up claims."""
        self._closed.set()
        self._wake.set()
        if self._waiter is not None and self._waiter is not threading.current_thread():
            self._waiter.join(timeout=5)
        with self._lock:
            waits, self._waits = self._waits, {}
        for wait in waits.values():
            wait.result.cancel()
        self._decoding.close()
        self._writer.close()
        if self.ledger is not None:
            self.ledger.close()
