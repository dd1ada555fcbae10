"""Listings: what a prefix or a list of URLs holds, resolved online and stored for offline runs.

A listing is stored in the cache's metadata under its *name*: the prefix URL as given, or a
digest of a URL list. Every listed object is also added to the metadata's object index (URL to
ETag and size). Offline runs read the stored listing back (same items, same labels, same order);
without one, a prefix is cut out of a stored listing of an enclosing prefix, and a URL list is
resolved through the object index, so that a list of URLs warmed by prefix trains offline.

Online, a long URL list is resolved by listing the key ranges it spans (one request per 1,000
keys) rather than by one ``HEAD`` per URL, wherever the listing finds enough of the URLs per page
to be cheaper; see :func:`resolve_url_list`.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import math
import time
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from s3cache.errors import AccessDeniedError, EmptyListingError, NotCachedError
from s3cache.items import Item
from s3cache.keys import cache_key
from s3cache.packed import is_packed, packed_items
from s3cache.source import Source
from s3cache.source.ledger import FetchLedger
from s3cache.store import ArrayStore, MetaStore
from s3cache.urls import is_image_key, prefix_of, split_url

log = logging.getLogger(__name__)

# As Keras words them in "No images found in directory ..." (the extensions of IMAGE_EXTENSIONS, any case).
ALLOWED_FORMATS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")

# URL lists shorter than this (per bucket) are resolved with one HEAD per URL.
LIST_FROM_URLS = 8
# A chain of range listings continues while its pages find at least this many of its URLs each
# (after the first MIN_PAGES pages); below that, a HEAD per remaining URL is cheaper.
URLS_PER_PAGE = 4
MIN_PAGES = 2
# URLs per concurrently listed chain of key ranges, and the most chains listed at once.
URLS_PER_CHAIN = 10_000
MAX_CHAINS = 8


@runtime_checkable
class RangeLister(Protocol):
    """A source that can list one page of keys after a given key (as :class:`~s3cache.source.s3.S3Source` can)."""

    def list_page(self, bucket: str, prefix: str, start_after: str) -> tuple[list[Item], bool]:
        """Up to 1,000 objects under ``prefix`` with keys after ``start_after``, and whether more follow."""
        ...


def listing_name(directory: str | Sequence[str]) -> str:
    """The name a listing is stored under: the prefix URL, or a digest of a URL list."""
    if isinstance(directory, str):
        return directory
    digest = hashlib.sha256("\n".join(directory).encode()).hexdigest()[:16]
    return f"urls:{digest}"


def run_key(fingerprint: str, directory: str | Sequence[str]) -> str:
    """The cache's name for a run over a dataset: its spec and what it lists.

    Every process reading the same dataset at the same spec (Keras workers, a second training
    process) shares the run, and so the entries that the cache keeps for it
    (see :mod:`s3cache.store.recency`).
    """
    if isinstance(directory, str):
        bucket, prefix = prefix_of(directory)
        name = f"s3://{bucket}/{prefix}"
    else:
        name = listing_name(directory)
    return f"{fingerprint}:{name}"


def resolve_items(directory: str | Sequence[str], meta: MetaStore, source: Source | None) -> list[Item]:
    """List a prefix or URL list and store the listing; offline (no source), read what is stored.

    Raises:
        EmptyListingError: No image objects.
        NotCachedError: Offline, and neither a stored listing nor the object index covers ``directory``.
    """
    if source is None:
        return offline_items(directory, meta)
    items = list_online(directory, source, meta)
    store_listing(meta, directory, items)
    return items


def list_online(directory: str | Sequence[str], source: Source, meta: MetaStore | None = None) -> list[Item]:
    """List a prefix (loose images, or a packed shard set), or resolve a list of URLs, through the source.

    Args:
        directory: A prefix URL or a list of image URLs.
        source: Where to list.
        meta: Where an index built for tar shards without one is kept (``None``: not kept).

    Raises:
        EmptyListingError: No image objects.
        ShardError: A shard set's index is damaged or does not match its shards.
    """
    if isinstance(directory, str):
        objects = source.list_objects(directory)
        if is_packed(directory, objects):
            return packed_items(directory, objects, source, meta)
        items = [item for item in objects if is_image_key(item.key)]
        if not items:
            raise EmptyListingError(f"No images found in directory {directory}. Allowed formats: {ALLOWED_FORMATS}")
        return items
    if not directory:
        raise EmptyListingError(f"No images found: the list of URLs is empty. Allowed formats: {ALLOWED_FORMATS}")
    return resolve_url_list(list(directory), source)


def store_listing(meta: MetaStore, directory: str | Sequence[str], items: Sequence[Item]) -> None:
    """Store a listing for later offline runs, and add its objects to the object index."""
    name = listing_name(directory)
    meta.put_listing(name, {"url": name, "listed_at": time.time(), "objects": [i.to_json() for i in items]})
    meta.index_objects(items)
    log.debug("stored listing %s (%d items)", name, len(items))


def stored_items(meta: MetaStore, name: str) -> list[Item]:
    """The items of a stored listing.

    Raises:
        NotCachedError: No listing of that name is stored.
    """
    stored = meta.get_listing(name)
    if stored is None:
        raise NotCachedError(f"offline mode: no stored listing for {name}. Run once with offline=False "
                             "(or `s3cache warm`) to store it.")
    return [Item.from_json(row) for row in stored["objects"]]


# -- offline ------------------------------------------------------------------------------------------


def offline_items(directory: str | Sequence[str], meta: MetaStore) -> list[Item]:
    """The items of a prefix or URL list from what the cache knows, without contacting S3.

    A stored listing of exactly ``directory`` comes first. Otherwise a prefix is cut out of the
    stored listing of the closest enclosing prefix, and each URL of a list is looked up in the
    object index (filled by every listing).

    Raises:
        EmptyListingError: No image objects (an empty URL list, or none under the prefix).
        NotCachedError: Nothing stored covers the prefix, or some URLs were never listed (named, with their count).
    """
    if meta.get_listing(listing_name(directory)) is not None:
        return stored_items(meta, listing_name(directory))
    if isinstance(directory, str):
        return _from_enclosing_listing(directory, meta)
    if not directory:
        raise EmptyListingError("the list of object URLs is empty")
    urls = [_normalized(url) for url in directory]
    known = meta.lookup_objects(urls)
    unknown = [url for url in directory if _normalized(url) not in known]
    if unknown:
        shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise NotCachedError(
            f"offline mode: {len(unknown)} of {len(urls)} URL(s) were never listed into this cache: {shown}. "
            "Run once with offline=False, or `s3cache warm` a prefix that holds them.", unknown)
    return [known[url] for url in urls]


def _from_enclosing_listing(url: str, meta: MetaStore) -> list[Item]:
    bucket, prefix = prefix_of(url)
    enclosing = []
    for name in meta.listing_names():
        if name.startswith("urls:"):
            continue
        try:
            listed_bucket, listed_prefix = prefix_of(name)
        except ValueError:
            continue
        if listed_bucket == bucket and prefix.startswith(listed_prefix):
            enclosing.append((len(listed_prefix), name))
    if not enclosing:
        stored_items(meta, listing_name(url))  # raises the usual error
    name = max(enclosing)[1]
    items = [item for item in stored_items(meta, name) if item.key.startswith(prefix)]
    if not items:
        raise EmptyListingError(f"no image objects under {url} in the stored listing of {name}")
    log.info("offline: %d items of %s from the stored listing of %s", len(items), url, name)
    return items


def require_cached(items: Sequence[Item], fingerprint: str, arrays: ArrayStore) -> None:
    """Offline, check up front that every item's array is cached under the spec.

    Raises:
        NotCachedError: Some are not; the error names them and says how many.
    """
    keys = [cache_key(fingerprint, item) for item in items]
    cached = arrays.existing(keys)
    absent = [key for key in keys if key not in cached]
    if absent:  # an object rewritten after listing is stored under the version read: the ledger says where
        ledger = FetchLedger.in_directory(arrays.directory.parent, read_only=True)
        try:
            moved = ledger.stored_keys(absent)
        finally:
            ledger.close()
        cached |= {key for key, stored in moved.items() if stored in arrays.existing(list(moved.values()))}
    missing = [item.url for item, key in zip(items, keys, strict=True) if key not in cached]
    if missing:
        raise NotCachedError.for_objects(missing)


def _normalized(url: str) -> str:
    bucket, key = split_url(url)
    return f"s3://{bucket}/{key}"


# -- URL lists online -----------------------------------------------------------------------------------


def resolve_url_list(urls: Sequence[str], source: Source) -> list[Item]:
    """The items that a list of object URLs names, in the list's order.

    Per bucket, the sorted keys are split into chains of neighbouring keys. Each chain lists the
    key range it spans, one page of up to 1,000 keys at a time, each page starting just before
    the next key not yet found (so gaps between the URLs are skipped, not listed). A chain gives up
    on listing as soon as its pages find fewer than :data:`URLS_PER_PAGE` of its URLs each, and the
    rest of its URLs get one ``HEAD`` each, as do short lists, sources that cannot list a range,
    URLs a listing did not find (the ``HEAD`` reports them) and chains whose listing is denied
    (a bucket policy may allow reading objects but not listing them).

    Raises:
        ValueError: A URL is not an ``s3://`` URL.
        S3CacheError: An object does not exist, or S3 refused or failed (naming the URL).
    """
    if not isinstance(source, RangeLister):
        return source.resolve_urls(urls)
    keys_by_bucket: dict[str, set[str]] = {}
    for url in urls:
        bucket, key = split_url(url)
        keys_by_bucket.setdefault(bucket, set()).add(key)
    found: dict[tuple[str, str], Item] = {}
    by_head: list[str] = []
    chains: list[tuple[str, list[str]]] = []
    listed = 0
    for bucket, keys in keys_by_bucket.items():
        ordered = sorted(keys)
        if len(ordered) < LIST_FROM_URLS:
            by_head.extend(f"s3://{bucket}/{key}" for key in ordered)
            continue
        count = min(MAX_CHAINS, math.ceil(len(ordered) / URLS_PER_CHAIN))
        size = math.ceil(len(ordered) / count)
        chains.extend((bucket, ordered[start:start + size]) for start in range(0, len(ordered), size))
    if chains:
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(chains), MAX_CHAINS),
                                                   thread_name_prefix="s3cache-list") as pool:
            for bucket, items, rest in pool.map(lambda chain: _list_chain(source, *chain), chains):
                found.update(((bucket, item.key), item) for item in items)
                listed += len(items)
                by_head.extend(f"s3://{bucket}/{key}" for key in rest)
    if by_head:
        found.update(((item.bucket, item.key), item) for item in source.resolve_urls(by_head))
    log.info("resolved %d URLs: %d by listing %d key ranges, %d by HEAD", len(urls), listed, len(chains),
             len(by_head))
    return [found[split_url(url)] for url in urls]


def _list_chain(source: RangeLister, bucket: str, keys: list[str]) -> tuple[str, list[Item], list[str]]:
    """List the key range of sorted ``keys``; returns the bucket, the items found and the keys left for HEAD."""
    prefix = _common_prefix(keys[0], keys[-1])  # S3 prefixes are strings, not paths
    found: list[Item] = []
    unlisted: list[str] = []
    index = pages = 0
    last = ""
    while index < len(keys):
        if pages >= MIN_PAGES and len(found) < URLS_PER_PAGE * pages:
            break  # sparse: a HEAD per remaining URL costs fewer requests
        # Just before the next key wanted (a proper prefix of a key sorts before it), never back over a listed key.
        start_after = max(keys[index][:-1], last)
        try:
            page, more = source.list_page(bucket, prefix, start_after)
        except AccessDeniedError as exc:  # a policy may allow reading objects but not listing them
            log.info("listing s3://%s/%s was refused (%s); resolving its %d URLs by HEAD", bucket, prefix, exc,
                     len(keys) - index)
            break
        pages += 1
        listed = {item.key: item for item in page}
        if page:
            last = page[-1].key
        # Every wanted key up to the page's last one (all of them once nothing follows) is settled.
        while index < len(keys) and (not more or keys[index] <= last):
            item = listed.get(keys[index])
            if item is None:
                unlisted.append(keys[index])
            else:
                found.append(item)
            index += 1
    return bucket, found, unlisted + keys[index:]


def _common_prefix(first: str, last: str) -> str:
    """The longest string both start with."""
    length = 0
    for a, b in zip(first, last, strict=False):
        if a != b:
            break
        length += 1
    return first[:length]
