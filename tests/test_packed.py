"""Training from tar shards: packed datasets equal loose ones, a cold epoch reads shards in chunks, later
epochs and offline reruns read the cache; shards written by other tools; bad shards and indexes."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import all_batches, dataset_options, object_gets, stack_images

import s3cache
from s3cache.errors import DecodeError, EmptyListingError, ObjectChangedError, ShardError
from s3cache.pack import pack
from s3cache.testing.locals3 import LocalS3

LOOSE = "s3://photos/train/"
PACKED = "s3://shards/set/"


@pytest.fixture
def packed(s3: LocalS3, bucket: str) -> str:
    """The 24 sample photos packed into shards of about 100 KB (several shards); stats zeroed afterwards."""
    s3.boto3_client().create_bucket(Bucket="shards")
    pack(LOOSE, PACKED, shard_size=100_000, storage_options=s3.storage_options)
    s3.reset_stats()
    return PACKED


def shard_gets(s3: LocalS3) -> list[str]:
    return [path for path in object_gets(s3) if path.endswith(".tar")]


def epoch(ds: Any) -> tuple[np.ndarray, np.ndarray]:
    batches = all_batches(ds)
    return stack_images(batches), np.concatenate([labels for _, labels in batches])


def test_packed_dataset_equals_the_loose_one_item_by_item(s3: LocalS3, packed: str, tmp_path: Path) -> None:
    loose = s3cache.image_dataset_from_s3(LOOSE, **dataset_options(s3, tmp_path / "a"))
    shards = s3cache.image_dataset_from_s3(packed, **dataset_options(s3, tmp_path / "b"))
    assert shards.class_names == loose.class_names
    assert [path.partition("#")[2] for path in shards.file_paths] == \
        [path.removeprefix(LOOSE) for path in loose.file_paths]
    assert all(path.startswith(PACKED + "shard-") and ".tar#" in path for path in shards.file_paths)
    (x_loose, y_loose), (x_packed, y_packed) = epoch(loose), epoch(shards)
    np.testing.assert_array_equal(x_packed, x_loose)
    np.testing.assert_array_equal(y_packed, y_loose)


def test_a_cold_epoch_reads_shards_in_chunks_and_later_epochs_read_nothing(
    s3: LocalS3, packed: str, cache_dir: Path
) -> None:
    shard_count = len([key for key in s3.boto3_client().list_objects_v2(Bucket="shards")["Contents"]
                       if key["Key"].endswith(".tar")])
    s3.reset_stats()
    ds = s3cache.image_dataset_from_s3(packed, **dataset_options(s3, cache_dir, shuffle=True, seed=4))
    listing_gets = object_gets(s3)
    assert listing_gets == ["/shards/set/index.json"]  # the listing reads the index, no shard
    first = epoch(ds)
    gets = shard_gets(s3)
    assert len(gets) == shard_count  # one ranged GET per shard (each is smaller than a chunk), not one per image
    assert all(record.range for record in s3.records() if record.path.endswith(".tar"))
    assert ds.stats["misses"] == 24 and ds.stats["s3_requests"] == shard_count
    s3.reset_stats()
    second = epoch(ds)
    assert object_gets(s3) == []
    assert sorted(map(bytes, first[0])) == sorted(map(bytes, second[0]))  # the same images, reshuffled

    s3.reset_stats()
    offline = s3cache.image_dataset_from_s3(packed, **dataset_options(s3, cache_dir, offline=True))
    assert s3.requests() == 0
    online = s3cache.image_dataset_from_s3(packed, **dataset_options(s3, cache_dir))
    np.testing.assert_array_equal(epoch(offline)[0], epoch(online)[0])  # bit-identical
    assert object_gets(s3) == ["/shards/set/index.json"]  # the online rebuild listed; no shard was read


def test_any_batch_can_be_read_first(s3: LocalS3, packed: str, cache_dir: Path) -> None:
    ds = s3cache.image_dataset_from_s3(packed, **dataset_options(s3, cache_dir, batch_size=4))
    last = ds[len(ds) - 1]
    assert last[0].shape == (4, 32, 32, 3)
    assert 1 <= len(shard_gets(s3)) <= 2


def webdataset_shard(samples: list[tuple[str, bytes, int | None]], extra: list[tuple[str, bytes]] = ()) -> bytes:
    """A tar of ``<key>.jpg`` (+ ``<key>.cls``) members, as WebDataset writes them."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        entries = [(f"{key}.jpg", data) for key, data, _ in samples]
        entries += [(f"{key}.cls", str(label).encode()) for key, _, label in samples if label is not None]
        for name, data in sorted(entries) + list(extra):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_foreign_shards_are_indexed_once_with_cls_labels(
    s3: LocalS3, photos: list[tuple[str, bytes]], cache_dir: Path
) -> None:
    client = s3.boto3_client()
    client.create_bucket(Bucket="wds")
    samples = [(f"sample{i:04d}", data, i % 3) for i, (_, data) in enumerate(photos[:12])]
    for number in range(3):
        client.put_object(Bucket="wds", Key=f"train/part-{number}.tar",
                          Body=webdataset_shard(samples[4 * number:4 * number + 4]))
    s3.reset_stats()
    ds = s3cache.image_dataset_from_s3("s3://wds/train/", **dataset_options(s3, cache_dir))
    assert len(shard_gets(s3)) == 3  # each shard read once, whole, to build the index
    assert ds.class_names == ["0", "1", "2"]
    images, labels = epoch(ds)
    assert labels.tolist() == [i % 3 for i in range(12)]
    s3.reset_stats()
    again = s3cache.image_dataset_from_s3("s3://wds/train/", **dataset_options(s3, cache_dir))
    assert shard_gets(s3) == []  # the index is kept in the cache while the shards keep their ETags
    np.testing.assert_array_equal(epoch(again)[0], images)


def test_bad_shards_and_indexes_are_named(s3: LocalS3, packed: str, photos: list[tuple[str, bytes]],
                                          cache_dir: Path) -> None:
    client = s3.boto3_client()
    # A member that is not an image: skipped (named shard.tar#member) or raised.
    client.create_bucket(Bucket="odd")
    client.put_object(Bucket="odd", Key="set/part-0.tar",
                      Body=webdataset_shard([("cat/a", photos[0][1], None), ("cat/b", b"not a jpeg", None)]))
    with pytest.raises(DecodeError, match=r"s3://odd/set/part-0\.tar#cat/b\.jpg"):
        epoch(s3cache.image_dataset_from_s3("s3://odd/set/", **dataset_options(s3, cache_dir)))
    with pytest.warns(UserWarning, match=r"part-0\.tar#cat/b\.jpg"):
        images, _ = epoch(s3cache.image_dataset_from_s3("s3://odd/set/", **dataset_options(
            s3, cache_dir, on_error="skip")))
    assert len(images) == 1

    # A truncated foreign shard: an error naming it.
    whole = webdataset_shard([("cat/a", photos[0][1], None)])
    client.put_object(Bucket="odd", Key="cut/part-0.tar", Body=whole[:700])
    with pytest.raises(ShardError, match=r"s3://odd/cut/part-0\.tar.*truncated"):
        s3cache.image_dataset_from_s3("s3://odd/cut/", **dataset_options(s3, cache_dir))

    # A shard that no longer matches our index: an error naming the shard.
    client.put_object(Bucket="shards", Key="set/shard-000000.tar", Body=whole)
    with pytest.raises(ShardError, match=r"s3://shards/set/shard-000000\.tar: changed since the index"):
        s3cache.image_dataset_from_s3(packed, **dataset_options(s3, cache_dir))

    # Nothing under a prefix: Keras's ValueError.
    with pytest.raises(EmptyListingError):
        s3cache.image_dataset_from_s3("s3://odd/nothing/", **dataset_options(s3, cache_dir))


def test_a_shard_rewritten_after_listing_is_never_read_at_stale_offsets(
    s3: LocalS3, packed: str, cache_dir: Path
) -> None:
    ds = s3cache.image_dataset_from_s3(packed, **dataset_options(s3, cache_dir))
    client = s3.boto3_client()
    first_shard = ds.items[0].key
    body = client.get_object(Bucket="shards", Key=first_shard)["Body"].read()
    client.put_object(Bucket="shards", Key=first_shard, Body=body + b"\0" * 1024)  # same bytes, new ETag
    with pytest.raises(ObjectChangedError, match=first_shard):
        ds[0]


def test_hostile_members_never_become_images(s3: LocalS3, photos: list[tuple[str, bytes]], cache_dir: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name in ("../escape.jpg", "/abs/olute.jpg", "cat/ok.jpg"):
            info = tarfile.TarInfo(name)
            info.size = len(photos[0][1])
            tar.addfile(info, io.BytesIO(photos[0][1]))
        link = tarfile.TarInfo("cat/link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    client = s3.boto3_client()
    client.create_bucket(Bucket="hostile")
    client.put_object(Bucket="hostile", Key="set/part-0.tar", Body=buffer.getvalue())
    ds = s3cache.image_dataset_from_s3("s3://hostile/set/", **dataset_options(s3, cache_dir))
    assert ds.file_paths == ["s3://hostile/set/part-0.tar#cat/ok.jpg"]
