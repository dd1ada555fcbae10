"""Cache operations behind the ``s3cache`` command: warm, inspect, list, verify and clear.

Every function returns plain data and prints nothing; :mod:`s3cache.cli` only formats it.
None of them imports Keras or TensorFlow.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from s3cache.config import DEFAULT_CONCURRENCY, CacheConfig, reading_members_by_chunk
from s3cache.errors import CacheError, NotCachedError, S3CacheError
from s3cache.items import Item
from s3cache.keys import cache_key
from s3cache.listing import list_online, listing_name, resolve_items, run_key, stored_items
from s3cache.loader import FillProgress, Loader
from s3cache.spec import ImageSpec
from s3cache.stats import fitting_items, warn_if_larger_than_cache
from s3cache.store import MetaStore, Problem
from s3cache.store.directory import CacheDirectory, verify_directory

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
        left_out: Objects neither read nor fetched because the cache cannot hold them too (a
            :class:`~s3cache.stats.CacheTooSmallWarning` says so): training reads them from S3.
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
    left_out: int = 0


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
    decoder: str | None = None,
    progress: Callable[[FillProgress], None] | None = None,
    on_listed: Callable[[int], None] | None = None,
) -> WarmReport:
    """List a prefix (storing the listing) and cache the resized array of every image under it.

    Objects already cached under the same spec and ETag are not fetched again. Interrupting it
    (Ctrl-C) keeps every entry stored so far. When the arrays do not all fit the cache's size
    limit, it warns (:class:`~s3cache.stats.CacheTooSmallWarning`) and fills the cache with the first
    objects that fit, rather than fetching the others for nothing.

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
        decoder: ``"auto"``, ``"numpy"`` or ``"tensorflow"`` (default ``$S3CACHE_DECODER``, else ``"auto"``,
            which is NumPy unless this process imported TensorFlow): see :mod:`s3cache.decoders`.
        progress: Called once per object with a :class:`~s3cache.loader.FillProgress`.
        on_listed: Called with the number of image objects once the listing is known.

    Returns:
        A :class:`WarmReport`.

    Raises:
        S3CacheError: Listing or fetching failed (see :mod:`s3cache.errors`).
        ValueError: Inconsistent arguments.
    """
    spec = ImageSpec(tuple(image_size), color_mode, interpolation, crop_to_aspect_ratio, pad_to_aspect_ratio)
    config = CacheConfig.create(cache_dir, cache_size_limit, storage_options, concurrency=concurrency, decoder=decoder)
    counts: Counter[str] = Counter()

    def count(event: FillProgress) -> None:
        counts["hits" if event.hit else "fetched"] += 1
        counts["failed"] += event.failed
        if progress:
            progress(event)

    started = time.perf_counter()
    source = config.open_source()
    assert source is not None  # the config is online
    with config.open_cache(spec=spec) as cache:
        items = resolve_items(url, cache.meta, source)
        if on_listed:
            on_listed(len(items))
        cache.record_spec(spec.fingerprint, spec.to_dict())
        cache.arrays.begin_run(run_key(spec.fingerprint, url))  # the same run as training on this prefix
        kept = items if warn_if_larger_than_cache(items, spec, cache.arrays) >= 1 else \
            fitting_items(items, spec, cache.arrays)
        loader = Loader(spec, cache.arrays, reading_members_by_chunk(source, kept), decoder=config.decoder)
        try:
            loader.fill(kept, count)
        finally:
            loader.close()
    return WarmReport(url, str(config.cache_dir), spec.fingerprint, len(items), counts["hits"], counts["fetched"],
                      counts["failed"], source.counters.bytes_received, time.perf_counter() - started,
                      len(items) - len(kept))


def cache_info(cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Describe a cache: location, size, limit, specs and how much of each stored listing is cached.

    Works on a full file system (the cache is then read as it is).

    Returns:
        A JSON-ready dict with ``directory``, ``entries``, ``size_bytes``, ``size_limit_bytes``,
        ``specs`` (fingerprint -> ``{"description": <spec fields>, "entries": n, "size_bytes": b}``),
        ``unrecorded`` (``{"entries": n, "size_bytes": b}``: entries under no recorded spec, such as
        those a running writer stored after ``clear`` removed its spec record) and ``listings``:
        one row ``{"url", "spec", "objects", "cached", "fraction"}`` per stored listing and spec
        holding at least one of its objects, or a single row with ``spec: None`` and nothing cached
        when no spec holds any.

    Raises:
        CacheError: There is no cache in the directory, or it is damaged or not trusted.
    """
    with _open_existing(cache_dir) as cache, _damaged_metadata(cache):
        keys = set(cache.arrays.keys())
        usage = cache.arrays.usage()
        recorded = cache.meta.specs()
        specs = {fingerprint: {"description": description, "entries": usage.get(fingerprint, (0, 0))[0],
                               "size_bytes": usage.get(fingerprint, (0, 0))[1]}
                 for fingerprint, description in sorted(recorded.items())}
        unrecorded = [counts for fingerprint, counts in usage.items() if fingerprint not in recorded]
        fingerprints = _current_fingerprints(cache.meta)
        listings = [row for name in cache.meta.listing_names()
                    for row in _listing_rows(cache.meta, name, fingerprints, keys)]
        return {
            "directory": str(cache.path),
            "entries": len(keys),
            "size_bytes": cache.arrays.volume(),
            "size_limit_bytes": cache.arrays.size_limit,
            "specs": specs,
            "unrecorded": {"entries": sum(n for n, _ in unrecorded), "size_bytes": sum(b for _, b in unrecorded)},
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
) -> list[tuple[Item, bool]]:
    """List a prefix and tell, per object, whether its array is cached under the given spec.

    Nothing is written: online, the prefix is listed afresh (and a missing cache means nothing is
    cached); offline, the stored listing is used.

    Returns:
        ``(object, cached)`` pairs in key order.

    Raises:
        NotCachedError: Offline, and no listing of ``url`` is stored.
        S3CacheError: Listing failed.
        ValueError: Inconsistent arguments.
    """
    spec = ImageSpec(tuple(image_size), color_mode, interpolation, crop_to_aspect_ratio, pad_to_aspect_ratio)
    config = CacheConfig.create(cache_dir, storage_options=storage_options, offline=offline)
    if offline:
        with _open_existing(cache_dir) as cache:
            return _marked(stored_items(cache.meta, listing_name(url)), spec, cache)
    source = config.open_source()
    assert source is not None  # the config is online
    items = list_online(url, source)
    if not (config.cache_dir / "arrays").is_dir():
        return [(item, False) for item in items]
    with config.open_cache(must_exist=True) as cache:
        return _marked(items, spec, cache)


def verify_cache(cache_dir: str | os.PathLike[str] | None = None, fix: bool = False) -> list[Problem]:
    """Check both databases of a cache, every entry's form, header, length and checksum, and the value files.

    Works on a full file system: the cache is then read as it is, and fixing removes files before
    it writes to a database.

    Args:
        cache_dir: The cache directory.
        fix: Remove damaged entries and unknown files, repair database/file mismatches, and rebuild
            a damaged database empty (arrays are fetched from S3 again, listings listed again).

    Returns:
        The problems found (before any fixing); ``Problem.action`` says when a database was rebuilt.

    Raises:
        CacheError: There is no cache in the directory, it is not trusted, or fixing needs to
            write and its file system is full.
    """
    config = CacheConfig.create(cache_dir)
    return verify_directory(config.cache_dir, fix, trust_shared=config.trust_shared_cache)


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

    Works on a full file system: value files are removed before the database is changed.

    Raises:
        CacheError: There is no cache in the directory, or it is damaged or not trusted.
        NotCachedError: The spec or listing is not in the cache.
        ValueError: Both ``spec`` and ``url`` were given.
    """
    if spec is not None and url is not None:
        raise ValueError("give a spec or a url to clear, not both")
    with _open_existing(cache_dir) as cache, _damaged_metadata(cache):
        if spec is not None:
            return _clear_spec(cache, spec)
        if url is not None:
            return _clear_listing(cache, url)
        removed = cache.arrays.clear()
        for name in cache.meta.listing_names():
            cache.meta.delete_listing(name)
        for fingerprint in cache.meta.specs():
            cache.meta.delete_spec(fingerprint)
        return removed


# -- internals --------------------------------------------------------------------------------------


def _open_existing(cache_dir: str | os.PathLike[str] | None) -> CacheDirectory:
    """Open a cache that must already exist: inspecting commands never create one."""
    return CacheConfig.create(cache_dir).open_cache(must_exist=True)


@contextlib.contextmanager
def _damaged_metadata(cache: CacheDirectory) -> Iterator[None]:
    """Name the repair when a metadata record does not parse (damaged, or not written by s3cache)."""
    try:
        yield
    except ValueError as exc:
        if isinstance(exc, S3CacheError):
            raise
        raise CacheError(f"a record in the cache metadata {cache.path / 'meta'} is damaged ({exc}). Run "
                         f"`s3cache verify --fix --cache-dir {cache.path}` to remove it.") from exc


def _marked(items: Sequence[Item], spec: ImageSpec, cache: CacheDirectory) -> list[tuple[Item, bool]]:
    """Each item with whether its array is cached under the spec."""
    keys = [cache_key(spec.fingerprint, item) for item in items]
    cached = cache.arrays.existing(keys)
    return [(item, key in cached) for item, key in zip(items, keys, strict=True)]


def _current_fingerprints(meta: MetaStore) -> list[str]:
    """The recorded specs whose fingerprint this decoder version still produces.

    Entries of specs recorded by another decoder version are never served, so they are left out.
    """
    return [fingerprint for fingerprint, description in meta.specs().items()
            if ImageSpec.from_dict(description).fingerprint == fingerprint]


def _listing_rows(meta: MetaStore, name: str, fingerprints: list[str], keys: set[str]) -> list[dict[str, Any]]:
    items = _stored(meta, name)
    rows = []
    for fingerprint in fingerprints:
        cached = sum(cache_key(fingerprint, item) in keys for item in items)
        if cached:
            rows.append({"url": name, "spec": fingerprint, "objects": len(items), "cached": cached,
                         "fraction": cached / len(items)})
    return rows or [{"url": name, "spec": None, "objects": len(items), "cached": 0, "fraction": 0.0}]


def _stored(meta: MetaStore, name: str) -> list[Item]:
    if meta.get_listing(name) is None:
        raise NotCachedError(f"no stored listing for {name}; stored listings: {meta.listing_names() or 'none'}")
    return stored_items(meta, name)


def _clear_spec(cache: CacheDirectory, fingerprint: str) -> int:
    known = cache.meta.specs()
    if fingerprint not in known:
        raise NotCachedError(f"no spec {fingerprint} in the cache; recorded specs: {sorted(known) or 'none'}")
    removed = cache.arrays.evict_tag(fingerprint)
    cache.meta.delete_spec(fingerprint)
    return removed


def _clear_listing(cache: CacheDirectory, name: str) -> int:
    items = _stored(cache.meta, name)
    removed = sum(cache.arrays.delete(cache_key(fingerprint, item))
                  for fingerprint in _current_fingerprints(cache.meta) for item in items)
    cache.meta.delete_listing(name)
    return removed
