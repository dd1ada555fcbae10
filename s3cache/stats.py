"""What the cache did for a dataset, summed over Keras worker threads and processes, per epoch.

Every process that serves batches of a dataset (the training process, and each Keras worker
process, which Keras starts afresh every epoch) writes its own counters into a small file of its
own under ``<cache_dir>/stats/<dataset id>/``: one fixed-size record per epoch, rewritten in place
after every batch with one ``pwrite`` (no lock, no database, nothing lost when Keras terminates a
worker). :func:`read_stats` sums the files, so the training process sees what its workers did.

:class:`CacheStatsCallback` puts each epoch's hits, misses and hit rate into Keras's logs, and so
into ``History`` and the progress bar. :func:`warn_if_larger_than_cache` tells, when a dataset is
built, that its arrays do not fit the cache, and what hit rate to expect.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import struct
import threading
import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from s3cache import codec
from s3cache.config import size_text
from s3cache.items import Item
from s3cache.keys import cache_key
from s3cache.store.layout import DEFAULT_PAGE_SIZE, empty_store_bytes, footprint

if TYPE_CHECKING:
    from s3cache.dataset import S3ImageDataset
    from s3cache.spec import ImageSpec
    from s3cache.store import ArrayStore

log = logging.getLogger(__name__)

# Share of the room that warm leaves unfilled when a dataset does not fit (see fitting_items).
WARM_MARGIN = 0.03
COUNTERS = ("hits", "misses", "skipped", "s3_requests", "s3_bytes", "retries", "shared")
# One record per epoch: the counters, padded to 64 bytes so that no record straddles a page.
_RECORD = struct.Struct("<8q")
# Stats of datasets untouched for this long are removed when another dataset is built.
KEEP_SECONDS = 7 * 24 * 3600


class CacheTooSmallWarning(UserWarning):
    """A dataset's arrays need more room than the cache's size limit."""


def new_stats_id() -> str:
    """A fresh name for one dataset's counters."""
    return uuid.uuid4().hex


def stats_directory(cache_dir: str | os.PathLike[str], stats_id: str) -> Path:
    """Where the per-process counter files of one dataset live."""
    return Path(cache_dir) / "stats" / stats_id


class StatsRecorder:
    """This process's counters for one dataset, one record per epoch, written after every batch.

    Args:
        directory: The dataset's stats directory (created ``0700`` if missing).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._failed = False  # writing failed once (a full disk): counted in memory only from then on
        self._epoch: int | None = None
        self._base = (0,) * len(COUNTERS)
        self._last = (0,) * len(COUNTERS)

    def record(self, epoch: int, totals: Mapping[str, int]) -> None:
        """Write the counters of ``epoch``: what ``totals`` (this process's running totals) gained in it."""
        now = tuple(int(totals.get(name, 0)) for name in COUNTERS)
        with self._lock:
            # Totals only grow, but threads take them before this lock: one taken before another thread's
            # newer totals can come second, and must not take back what that one recorded.
            now = tuple(max(value, last) for value, last in zip(now, self._last, strict=True))
            if epoch != self._epoch:
                self._epoch, self._base = epoch, self._last
            self._last = now
            delta = [value - base for value, base in zip(now, self._base, strict=True)]
            if self._failed:
                return
            try:
                if self._fd is None:
                    self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                    name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}.bin"
                    self._fd = os.open(self.directory / name, os.O_WRONLY | os.O_CREAT, 0o600)
                padding = (0,) * (_RECORD.size // 8 - len(delta))
                os.pwrite(self._fd, _RECORD.pack(*delta, *padding), epoch * _RECORD.size)
            except OSError as exc:  # a full or read-only disk must not stop training over a counter
                self._failed = True
                log.warning("s3cache: cannot record cache counters in %s (%s): ds.stats leaves this process "
                            "out from now on", self.directory, exc)

    def close(self) -> None:
        """Close the file (its records stay)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def read_stats(directory: Path) -> dict[str, Any]:
    """The counters of every process of a dataset, summed: totals, ``hit_rate``, and ``epochs``.

    Returns:
        ``{"hits", "misses", "skipped", "s3_requests", "s3_bytes", "retries"}`` (totals),
        ``"hit_rate"`` (hits over hits and misses, 0.0 before any read) and ``"epochs"``: one dict
        per epoch with the same counters, its ``hit_rate`` and its ``epoch`` number (from 0).
    """
    epochs: list[list[int]] = []
    try:
        files = list(directory.iterdir())
    except OSError:
        files = []
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        for index in range(len(data) // _RECORD.size):
            values = _RECORD.unpack_from(data, index * _RECORD.size)[:len(COUNTERS)]
            while len(epochs) <= index:
                epochs.append([0] * len(COUNTERS))
            epochs[index] = [a + b for a, b in zip(epochs[index], values, strict=True)]
    totals = [sum(column) for column in zip(*epochs, strict=True)] if epochs else [0] * len(COUNTERS)
    summary: dict[str, Any] = _with_rate(dict(zip(COUNTERS, totals, strict=True)))
    summary["epochs"] = [{"epoch": index, **_with_rate(dict(zip(COUNTERS, values, strict=True)))}
                         for index, values in enumerate(epochs)]
    return summary


def prune_stats(cache_dir: str | os.PathLike[str], keep_seconds: float = KEEP_SECONDS) -> None:
    """Remove the counters of datasets not read for ``keep_seconds``."""
    root = Path(cache_dir) / "stats"
    try:
        entries = list(root.iterdir())
    except OSError:
        return
    cutoff = time.time() - keep_seconds
    for entry in entries:
        try:
            if entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            continue


def _with_rate(counts: dict[str, Any]) -> dict[str, Any]:
    served = counts["hits"] + counts["misses"]
    return counts | {"hit_rate": counts["hits"] / served if served else 0.0}


def __getattr__(name: str) -> Any:
    """Define ``CacheStatsCallback`` on first use.

    It subclasses a Keras class, and the cache commands (which import this module for the fit
    estimate) never import Keras.
    """
    if name == "CacheStatsCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _callback_class() -> type:
    import keras

    class CacheStatsCallback(keras.callbacks.Callback):
        """Puts a dataset's cache hits, misses and hit rate of each epoch into Keras's logs.

        They land in ``History`` (``history.history["cache_hit_rate"]``, ...) and in the progress bar,
        for Keras worker threads and processes alike::

            model.fit(ds, epochs=5, callbacks=[s3cache.CacheStatsCallback(ds)])

        Each ``fit`` epoch reports every dataset epoch not reported yet (see :attr:`S3ImageDataset.stats`),
        so the first one includes the batches Keras reads before training starts, to learn the input
        shapes (and what read-ahead fetched with them).

        Args:
            dataset: The training dataset.
            prefix: Prefix of the log names (``cache_hits``, ``cache_misses``, ``cache_hit_rate``).
            every_seconds: Least time between two updates of the running numbers shown per batch.
        """

        def __init__(self, dataset: S3ImageDataset, prefix: str = "cache_", every_seconds: float = 0.5) -> None:
            super().__init__()
            self.dataset = dataset
            self.prefix = prefix
            self.every_seconds = every_seconds
            self._first = self._epoch = dataset.epoch  # dataset epochs not reported yet: _first to _epoch
            self._shown = 0.0

        def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            """Note which of the dataset's epochs this is."""
            self._epoch = self.dataset.epoch  # Keras ends an epoch of its own before training, to learn shapes
            self._shown = 0.0

        def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            """Show the epoch's numbers so far in the progress bar (at most every ``every_seconds``)."""
            if logs is not None and time.monotonic() - self._shown >= self.every_seconds:
                self._shown = time.monotonic()
                logs.update(self._logs())

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            """Put the epoch's numbers into its logs (and so into ``History``)."""
            if logs is not None:
                logs.update(self._logs())
            self._first = self._epoch + 1

        def _logs(self) -> dict[str, float]:
            epochs = self.dataset.stats["epochs"][self._first:self._epoch + 1]
            counts = _with_rate({name: sum(epoch[name] for epoch in epochs) for name in COUNTERS})
            return {f"{self.prefix}hits": float(counts["hits"]), f"{self.prefix}misses": float(counts["misses"]),
                    f"{self.prefix}hit_rate": float(counts["hit_rate"])}

    CacheStatsCallback.__qualname__ = "CacheStatsCallback"
    return CacheStatsCallback


# -- does the dataset fit? ------------------------------------------------------------------------------


def cache_bytes_needed(items: Sequence[Item], spec: ImageSpec, page_size: int = DEFAULT_PAGE_SIZE) -> int:
    """About how many bytes of the cache the arrays of ``items`` take at ``spec`` (as the size limit counts them).

    Args:
        items: The images.
        spec: Their arrays' spec.
        page_size: The page size of the store's database.
    """
    value = codec.entry_size(spec.shape)
    return sum(footprint(value, len(cache_key(spec.fingerprint, item)), page_size) for item in items)


def fitting_items(items: Sequence[Item], spec: ImageSpec, arrays: ArrayStore) -> list[Item]:
    """The leading items whose arrays fit the cache's size limit together (all of them when the dataset fits).

    A little conservative (:data:`WARM_MARGIN`): the estimate is close, and an array fetched but not
    kept is a wasted request, while training (the same run) fills what room is left.
    """
    page_size = arrays.page_size
    room = (arrays.size_limit - empty_store_bytes(page_size)) * (1 - WARM_MARGIN)
    value = codec.entry_size(spec.shape)
    used = 0
    for count, item in enumerate(items):
        used += footprint(value, len(cache_key(spec.fingerprint, item)), page_size)
        if used > room:
            return list(items[:count])
    return list(items)


def warn_if_larger_than_cache(items: Sequence[Item], spec: ImageSpec, arrays: ArrayStore,
                              stacklevel: int = 3) -> float:
    """Warn (:class:`CacheTooSmallWarning`) when the items' arrays exceed the cache's size limit.

    Returns:
        The fraction of the items the cache can hold (1.0 when they fit): the hit rate to expect
        per epoch once the cache is full.
    """
    page_size = arrays.page_size
    need = cache_bytes_needed(items, spec, page_size)
    limit = arrays.size_limit
    room = max(limit - empty_store_bytes(page_size), 0)
    if need <= room:
        return 1.0
    fraction = room / need if need else 1.0
    height, width, channels = spec.shape
    warnings.warn(
        f"s3cache: the {len(items):,} images of this dataset need about {size_text(need)} of cache at "
        f"{height}x{width}x{channels}, more than the cache's size limit of {size_text(limit)} "
        f"({arrays.directory.parent}). Expect about {fraction:.0%} cache hits per epoch once the cache is full: "
        "it keeps the images it holds and reads the others from S3 every epoch. To cache them all, set "
        f"cache_size_limit to at least {size_text(need + empty_store_bytes(page_size))} "
        "(or `s3cache warm --cache-size-limit`).",
        CacheTooSmallWarning, stacklevel=stacklevel)
    return fraction

