"""Packing: every image under a prefix, with its original bytes, into uncompressed tar shards in S3.

``pack("s3://bucket/train/", "s3://bucket/train-shards/")`` writes::

    train-shards/shard-000000.tar   members named by key relative to the prefix: cat/0001.jpg, ...
    train-shards/shard-000000.json  the shard's manifest, written once the shard is complete
    ...
    train-shards/index.json         the whole set's index (see s3cache.shards), written last

The shards use the WebDataset layout (``<key>.<ext>`` members) and any tar reader opens them. Only
``index.json`` marks a set as complete: it is deleted before a run changes anything and written after
every shard and manifest, so a half-packed folder is never taken for a packed one.

Resuming: a shard is final once its manifest is written after it. A rerun (after a crash, an interruption,
or changes to the source) first aborts multipart uploads left unfinished, then keeps every shard whose
manifest (or entry in an existing index) matches the shard's current ETag and size, has the same source,
and whose members all still exist under the same key with the same ETag. Only the other objects are
fetched again, into new shards numbered in the gaps; shards that are no longer kept are deleted. Members
are never duplicated: each object is in exactly one kept or new shard. Two runs must not write to the
same destination at the same time.

Memory holds the read-ahead window (at most ``READ_AHEAD_BYTES`` of listed objects, ``2 * concurrency``
GETs) and the multipart parts in flight (see :mod:`s3cache.shardwriter`), never a whole dataset or shard.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass
from typing import Any

from s3cache.config import DEFAULT_CONCURRENCY, parse_size
from s3cache.errors import EmptyListingError, ShardError
from s3cache.items import Item
from s3cache.shards import INDEX_NAME, MemberInfo, ShardIndex, manifest_name, shard_name, shard_number
from s3cache.shardwriter import DEFAULT_PART_SIZE, ShardSetWriter
from s3cache.source import Payload
from s3cache.source.s3 import S3Source
from s3cache.tarformat import END_OF_ARCHIVE, entry_size, member_name_problem
from s3cache.urls import split_url

__all__ = ["PackProgress", "PackReport", "pack"]

DEFAULT_SHARD_SIZE = "256MB"
READ_AHEAD_BYTES = 32 * 2**20
# Shards whose upload completes in the background while the next one fills.
SHARDS_FINISHING = 1


@dataclass(frozen=True)
class PackProgress:
    """One object written into a shard: its member name and size, and how many of ``total`` are done."""

    name: str
    size: int
    done: int
    total: int


@dataclass(frozen=True)
class PackReport:
    """What :func:`pack` did.

    Attributes:
        source: The prefix URL members are named relative to.
        destination: The shard set's folder URL.
        members: Members in the index.
        shards: Shards in the index.
        packed: Objects fetched and written in this run.
        kept: Members of shards kept from an earlier run.
        shards_written: Shards written in this run.
        shards_deleted: Shards of an earlier run deleted because their members changed.
        skipped: ``"URL: reason"`` for each object whose key cannot be a member name.
        bytes_read: Bytes fetched from the source.
        bytes_written: Bytes of the shards written.
        seconds: Wall time.
    """

    source: str
    destination: str
    members: int
    shards: int
    packed: int
    kept: int
    shards_written: int
    shards_deleted: int
    skipped: tuple[str, ...]
    bytes_read: int
    bytes_written: int
    seconds: float


@dataclass(frozen=True)
class _Entry:
    """An object to pack and its member name."""

    name: str
    obj: Item


@dataclass(frozen=True)
class _Plan:
    """A shard to write and its members, in order."""

    name: str
    entries: tuple[_Entry, ...]


@dataclass(frozen=True)
class _Existing:
    """What an earlier run left in the destination."""

    listed: dict[str, tuple[str, int]]
    kept: list[ShardIndex]
    index: ShardIndex | None

    @property
    def claimed(self) -> set[str]:
        return {member.name for part in self.kept for member in part.members}


def pack(
    source: str | Sequence[str],
    destination: str,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    storage_options: dict[str, Any] | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    progress: Callable[[PackProgress], None] | None = None,
    *,
    part_size: int | str = DEFAULT_PART_SIZE,
    seed: int | None = 0,
) -> PackReport:
    """Pack every image object of a prefix (or a list of object URLs) into tar shards with an index.

    A rerun finishes an interrupted run and brings a packed set up to date, fetching only the objects of
    shards that must be (re)written; see the module documentation.

    Args:
        source: A prefix URL such as ``"s3://bucket/train/"``, or object URLs in one bucket (members are then
            named relative to their longest common folder).
        destination: Folder URL for the shards and ``index.json``, e.g. ``"s3://bucket/train-shards/"``.
        shard_size: Target shard size (bytes or a string like ``"256MB"``); a shard holds at least one member.
        storage_options: Options for ``s3fs.S3FileSystem`` (reading and writing).
        concurrency: Most GETs in flight.
        progress: Called after each object written.
        part_size: Bytes per multipart part (at least 5 MiB).
        seed: Members are spread over the shards in an order shuffled with this seed, so that every shard
            holds a sample of the whole dataset (its classes mixed), and a first epoch that reads a few
            shards at a time still sees every class; ``None`` keeps key order. A rerun with the same seed
            plans the same shards.

    Returns:
        A :class:`PackReport`.

    Raises:
        EmptyListingError: No image objects under ``source``.
        S3CacheError: Listing, reading or writing failed (see :mod:`s3cache.errors`).
        ValueError: Inconsistent arguments.
    """
    started = time.perf_counter()
    limit = parse_size(shard_size)
    reader = S3Source(storage_options, concurrency=concurrency)
    writer = ShardSetWriter(destination, storage_options, parse_size(part_size))
    root, entries, skipped = _list_source(reader, source)
    existing = _recover(writer, root, entries)
    claimed = existing.claimed
    todo = [entry for entry in entries if entry.name not in claimed]
    if seed is not None:
        random.Random(seed).shuffle(todo)
    plans = _plan(todo, limit, {_number(part) for part in existing.kept})
    stale = _stale(existing, plans)
    if (plans or stale) and INDEX_NAME in existing.listed:
        writer.delete([INDEX_NAME])
    written = _write_shards(reader, writer, root, plans, progress)
    writer.delete(stale)
    parts = sorted(existing.kept + written, key=_number)
    index = ShardIndex.combine(root, parts)
    if plans or stale or index != existing.index:
        writer.put(INDEX_NAME, index.dumps())
    return PackReport(root, writer.url, len(index.members), len(index.shards), sum(len(p.entries) for p in plans),
                      len(claimed), len(written), sum(name.endswith(".tar") for name in stale), tuple(skipped),
                      sum(member.size for part in written for member in part.members),
                      sum(part.shards[0].size for part in written), time.perf_counter() - started)


# -- the source side: the only calls into s3cache.source ------------------------------------------------


def _list_source(reader: S3Source, source: str | Sequence[str]) -> tuple[str, list[_Entry], list[str]]:
    """The root URL, the objects to pack with their member names, and ``"URL: reason"`` for unfit keys."""
    if isinstance(source, str):
        bucket, prefix = split_url(source)
        prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        objects = reader.list_prefix(source)
        if not objects:
            raise EmptyListingError(f"no image objects (.jpg .jpeg .png .bmp .gif) under {source}")
    else:
        urls = list(dict.fromkeys(source))
        if not urls:
            raise EmptyListingError("the list of object URLs to pack is empty")
        buckets = {split_url(url)[0] for url in urls}
        if len(buckets) > 1:
            raise ValueError(f"object URLs to pack span several buckets ({', '.join(sorted(buckets))}); "
                             "pack each bucket into its own destination")
        bucket = buckets.pop()
        # Character-wise on purpose: the common part is then cut back to its last folder.
        common = os.path.commonprefix([split_url(url)[1] for url in urls])  # noqa: RUF071
        prefix = common[: common.rfind("/") + 1]
        objects = reader.resolve_urls(urls)
    entries: list[_Entry] = []
    skipped: list[str] = []
    for obj in objects:
        name = obj.key[len(prefix):]
        if problem := member_name_problem(name):
            skipped.append(f"{obj.url}: {problem}, so it cannot be a tar member name")
        else:
            entries.append(_Entry(name, obj))
    if not entries:
        raise EmptyListingError(f"none of the {len(skipped)} objects can be packed: {skipped[0]}")
    return f"s3://{bucket}/{prefix}", entries, skipped


def _read(reader: S3Source, obj: Item) -> Future[Payload]:
    """Start a GET of one object: its bytes and the ETag of the version read."""
    return reader.read(obj)


def _number(part: ShardIndex) -> int:
    """The number of a one-shard index's shard (only shards named by ``shard_name`` get this far)."""
    return shard_number(part.shards[0].name) or 0


# -- resuming ---------------------------------------------------------------------------------------------


def _recover(writer: ShardSetWriter, root: str, entries: Sequence[_Entry]) -> _Existing:
    """Find the shards of earlier runs that can stay as they are."""
    writer.abort_uploads(lambda name: shard_number(name) is not None)
    listed = writer.contents()
    index = _read_index(writer, listed) if INDEX_NAME in listed else None
    known: dict[str, ShardIndex] = {}
    if index is not None:
        known = {shard.name: index.single(position) for position, shard in enumerate(index.shards)}
    for name in listed:
        if shard_number(name) is not None and name not in known and manifest_name(name) in listed:
            manifest = _read_manifest(writer, manifest_name(name))
            if manifest is not None and len(manifest.shards) == 1 and manifest.shards[0].name == name:
                known[name] = manifest
    wanted = {entry.name: entry.obj.etag for entry in entries}
    kept: list[ShardIndex] = []
    claimed: set[str] = set()
    for name in sorted(known, key=lambda name: shard_number(name) or -1):
        part = known[name]
        shard, names = part.shards[0], {member.name for member in part.members}
        if (shard_number(name) is not None and part.source == root and listed.get(name) == (shard.etag, shard.size)
                and names and claimed.isdisjoint(names)
                and all(wanted.get(member.name) == member.etag for member in part.members)):
            kept.append(part)
            claimed |= names
    return _Existing(listed, kept, index)


def _read_index(writer: ShardSetWriter, listed: dict[str, tuple[str, int]]) -> ShardIndex | None:
    """The existing index, if it is readable and matches the shards; else ``None`` (it will be rewritten)."""
    index = _read_manifest(writer, INDEX_NAME)  # an index is read as a manifest of many shards
    try:
        if index is not None:
            index.check_listing(writer.url, listed)
    except ShardError:
        return None
    return index


def _read_manifest(writer: ShardSetWriter, name: str) -> ShardIndex | None:
    """A manifest or index of an earlier run; ``None`` if it is damaged (its shards are then rewritten)."""
    try:
        return ShardIndex.loads(writer.get(name), writer.url_of(name))
    except ShardError:
        return None


def _stale(existing: _Existing, plans: Sequence[_Plan]) -> list[str]:
    """Shards and manifests of earlier runs that are neither kept nor about to be overwritten."""
    current = {part.shards[0].name for part in existing.kept} | {plan.name for plan in plans}
    current |= {manifest_name(name) for name in current}
    ours = {name for name in existing.listed
            if shard_number(name) is not None or shard_number(name.removesuffix(".json") + ".tar") is not None}
    return sorted(ours - current)


# -- writing ----------------------------------------------------------------------------------------------


def _plan(entries: Iterable[_Entry], limit: int, taken: set[int]) -> list[_Plan]:
    """Group objects into shards of at most ``limit`` bytes (by listed size), numbered in the gaps of ``taken``."""
    numbers = (number for number in itertools.count() if number not in taken)
    plans: list[_Plan] = []
    current: list[_Entry] = []
    size = len(END_OF_ARCHIVE)
    for entry in entries:
        need = entry_size(entry.name, entry.obj.size)
        if current and size + need > limit:
            plans.append(_Plan(shard_name(next(numbers)), tuple(current)))
            current, size = [], len(END_OF_ARCHIVE)
        current.append(entry)
        size += need
    if current:
        plans.append(_Plan(shard_name(next(numbers)), tuple(current)))
    return plans


def _write_shards(
    reader: S3Source, writer: ShardSetWriter, root: str, plans: Sequence[_Plan],
    progress: Callable[[PackProgress], None] | None,
) -> list[ShardIndex]:
    """Fetch and write the planned shards; return their manifests."""
    entries = [entry for plan in plans for entry in plan.entries]
    fetched = _ReadAhead(lambda entry: _read(reader, entry.obj), entries, 2 * reader.concurrency)
    finishing: deque[Future[ShardIndex]] = deque()
    written: list[ShardIndex] = []
    try:
        for plan in plans:
            upload = writer.open_shard(plan.name)
            members: list[MemberInfo] = []
            try:
                for entry in plan.entries:
                    payload = fetched.next()
                    offset = upload.add(entry.name, payload.data)
                    members.append(MemberInfo(entry.name, 0, offset, len(payload.data), payload.etag))
                    if progress is not None:
                        progress(PackProgress(entry.name, len(payload.data), fetched.done, len(entries)))
            except BaseException:
                upload.abort()
                raise
            finishing.append(upload.finish(root, members))
            while len(finishing) > SHARDS_FINISHING:
                written.append(finishing.popleft().result())
        while finishing:
            written.append(finishing.popleft().result())
    except BaseException:
        fetched.cancel()
        wait(finishing)  # shards already complete in memory still land, so a rerun keeps them
        raise
    return written


class _ReadAhead:
    """GETs objects in order, keeping up to ``most`` GETs and ``READ_AHEAD_BYTES`` ahead of the consumer."""

    def __init__(self, read: Callable[[_Entry], Future[Payload]], entries: Sequence[_Entry],
                 most: int) -> None:
        self._read = read
        self._todo = iter(entries)
        self._most = most
        self._window: deque[tuple[_Entry, Future[Payload]]] = deque()
        self._bytes = 0
        self.done = 0
        self._fill()

    def _fill(self) -> None:
        while len(self._window) < self._most and (not self._window or self._bytes < READ_AHEAD_BYTES):
            entry = next(self._todo, None)
            if entry is None:
                return
            self._window.append((entry, self._read(entry)))
            self._bytes += entry.obj.size

    def next(self) -> Payload:
        """The next object's bytes and the ETag read."""
        entry, future = self._window.popleft()
        self._bytes -= entry.obj.size
        self._fill()
        result = future.result()
        self.done += 1
        return result

    def cancel(self) -> None:
        """Cancel the GETs not consumed yet."""
        for _, future in self._window:
            future.cancel()
