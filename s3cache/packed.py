"""Packed datasets: a prefix of tar shards read as the images inside them.

Two kinds of shard sets are recognised under a prefix:

* sets written by ``s3cache pack``: ``shard-NNNNNN.tar`` files and an ``index.json`` written last; the
  index says where every member is, and is checked against the listed shards (ETag and size);
* tar shards written by other tools (WebDataset's ``<key>.jpg``, ``<key>.cls`` layout) without our
  index: each shard is read once to build one (:func:`~s3cache.webdataset.index_from_tars`), which
  is kept in the cache's metadata and reused while the shards keep their ETags.

Either way the result is one :class:`~s3cache.items.Item` per image member, sorted by member name
(the key relative to the packed prefix), so a packed dataset lists in the same order as the loose
objects it was packed from.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from s3cache.errors import EmptyListingError, ShardError
from s3cache.items import Item
from s3cache.shards import INDEX_NAME, ShardIndex, ShardInfo
from s3cache.source import Source
from s3cache.store import MetaStore
from s3cache.tarformat import SkippedMember, TarMember, scan_tar
from s3cache.urls import prefix_of
from s3cache.webdataset import index_from_tars, is_label_member

log = logging.getLogger(__name__)

TAR_EXTENSION = ".tar"
_FOREIGN_INDEX = "shards:"


def is_packed(url: str, objects: Sequence[Item]) -> bool:
    """Whether a listed prefix holds a shard set (our index, or tar files) rather than loose images."""
    _, prefix = prefix_of(url)
    return any(item.key == prefix + INDEX_NAME or _is_shard(item, prefix) for item in objects)


def packed_items(url: str, objects: Sequence[Item], source: Source, meta: MetaStore | None) -> list[Item]:
    """The image members of the shard set under a prefix, in member-name order.

    Args:
        url: The prefix URL.
        objects: Every object listed under it.
        source: Reads the index, or the shards of a set without one.
        meta: Where an index built from foreign shards is kept (``None``: built, not kept).

    Raises:
        ShardError: The index is damaged or does not match the shards.
        EmptyListingError: The shards hold no images.
    """
    bucket, prefix = prefix_of(url)
    base = f"s3://{bucket}/{prefix}"
    listed = {item.key[len(prefix):]: item for item in objects if _is_shard(item, prefix)}
    index_item = next((item for item in objects if item.key == prefix + INDEX_NAME), None)
    if index_item is not None:
        index = ShardIndex.loads(source.read(index_item).result().data, index_item.url)
        index.check_listing(base, {name: (item.etag, item.size) for name, item in listed.items()})
    else:
        index = _foreign_index(base, listed, source, meta)
    items = [Item(bucket, prefix + index.shards[m.shard].name, index.shards[m.shard].etag, m.size,
                  member=m.name, offset=m.offset, label=m.label) for m in index.members]
    if not items:
        raise EmptyListingError(f"no images in the tar shards under {url}")
    log.info("%s: %d images in %d shards", url, len(items), len(index.shards))
    return sorted(items, key=lambda item: item.name)


def _is_shard(item: Item, prefix: str) -> bool:
    """A tar file directly in the packed folder."""
    name = item.key[len(prefix):]
    return item.key.startswith(prefix) and "/" not in name and name.endswith(TAR_EXTENSION)


def _foreign_index(base: str, listed: dict[str, Item], source: Source, meta: MetaStore | None) -> ShardIndex:
    """The index of shards written by other tools: kept from an earlier read, or built by reading each shard."""
    shards = [ShardInfo(name, item.etag, item.size) for name, item in sorted(listed.items())]
    kept = meta.get_listing(_FOREIGN_INDEX + base) if meta is not None else None
    if kept is not None:
        index = ShardIndex.from_json(kept, base + INDEX_NAME)
        if index.shards == tuple(shards):
            return index
    log.info("%s: no index; reading %d shards once to build one", base, len(shards))
    index = index_from_tars(base, ((info, _scan(base, listed[info.name], source)) for info in shards), _log_skip)
    if meta is not None:
        meta.put_listing(_FOREIGN_INDEX + base, index.to_json())
    return index


def _scan(base: str, shard: Item, source: Source) -> list[TarMember]:
    """Every member header of one shard (and the data of its label members), reading it whole."""
    data = source.read(shard).result().data
    if len(data) != shard.size:
        raise ShardError(f"{shard.url}: read {len(data)} bytes, the listing says {shard.size}; list it again")

    def skipped(member: SkippedMember) -> None:
        log.info("skipping %s#%s: %s", shard.url, member.name, member.reason)

    return list(scan_tar(data, shard.url, read=is_label_member, on_skip=skipped))


def _log_skip(skipped: SkippedMember) -> None:
    log.info("not indexing tar member %s: %s", skipped.name, skipped.reason)
