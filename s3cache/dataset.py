"""The Keras side: a ``PyDataset`` of ``(images, labels)`` batches served through the cache."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import multiprocessing.util
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from s3cache.config import CacheConfig
from s3cache.errors import DecodeError
from s3cache.items import Item, any_members
from s3cache.loader import Loader
from s3cache.order import full_shuffle, shard_window_shuffle
from s3cache.spec import ImageSpec
from s3cache.stats import StatsRecorder, new_stats_id, prune_stats, read_stats, stats_directory

if TYPE_CHECKING:
    from s3cache.source.s3 import S3Source

DTYPES = ("float32", "uint8")
PACKED_READAHEAD_IMAGES = 256
"""Tar-shard members read ahead by default: they arrive by the chunk, so reading ahead costs no request, and
decode batches (up to 64) fill."""
DATA_FORMATS = ("channels_last", "channels_first")


def data_format_of(data_format: str | None) -> str:
    """``data_format`` as Keras resolves it: ``None`` means ``keras.config.image_data_format()``.

    Raises:
        ValueError: Neither ``"channels_last"`` nor ``"channels_first"`` (Keras's wording).
    """
    if data_format is None:
        return str(keras.config.image_data_format())
    value = str(data_format).lower()
    if value not in DATA_FORMATS:
        raise ValueError("The `data_format` argument must be one of {'channels_first', 'channels_last'}. "
                         f"Received: data_format={data_format}")
    return value


def default_readahead(items: Sequence[Item], batch_size: int, concurrency: int) -> int:
    """Batches to read ahead: twice the S3 requests in flight for objects, 256 images for tar-shard members.

    Each loose object is a request, so twice ``concurrency`` keeps the connections busy without
    reading further than they can. Members arrive many to a chunk, so reading them ahead costs
    nothing but memory, and keeps the decoder's batches full: measured on a packed cold epoch,
    256 members ahead ran 15-25% faster than 64.
    """
    wanted = PACKED_READAHEAD_IMAGES if any_members(items) else 2 * concurrency
    return max(2, math.ceil(wanted / batch_size))


class S3ImageDataset(keras.utils.PyDataset):
    """Batches of images (and labels) from S3, read through the local array cache.

    Build it with :func:`s3cache.image_dataset_from_s3`. Each process (Keras worker processes
    included) opens its own store and S3 client on first use, since neither survives a fork.

    Every direct pass (``for batch in ds``) is an epoch: it ends with :meth:`on_epoch_end`, so the
    next pass is reshuffled, and a pass started over an epoch that was already partly served (a
    loop left early, ``ds[0]`` looked at) begins a new one. ``model.fit`` and friends do not
    iterate the dataset this way; they index it and call :meth:`on_epoch_end` themselves.

    Args:
        items: The items to serve, in the order of the first epoch (Keras's order, shuffled with
            the seed when ``image_dataset_from_s3`` shuffles); later epochs are reshuffled.
        labels: One label per item (class indices), or ``None``.
        class_names: Names of the classes, indexed by label, or ``None``.
        spec: How images are decoded and resized.
        config: Where the cache is and how to reach S3.
        label_mode: ``"int"``, ``"categorical"``, ``"binary"`` or ``None``.
        batch_size: Images per batch; ``None`` serves single images (``ds[i]`` is image ``i``).
        shuffle: Reshuffle the order every epoch after the first.
        seed: Seed of the shuffles.
        dtype: ``"float32"`` or ``"uint8"`` images.
        data_format: ``"channels_last"`` (``(height, width, channels)``) or ``"channels_first"``;
            ``None`` means ``keras.config.image_data_format()``.
        readahead: Batches whose misses are fetched ahead of the one being served; ``None``
            picks enough to keep the S3 connections and the decoder busy (none with
            ``use_multiprocessing``): see :func:`default_readahead`.
        steps_per_epoch: Elements per epoch of :meth:`to_tf_dataset` (default ``len(self)``): the
            largest shard's count, so that every worker of a sharded run takes as many steps.
        cold_shards: Serve the first epoch shard window by shard window (see :mod:`s3cache.order`): for
            a packed dataset whose arrays are not cached yet.
        run: The cache's name for this run (:func:`s3cache.listing.run_key`): the cache keeps the
            entries of the current run rather than cycling through a dataset larger than itself.
            Default: derived from the spec and the items.
        s3: An S3 source opened in this process (sharing the client that listed ``items``), read
            through by this process's loader instead of a new one; other processes open their own.
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
        batch_size: int | None = 32,
        shuffle: bool = True,
        seed: int | None = None,
        dtype: str = "float32",
        data_format: str | None = "channels_last",
        readahead: int | None = None,
        steps_per_epoch: int | None = None,
        cold_shards: bool = False,
        run: str | None = None,
        s3: S3Source | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be positive or None, got {batch_size}")
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
        self.data_format = data_format_of(data_format)
        self._step = batch_size or 1  # images per index
        if readahead is None:
            readahead = 0 if self.use_multiprocessing else default_readahead(self.items, self._step, config.concurrency)
        self.readahead = readahead
        self.steps_per_epoch = steps_per_epoch or len(self)
        self.cold_shards = cold_shards
        self.run = run or _default_run(spec, self.items)
        self.epoch = 0
        self._stats_id = new_stats_id()
        self._recorder: StatsRecorder | None = None
        prune_stats(config.cache_dir)
        self._order = self._epoch_order(0)
        # Items whose arrays the store held when last served: read-ahead skips them (no lookup, no key).
        self._held = np.zeros(len(self.items), dtype=bool)
        self._last_index: int | None = None
        self._served = False  # whether this epoch has served anything yet
        self._loader: Loader | None = None
        self._loader_pid = -1
        self._s3, self._s3_pid = s3, os.getpid()

    # -- keras.utils.PyDataset --------------------------------------------------------------------

    def __len__(self) -> int:
        return math.ceil(len(self.items) / self._step)

    def __getitem__(self, index: int) -> Any:
        """Batch ``index`` of this epoch: ``images`` or ``(images, labels)``; one image when unbatched.

        Raises:
            DecodeError: Unbatched, with ``on_error="skip"``, and image ``index`` was skipped (a
                pass over the dataset leaves skipped images out instead).
        """
        images, labels = self._load(index)
        if self.batch_size is None:
            if not len(images):
                raise DecodeError(f"{self._batch_items(index)[0].url} was skipped (on_error='skip'); iterate "
                                  "the dataset, or use to_tf_dataset(), to leave skipped images out")
            return images[0] if labels is None else (images[0], labels[0])
        return images if labels is None else (images, labels)

    def __iter__(self) -> Iterator[Any]:
        """One epoch: every batch (or image) in this epoch's order; the next pass is reshuffled."""
        return self._one_pass(len(self))

    def on_epoch_begin(self) -> None:
        """Check whether another dataset used the cache since (so this epoch's reads refresh recency)."""
        if self._loader is not None and self._loader_pid == os.getpid():
            self._loader.store.recency.refresh()

    def on_epoch_end(self) -> None:
        """Reshuffle for the next epoch, write back cache recency and fold the store's write-ahead log in."""
        self.epoch += 1
        self._order = self._epoch_order(self.epoch)
        self._last_index = None
        self._served = False
        if self._loader is not None and self._loader_pid == os.getpid():
            self._loader.drop_prefetched()
            self._loader.store.recency.flush()  # before another dataset may evict by it
            self._loader.store.recency.refresh()
            self._loader.store.checkpoint()  # the next epoch reads what this one stored through the memory map

    # -- public extras ----------------------------------------------------------------------------

    @property
    def file_paths(self) -> list[str]:
        """The images' URLs (``s3://bucket/key`` or ``s3://bucket/shard.tar#member``), as Keras's ``file_paths``.

        In Keras's order (shuffled with the seed when shuffling), which is the order of the first epoch.
        """
        return [item.url for item in self.items]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape of one image: ``(height, width, channels)``, or ``(channels, height, width)`` channels-first."""
        height, width, channels = self.spec.shape
        return (channels, height, width) if self.data_format == "channels_first" else (height, width, channels)

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
            s3 = self._s3 if self._s3_pid == os.getpid() else None  # s3fs does not survive a fork
            config = dataclasses.replace(self.config, size_limit=None)
            self._loader = config.open_loader(self.spec, self.items, s3)
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
        """This dataset as a ``tf.data.Dataset`` with known shapes, reading through the cache.

        Like the dataset ``keras.utils.image_dataset_from_directory`` returns, it has
        ``class_names`` and ``file_paths``. Each iteration is one epoch of :attr:`steps_per_epoch`
        elements (batches, or images when unbatched), reshuffled like the ``PyDataset``; a shard
        with fewer than that repeats its first ones (from the cache). Auto-sharding is off: under
        ``tf.distribute`` every worker keeps its own shard (give ``shard=`` to
        :func:`~s3cache.image_dataset_from_s3`).
        """
        import tensorflow as tf

        batch: tuple[int | None, ...] = () if self.batch_size is None else (None,)
        images = tf.TensorSpec((*batch, *self.image_shape), tf.as_dtype(self.dtype))
        if self.label_mode is None:
            signature: Any = images
        elif self.label_mode == "int":
            signature = (images, tf.TensorSpec(batch, tf.int32))
        else:
            width = self.num_classes if self.label_mode == "categorical" else 1
            signature = (images, tf.TensorSpec((*batch, width), tf.float32))

        dataset = tf.data.Dataset.from_generator(lambda: self._one_pass(self.steps_per_epoch),
                                                 output_signature=signature)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        dataset = dataset.with_options(options)
        if self.batch_size is not None or self.config.on_error == "raise":  # skipped images change the count
            dataset = dataset.apply(tf.data.experimental.assert_cardinality(self.steps_per_epoch))
        dataset = dataset.prefetch(2)
        dataset.class_names = self.class_names
        dataset.file_paths = self.file_paths
        return dataset

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_loader"], state["_loader_pid"], state["_recorder"], state["_s3"] = None, -1, None, None
        return state

    # -- internals ----------------------------------------------------------------------------------

    def _record(self, loader: Loader) -> None:
        """Write this process's counters for the current epoch (one ``pwrite``)."""
        if self._recorder is not None:
            self._recorder.record(self.epoch, loader.stats)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self.shuffle and epoch == 0 and self.cold_shards:  # a cold packed dataset: shard by shard
            return shard_window_shuffle(self.items, self.seed, epoch)
        if not self.shuffle or epoch == 0:  # the first epoch serves the items as given (Keras's order)
            return np.arange(len(self.items))
        return full_shuffle(len(self.items), self.seed, epoch)

    def _one_pass(self, steps: int) -> Iterator[Any]:
        """One epoch of ``steps`` elements (indices wrap around), then :meth:`on_epoch_end`."""
        if self._served:
            self.on_epoch_end()
        for step in range(steps if len(self) else 0):  # an empty shard has nothing to repeat
            index = step % len(self)
            if self.batch_size is not None:
                yield self[index]
                continue
            images, labels = self._load(index)
            for slot in range(len(images)):  # none when the image was skipped
                yield images[slot] if labels is None else (images[slot], labels[slot])
        self.on_epoch_end()

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The images (in :attr:`data_format`) and encoded labels (or ``None``) of index ``index``, skips left out."""
        if not 0 <= index < len(self):
            raise IndexError(f"batch index {index} out of range for {len(self)} batches")
        self._served = True
        loader = self.loader
        positions = self._positions(index)
        try:
            arrays, held = loader.load_with_hits([self.items[i] for i in positions])
            self._held[positions] = held
            loader.prefetch(self._readahead_items(index))
        finally:
            self._record(loader)  # a batch that raised counted its misses and retries too
        kept = [i for i, array in enumerate(arrays) if array is not None]
        images = np.empty((len(kept), *self.spec.shape), dtype=self.dtype)
        for slot, i in enumerate(kept):
            images[slot] = arrays[i]
        if self.data_format == "channels_first":
            images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
        if self.labels is None or self.label_mode is None:
            return images, None
        return images, self._encode_labels(self.labels[positions[kept]])

    def _readahead_items(self, index: int) -> list[Item]:
        """The items to read ahead after serving ``index``, leaving out those the store held when last served.

        After a jump that is the whole window; in sequential order only the batch entering it,
        since the previous calls asked for the others. An item left out because it was held, but
        evicted since, is read when its batch is served.
        """
        sequential = self._last_index is not None and index == self._last_index + 1
        # Never the batch just served (readahead 0): with a full cache its misses would be fetched again.
        first = index + max(self.readahead, 1) if sequential else index + 1
        last = min(index + 1 + self.readahead, len(self))
        self._last_index = index
        ahead = self._order[first * self._step: max(first, last) * self._step]
        return [self.items[i] for i in ahead[~self._held[ahead]]]

    def _batch_items(self, index: int) -> list[Item]:
        return [self.items[i] for i in self._positions(index)]

    def _positions(self, index: int) -> np.ndarray:
        """Positions in :attr:`items` of index ``index``'s images, in this epoch's order."""
        return self._order[index * self._step: (index + 1) * self._step]

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
