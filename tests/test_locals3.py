"""Tests of the local S3 endpoint (counting, faults, latency, reset) and of the sample photos."""

import asyncio
import io
import time

import aiohttp
import pytest
from aiobotocore.session import get_session
from botocore.config import Config
from botocore.exceptions import ClientError, ResponseStreamingError
from PIL import Image

from s3cache.testing import locals3 as locals3_module
from s3cache.testing.locals3 import LocalS3
from s3cache.testing.sampledata import make_photos, photo_classes

NO_RETRIES = Config(retries={"total_max_attempts": 1, "mode": "standard"})


def first_key(s3: LocalS3, bucket: str) -> str:
    """Any key of the photo bucket, fetched before the stats are zeroed again."""
    key = s3.boto3_client().list_objects_v2(Bucket=bucket, MaxKeys=1)["Contents"][0]["Key"]
    s3.reset_stats()
    return key


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


def test_control_calls_are_not_counted_and_reset_stats_zeroes(s3: LocalS3, bucket: str) -> None:
    assert s3.requests() == 0 and s3.log() == []
    s3.boto3_client().list_objects_v2(Bucket=bucket)
    s3.configure()
    assert s3.requests() == 1 and s3.requests("GET") == 1
    s3.reset_stats()
    assert s3.requests() == 0 and s3.requests("GET") == 0 and s3.log() == []


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


def test_drop_every_truncates_the_body_for_boto3(s3: LocalS3, bucket: str) -> None:
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
    monkeypatch.setattr(locals3_module, "SERVER_MODULE", "s3cache.no_such_module")
    server = LocalS3(startup_timeout=30)
    with pytest.raises(RuntimeError, match=r"exited with code 1:\n.*No module named s3cache.no_such_module"):
        server.start()
    server.stop()  # Already stopped by the failed start; stopping again is harmless.
    with pytest.raises(RuntimeError, match="not running"):
        _ = server.endpoint_url
