"""Cache keys: built in one place, parsed back exactly, whatever the key or member name holds."""

from __future__ import annotations

import itertools

import pytest

from s3cache.items import Item
from s3cache.keys import CacheKey, cache_key, fingerprint_of, parse_key


def test_object_key_reads_as_before() -> None:
    item = Item("bucket", "train/cat/1.jpg", "abc", 10)
    assert cache_key("f" * 16, item) == f"{'f' * 16}/abc/bucket/train/cat/1.jpg"
    assert cache_key("f" * 16, item, etag="new") == f"{'f' * 16}/new/bucket/train/cat/1.jpg"


def test_member_keys_are_distinct_from_object_keys() -> None:
    whole = Item("b", "packed/shard-000001.tar#cat/1.jpg", "e", 1)
    member = Item("b", "packed/shard-000001.tar", "e", 1, member="cat/1.jpg", offset=512)
    assert cache_key("f", whole) != cache_key("f", member)
    assert parse_key(cache_key("f", whole)) == CacheKey("f", "e", "b", "packed/shard-000001.tar#cat/1.jpg")
    assert parse_key(cache_key("f", member)) == CacheKey("f", "e", "b", "packed/shard-000001.tar", "cat/1.jpg")
    assert parse_key(cache_key("f", member)).url == member.url == "s3://b/packed/shard-000001.tar#cat/1.jpg"


def test_any_key_and_member_round_trip() -> None:
    # Every string of four characters drawn from the escape characters and their neighbours.
    for name in ("".join(chars) for chars in itertools.product("%#23/a", repeat=4)):
        for item in (Item("b", name, "e", 1), Item("b", name, "e", 1, member=name, offset=0)):
            parsed = parse_key(cache_key("fp", item))
            assert (parsed.key, parsed.member) == (item.key, item.member)
            assert fingerprint_of(cache_key("fp", item)) == "fp"


@pytest.mark.parametrize("bad", ["", "fp", "fp/etag/bucket", "/etag/bucket/key", "fp//bucket/key"])
def test_parse_refuses_what_it_did_not_build(bad: str) -> None:
    with pytest.raises(ValueError, match="not an s3cache key"):
        parse_key(bad)


def test_item_json_round_trip() -> None:
    for item in (Item("b", "k.jpg", "e", 3), Item("b", "s.tar", "e", 3, member="m.jpg", offset=1024)):
        assert Item.from_json(item.to_json()) == item
    with pytest.raises(ValueError, match="not a stored item"):
        Item.from_json(["b", "k"])
