"""Tests of the local S3 endpoint (counting, faults, latency, keep-alive, reset) and of the sample photos."""

import asyncio
import http.client
import io
import random
import time
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
import s3fs
from aiobotocore.session import get_session
from botocore.config import Config
from botocore.exceptions import ClientError, ResponseStreamingError
from PIL import Image

from s3cache.testing import client as client_module
from s3cache.testing.locals3 import LocalS3
from s3cache.testing.sampledata import make_photos, photo_classes

NO_RETRIES = Config(retries={"total_max_attempts": 1, "mode": "standard"})
MIB = 1024 * 1024


def first_key(s3: LocalS3, bucket: str) -> str:
    """Any key of the photo bucket, fetched before the stats are zeroed again."""
    key = s3.boto3_client().list_objects_v2(Bucket=bucket, MaxKeys=1)["Contents"][0]["Key"]
    s3.reset_stats()
    return key


def filesystem(s3: LocalS3) -> s3fs.S3FileSystem:
    """A fresh s3fs filesystem on the server (no instance or listing cache shared with other tests)."""
    return s3fs.S3FileSystem(**s3.storage_options, skip_instance_cache=True, use_listings_cache=False)


def connect(s3: LocalS3) -> http.client.HTTPConnection:
    """A plain HTTP connection to the server (moto accepts unsigned requests)."""
    return http.client.HTTPConnection(urlsplit(s3.endpoint_url).netloc, timeout=30)


def outcome(call: Callable[[], object]) -> str:
    """'ok', the error code of an S3 error, or 'dropped' for a truncated body."""
    try:
        call()
    except ClientError as error:
        return str(error.response["Error"]["Code"])
    except ResponseStreamingError:
        return "dropped"
    return "ok"


# -- counting and the request log -----------------------------------------------------------------------------


def test_counts_each_request_by_method_and_logs_decoded_paths(s3: LocalS3) -> None:
    client = s3.boto3_client()
    client.create_bucket(Bucket="box")
    client.put_object(Bucket="box", Key="dir/a b é.txt", Body=b"hello")
    client.head_object(Bucket="box", Key="dir/a b é.txt")
    assert client.get_object(Bucket="box", Key="dir/a b é.txt")["Body"].read() == b"hello"
    client.list_objects_v2(Bucket="box", Prefix="dir/")

    assert (s3.requests(), s3.requests("PUT"), s3.requests("HEAD"), s3.requests("GET")) == (5, 2, 1, 2)
    assert s3.requests("DELETE") == 0
    log = s3.log()
    assert log[:4] == [
        ("PUT", "/box", ""),
        ("PUT", "/box/dir/a b é.txt", ""),
        ("HEAD", "/box/dir/a b é.txt", ""),
        ("GET", "/box/dir/a b é.txt", ""),
    ]
    method, path, query = log[4]
    assert (method, path) == ("GET", "/box")
    assert "list-type=2" in query and "prefix=dir%2F" in query

    records = s3.records()
    assert [(r.method, r.path, r.query) for r in records] == log
    get = records[3]
    assert (get.range, get.body_bytes, get.fault) == (None, 5, None)
    assert records[2].body_bytes == 0  # HEAD answers carry no body.
    assert records[4].body_bytes > 0  # The listing's XML.


def test_control_calls_are_not_counted_and_reset_stats_zeroes(s3: LocalS3, bucket: str) -> None:
    assert s3.requests() == 0 and s3.log() == [] and s3.connections() == 0
    s3.boto3_client().list_objects_v2(Bucket=bucket)
    s3.configure()
    assert s3.requests() == 1 and s3.requests("GET") == 1 and s3.connections() == 1
    s3.reset_stats()
    assert s3.requests() == 0 and s3.requests("GET") == 0 and s3.log() == [] and s3.connections() == 0


def test_unknown_control_call_is_a_404(s3: LocalS3) -> None:
    conn = connect(s3)
    try:
        conn.request("POST", "/_locals3/stat")
        response = conn.getresponse()
        assert (response.status, response.read()) == (404, b'{"error": "no control call POST stat"}')
    finally:
        conn.close()


# -- keep-alive ------------------------------------------------------------------------------------------------


def test_sequential_boto3_gets_share_one_connection(s3: LocalS3, bucket: str) -> None:
    key = first_key(s3, bucket)
    client = s3.boto3_client()
    bodies = {client.get_object(Bucket=bucket, Key=key)["Body"].read() for _ in range(50)}
    assert len(bodies) == 1
    assert s3.requests("GET") == 50
    assert s3.connections() == 1
    assert len({record.connection for record in s3.records()}) == 1


def test_sequential_s3fs_reads_share_a_few_connections(s3: LocalS3, bucket: str) -> None:
    key = first_key(s3, bucket)
    fs = filesystem(s3)
    bodies = {fs.cat_file(f"{bucket}/{key}") for _ in range(50)}
    assert len(bodies) == 1
    assert s3.requests("GET") == 50
    assert s3.connections() <= 2


def test_errors_and_faults_keep_the_connection_open(s3: LocalS3, bucket: str) -> None:
    key = first_key(s3, bucket)
    client = s3.boto3_client(config=NO_RETRIES)
    s3.configure(fail_every=2, deny="secret")
    outcomes = [
        outcome(lambda: client.get_object(Bucket=bucket, Key=key)["Body"].read()),
        outcome(lambda: client.get_object(Bucket=bucket, Key=key)["Body"].read()),  # the 2nd object GET: 503
        outcome(lambda: client.get_object(Bucket=bucket, Key="train/missing.jpg")),
        # Denied before its body is read: the server reads the body away before the next request.
        outcome(lambda: client.put_object(Bucket=bucket, Key="secret/a.jpg", Body=b"x" * 200_000)),
        outcome(lambda: client.head_object(Bucket=bucket, Key="secret/a.jpg")),
        outcome(lambda: client.list_objects_v2(Bucket=bucket, Prefix="train/")),
    ]
    assert outcomes == ["ok", "SlowDown", "NoSuchKey", "AccessDenied", "403", "ok"]
    assert s3.connections() == 1


def test_chunked_request_bodies_end_where_the_client_ends_them(s3: LocalS3, bucket: str) -> None:
    conn = connect(s3)
    try:
        for key, pieces in (("a.bin", [b"ab", b"cde"]), ("b.bin", [b"fg"])):
            conn.request("PUT", f"/{bucket}/{key}", body=iter(pieces), encode_chunked=True)
            response = conn.getresponse()
            assert (response.status, response.read(), response.getheader("Connection")) == (200, b"", None)
    finally:
        conn.close()
    client = s3.boto3_client()
    assert [client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in ("a.bin", "b.bin")] == [b"abcde", b"fg"]
    first, second, *_ = s3.records()
    assert first.method == second.method == "PUT" and first.connection == second.connection


# -- faults on object GETs -------------------------------------------------------------------------------------


def test_fail_every_answers_every_second_get_with_slow_down(s3: LocalS3, bucket: str) -> None:
    key = first_key(s3, bucket)
    client = s3.boto3_client(config=NO_RETRIES)
    s3.configure(fail_every=2)
    outcomes = []
    for _ in range(4):
        try:
            client.get_object(Bucket=bucket, Key=key)["Body"].read()
            outcomes.append("ok")
        except ClientError as error:
            status = error.response["ResponseMetadata"]["HTTPStatusCode"]
            outcomes.append(f"{status} {error.response['Error']['Code']}")
    assert outcomes == ["ok", "503 SlowDown", "ok", "503 SlowDown"]
    # HEAD and list requests are not object GETs and never fail.
    client.head_object(Bucket=bucket, Key=key)
    client.list_objects_v2(Bucket=bucket)
    client.list_objects_v2(Bucket=bucket)
    assert s3.requests("GET") == 6
    assert [r.fault for r in s3.records()][:4] == [None, "slow_down", None, "slow_down"]


def test_ranged_gets_are_object_gets_for_faults(s3: LocalS3, bucket: str) -> None:
    key = first_key(s3, bucket)
    client = s3.boto3_client(config=NO_RETRIES)
    s3.configure(fail_every=2, drop_every=3)

    def ranged() -> None:
        assert len(client.get_object(Bucket=bucket, Key=key, Range="bytes=100-199")["Body"].read()) == 100

    assert [outcome(ranged) for _ in range(4)] == ["ok", "SlowDown", "dropped", "SlowDown"]
    records = s3.records()
    assert {r.range for r in records} == {"bytes=100-199"}
    assert [r.body_bytes for r in records if r.fault != "slow_down"] == [100, 50]  # Half the range, then closed.
    assert s3.faults() == {"slow_down": 2, "dropped": 1}


def test_drop_every_truncates_the_body_and_closes_the_connection(s3: LocalS3, bucket: str) -> None:
    key = first_key(s3, bucket)
    client = s3.boto3_client(config=NO_RETRIES)
    size = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
    s3.configure(drop_every=2)
    assert len(client.get_object(Bucket=bucket, Key=key)["Body"].read()) == size

    response = client.get_object(Bucket=bucket, Key=key)
    assert response["ContentLength"] == size  # The headers announce the whole object...
    sent = size // 2  # ...but only the first half of the body arrives before the connection closes.
    expected = rf"IncompleteRead\({sent} bytes read, {size - sent} more expected\)"
    with pytest.raises(ResponseStreamingError, match=expected):
        response["Body"].read()
    assert len(client.get_object(Bucket=bucket, Key=key)["Body"].read()) == size

    head, whole, dropped, after = s3.records()
    assert (dropped.fault, dropped.body_bytes) == ("dropped", sent)
    assert head.connection == whole.connection == dropped.connection != after.connection


def test_drop_every_is_a_payload_error_for_aiobotocore(s3: LocalS3, bucket: str) -> None:
    key = first_key(s3, bucket)
    options = s3.storage_options
    s3.configure(drop_every=1)

    async def fetch() -> None:
        async with get_session().create_client(
            "s3",
            endpoint_url=options["endpoint_url"],
            aws_access_key_id=options["key"],
            aws_secret_access_key=options["secret"],
            **options["client_kwargs"],
        ) as client:
            response = await client.get_object(Bucket=bucket, Key=key)
            size = response["ContentLength"]
            sent = size // 2
            with pytest.raises(aiohttp.ClientPayloadError, match=f"received {sent} of {size} bytes"):
                await response["Body"].read()

    asyncio.run(fetch())


def test_trickle_defeats_a_read_timeout_but_not_a_deadline(s3: LocalS3, bucket: str) -> None:
    key = first_key(s3, bucket)
    # A read timeout bounds each wait for bytes; a trickle of 20 bytes/s never waits that long.
    client = s3.boto3_client(config=Config(retries={"total_max_attempts": 1}, read_timeout=2))
    whole = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    s3.reset_stats()
    s3.configure(trickle_every=2, trickle_bytes_per_s=20)
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == whole

    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    received = body.read(1)
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        received += body.read(1)
    # Sent whole, this photo would take minutes: only a few bytes made it by the deadline.
    assert len(received) < len(whole) // 10
    trickled = s3.records()[1]
    assert trickled.fault == "trickled" and trickled.body_bytes < len(whole)

    s3.configure()  # New settings end the trickle: the rest comes at once, and the connection stays usable.
    assert received + body.read() == whole
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == whole
    assert s3.faults() == {"trickled": 1}
    assert [r.body_bytes for r in s3.records()] == [len(whole)] * 3
    assert s3.connections() == 1


def test_latency_and_spikes_delay_requests(s3: LocalS3, bucket: str) -> None:
    key = first_key(s3, bucket)
    client = s3.boto3_client()
    s3.configure(latency_ms=50)
    start = time.perf_counter()
    client.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert time.perf_counter() - start >= 0.050

    s3.configure(spike_every=3, spike_ms=250)
    durations = []
    for _ in range(3):
        start = time.perf_counter()
        client.head_object(Bucket=bucket, Key=key)
        durations.append(time.perf_counter() - start)
    assert max(durations[:2]) < 0.250 <= durations[2]


def test_configure_rejects_unknown_or_negative_settings(s3: LocalS3) -> None:
    with pytest.raises(ValueError, match="unknown settings"):
        s3.configure(fail_evry=2)
    with pytest.raises(ValueError, match="non-negative"):
        s3.configure(latency_ms=-1)
    with pytest.raises(ValueError, match="whole number"):
        s3.configure(drop_every=1.5)
    with pytest.raises(ValueError, match="trickle_every needs trickle_bytes_per_s"):
        s3.configure(trickle_every=1)


def test_reset_removes_buckets_stats_and_faults(s3: LocalS3, bucket: str) -> None:
    client = s3.boto3_client(config=NO_RETRIES)
    assert [b["Name"] for b in client.list_buckets()["Buckets"]] == [bucket]
    s3.configure(fail_every=1)
    s3.reset()
    assert s3.requests() == 0
    assert client.list_buckets()["Buckets"] == []
    client.create_bucket(Bucket="fresh")
    client.put_object(Bucket="fresh", Key="k", Body=b"x")
    assert client.get_object(Bucket="fresh", Key="k")["Body"].read() == b"x"


# -- multipart uploads and ranged reads through s3fs -----------------------------------------------------------


def test_s3fs_multipart_upload_and_ranged_reads(s3: LocalS3, bucket: str) -> None:
    data = random.Random(7).randbytes(11 * MIB)
    fs = filesystem(s3)
    with fs.open(f"{bucket}/shards/shard-0000.tar", "wb", block_size=5 * MIB) as file:
        for start in range(0, len(data), MIB):
            file.write(data[start : start + MIB])
    writes = [(r.method, sorted(parse_qs(r.query, keep_blank_values=True))) for r in s3.records()]
    part = ("PUT", ["partNumber", "uploadId"])
    assert writes == [("POST", ["uploads"]), part, part, part, ("POST", ["uploadId"])]
    assert fs.info(f"{bucket}/shards/shard-0000.tar")["size"] == len(data)

    s3.reset_stats()
    spans = [(0, 512), (5 * MIB - 100, 5 * MIB + 100), (len(data) - 1000, len(data))]
    for start, end in spans:
        assert fs.cat_file(f"{bucket}/shards/shard-0000.tar", start=start, end=end) == data[start:end]
    ranged = [r for r in s3.records() if r.range is not None]
    assert [(r.path, r.range, r.body_bytes) for r in ranged] == [
        ("/photos/shards/shard-0000.tar", f"bytes={start}-{end - 1}", end - start) for start, end in spans
    ]
    assert s3.requests("GET") == 3


# -- sample photos and start-up --------------------------------------------------------------------------------


def test_make_photos_is_deterministic_distinct_and_decodable() -> None:
    photos = make_photos(14, seed=3, size_range=(64, 128))
    assert photos == make_photos(14, seed=3, size_range=(64, 128))
    assert [data for _, data in photos] != [data for _, data in make_photos(14, seed=4, size_range=(64, 128))]
    assert len({data for _, data in photos}) == len(photos)

    classes = photo_classes()
    for index, (key, data) in enumerate(photos):
        name = classes[index % len(classes)]
        assert key == f"{name}/{name}_{index:05d}.jpg"
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            # The aspect ratio stays within 4:3, so a side is at most sqrt(4/3) off the crop size.
            assert all(64 / 1.155 - 1 <= side <= 128 * 1.155 + 1 for side in image.size)


def test_make_photos_png() -> None:
    ((key, data),) = make_photos(1, fmt="png")
    assert key.endswith(".png")
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"


def test_start_failure_reports_the_server_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "SERVER_MODULE", "s3cache.no_such_module")
    server = LocalS3(startup_timeout=30)
    with pytest.raises(RuntimeError, match=r"exited with code 1:\n.*No module named s3cache.no_such_module"):
        server.start()
    server.stop()  # Already stopped by the failed start; stopping again is harmless.
    with pytest.raises(RuntimeError, match="not running"):
        _ = server.endpoint_url
