"""Listings: what a prefix or a list of URLs holds, resolved online and stored for offline runs.

A listing is stored in the cache's metadata under its *name*: the prefix URL as given, or a
digest of a URL list. Offline runs read it back: same items, same labels, same order.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence

from s3cache.errors import EmptyListingError, NotCachedError
from s3cache.items import Item
from s3cache.packed import is_packed, packed_items
from s3cache.source import Source
from s3cache.store import MetaStore
from s3cache.urls import is_image_key

log = logging.getLogger(__name__)

# As Keras words them in "No images found in directory ..." (the extensions of IMAGE_EXTENSIONS, any case).
ALLOWED_FORMATS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")


def listing_name(directory: str | Sequence[str]) -> str:
    """The name a listing is stored under: the prefix URL, or a digest of a URL list."""
    if isinstance(directory, str):
        return directory
    digest = hashlib.sha256("\n".join(directory).encode()).hexdigest()[:16]
    return f"urls:{digest}"


def resolve_items(directory: str | Sequence[str], meta: MetaStore, source: Source | None) -> list[Item]:
    """List a prefix or URL list and store the listing; offline (no source), read the stored one.

    Raises:
        EmptyListingError: No image objects.
        NotCachedError: Offline and no listing was stored for ``directory``.
    """
    if source is None:
        return stored_items(meta, listing_name(directory))
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
    return source.resolve_urls(list(directory))


def store_listing(meta: MetaStore, directory: str | Sequence[str], items: Sequence[Item]) -> None:
    """Store a listing for later offline runs."""
    name = listing_name(directory)
    meta.put_listing(name, {"url": name, "listed_at": time.time(), "objects": [i.to_json() for i in items]})
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
