"""Members of tar shards read chunk by chunk: one read brings many members, memory stays bounded."""

from __future__ import annotations

import concurrent.futures

import pytest
from memory_source import MemorySource, etag_of

from s3cache.items import Item
from s3cache.source.chunks import ChunkedSource, ChunkPlan

MEMBER = 1000
SHARD = bytes(range(256)) * 40  # 10,240 bytes: ten members of 1,000 bytes at offsets 0, 1024, 2048, ...


def members(key: str = "packed/shard-0.tar") -> list[Item]:
    return [Item("b", key, etag_of(SHARD), MEMBER, member=f"m{i}.jpg", offset=1024 * i) for i in range(10)]


def read_all(source: ChunkedSource, items: list[Item]) -> list[bytes]:
    futures = [source.read(item) for item in items]
    return [future.result(timeout=10).data for future in futures]


def test_plan_cuts_shards_into_chunks_of_bounded_span() -> None:
    items = members() + members("packed/shard-1.tar") + [Item("b", "loose.jpg", "e", 5)]
    plan = ChunkPlan(items, chunk_bytes=4096)
    assert len(plan) == 6  # per shard: members 0-3 and 4-7 span 4,072 bytes each; 8-9 the rest
    assert plan.chunk_of(Item("b", "loose.jpg", "e", 5)) is None
    chunk = plan.chunk_of(members()[4])
    assert chunk is not None and (chunk.start, chunk.end) == (4096, 8168) and len(chunk.members) == 4


def test_gaps_start_a_new_chunk() -> None:
    far = [Item("b", "s.tar", "e", 10, member="a", offset=0), Item("b", "s.tar", "e", 10, member="b", offset=2**20)]
    assert len(ChunkPlan(far)) == 2


def test_members_are_served_from_one_read_per_chunk() -> None:
    inner = MemorySource({("b", "packed/shard-0.tar"): SHARD})
    source = ChunkedSource(inner, ChunkPlan(members(), chunk_bytes=4096))
    served = read_all(source, members())
    assert served == [SHARD[1024 * i:1024 * i + MEMBER] for i in range(10)]
    assert inner.counters.requests == 3 and inner.counters.bytes_received == 4072 + 4072 + 2024
    assert read_all(source, members()[:1]) == served[:1]  # handed out already: read again
    assert inner.counters.requests == 4


def test_held_chunks_stay_within_the_memory_budget() -> None:
    inner = MemorySource({("b", "packed/shard-0.tar"): SHARD})
    source = ChunkedSource(inner, ChunkPlan(members(), chunk_bytes=2048), memory_budget=2048)
    items = members()
    # Ask for the first member of every chunk, then the second: the early chunks were dropped meanwhile.
    firsts, seconds = items[0::2], items[1::2]
    assert read_all(source, firsts + seconds) == [SHARD[1024 * i:1024 * i + MEMBER] for i in [*range(0, 10, 2),
                                                                                              *range(1, 10, 2)]]
    assert inner.counters.requests > 5


def test_a_failed_chunk_read_fails_its_members_and_is_tried_again() -> None:
    inner = MemorySource({("b", "packed/shard-0.tar"): SHARD})
    stale = [Item("b", m.key, "old-etag", m.size, member=m.member, offset=m.offset) for m in members()]
    source = ChunkedSource(inner, ChunkPlan(stale))
    with pytest.raises(ValueError, match="changed since it was listed"):
        source.read(stale[0]).result(timeout=10)
    with pytest.raises(ValueError, match="changed since it was listed"):
        source.read(stale[1]).result(timeout=10)
    assert inner.counters.requests == 2


def test_whole_objects_pass_through() -> None:
    inner = MemorySource({("b", "loose.jpg"): b"jpeg"})
    source = ChunkedSource(inner, ChunkPlan([]))
    loose = inner.resolve_urls(["s3://b/loose.jpg"])[0]
    assert isinstance(source.read(loose), concurrent.futures.Future)
    assert source.read(loose).result(timeout=10).data == b"jpeg"
