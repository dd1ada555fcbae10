"""Packing into tar shards against the local S3 endpoint: contents, requests, resuming and the command."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from typing import Any

import pytest
from helpers import listings, object_gets

from s3cache.cli import main
from s3cache.errors import AccessDeniedError, EmptyListingError
from s3cache.pack import PackProgress, pack
from s3cache.shards import INDEX_NAME, ShardIndex, manifest_name
from s3cache.tarformat import scan_tar
from s3cache.testing.locals3 import LocalS3
from s3cache.testing.sampledata import make_photos, upload_photos

PHOTO_BUCKET, PHOTO_PREFIX = "photos", "train/"  # where the `bucket` fixture puts the photos
URL = f"s3://{PHOTO_BUCKET}/{PHOTO_PREFIX}"
SHARDS = "shards"
DEST = f"s3://{SHARDS}/set/"


@pytest.fixture
def dest(s3: LocalS3, bucket: str) -> str:
    """The destination folder URL, in a bucket of its own; stats are zeroed after creating it."""
    s3.boto3_client().create_bucket(Bucket=SHARDS)
    s3.reset_stats()
    return DEST


@pytest.fixture
def client(s3: LocalS3) -> Any:
    """A boto3 client of the server, for set-up and checks."""
    return s3.boto3_client()


def folder(client: Any, prefix: str = "set/") -> dict[str, tuple[str, int]]:
    """{name: (ETag, size)} of the objects in the destination folder."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=SHARDS, Prefix=prefix)
    return {item["Key"][len(prefix):]: (item["ETag"].strip('"'), item["Size"])
            for page in pages for item in page.get("Contents", [])}


def read(client: Any, key: str, bucket: str = SHARDS) -> bytes:
    body: bytes = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return body


def source_objects(client: Any, prefix: str = PHOTO_PREFIX) -> dict[str, tuple[bytes, str]]:
    """{member name: (bytes, ETag)} of every object under the photo prefix, as the server has them now."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=PHOTO_BUCKET, Prefix=prefix)
    return {item["Key"][len(prefix):]: (read(client, item["Key"], PHOTO_BUCKET), item["ETag"].strip('"'))
            for page in pages for item in page.get("Contents", [])}


def check_set(client: Any, expected: dict[str, tuple[bytes, str]], source: str = URL) -> ShardIndex:
    """Check a complete shard set against the source objects; return its index.

    Every member is in exactly one shard, byte-identical to its object, where the index says, as tarfile
    and our scanner both read it; every shard in the folder is indexed, with the ETag and size listed.
    """
    listed = folder(client)
    index = ShardIndex.loads(read(client, "set/" + INDEX_NAME), DEST + INDEX_NAME)
    index.check_listing(DEST, listed)
    assert index.source == source
    assert sorted(m.name for m in index.members) == sorted(expected)
    assert {m.name: m.etag for m in index.members} == {name: etag for name, (_, etag) in expected.items()}
    shards = {shard.name for shard in index.shards}
    assert set(listed) == shards | {manifest_name(name) for name in shards} | {INDEX_NAME}
    for position, shard in enumerate(index.shards):
        raw = read(client, "set/" + shard.name)
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            assert [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()] == [  # type: ignore[union-attr]
                (m.name, expected[m.name][0]) for m in index.shard_members(position)]
        index.check_scan(DEST, position, scan_tar(raw, DEST + shard.name))
        assert all(raw[m.offset : m.offset + m.size] == expected[m.name][0] for m in index.shard_members(position))
        assert ShardIndex.loads(read(client, "set/" + manifest_name(shard.name)), "manifest") == index.single(position)
    return index


def test_pack_writes_shards_any_tar_reader_opens_and_the_index_last(
    s3: LocalS3, client: Any, dest: str, photos: list[tuple[str, bytes]]
) -> None:
    events: list[PackProgress] = []
    report = pack(URL, dest, "100KB", s3.storage_options, progress=events.append)
    log = s3.log()
    gets, lists = object_gets(s3), listings(s3)

    index = check_set(client, source_objects(client))
    assert sorted(m.name for m in index.members) == sorted(name for name, _ in photos)
    assert [m.name for m in index.members] != sorted(name for name, _ in photos)  # spread over shards, seeded
    assert all(shard.size <= 100_000 for shard in index.shards) and len(index.shards) >= 3
    assert (report.members, report.shards, report.packed, report.kept, report.shards_written) == (
        24, len(index.shards), 24, 0, len(index.shards))
    assert report.bytes_read == sum(len(data) for _, data in photos)
    assert report.bytes_written == sum(shard.size for shard in index.shards)
    assert [(e.done, e.total) for e in events] == [(n, 24) for n in range(1, 25)]

    assert sorted(gets) == sorted(f"/{PHOTO_BUCKET}/{PHOTO_PREFIX}{name}" for name, _ in photos)  # each once
    assert len(lists) == 2  # the source, and the destination (for a rerun's shards)
    puts = [path for method, path, _ in log if method == "PUT"]
    assert len(puts) == 2 * len(index.shards) + 1  # one PUT a shard and its manifest: no multipart uploads
    assert not [method for method, _, _ in log if method not in ("GET", "PUT")]
    for shard in index.shards:
        assert puts.index(f"/{SHARDS}/set/{shard.name}") < puts.index(f"/{SHARDS}/set/{manifest_name(shard.name)}")
    assert log[-1] == ("PUT", f"/{SHARDS}/set/{INDEX_NAME}", "")


def test_a_rerun_of_a_complete_set_reads_the_index_and_writes_nothing(s3: LocalS3, client: Any, dest: str) -> None:
    pack(URL, dest, "100KB", s3.storage_options)
    before = folder(client)
    s3.reset_stats()

    report = pack(URL, dest, "100KB", s3.storage_options)
    log = s3.log()

    assert (report.packed, report.kept, report.shards_written) == (0, 24, 0)
    assert folder(client) == before
    assert [(method, path) for method, path, _ in log] == [
        ("GET", f"/{PHOTO_BUCKET}"), ("GET", f"/{SHARDS}"), ("GET", f"/{SHARDS}"),  # listings (and uploads)
        ("GET", f"/{SHARDS}/set/{INDEX_NAME}")]


def test_large_shards_go_up_as_multipart_uploads_aborted_on_failure(s3: LocalS3, client: Any, dest: str) -> None:
    big = make_photos(25, seed=3, size_range=(480, 512), fmt="png")
    upload_photos(s3.storage_options, PHOTO_BUCKET, "big/", [*big[:24], ("zz-deny.png", big[24][1])])
    assert sum(len(data) for _, data in big[:24]) > 5 * 2**20
    shard_path = f"/{SHARDS}/set/shard-000000.tar"

    s3.configure(deny="deny")  # the last object cannot be read, after a part of the shard went up
    s3.reset_stats()
    with pytest.raises(AccessDeniedError, match="zz-deny.png"):  # in key order, the denied object comes last
        pack(f"s3://{PHOTO_BUCKET}/big/", dest, "1GB", s3.storage_options, part_size="5MiB", seed=None)
    assert any("partNumber=" in query for _, path, query in s3.log() if path == shard_path)
    assert client.list_multipart_uploads(Bucket=SHARDS).get("Uploads", []) == [] and folder(client) == {}

    s3.configure()
    client.delete_object(Bucket=PHOTO_BUCKET, Key="big/zz-deny.png")
    s3.reset_stats()
    pack(f"s3://{PHOTO_BUCKET}/big/", dest, "1GB", s3.storage_options, part_size="5MiB")
    log = s3.log()

    index = check_set(client, source_objects(client, "big/"), f"s3://{PHOTO_BUCKET}/big/")
    (shard,) = index.shards
    parts = -(-shard.size // (5 * 2**20))
    assert parts >= 2 and shard.etag.endswith(f"-{parts}")  # S3's ETag of a multipart upload
    requests = [(method, "partNumber=" in query, query.startswith("uploads")) for method, path, query in log
                if path == shard_path]
    # created, the parts, completed
    assert requests == [("POST", False, True), *[("PUT", True, False)] * parts, ("POST", False, False)]


def test_a_failure_midway_keeps_complete_shards_and_a_rerun_finishes_without_duplicates(
    s3: LocalS3, client: Any, dest: str
) -> None:
    upload_photos(s3.storage_options, PHOTO_BUCKET, PHOTO_PREFIX, [("zz/deny.jpg", make_photos(1, seed=5)[0][1])])
    s3.configure(deny="deny")  # the last object in key order cannot be read
    with pytest.raises(AccessDeniedError, match=f"{URL}zz/deny.jpg"):
        pack(URL, dest, "60KB", s3.storage_options)

    left = folder(client)
    assert INDEX_NAME not in left  # an unfinished set never looks finished
    manifests = [ShardIndex.loads(read(client, "set/" + name), name) for name in left if name.endswith(".json")]
    assert manifests and all(left[m.shards[0].name] == (m.shards[0].etag, m.shards[0].size) for m in manifests)
    assert client.list_multipart_uploads(Bucket=SHARDS).get("Uploads", []) == []

    s3.configure()
    s3.reset_stats()
    report = pack(URL, dest, "60KB", s3.storage_options)

    kept = sum(len(m.members) for m in manifests)
    assert (report.kept, report.packed, report.members) == (kept, 25 - kept, 25)
    assert len(object_gets(s3)) == 25 - kept + len(manifests)  # no index to read: the manifests are read
    check_set(client, source_objects(client))


def test_a_killed_run_is_finished_by_the_next_one(s3: LocalS3, client: Any, dest: str) -> None:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    s3.configure(latency_ms=40)  # slow enough that the run is still going when killed
    process = subprocess.Popen(
        [sys.executable, "-m", "s3cache", "pack", URL, dest, "--shard-size", "40KB", "--concurrency", "1",
         "--endpoint-url", s3.endpoint_url], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while sum(method == "PUT" and path.endswith(".json") for method, path, _ in s3.log()) < 2:
            assert process.poll() is None, "the run ended before two shards were complete"
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    s3.configure()
    left = folder(client)
    assert INDEX_NAME not in left
    s3.reset_stats()

    report = pack(URL, dest, "40KB", s3.storage_options)

    assert report.kept >= 2 and report.packed == 24 - report.kept
    assert len([path for path in object_gets(s3) if path.startswith(f"/{PHOTO_BUCKET}/")]) == report.packed
    check_set(client, source_objects(client))
    assert client.list_multipart_uploads(Bucket=SHARDS).get("Uploads", []) == []


def test_a_rerun_after_source_changes_repacks_only_the_shards_they_touch(s3: LocalS3, client: Any, dest: str) -> None:
    pack(URL, dest, "60KB", s3.storage_options)
    index = ShardIndex.loads(read(client, "set/" + INDEX_NAME), INDEX_NAME)
    assert len(index.shards) >= 4
    changed, removed = index.shard_members(1)[0].name, index.shard_members(2)[-1].name
    touched = len(index.shard_members(1)) + len(index.shard_members(2))
    client.put_object(Bucket=PHOTO_BUCKET, Key=PHOTO_PREFIX + changed, Body=make_photos(1, seed=7)[0][1])
    client.delete_object(Bucket=PHOTO_BUCKET, Key=PHOTO_PREFIX + removed)
    upload_photos(client, PHOTO_BUCKET, PHOTO_PREFIX, [("zz/new.jpg", make_photos(1, seed=8)[0][1])])
    s3.reset_stats()

    report = pack(URL, dest, "60KB", s3.storage_options)

    # The touched shards' members, less the removed one, plus the new object; and the old index is read.
    assert report.packed == touched and report.kept == 24 - touched
    assert len(object_gets(s3)) == report.packed + 1
    updated = check_set(client, source_objects(client))
    assert set(index.shards) - set(index.shards[1:3]) <= set(updated.shards)


def test_a_list_of_urls_is_named_relative_to_its_common_folder(s3: LocalS3, client: Any, dest: str,
                                                                photos: list[tuple[str, bytes]]) -> None:
    chosen = [name for name, _ in photos if name.startswith(("cat/", "coffee/"))]
    urls = [URL + name for name in chosen]
    report = pack([*urls, urls[0]], dest, "1MB", s3.storage_options)

    assert report.source == URL and s3.requests("HEAD") == len(urls)
    expected = source_objects(client)
    check_set(client, {name: expected[name] for name in chosen})
    with pytest.raises(ValueError, match="span several buckets"):
        pack([urls[0], "s3://other/x.jpg"], dest, storage_options=s3.storage_options)


def test_keys_that_cannot_be_member_names_are_skipped_and_reported(s3: LocalS3, client: Any, dest: str) -> None:
    upload_photos(s3.storage_options, PHOTO_BUCKET, PHOTO_PREFIX, [("/abs.jpg", b"x"), ("a/../up.jpg", b"y")])
    s3.reset_stats()

    report = pack(URL, dest, "1MB", s3.storage_options)

    assert report.skipped == (f"{URL}/abs.jpg: absolute name, so it cannot be a tar member name",
                              f"{URL}a/../up.jpg: name contains a '..' component, so it cannot be a tar member name")
    assert len(object_gets(s3)) == 24
    expected = source_objects(client)
    check_set(client, {name: value for name, value in expected.items() if name not in ("/abs.jpg", "a/../up.jpg")})


def test_unfinished_uploads_of_a_killed_run_are_aborted(s3: LocalS3, client: Any, dest: str) -> None:
    client.create_multipart_upload(Bucket=SHARDS, Key="set/shard-000000.tar")
    client.create_multipart_upload(Bucket=SHARDS, Key="set/notes.bin")  # not ours: left alone

    pack(URL, dest, "1MB", s3.storage_options)

    assert [u["Key"] for u in client.list_multipart_uploads(Bucket=SHARDS)["Uploads"]] == ["set/notes.bin"]


def test_errors_name_what_failed(s3: LocalS3, client: Any, dest: str) -> None:
    s3.configure(deny="deny")
    with pytest.raises(AccessDeniedError, match=f"access denied to s3://{SHARDS}/deny-set/"):
        pack(URL, f"s3://{SHARDS}/deny-set/", storage_options=s3.storage_options)
    with pytest.raises(EmptyListingError, match=f"no image objects .* under s3://{PHOTO_BUCKET}/nothing/"):
        pack(f"s3://{PHOTO_BUCKET}/nothing/", dest, storage_options=s3.storage_options)
    with pytest.raises(ValueError, match="part_size must be at least"):
        pack(URL, dest, storage_options=s3.storage_options, part_size="1MB")


def test_pack_command(s3: LocalS3, client: Any, dest: str, capsys: pytest.CaptureFixture[str]) -> None:
    env: dict[str, Any] = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3.endpoint_url}
    result = subprocess.run([sys.executable, "-m", "s3cache", "pack", URL, dest, "--shard-size", "100KB"],
                            env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert f"{URL} -> {dest}: 24 members in " in result.stdout and "24 packed" in result.stdout
    assert "24/24" in result.stderr  # the progress bar
    check_set(client, source_objects(client))

    missing = subprocess.run([sys.executable, "-m", "s3cache", "pack", URL, "s3://no-such-bucket/set/"],
                             env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert missing.returncode == 2 and missing.stderr.startswith("s3cache: error: bucket 'no-such-bucket'")

    with pytest.raises(SystemExit) as exited:
        main(["pack", "--help"])
    assert exited.value.code == 0 and "example:\n  s3cache pack " in capsys.readouterr().out
