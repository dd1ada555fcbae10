"""The front door: ``image_dataset_from_s3``, shaped like ``keras.utils.image_dataset_from_directory``."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from s3cache.config import DEFAULT_CONCURRENCY, CacheConfig
from s3cache.dataset import S3ImageDataset
from s3cache.labels import labels_for
from s3cache.listing import require_cached, resolve_items, run_key
from s3cache.sharding import resolve_shard, shard_slice
from s3cache.spec import ImageSpec
from s3cache.stats import warn_if_larger_than_cache

LABEL_MODES = ("int", "categorical", "binary", None)
SUBSETS = ("training", "validation", "both")


def image_dataset_from_s3(
    directory: str | Sequence[str],
    labels: str | Sequence[int] | None = "inferred",
    label_mode: str | None = "int",
    class_names: Sequence[str] | None = None,
    color_mode: str = "rgb",
    batch_size: int = 32,
    image_size: tuple[int, int] = (256, 256),
    shuffle: bool = True,
    seed: int | None = None,
    validation_split: float | None = None,
    subset: str | None = None,
    interpolation: str = "bilinear",
    crop_to_aspect_ratio: bool = False,
    pad_to_aspect_ratio: bool = False,
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
    verbose: bool = True,
) -> S3ImageDataset | tuple[S3ImageDataset, S3ImageDataset]:
    """A Keras dataset of the images under an S3 prefix, cached on local disk as resized arrays.

    The first pass reads S3 (concurrently, reading ahead); later passes, later runs and
    ``offline=True`` runs read the cache. Arguments not listed are as in
    ``keras.utils.image_dataset_from_directory``.

    Args:
        directory: A prefix URL (``"s3://bucket/train/"``) or a list of ``s3://`` object URLs.
        labels: ``"inferred"`` (the first path part under the prefix names the class; for a
            list of URLs, the parent folder), ``None``, or one integer label per object
            (objects of a prefix in key order, a list in its own order).
        label_mode: ``"int"``, ``"categorical"``, ``"binary"`` or ``None``.
        class_names: Class folder names to use, in label order (must match the folders).
        color_mode: ``"rgb"``, ``"rgba"`` or ``"grayscale"``.
        batch_size: Images per batch.
        image_size: ``(height, width)`` of the arrays.
        shuffle: Shuffle the files (with ``seed``) and reshuffle every epoch.
        seed: Seed for shuffling and the validation split.
        validation_split: Fraction of the files held out for validation.
        subset: ``"training"``, ``"validation"`` or ``"both"`` (returns a pair).
        interpolation: Resampling filter.
        crop_to_aspect_ratio: Center-crop to the target aspect ratio before resizing.
        pad_to_aspect_ratio: Pad to the target aspect ratio before resizing.
        dtype: ``"float32"`` or ``"uint8"`` batches (values 0-255 either way).
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
        shard: ``(index, count)`` keeps every ``count``-th object starting at ``index`` (after the
            validation split), for multi-worker training; ``"auto"`` reads them from ``TF_CONFIG``.
        verbose: Print how many files and classes were found.

    Returns:
        An :class:`~s3cache.dataset.S3ImageDataset`, or a ``(training, validation)`` pair for
        ``subset="both"``.

    Raises:
        EmptyListingError: The prefix holds no image objects.
        NotCachedError: Offline, and the cache lacks the listing of ``directory`` or some of its
            arrays (the error names them and says how many).
        S3CacheError: S3 could not be listed (missing bucket, denied, no credentials, unreachable).
        ValueError: Inconsistent arguments.
    """
    _check_arguments(labels, label_mode, subset, validation_split, shuffle, seed)
    spec = ImageSpec(image_size, color_mode, interpolation, crop_to_aspect_ratio, pad_to_aspect_ratio)
    config = CacheConfig.create(cache_dir, cache_size_limit, storage_options, offline=offline, on_error=on_error,
                                concurrency=concurrency)
    shard_index, shard_count = resolve_shard(shard)
    with config.open_cache() as cache:
        items = resolve_items(directory, cache.meta, config.open_source())
        if offline:
            require_cached(items, spec.fingerprint, cache.arrays)
        warn_if_larger_than_cache(items, spec, cache.arrays)
    label_array, names = labels_for(items, directory, labels, class_names)
    if isinstance(labels, str):  # inferred: items outside every class folder are left out, as in Keras
        keep = label_array >= 0
        items, label_array = [item for item, k in zip(items, keep, strict=True) if k], label_array[keep]
    if label_mode == "binary" and len(names) != 2:
        raise ValueError(f'label_mode="binary" needs exactly 2 classes, found {len(names)}: {names}')
    if verbose:
        print(f"Found {len(items)} files" + (f" belonging to {len(names)} classes." if labels is not None else "."))
    if shuffle and validation_split:
        # Shuffle before splitting, as Keras does; the seed makes every subset (and shard) agree.
        order = np.random.default_rng(seed).permutation(len(items))
        items, label_array = [items[i] for i in order], label_array[order]

    def build(part: slice) -> S3ImageDataset:
        part_items, part_labels = items[part], label_array[part]
        mine = shard_slice(shard_index, shard_count)
        largest_shard = math.ceil(len(part_items) / shard_count)
        return S3ImageDataset(
            part_items[mine], part_labels[mine] if labels is not None else None, names if labels is not None else None,
            spec, config, label_mode=label_mode if labels is not None else None, batch_size=batch_size,
            shuffle=shuffle, seed=seed, dtype=dtype, steps_per_epoch=math.ceil(largest_shard / batch_size),
            workers=workers, use_multiprocessing=use_multiprocessing, max_queue_size=max_queue_size,
            run=run_key(spec.fingerprint, directory),
        )

    if not validation_split:
        return build(slice(None))
    num_val = int(validation_split * len(items))
    train, val = slice(0, len(items) - num_val), slice(len(items) - num_val, None)
    if verbose:
        for name, part in (("training", train), ("validation", val)):
            if subset in (name, "both"):
                print(f"Using {len(items[part])} files for {name}.")
    if subset == "both":
        return build(train), build(val)
    return build(train if subset == "training" else val)


def _check_arguments(labels: Any, label_mode: str | None, subset: str | None, validation_split: float | None,
                     shuffle: bool, seed: int | None) -> None:
    if not (labels is None or (isinstance(labels, str) and labels == "inferred")
            or isinstance(labels, list | tuple | np.ndarray)):
        raise ValueError(f'labels must be "inferred", None or a list of integers, got {labels!r}')
    if label_mode not in LABEL_MODES:
        raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
    if subset not in (*SUBSETS, None):
        raise ValueError(f"subset must be one of {SUBSETS} or None, got {subset!r}")
    if validation_split is not None and not 0 < validation_split < 1:
        raise ValueError(f"validation_split must be between 0 and 1, got {validation_split}")
    if bool(subset) != bool(validation_split):
        raise ValueError("validation_split and subset must be given together")
    if validation_split and shuffle and seed is None:
        raise ValueError("a validation split with shuffling needs a seed, so both subsets agree on the split")
