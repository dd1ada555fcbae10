"""Fetched entries written to the store in batches: one transaction per batch of arrivals.

Decode threads hand their encoded entries to a :class:`BatchWriter`. Its thread writes what
arrived meanwhile in one store transaction (:meth:`ArrayStore.put_many
<s3cache.store.ArrayStore.put_many>`, which keeps the store within its size limit), releases the
batch's fetch claims in one ledger transaction, and only then completes each write's future: a
caller that sees its write done finds the entry in the store, and so does a process that was
waiting for the claim. A batch waits :data:`LINGER` seconds at most for arrivals after its first:
far less than an S3 request, and enough to gather the decodes of a busy first epoch.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from s3cache.futures import fail, resolve
from s3cache.source.ledger import FetchLedger
from s3cache.store import ArrayStore

MAX_BATCH = 64
"""Most entries written in one transaction."""
LINGER = 0.01
"""Seconds a batch waits for more arrivals after its first, unless it is full before."""


@dataclass(frozen=True)
class _Write:
    key: str  # the key the entry is stored under
    entry: bytes
    claimed: str | None  # the fetch claim this write settles (the listed version's key)
    done: concurrent.futures.Future[bool]


class BatchWriter:
    """Writes entries handed over by any thread, in batches, on its own thread.

    Args:
        store: The array store written to.
        tag: The tag of every entry (the spec's fingerprint).
        ledger: Where the claims settled by the writes are released; ``None`` releases nothing.
        max_batch: Most entries per transaction.
        linger: Seconds a batch waits for more arrivals after its first.
    """

    def __init__(self, store: ArrayStore, tag: str, ledger: FetchLedger | None = None,
                 max_batch: int = MAX_BATCH, linger: float = LINGER) -> None:
        self.store = store
        self.tag = tag
        self.ledger = ledger
        self.max_batch = max_batch
        self.linger = linger
        self._queue: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards starting and closing the thread
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, key: str, entry: bytes, claimed: str | None = None) -> concurrent.futures.Future[bool]:
        """Queue an encoded entry; the future says whether it was written, once it is in the store.

        Args:
            key: The key to store the entry under.
            entry: The encoded entry.
            claimed: The fetch claim to release once the entry is stored.

        Raises:
            RuntimeError: The writer is closed.
        """
        done: concurrent.futures.Future[bool] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the store writer is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="s3cache-store-writer", daemon=True)
                self._thread.start()
            self._queue.put(_Write(key, entry, claimed, done))
        return done

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        with self._lock:
            self._closed = True
            thread = self._thread
            if thread is not None:
                self._queue.put(None)
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            deadline = time.monotonic() + self.linger
            while len(batch) < self.max_batch and batch[-1] is not None:
                try:
                    batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            writes = [write for write in batch if write is not None]
            if writes:
                self._write(writes)
            if batch[-1] is None:
                return

    def _write(self, writes: Sequence[_Write]) -> None:
        try:
            written = self.store.put_many([(write.key, write.entry) for write in writes], self.tag)
        except BaseException as exc:  # the store failed: every caller of the batch sees why
            for write in writes:
                fail(write.done, exc)
            return
        if self.ledger is not None:
            self.ledger.release_many([(write.claimed, write.key) for write in writes if write.claimed is not None])
        for write, wrote in zip(writes, written, strict=True):
            resolve(write.done, wrote)
