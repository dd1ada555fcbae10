"""URLs, listings (online and stored), labels and shards, against an in-memory source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from memory_source import MemorySource

from s3cache.errors import EmptyListingError, NotCachedError
from s3cache.items import Item
from s3cache.labels import class_folder, index_items
from s3cache.listing import listing_name, resolve_items
from s3cache.sharding import resolve_shard, shard_slice
from s3cache.store import MetaStore
from s3cache.urls import is_image_key, prefix_of, relative_name, split_url

OBJECTS = {("b", f"train/{cls}/{i}.jpg"): bytes([i]) for cls in ("cat", "dog") for i in range(3)}
OBJECTS |= {("b", "train/root.jpg"): b"r", ("b", "train/cat/notes.txt"): b"t", ("b", "other/x.png"): b"x"}


@pytest.fixture
def meta(tmp_path: Path) -> MetaStore:
    store = MetaStore(tmp_path / "meta")
    yield store
    store.close()


def test_urls() -> None:
    assert split_url("s3://b/k/x.jpg") == ("b", "k/x.jpg") and split_url("s3a://b") == ("b", "")
    assert prefix_of("s3://b/train") == prefix_of("s3://b/train/") == ("b", "train/")
    assert prefix_of("s3://b") == ("b", "")
    assert relative_name("train/cat/1.jpg", "train/") == "cat/1.jpg"
    assert is_image_key("A.JPEG") and not is_image_key("a.txt")
    for bad in ("b/k", "s3:/b/k", "http://host/b", "s3:///k"):
        with pytest.raises(ValueError, match="not an S3 URL"):
            split_url(bad)


def test_online_listing_is_stored_and_read_back_offline(meta: MetaStore) -> None:
    source = MemorySource(OBJECTS)
    items = resolve_items("s3://b/train", meta, source)
    assert [i.key for i in items] == sorted(k for (_, k) in OBJECTS if k.startswith("train/") and k.endswith(".jpg"))
    assert resolve_items("s3://b/train", meta, None) == items
    with pytest.raises(NotCachedError, match="no stored listing for s3://b/other"):
        resolve_items("s3://b/other", meta, None)


def test_url_lists_keep_their_order_under_a_digest_name(meta: MetaStore) -> None:
    urls = ["s3://b/train/dog/2.jpg", "s3://b/train/cat/0.jpg"]
    items = resolve_items(urls, meta, MemorySource(OBJECTS))
    assert [i.url for i in items] == urls
    assert listing_name(urls).startswith("urls:") and listing_name(urls) != listing_name(urls[::-1])
    assert resolve_items(urls, meta, None) == items


def test_empty_listings(meta: MetaStore) -> None:
    with pytest.raises(EmptyListingError, match="No images found"):
        resolve_items("s3://b/nothing/", meta, MemorySource(OBJECTS))
    with pytest.raises(EmptyListingError, match="empty"):
        resolve_items([], meta, MemorySource(OBJECTS))


def test_inferred_labels_come_from_class_folders() -> None:
    items = MemorySource(OBJECTS).list_prefix("s3://b/train/")
    ordered, labels, names = index_items(items, "s3://b/train/", "inferred", None)
    assert names == ["cat", "dog"]
    assert "train/root.jpg" not in [i.key for i in ordered]  # outside every class folder, as Keras leaves it out
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert class_folder(Item("b", "x/y/z.jpg", "e", 1), ["s3://b/x/y/z.jpg"]) == "y"
    assert class_folder(Item("b", "z.jpg", "e", 1), ["s3://b/z.jpg"]) is None


def test_labels_stored_with_tar_members() -> None:
    members = [Item("b", "p/s.tar", "e", 1, member=f"{i:03d}.jpg", offset=512 * i, label=i % 3) for i in range(6)]
    ordered, labels, names = index_items(members, "s3://b/p/", "inferred", None)
    assert [i.member for i in ordered] == [f"{i:03d}.jpg" for i in range(6)]
    assert labels.tolist() == [0, 1, 2, 0, 1, 2] and names == ["0", "1", "2"]


def test_given_labels_as_list_or_array() -> None:
    items = [Item("b", f"{i}.jpg", "e", 1) for i in range(3)]
    for given in ([0, 1, 1], np.array([0, 1, 1])):
        _, labels, names = index_items(items, "s3://b/", given, None)
        assert labels.tolist() == [0, 1, 1] and names == ["0", "1"]
    with pytest.raises(ValueError, match="labels"):
        index_items(items, "s3://b/", [0, 1], None)


def test_shards() -> None:
    assert resolve_shard(None) == (0, 1) and resolve_shard((1, 3)) == (1, 3)
    assert list(range(10))[shard_slice(1, 3)] == [1, 4, 7]
    with pytest.raises(ValueError, match="shard index"):
        resolve_shard((3, 3))
