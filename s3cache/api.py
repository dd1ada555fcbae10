"""The front door: ``image_dataset_from_s3``, shaped like ``keras.utils.image_dataset_from_directory``."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from s3cache.dataset import S3ImageDataset
from s3cache.loader import CacheConfig, resolve_objects
from s3cache.source import DEFAULT_CONCURRENCY, S3Object, S3Source, split_url
from s3cache.spec import ImageSpec
from s3cache.store import ArrayStore, default_cache_dir, parse_size

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
    cache_size_limit: int | str = "10GB",
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
        cache_size_limit: Size limit of the cached arrays: bytes, or a string like ``"500MB"``.
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
        NotCachedError: Offline, without a stored listing for ``directory``.
        S3CacheError: S3 could not be listed (missing bucket, denied, no credentials, unreachable).
        ValueError: Inconsistent arguments.
    """
    _check_arguments(labels, label_mode, subset, validation_split, shuffle, seed)
    spec = ImageSpec(image_size, color_mode, interpolation, crop_to_aspect_ratio, pad_to_aspect_ratio)
    config = CacheConfig(str(Path(cache_dir or default_cache_dir()).expanduser()), parse_size(cache_size_limit),
                         dict(storage_options or {}), offline, on_error, concurrency)
    store = ArrayStore(config.cache_dir, config.size_limit)
    try:
        objects = resolve_objects(directory, store, None if offline else S3Source(config.storage_options))
    finally:
        store.close()
    label_array, names = _labels_for(objects, directory, labels, class_names)
    if labels == "inferred":
        keep = label_array >= 0
        objects, label_array = [o for o, k in zip(objects, keep, strict=True) if k], label_array[keep]
    if label_mode == "binary" and len(names) != 2:
        raise ValueError(f'label_mode="binary" needs exactly 2 classes, found {len(names)}: {names}')
    if verbose:
        print(f"Found {len(objects)} files" + (f" belonging to {len(names)} classes." if labels else "."))
    if shuffle and validation_split:
        # Shuffle before splitting, as Keras does; the seed makes every subset (and shard) agree.
        order = np.random.default_rng(seed).permutation(len(objects))
        objects, label_array = [objects[i] for i in order], label_array[order]

    shard_index, shard_count = resolve_shard(shard)

    def build(part: slice) -> S3ImageDataset:
        part_objects, part_labels = objects[part], label_array[part]
        mine = slice(shard_index, None, shard_count)
        largest_shard = math.ceil(len(part_objects) / shard_count)
        return S3ImageDataset(
            part_objects[mine], part_labels[mine] if labels is not None else None, names if labels else None,
            spec, config, label_mode=label_mode if labels is not None else None, batch_size=batch_size,
            shuffle=shuffle, seed=seed, dtype=dtype, steps_per_epoch=math.ceil(largest_shard / batch_size),
            workers=workers, use_multiprocessing=use_multiprocessing, max_queue_size=max_queue_size,
        )

    if not validation_split:
        return build(slice(None))
    num_val = int(validation_split * len(objects))
    train, val = slice(0, len(objects) - num_val), slice(len(objects) - num_val, None)
    if verbose:
        for name, part in (("training", train), ("validation", val)):
            if subset in (name, "both"):
                print(f"Using {len(objects[part])} files for {name}.")
    if subset == "both":
        return build(train), build(val)
    return build(train if subset == "training" else val)


def resolve_shard(shard: tuple[int, int] | str | None) -> tuple[int, int]:
    """``(index, count)`` of this worker's shard: as given, from ``TF_CONFIG`` for ``"auto"``, else ``(0, 1)``.

    Raises:
        ValueError: An index outside ``0..count-1``, or an unknown value.
    """
    if shard is None:
        return 0, 1
    if shard == "auto":
        return shard_from_tf_config(os.environ.get("TF_CONFIG", ""))
    if isinstance(shard, str) or len(shard) != 2:
        raise ValueError(f'shard must be (index, count), "auto" or None, got {shard!r}')
    index, count = (int(v) for v in shard)
    if not 0 <= index < count:
        raise ValueError(f"shard index must be in 0..{count - 1}, got {index} (of {count})")
    return index, count


def shard_from_tf_config(tf_config: str) -> tuple[int, int]:
    """This task's ``(index, count)`` among the chief and workers of a ``TF_CONFIG`` cluster.

    The chief (if any) comes first, then the workers in order, as in TensorFlow's own numbering
    of ``MultiWorkerMirroredStrategy`` tasks. Without a cluster, there is one shard.
    """
    config = json.loads(tf_config) if tf_config.strip() else {}
    cluster, task = config.get("cluster", {}), config.get("task", {})
    chiefs, workers = list(cluster.get("chief", [])), list(cluster.get("worker", []))
    if not chiefs + workers:
        return 0, 1
    if task.get("type") not in ("chief", "worker"):
        raise ValueError(f"TF_CONFIG task type {task.get('type')!r} does not train; give shard=(index, count)")
    index = int(task.get("index", 0)) + (len(chiefs) if task["type"] == "worker" else 0)
    return index, len(chiefs) + len(workers)


def _check_arguments(labels: Any, label_mode: str | None, subset: str | None, validation_split: float | None,
                     shuffle: bool, seed: int | None) -> None:
    if not (labels in ("inferred", None) or isinstance(labels, list | tuple | np.ndarray)):
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


def _labels_for(
    objects: Sequence[S3Object], directory: str | Sequence[str], labels: Any, class_names: Sequence[str] | None
) -> tuple[np.ndarray, list[str]]:
    """Integer labels per object (``-1`` for objects outside any class folder) and the class names."""
    if labels is None:
        return np.zeros(len(objects), dtype="int64"), []
    if labels != "inferred":
        given = np.asarray(labels, dtype="int64")
        if len(given) != len(objects):
            raise ValueError(f"labels has {len(given)} entries but {len(objects)} image objects were found")
        names = list(class_names) if class_names else [str(i) for i in range(int(given.max()) + 1)]
        return given, names
    folders = [_class_folder(obj, directory) for obj in objects]
    found = sorted({f for f in folders if f})
    if class_names is not None and set(class_names) != set(found):
        raise ValueError(f"class_names {list(class_names)} do not match the class folders found: {found}")
    names = list(class_names) if class_names is not None else found
    index = {name: i for i, name in enumerate(names)}
    return np.array([index.get(f, -1) if f else -1 for f in folders], dtype="int64"), names


def _class_folder(obj: S3Object, directory: str | Sequence[str]) -> str | None:
    """The class folder of an object: first path part under the prefix, or a listed URL's parent folder."""
    if isinstance(directory, str):
        relative = obj.key[len(split_url(directory)[1]):]
        folder, sep, _ = relative.lstrip("/").partition("/")
    else:
        folder, sep = obj.key.rpartition("/")[0].rpartition("/")[2], "/" if "/" in obj.key else ""
    return folder if sep and folder else None
