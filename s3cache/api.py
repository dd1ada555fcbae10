"""The front door: ``image_dataset_from_s3``, a drop-in for ``keras.utils.image_dataset_from_directory``."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from s3cache.arguments import check_array_size, check_directory, image_size_of
from s3cache.config import DEFAULT_CONCURRENCY, CacheConfig
from s3cache.dataset import DTYPES, S3ImageDataset, data_format_of
from s3cache.items import Item
from s3cache.keys import cache_key
from s3cache.labels import index_items
from s3cache.listing import ALLOWED_FORMATS, require_cached, resolve_items, run_key
from s3cache.sharding import resolve_shard, shard_slice
from s3cache.spec import ImageSpec
from s3cache.stats import warn_if_larger_than_cache
from s3cache.store.directory import CacheDirectory

LABEL_MODES = ("int", "categorical", "binary", None)
SUBSETS = ("training", "validation", "both")
FORMATS = (None, "tf")
COLOR_MODES = ("rgb", "rgba", "grayscale")


def image_dataset_from_s3(
    directory: str | Sequence[str],
    labels: str | Sequence[int] | None = "inferred",
    label_mode: str | None = "int",
    class_names: Sequence[str] | None = None,
    color_mode: str = "rgb",
    batch_size: int | None = 32,
    image_size: int | tuple[int, int] = (256, 256),
    shuffle: bool = True,
    seed: int | None = None,
    validation_split: float | None = None,
    subset: str | None = None,
    interpolation: str = "bilinear",
    follow_links: bool = False,
    crop_to_aspect_ratio: bool = False,
    pad_to_aspect_ratio: bool = False,
    data_format: str | None = None,
    format: str | None = None,
    verbose: bool = True,
    *,
    dtype: str = "float32",
    cache_dir: str | os.PathLike[str] | None = None,
    cache_size_limit: int | str | None = None,
    offline: bool = False,
    on_error: str = "raise",
    storage_options: dict[str, Any] | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    workers: int = 1,
    use_multiprocessing: bool = False,
    max_queue_size: int = 10,
    shard: tuple[int, int] | str | None = None,
    decoder: str | None = None,
) -> Any:
    """A Keras dataset of the images under an S3 prefix, cached on local disk as resized arrays.

    Takes every argument of ``keras.utils.image_dataset_from_directory``, in the same order and
    with the same meaning, and picks the same files in the same order: the same ``labels`` list
    fits, and the same ``seed`` puts the same files into the validation subset. The first pass
    reads S3 (concurrently, reading ahead); later passes, later runs and ``offline=True`` runs
    read the cache. Every argument is checked before anything is read or written.

    Args:
        directory: A prefix URL (``"s3://bucket/train/"``), or a list of ``s3://`` object URLs
            (kept in their order; with inferred labels, an object's parent folder is its class).
        labels: ``"inferred"`` (the first folder under the prefix names the class; objects
            directly under the prefix, and folders starting with ``.``, are left out), ``None``,
            or a list/tuple of integer labels, one per image in the order Keras walks the
            directory (see :mod:`s3cache.labels`).
        label_mode: ``"int"``, ``"categorical"``, ``"binary"`` or ``None`` (no labels, as ``labels=None``).
        class_names: With inferred labels, the classes to use (a subset of the folders), in label order.
        color_mode: ``"rgb"``, ``"rgba"`` or ``"grayscale"``.
        batch_size: Images per batch; ``None`` yields single images.
        image_size: ``(height, width)`` of the arrays, or one int for a square.
        shuffle: Shuffle the files (with ``seed``, as Keras does) and reshuffle every epoch;
            ``False`` keeps Keras's sorted order.
        seed: Seed for shuffling and the validation split.
        validation_split: Fraction of the files held out for validation.
        subset: ``"training"``, ``"validation"`` or ``"both"`` (returns a pair).
        interpolation: Resampling filter (the names Keras accepts).
        follow_links: Accepted for compatibility; S3 has no symbolic links, so it changes nothing.
        crop_to_aspect_ratio: Center-crop to the target aspect ratio before resizing.
        pad_to_aspect_ratio: Pad to the target aspect ratio before resizing.
        data_format: ``"channels_last"`` or ``"channels_first"``; default ``keras.config.image_data_format()``.
        format: ``None`` (default): a :class:`~s3cache.dataset.S3ImageDataset`, a Keras ``PyDataset``
            that works with every backend; ``"tf"``: a ``tf.data.Dataset`` like Keras's own (see
            :meth:`~s3cache.dataset.S3ImageDataset.to_tf_dataset`). Keras's ``"grain"`` is not supported.
        verbose: Print how many files and classes were found, and the split.
        dtype: ``"float32"`` or ``"uint8"`` images (values 0-255 either way).
        cache_dir: Cache directory; default ``$S3CACHE_DIR``, else ``~/.cache/s3cache``.
        cache_size_limit: Size limit of the cached arrays: bytes, or a string like ``"500MB"``. It is
            the cache's own: ``None`` keeps the stored limit (10 GB for a new cache); a value
            replaces it, for every process using the cache, and evicts down to it at once.
        offline: Never contact S3: use the stored listing and the cached arrays.
        on_error: ``"raise"`` or ``"skip"`` (with a warning) for objects that cannot be decoded.
        storage_options: Options for ``s3fs.S3FileSystem`` (``endpoint_url``, ``anon``, ``key``, ...).
        concurrency: Most S3 requests in flight per process.
        workers: ``keras.utils.PyDataset`` workers.
        use_multiprocessing: ``keras.utils.PyDataset`` option.
        max_queue_size: ``keras.utils.PyDataset`` option.
        shard: ``(index, count)`` keeps every ``count``-th image starting at ``index`` (after the
            validation split), for multi-worker training; ``"auto"`` reads them from ``TF_CONFIG``.
        decoder: How fetched images are decoded: ``"auto"`` (TensorFlow's ops, in batches, where the
            process already imported TensorFlow; else NumPy), ``"numpy"`` or ``"tensorflow"``; default
            ``$S3CACHE_DECODER``, else ``"auto"``. The arrays are the same either way (see
            :mod:`s3cache.decoders`).

    Returns:
        An :class:`~s3cache.dataset.S3ImageDataset` (or a ``tf.data.Dataset`` for ``format="tf"``),
        or a ``(training, validation)`` pair for ``subset="both"``. Either has ``class_names``
        and ``file_paths`` (``s3://`` URLs) as Keras's datasets do.

    Raises:
        EmptyListingError: No images (a ``ValueError``, as in Keras).
        NotCachedError: Offline, and the cache lacks the listing of ``directory`` or some of its
            arrays (the error names them and says how many).
        S3CacheError: S3 could not be listed (missing bucket, denied, no credentials, unreachable).
        ValueError: A bad argument, found before any request is made.
    """
    # -- every check first: nothing is read, written or requested before them ------------------------
    check_directory(directory)
    _check_labels(labels, label_mode, class_names)
    if labels is None or label_mode is None:  # as in Keras: either one means no labels
        labels = label_mode = None
    if color_mode not in COLOR_MODES:
        raise ValueError('`color_mode` must be one of {"rgb", "rgba", "grayscale"}. '
                         f"Received: color_mode={color_mode}")
    image_size = image_size_of(image_size)
    spec = ImageSpec(image_size, color_mode, interpolation, crop_to_aspect_ratio, pad_to_aspect_ratio)
    check_array_size(spec.image_size, spec.color_mode)
    if format not in FORMATS:
        hint = " (grain is not supported: use the default, a PyDataset, or format='tf')" if format == "grain" else ""
        raise ValueError(f'`format` should be None or "tf". Received: format={format}{hint}')
    _check_validation_split(validation_split, subset, shuffle, seed)
    _check_positive("batch_size", batch_size, allow_none=True)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    data_format = data_format_of(data_format)
    if storage_options is not None and not isinstance(storage_options, dict):
        raise ValueError(f"storage_options must be a dict of s3fs.S3FileSystem options, got {storage_options!r}")
    _check_positive("workers", workers)
    _check_positive("max_queue_size", max_queue_size)
    config = CacheConfig.create(cache_dir, cache_size_limit, storage_options, offline=offline, on_error=on_error,
                                concurrency=concurrency, decoder=decoder)
    shard_index, shard_count = resolve_shard(shard)
    if seed is None:
        seed = int(np.random.randint(1e6))  # as Keras draws it (keras.utils.set_random_seed makes it repeatable)

    # -- list (or read the stored listing), then order, label, shuffle and split as Keras does ----------
    with config.open_cache(spec=spec) as cache:
        s3 = config.open_s3()  # the datasets read through its client too: it is ready by then
        listed = resolve_items(directory, cache.meta, s3)
        if offline:
            require_cached(listed, spec.fingerprint, cache.arrays)
        warn_if_larger_than_cache(listed, spec, cache.arrays)
        cold_shards = not offline and _mostly_uncached_members(listed, spec, cache)
    items, label_array, names = index_items(listed, directory, labels, class_names)
    if label_mode == "binary" and len(names or ()) != 2:
        raise ValueError('When passing `label_mode="binary"`, there must be exactly 2 class_names. '
                         f"Received: class_names={names}")
    if label_mode in ("binary", "categorical") and label_array is not None and len(label_array) \
            and not 0 <= label_array.min() <= label_array.max() < len(names or ()):
        raise ValueError(f"with label_mode={label_mode!r}, labels must be integers from 0 to the number of classes "
                         f"minus 1; got labels {sorted(set(label_array.tolist()))}")
    if verbose:
        found = f"Found {len(items)} files"
        print(found + (f" belonging to {len(names or ())} classes." if label_array is not None else "."))
    if shuffle:
        # Keras shuffles the file list and the labels with two RandomState(seed) generators: the same permutation.
        order = list(range(len(items)))
        np.random.RandomState(seed).shuffle(order)
        items = [items[i] for i in order]
        label_array = label_array[order] if label_array is not None else None

    def build(part: slice, part_shuffle: bool) -> Any:
        part_items = items[part]
        mine = shard_slice(shard_index, shard_count)
        largest_shard = math.ceil(len(part_items) / shard_count)
        ds = S3ImageDataset(
            part_items[mine], label_array[part][mine] if label_array is not None else None, names, spec, config,
            label_mode=label_mode, batch_size=batch_size, shuffle=part_shuffle, seed=seed, dtype=dtype,
            data_format=data_format, steps_per_epoch=math.ceil(largest_shard / (batch_size or 1)),
            workers=workers, use_multiprocessing=use_multiprocessing, max_queue_size=max_queue_size,
            cold_shards=cold_shards, run=run_key(spec.fingerprint, directory), s3=s3 and s3.sharing_client(),
        )
        return ds.to_tf_dataset() if format == "tf" else ds

    if not validation_split:
        return build(slice(None), shuffle)
    num_val = int(validation_split * len(items))
    if num_val == 0:  # Keras would return an empty training subset and a validation subset of every file
        raise ValueError(f"No validation images found in directory {directory}: validation_split={validation_split} "
                         f"of {len(items)} files is less than one file. Allowed formats: {ALLOWED_FORMATS}")
    train, val = slice(0, len(items) - num_val), slice(len(items) - num_val, None)
    if verbose:
        for name, part in (("training", train), ("validation", val)):
            if subset in (name, "both"):
                print(f"Using {len(items[part])} files for {name}.")
    if subset == "both":
        # As in Keras: the validation half of a pair keeps one order; a single subset follows `shuffle`.
        return build(train, shuffle), build(val, False)
    return build(train, shuffle) if subset == "training" else build(val, shuffle)


def _check_labels(labels: Any, label_mode: Any, class_names: Any) -> None:
    """Keras's checks of ``labels``, ``label_mode`` and ``class_names``, with its wording."""
    if not (labels is None or (isinstance(labels, str) and labels == "inferred")):
        if not isinstance(labels, list | tuple | np.ndarray) or not _all_ints(labels):
            raise ValueError(
                "`labels` argument should be a list/tuple of integer labels, of the same size as the number of "
                "image files in the target directory. If you wish to infer the labels from the subdirectory names "
                'in the target directory, pass `labels="inferred"`. If you wish to get a dataset that only '
                f"contains images (no labels), pass `labels=None`. Received: labels={labels}"
            )
        if class_names:
            raise ValueError('You can only pass `class_names` if `labels="inferred"`. '
                             f"Received: labels={labels}, and class_names={class_names}")
    if label_mode not in LABEL_MODES:
        raise ValueError('`label_mode` argument must be one of "int", "categorical", "binary", or None. '
                         f"Received: label_mode={label_mode}")
    if class_names is not None:
        if labels is None or label_mode is None:
            raise ValueError("When `labels=None` (no labels), argument `class_names` cannot be specified.")
        if isinstance(class_names, str) or not all(isinstance(name, str) for name in class_names):
            raise ValueError(f"class_names must be a list of folder names, got {class_names!r}")


def _check_validation_split(validation_split: Any, subset: Any, shuffle: Any, seed: Any) -> None:
    """Keras's ``check_validation_split_arg``, with its wording."""
    if validation_split and not 0 < validation_split < 1:
        raise ValueError(f"`validation_split` must be between 0 and 1, received: {validation_split}")
    if (validation_split or subset) and not (validation_split and subset):
        raise ValueError("If `subset` is set, `validation_split` must be set, and inversely.")
    if subset not in (*SUBSETS, None):
        raise ValueError(f'`subset` must be either "training", "validation" or "both", received: {subset}')
    if validation_split and shuffle and seed is None:
        raise ValueError("If using `validation_split` and shuffling the data, you must provide a `seed` argument, "
                         "to make sure that there is no overlap between the training and validation subset.")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int | np.integer)
                             or not 0 <= seed < 2**32):
        raise ValueError(f"seed must be None or an integer from 0 to 2**32 - 1, got {seed!r}")


def _check_positive(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if allow_none else ''}, got {value!r}")


def _all_ints(values: Any) -> bool:
    array = np.asarray(values)
    return array.ndim == 1 and (array.size == 0 or array.dtype.kind in "iu")


def _mostly_uncached_members(items: Sequence[Item], spec: ImageSpec, cache: CacheDirectory) -> bool:
    """Whether the items are tar-shard members and most of a sample of them is not cached yet."""
    members = [item for item in items if item.member is not None]
    if not members:
        return False
    sample = [members[i] for i in np.random.default_rng(0).choice(len(members), min(256, len(members)), False)]
    cached = cache.arrays.existing([cache_key(spec.fingerprint, item) for item in sample])
    return len(cached) < len(sample) / 2
