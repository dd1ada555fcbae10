"""Cache operations behind the ``s3cache`` command: warm, inspect, list, verify and clear.

Every function returns plain data and prints nothing; :mod:`s3cache.cli` only formats it.
None of them imports Keras or TensorFlow.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from s3cache.errors import CacheError, NotCachedError
from s3cache.loader import FillProgress, Loader, resolve_objects
from s3cache.source import DEFAULT_CONCURRENCY, S3Object, S3Source
from s3cache.spec import ImageSpec
from s3cache.store import ArrayStore, Problem, default_cache_dir, parse_size

__all__ = ["Problem", "WarmReport", "cache_info", "clear_cache", "list_objects", "verify_cache", "warm"]


@dataclass(frozen=True)
class WarmReport:
    """What :func:`warm` did.

    Attributes:
        url: The listed prefix.
        cache_dir: The cache directory filled.
        fingerprint: The spec's cache namespace.
        total: Image objects listed.
        hits: Objects that were already cached (not fetched).
        fetched: Objects read from S3 in this run, ``failed`` included.
        failed: Fetched objects that could not be decoded (stored as failure records).
        bytes_fetched: Bytes received from S3 for the fetched objects.
        seconds: Wall time, listing included.
    """

    url: str
    cache_dir: str
    fingerprint: str
    total: int
    hits: int
    fetched: int
    failed: int
    bytes_fetched: int
    seconds: float


def warm(
    url: str,
    image_size: Sequence[int],
    *,
    color_mode: str = "rgb",
    interpolation: str = "bilinear",
    crop_to_aspect_ratio: bool = False,
    pad_to_aspect_ratio: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    cache_size_limit: int | str | None = None,
    storage_options: dict[str, Any] | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    progress: Callable[[FillProgress], None] | None = None,
    on_listed: Callable[[int], None] | None = None,
) -> WarmReport:
    """List a prefix (storing the listing) and cache the resized array of every image under it.

    Objects already cached under the same spec and ETag are not fetched again. Interrupting it
    (Ctrl-C) keeps every entry stored so far.

    Args:
        url: A prefix URL such as ``"s3://bucket/train/"``.
        image_size: ``(height, width)`` of the arrays.
        color_mode: ``"rgb"``, ``"rgba"`` or ``"grayscale"``.
        interpolation: Resampling filter.
        crop_to_aspect_ratio: Center-crop to the target aspect ratio before resizing.
        pad_to_aspect_ratio: Pad to the target aspect ratio before resizing.
        cache_dir: Cache directory; default ``$S3CACHE_DIR``, else ``~/.cache/s3cache``.
        cache_size_limit: New size limit (bytes or a string like ``"10GB"``); ``None`` keeps the stored one.
        storage_options: Options for ``s3fs.S3FileSystem``.
        concurrency: Most S3 requests in flight.
        progress: Called once per object with a :class:`~s3cache.loader.FillProgress`.
        on_listed: Called with the number of image objects once the listing is known.

    Returns:
        A :class:`WarmReport`.

    Raises:
        S3CacheError: Listing or fetching failed (see :mod:`s3cache.errors`).
        ValueError: Inconsistent arguments.
    """
    spec = ImageSpec(tuple(image_size), color_mode, interpolation, crop_to_aspect_ratio, pad_to_aspect_ratio)
    limit = None if cache_size_limit is None else parse_size(cache_size_limit)
    counts: Counter[str] = Counter()

    def count(event: FillProgress) -> None:
        counts["hits" if event.hit else "fetched"] += 1
        counts["failed"] += event.failed
        if progress:
            progress(event)

    started = time.perf_counter()
    source = S3Source(storage_options, concurrency=concurrency)
    with _store(cache_dir, limit, must_exist=False) as store:
        objects = resolve_objects(url, store, source)
        if on_listed:
            on_listed(len(objects))
        loader = Loader(spec, store, source)
        try:
            loader.fill(objects, count)
        finally:
            loader.close()
    return WarmReport(url, str(store.directory), spec.fingerprint, len(objects), counts["hits"], counts["fetched"],
                      counts["failed"], source.bytes_received, time.perf_counter() - started)


def cache_info(cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Describe a cache: location, size, limit, specs and how much of each stored listing is cached.

    Returns:
        A JSON-ready dict with ``directory``, ``entries``, ``size_bytes``, ``size_limit_bytes``,
        ``specs`` (fingerprint -> ``{"description": <spec fields>, "entries": n}``) and ``listings``:
        one row ``{"url", "spec", "objects", "cached", "fraction"}`` per stored listing and spec
        holding at least one of its objects, or a single row with ``spec: None`` and nothing cached
        when no spec holds any.

    Raises:
        CacheError: There is no cache in the directory.
    """
    with _store(cache_dir) as store:
        keys = set(store.keys())
        per_spec = Counter(key.partition("/")[0] for key in keys)
        specs = {fingerprint: {"description": description, "entries": per_spec.get(fingerprint, 0)}
                 for fingerprint, description in sorted(store.specs().items())}
        with _loaders(store) as loaders:
            listings = [row for url in store.listing_urls() for row in _listing_rows(store, url, loaders, keys)]
        return {
            "directory": str(store.directory),
            "entries": len(keys),
            "size_bytes": store.volume(),
            "size_limit_bytes": store.size_limit,
            "specs": specs,
            "listings": listings,
        }


def list_objects(
    url: str,
    *,
    image_size: Sequence[int],
    color_mode: str = "rgb",
    interpolation: str = "bilinear",
    crop_to_aspect_ratio: bool = False,
    pad_to_aspect_ratio: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    offline: bool = False,
) -> list[tuple[S3Object, bool]]:
    """List a prefix and tell, per object, whether its array is cached under the given spec.

    Online, the fresh listing is also stored (as a dataset build would); offline, the stored one is used.

    Returns:
        ``(object, cached)`` pairs in key order.

    Raises:
        NotCachedError: Offline, and no listing of ``url`` is stored.
        S3CacheError: Listing failed.
        ValueError: Inconsistent arguments.
    """
    spec = ImageSpec(tuple(image_size), color_mode, interpolation, crop_to_aspect_ratio, pad_to_aspect_ratio)
    with _store(cache_dir, must_exist=offline) as store:
        objects = resolve_objects(url, store, None if offline else S3Source(storage_options))
        loader = Loader(spec, store, None)
        try:
            keys = [loader.cache_key(obj) for obj in objects]
            cached = store.existing(keys)
            return [(obj, key in cached) for obj, key in zip(objects, keys, strict=True)]
        finally:
            loader.close()


def verify_cache(cache_dir: str | os.PathLike[str] | None = None, fix: bool = False) -> list[Problem]:
    """Check every entry's header, length and checksum, and the database against the value files.

    Args:
        cache_dir: The cache directory.
        fix: Remove damaged entries and repair database/file mismatches.

    Returns:
        The problems found (before any fixing).

    Raises:
        CacheError: There is no cache in the directory.
    """
    with _store(cache_dir) as store:
        return store.verify(fix=fix)


def clear_cache(
    cache_dir: str | os.PathLike[str] | None = None, *, spec: str | None = None, url: str | None = None
) -> int:
    """Remove cached arrays: everything, one spec's namespace, or one stored listing's objects.

    Args:
        cache_dir: The cache directory.
        spec: A spec fingerprint (as shown by :func:`cache_info`): remove its arrays and its record.
        url: A stored listing's URL: remove the listing and its objects' arrays under every spec.

    Returns:
        The number of array entries removed. Without ``spec`` and ``url``, listings and spec
        records are removed as well.

    Raises:
        CacheError: There is no cache in the directory.
        NotCachedError: The spec or listing is not in the cache.
        ValueError: Both ``spec`` and ``url`` were given.
    """
    if spec is not None and url is not None:
        raise ValueError("give a spec or a url to clear, not both")
    with _store(cache_dir) as store:
        if spec is not None:
            return _clear_spec(store, spec)
        if url is not None:
            return _clear_listing(store, url)
        removed = store.clear()
        for name in store.listing_urls():
            store.delete_listing(name)
        for fingerprint in store.specs():
            store.delete_spec(fingerprint)
        return removed


# -- internals --------------------------------------------------------------------------------------


@contextmanager
def _store(
    cache_dir: str | os.PathLike[str] | None, size_limit: int | None = None, *, must_exist: bool = True
) -> Iterator[ArrayStore]:
    """Open (and always close) the store; inspecting commands refuse to create a cache."""
    directory = Path(cache_dir or default_cache_dir()).expanduser()
    if must_exist and not (directory / "arrays").is_dir():
        raise CacheError(f"no s3cache cache in {directory} (nothing cached yet; run `s3cache warm` first)")
    store = ArrayStore(directory, size_limit)
    try:
        yield store
    finally:
        store.close()


@contextmanager
def _loaders(store: ArrayStore) -> Iterator[dict[str, Loader]]:
    """Offline loaders of the recorded specs, by fingerprint, to compute cache keys with.

    Specs recorded by another decoder version no longer reproduce their fingerprint; their
    entries are never served, so they are left out.
    """
    loaders: dict[str, Loader] = {}
    try:
        for fingerprint, description in store.specs().items():
            spec = ImageSpec.from_dict(description)
            if spec.fingerprint == fingerprint:
                loaders[fingerprint] = Loader(spec, store, None)
        yield loaders
    finally:
        for loader in loaders.values():
            loader.close()


def _listing_rows(store: ArrayStore, url: str, loaders: dict[str, Loader], keys: set[str]) -> list[dict[str, Any]]:
    objects = _stored_objects(store, url)
    rows = []
    for fingerprint, loader in loaders.items():
        cached = sum(loader.cache_key(obj) in keys for obj in objects)
        if cached:
            rows.append({"url": url, "spec": fingerprint, "objects": len(objects), "cached": cached,
                         "fraction": cached / len(objects)})
    return rows or [{"url": url, "spec": None, "objects": len(objects), "cached": 0, "fraction": 0.0}]


def _stored_objects(store: ArrayStore, url: str) -> list[S3Object]:
    listing = store.get_listing(url)
    if listing is None:
        raise NotCachedError(f"no stored listing for {url}; stored listings: {store.listing_urls() or 'none'}")
    return [S3Object.from_json(row) for row in listing["objects"]]


def _clear_spec(store: ArrayStore, fingerprint: str) -> int:
    known = store.specs()
    if fingerprint not in known:
        raise NotCachedError(f"no spec {fingerprint} in the cache; recorded specs: {sorted(known) or 'none'}")
    removed = store.evict_tag(fingerprint)
    store.delete_spec(fingerprint)
    return removed


def _clear_listing(store: ArrayStore, url: str) -> int:
    objects = _stored_objects(store, url)
    with _loaders(store) as loaders:
        removed = sum(store.delete(loader.cache_key(obj)) for loader in loaders.values() for obj in objects)
    store.delete_listing(url)
    return removed
