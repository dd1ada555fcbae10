"""The Keras side: a ``PyDataset`` of ``(images, labels)`` batches served through the cache."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import multiprocessing.util
import os
from collections.abc import Iterator, Sequence
from typing import Any

import keras
import numpy as np

from s3cache.config import CacheConfig
from s3cache.items import Item
from s3cache.loader import Loader
from s3cache.spec import ImageSpec
from s3cache.stats import StatsRecorder, new_stats_id, prune_stats, read_stats, stats_directory

DTYPES = ("float32", "uint8")


class S3ImageDataset(keras.utils.PyDataset):
    """Batches of images (and labels) from S3, read through the local array cache.

    Build it with :func:`s3cache.image_dataset_from_s3`. Each process (Keras worker processes
    included) opens its own store and S3 client on first use, since neither survives a fork.

    Args:
        items: The items to serve, in their canonical (unshuffled) order.
        labels: One label per item (class indices), or ``None``.
        class_names: Names of the classes, indexed by label.
        spec: How images are decoded and resized.
        config: Where the cache is and how to reach S3.
        label_mode: ``"int"``, ``"categorical"``, ``"binary"`` or ``None``.
        batch_size: Images per batch.
        shuffle: Reshuffle the order every epoch.
        seed: Seed of the shuffles.
        dtype: ``"float32"`` or ``"uint8"`` images.
        readahead: Batches whose misses are fetched ahead of the one being served; ``None``
            picks enough to keep the S3 connections busy (none with ``use_multiprocessing``).
        steps_per_epoch: Batches per epoch of :meth:`to_tf_dataset` (default ``len(self)``): the
            largest shard's count, so that every worker of a sharded run takes as many steps.
        run: The cache's name for this run (:func:`s3cache.listing.run_key`): the cache keeps the
            entries of the current run rather than cycling through a dataset larger than itself.
            Default: derived from the spec and the items.
        **kwargs: ``workers``, ``use_multiprocessing``, ``max_queue_size`` for ``PyDataset``.
    """

    def __init__(
        self,
        items: Sequence[Item],
        labels: np.ndarray | None,
        class_names: Sequence[str] | None,
        spec: ImageSpec,
        config: CacheConfig,
        *,
        label_mode: str | None = "int",
        batch_size: int = 32,
        shuffle: bool = True,
        seed: int | None = None,
        dtype: str = "float32",
        readahead: int | None = None,
        steps_per_epoch: int | None = None,
        run: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.items = list(items)
        self.labels = labels
        self.class_names = list(class_names) if class_names is not None else None
        self.spec = spec
        self.config = config
        self.label_mode = label_mode if labels is not None else None
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed if seed is not None else int(np.random.SeedSequence().entropy % 2**32)
        self.dtype = dtype
        if readahead is None:
            readahead = 0 if self.use_multiprocessing else max(2, math.ceil(2 * config.concurrency / batch_size))
        self.readahead = readahead
        self.steps_per_epoch = steps_per_epoch or len(self)
        self.run = run or _default_run(spec, self.items)
        self.epoch = 0
        self._stats_id = new_stats_id()
        self._recorder: StatsRecorder | None = None
        prune_stats(config.cache_dir)
        self._order = self._epoch_order(0)
        self._last_index: int | None = None
        self._loader: Loader | None = None
        self._loader_pid = -1

    # -- keras.utils.PyDataset --------------------------------------------------------------------

    def __len__(self) -> int:
        return math.ceil(len(self.items) / self.batch_size)

    def __getitem__(self, index: int) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"batch index {index} out of range for {len(self)} batches")
        loader = self.loader
        try:
            arrays = loader.load(self._batch_items(index))
            loader.prefetch(self._readahead_items(index))
        finally:
            self._record(loader)  # a batch that raised counted its misses and retries too
        kept = [i for i, array in enumerate(arrays) if array is not None]
        images = np.empty((len(kept), *self.spec.shape), dtype=self.dtype)
        for slot, i in enumerate(kept):
            images[slot] = arrays[i]
        if self.labels is None or self.label_mode is None:
            return images
        positions = self._order[index * self.batch_size: (index + 1) * self.batch_size][kept]
        return images, self._encode_labels(self.labels[positions])

    def on_epoch_begin(self) -> None:
        """Check whether another dataset used the cache since (so this epoch's reads refresh recency)."""
        if self._loader is not None and self._loader_pid == os.getpid():
            self._loader.store.recency.refresh()

    def on_epoch_end(self) -> None:
        """Reshuffle for the next epoch and write back cache recency."""
        self.epoch += 1
        self._order = self._epoch_order(self.epoch)
        self._last_index = None
        if self._loader is not None and self._loader_pid == os.getpid():
            self._loader.drop_prefetched()
            self._loader.store.recency.flush()  # before another dataset may evict by it
            self._loader.store.recency.refresh()

    # -- public extras ----------------------------------------------------------------------------

    @property
    def file_paths(self) -> list[str]:
        """The items' URLs (``s3://bucket/key`` or ``s3://bucket/shard.tar#member``), first-epoch order."""
        return [self.items[i].url for i in self._epoch_order(0)]

    @property
    def num_classes(self) -> int:
        """Number of classes (0 without labels)."""
        return len(self.class_names or ())

    @property
    def stats(self) -> dict[str, Any]:
        """Counters of every process and thread serving this dataset (Keras workers included).

        ``hits``, ``misses``, ``skipped``, ``s3_requests``, ``s3_bytes``, ``retries`` and
        ``hit_rate`` over all epochs, and ``epochs``: the same per epoch (see :func:`s3cache.stats.read_stats`).
        """
        return read_stats(stats_directory(self.config.cache_dir, self._stats_id))

    @property
    def loader(self) -> Loader:
        """This process's loader, opened on first use."""
        if self._loader is None or self._loader_pid != os.getpid():
            # The size limit was set when the dataset was built; a worker opening the cache keeps the stored one.
            self._loader = dataclasses.replace(self.config, size_limit=None).open_loader(self.spec)
            self._loader_pid = os.getpid()
            self._loader.store.begin_run(self.run)
            self._recorder = StatsRecorder(stats_directory(self.config.cache_dir, self._stats_id))
            # Keras worker processes end without closing anything: write back their last reads as they exit.
            multiprocessing.util.Finalize(self._loader, _flush_quietly, (self._loader.store.recency,), exitpriority=10)
        return self._loader

    def close(self) -> None:
        """Release threads and flush recency (the dataset reopens them if used again)."""
        if self._loader is not None and self._loader_pid == os.getpid():
            self._loader.close()
            self._loader.store.close()  # no connection left to hold the database (or its WAL) open
            if self._recorder is not None:
                self._recorder.close()
        self._loader = None
        self._recorder = None

    def to_tf_dataset(self) -> Any:
        """This dataset as a ``tf.data.Dataset`` of batches with known shapes, reading through the cache.

        Each iteration is one epoch of :attr:`steps_per_epoch` batches, reshuffled like the
        ``PyDataset``; a shard with fewer batches than that repeats its first ones (from the
        cache). Auto-sharding is off: under ``tf.distribute`` every worker keeps its own shard
        (give ``shard=`` to :func:`~s3cache.image_dataset_from_s3`).
        """
        import tensorflow as tf

        images = tf.TensorSpec((None, *self.spec.shape), tf.as_dtype(self.dtype))
        if self.label_mode is None:
            signature: Any = images
        elif self.label_mode == "int":
            signature = (images, tf.TensorSpec((None,), tf.int32))
        else:
            width = self.num_classes if self.label_mode == "categorical" else 1
            signature = (images, tf.TensorSpec((None, width), tf.float32))

        def one_epoch() -> Iterator[Any]:
            for step in range(self.steps_per_epoch):
                yield self[step % len(self)]
            self.on_epoch_end()

        dataset = tf.data.Dataset.from_generator(one_epoch, output_signature=signature)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        dataset = dataset.with_options(options).apply(tf.data.experimental.assert_cardinality(self.steps_per_epoch))
        return dataset.prefetch(2)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_loader"], state["_loader_pid"], state["_recorder"] = None, -1, None
        return state

    # -- internals ----------------------------------------------------------------------------------

    def _record(self, loader: Loader) -> None:
        """Write this process's counters for the current epoch (one ``pwrite``)."""
        if self._recorder is not None:
            self._recorder.record(self.epoch, loader.stats)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.items))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.items))

    def _readahead_items(self, index: int) -> list[Item]:
        """The items to read ahead after serving ``index``.

        After a jump that is the whole window; in sequential order only the batch entering it,
        since the previous calls asked for the others.
        """
        sequential = self._last_index is not None and index == self._last_index + 1
        # Never the batch just served (readahead 0): with a full cache its misses would be fetched again.
        first = index + max(self.readahead, 1) if sequential else index + 1
        self._last_index = index
        return [item for ahead in range(first, min(index + 1 + self.readahead, len(self)))
                for item in self._batch_items(ahead)]

    def _batch_items(self, index: int) -> list[Item]:
        positions = self._order[index * self.batch_size: (index + 1) * self.batch_size]
        return [self.items[i] for i in positions]

    def _encode_labels(self, labels: np.ndarray) -> np.ndarray:
        if self.label_mode == "int":
            return labels.astype("int32")
        if self.label_mode == "binary":
            return labels.astype("float32").reshape(-1, 1)
        return np.eye(self.num_classes, dtype="float32")[labels]


def _flush_quietly(recency: Any) -> None:
    """Write back noted reads at exit, unless the cache is gone by then."""
    with contextlib.suppress(Exception):
        recency.flush()


def _default_run(spec: ImageSpec, items: Sequence[Item]) -> str:
    """A run key for a dataset built without one: its spec and its items."""
    digest = hashlib.sha256("\n".join(item.url for item in items).encode()).hexdigest()[:16]
    return f"{spec.fingerprint}:items:{digest}"
