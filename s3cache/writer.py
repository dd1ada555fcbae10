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
from collections.abc import Sequence
from dataclasses import dataclass

from s3cache.batching import Batcher
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
        self._batcher: Batcher[_Write] = Batcher(self._write, _fail_writes, name="s3cache-store-writer",
                                                 max_batch=max_batch, linger=linger)

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
        self._batcher.submit(_Write(key, entry, claimed, done))
        return done

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        self._batcher.close()

    def _write(self, writes: Sequence[_Write]) -> None:
        written = self.store.put_many([(write.key, write.entry) for write in writes], self.tag)
        if self.ledger is not None:
            self.ledger.release_many([(write.claimed, write.key) for write in writes if write.claimed is not None])
        for write, wrote in zip(writes, written, strict=True):
            resolve(write.done, wrote)


def _fail_writes(writes: Sequence[_Write], error: BaseException) -> None:
    """The store (or the ledger) failed: every caller of the batch sees why."""
    for write in writes:
        fail(write.done, error)
