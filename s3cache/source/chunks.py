"""Reading tar-shard members in large ranges: one request brings many members.

A member of a shard could be read alone, with a ranged GET of its bytes; at 12 KB a member that is
one request per image again. :class:`ChunkPlan` cuts each shard's members (those a dataset uses,
in offset order) into *chunks* of consecutive members spanning at most ``chunk_bytes``;
:class:`ChunkedSource` answers a read of any member by reading its whole chunk once (one ranged GET
of several MB) and serving every member of that chunk from the bytes it holds, until each has been
asked for. Held chunks are bounded by ``memory_budget``: past it the oldest chunk is dropped and a
later read of one of its members fetches that chunk again. Whole objects pass straight through.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from s3cache.items import Item
from s3cache.source.base import Payload, Source, SourceCounters

DEFAULT_CHUNK_BYTES = 8 * 2**20
DEFAULT_MEMORY_BUDGET = 256 * 2**20
# Members further apart than this start a new chunk: reading the gap would waste more than a request.
MAX_GAP = 256 * 2**10


@dataclass(frozen=True)
class Chunk:
    """A byte range of one shard and the members inside it."""

    shard: Item
    start: int
    end: int
    members: frozenset[Item] = field(repr=False)

    @property
    def span(self) -> Item:
        """The range as an item a source can read (a ranged GET of the shard)."""
        return Item(self.shard.bucket, self.shard.key, self.shard.etag, self.end - self.start, offset=self.start)


class ChunkPlan:
    """Which chunk each member belongs to.

    Args:
        items: The items a dataset uses; members are grouped by shard, whole objects ignored.
        chunk_bytes: Most bytes one chunk spans (a larger member is a chunk of its own).
    """

    def __init__(self, items: Iterable[Item], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        by_shard: dict[tuple[str, str, str], list[Item]] = collections.defaultdict(list)
        for item in items:
            if item.member is not None and item.offset is not None:
                by_shard[item.bucket, item.key, item.etag].append(item)
        self._chunk_of: dict[Item, Chunk] = {}
        for members in by_shard.values():
            for chunk in _cut(sorted(members, key=lambda m: m.offset or 0), chunk_bytes):
                self._chunk_of.update(dict.fromkeys(chunk.members, chunk))

    def chunk_of(self, item: Item) -> Chunk | None:
        """The chunk holding a member, or ``None`` for items outside the plan."""
        return self._chunk_of.get(item)

    def __len__(self) -> int:
        return len(set(self._chunk_of.values()))


def _cut(members: Sequence[Item], chunk_bytes: int) -> Iterable[Chunk]:
    """Consecutive members (sorted by offset) cut into chunks of at most ``chunk_bytes``."""
    group: list[Item] = []
    for member in members:
        start, end = _range(member)
        if group and (end - _range(group[0])[0] > chunk_bytes or start - _range(group[-1])[1] > MAX_GAP):
            yield _chunk(group)
            group = []
        group.append(member)
    if group:
        yield _chunk(group)


def _range(member: Item) -> tuple[int, int]:
    assert member.offset is not None
    return member.offset, member.offset + member.size


def _chunk(group: Sequence[Item]) -> Chunk:
    first = group[0]
    shard = Item(first.bucket, first.key, first.etag, 0)
    return Chunk(shard, _range(first)[0], max(_range(m)[1] for m in group), frozenset(group))


class _Held:
    """A chunk being read or held, and the members not yet served from it."""

    def __init__(self, reading: concurrent.futures.Future[Payload], waiting: set[Item]) -> None:
        self.reading = reading
        self.waiting = waiting


class ChunkedSource:
    """A :class:`~s3cache.source.Source` that reads planned members chunk by chunk through another source.

    Args:
        inner: The source that reads objects and byte ranges.
        plan: The chunks of the members to serve.
        memory_budget: Most bytes of chunks held at once.
    """

    def __init__(self, inner: Source, plan: ChunkPlan, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> None:
        self.inner = inner
        self.plan = plan
        self.memory_budget = memory_budget
        self._lock = threading.Lock()
        self._held: collections.OrderedDict[Chunk, _Held] = collections.OrderedDict()

    @property
    def counters(self) -> SourceCounters:
        """The inner source's counters."""
        return self.inner.counters

    def list_objects(self, url: str) -> list[Item]:
        """As the inner source."""
        return self.inner.list_objects(url)

    def resolve_urls(self, urls: Sequence[str]) -> list[Item]:
        """As the inner source."""
        return self.inner.resolve_urls(urls)

    def read(self, item: Item) -> concurrent.futures.Future[Payload]:
        """A member's bytes from its chunk (reading the chunk if nobody has yet); other items as the inner source."""
        chunk = self.plan.chunk_of(item)
        if chunk is None:
            return self.inner.read(item)
        with self._lock:
            held = self._held.get(chunk)
            started = held is None or item not in held.waiting
            if started:
                held = self._start(chunk)
            assert held is not None
            held.waiting.discard(item)
            if not held.waiting:
                self._held.pop(chunk, None)  # every member has been handed out: the bytes can go
        if started:  # outside the lock: a callback runs at once on a read that has already failed
            held.reading.add_done_callback(lambda reading: self._forget_failed(chunk, held, reading))
        result: concurrent.futures.Future[Payload] = concurrent.futures.Future()
        held.reading.add_done_callback(lambda reading: _slice(reading, chunk, item, result))
        return result

    def _start(self, chunk: Chunk) -> _Held:
        """Read a chunk and hold it (caller holds the lock); drop the oldest chunks past the budget."""
        held = _Held(self.inner.read(chunk.span), set(chunk.members))
        self._held[chunk] = held
        while len(self._held) > 1 and sum(c.end - c.start for c in self._held) > self.memory_budget:
            self._held.popitem(last=False)  # its waiting members will read it again
        return held

    def _forget_failed(self, chunk: Chunk, held: _Held, reading: concurrent.futures.Future[Payload]) -> None:
        """A chunk whose read failed is not held: the next read of one of its members tries again."""
        if reading.cancelled() or reading.exception() is not None:
            with self._lock:
                if self._held.get(chunk) is held:
                    del self._held[chunk]

    def close(self) -> None:
        """Drop held chunks and close the inner source."""
        with self._lock:
            self._held.clear()
        self.inner.close()


def _slice(reading: concurrent.futures.Future[Payload], chunk: Chunk, item: Item,
           result: concurrent.futures.Future[Payload]) -> None:
    """Complete ``result`` with the member's bytes cut from the chunk's (or with the chunk's error)."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if reading.cancelled():
            result.cancel()
        elif (error := reading.exception()) is not None:
            result.set_exception(error)
        else:
            payload = reading.result()
            start, end = _range(item)
            result.set_result(Payload(payload.data[start - chunk.start:end - chunk.start], payload.etag))
