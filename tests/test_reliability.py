"""Reliability against a real S3 endpoint: injected S3 faults, SIGKILLed warms, concurrent processes,
a damaged cache, unusable cache directories and credentials."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ResponseStreamingError
from helpers import FILE_SIDE, all_batches, dataset_options, object_gets, run_together

import s3cache
from s3cache.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    CacheError,
    EndpointUnreachableError,
    ObjectNotFoundError,
    S3CacheError,
    S3RequestError,
)
from s3cache.keys import parse_key
from s3cache.source.s3 import DEFAULT_ATTEMPTS
from s3cache.spec import ImageSpec
from s3cache.store import ArrayStore
from s3cache.testing.locals3 import ACCESS_KEY, REGION, SECRET_KEY, LocalS3

URL = "s3://photos/train/"
SMALL = ImageSpec((32, 32))
BIG = ImageSpec((FILE_SIDE, FILE_SIDE))  # value files, not rows of the database
NO_RETRIES = Config(retries={"total_max_attempts": 1, "mode": "standard"})


# -- helpers ------------------------------------------------------------------------------------------


def decoded(photos: list[tuple[str, bytes]], spec: ImageSpec) -> dict[str, np.ndarray]:
    """Fresh decodes of the sample photos, by s3:// URL."""
    return {f"{URL}{key}": spec.decode(data) for key, data in photos}


def stored_arrays(cache_dir: Path, spec: ImageSpec) -> dict[str, Any]:
    """Every entry a store serves under one spec, by s3:// URL (a damaged entry reads as None)."""
    store = ArrayStore(cache_dir / "arrays")
    try:
        return {parse_key(key).url: store.get(key) for key in list(store.keys())
                if parse_key(key).fingerprint == spec.fingerprint}
    finally:
        store.close()


def assert_serves(cache_dir: Path, spec: ImageSpec, reference: dict[str, np.ndarray]) -> int:
    """Check every cached entry of a spec against its fresh decode; returns how many there are."""
    stored = stored_arrays(cache_dir, spec)
    for url, array in stored.items():
        np.testing.assert_array_equal(array, reference[url], err_msg=url)
    return len(stored)


def value_files(cache_dir: Path) -> dict[str, Path]:
    """The value file of each file-backed array entry, by store key."""
    with sqlite3.connect(cache_dir / "arrays" / "cache.db") as con:
        rows = con.execute("SELECT key, filename FROM Cache WHERE filename IS NOT NULL").fetchall()
    return {key: cache_dir / "arrays" / filename for key, filename in rows}


def cli_env(key: str = ACCESS_KEY, secret: str = SECRET_KEY) -> dict[str, str]:
    """A subprocess environment holding credentials, where the s3cache command reads them."""
    return os.environ | {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": REGION}


def s3cache_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "s3cache", *args]


def wait_until(condition: Callable[[], bool], process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the process ended first, with status {process.returncode}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def error_text(exc: BaseException) -> str:
    """An error's message with its whole chain of causes, as a traceback would show it."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


# -- the fault-injecting endpoint -------------------------------------------------------------------------


def test_endpoint_denies_matching_keys_and_counts_injected_faults(s3: LocalS3, bucket: str) -> None:
    client = s3.boto3_client(config=NO_RETRIES)
    client.put_object(Bucket=bucket, Key="secret/plans.jpg", Body=b"plans")
    key = client.list_objects_v2(Bucket=bucket, Prefix="train/", MaxKeys=1)["Contents"][0]["Key"]
    s3.reset_stats()
    s3.configure(deny="secret/")
    codes = []
    for call in (lambda: client.get_object(Bucket=bucket, Key="secret/plans.jpg"),
                 lambda: client.head_object(Bucket=bucket, Key="secret/plans.jpg"),
                 lambda: client.list_objects_v2(Bucket=bucket, Prefix="secret/")):
        with pytest.raises(ClientError) as info:
            call()
        codes.append((info.value.response["ResponseMetadata"]["HTTPStatusCode"], info.value.response["Error"]["Code"]))
    assert codes == [(403, "AccessDenied"), (403, "403"), (403, "AccessDenied")]  # HEAD answers carry no body
    # Listing the whole bucket is allowed, as is every other key.
    assert len(client.list_objects_v2(Bucket=bucket)["Contents"]) == 25
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert s3.faults() == {"slow_down": 0, "dropped": 0, "denied": 3}

    s3.configure(fail_every=2, drop_every=3)  # deny is off again: configure replaces everything
    outcomes = []
    for _ in range(6):
        try:
            client.get_object(Bucket=bucket, Key=key)["Body"].read()
            outcomes.append("ok")
        except ClientError as error:
            outcomes.append(error.response["Error"]["Code"])
        except ResponseStreamingError:
            outcomes.append("dropped")
    assert outcomes == ["ok", "SlowDown", "dropped", "SlowDown", "ok", "SlowDown"]
    assert s3.faults() == {"slow_down": 3, "dropped": 1, "denied": 3}
    s3.reset_stats()
    assert s3.faults() == {"slow_down": 0, "dropped": 0, "denied": 0}
    with pytest.raises(ValueError, match="deny must be a string"):
        s3.configure(deny=5)


# -- 1. transient and persistent S3 errors -------------------------------------------------------------------


def test_denied_objects_and_listings_raise_access_denied(
    s3: LocalS3, bucket: str, photos: list[tuple[str, bytes]], cache_dir: Path
) -> None:
    s3.boto3_client().put_object(Bucket=bucket, Key="secret/plans.jpg", Body=photos[0][1])
    s3.configure(deny="secret/")
    with pytest.raises(AccessDeniedError, match="access denied to s3://photos/secret/") as info:
        s3cache.image_dataset_from_s3("s3://photos/secret/", **dataset_options(s3, cache_dir))
    assert isinstance(info.value, PermissionError)
    with pytest.raises(AccessDeniedError, match=r"s3://photos/secret/plans\.jpg"):
        s3cache.image_dataset_from_s3(["s3://photos/secret/plans.jpg"], **dataset_options(s3, cache_dir))
    # The bucket's listing is allowed; reading the object is not, and a 403 is not retried.
    ds = s3cache.image_dataset_from_s3("s3://photos/", **dataset_options(s3, cache_dir, labels=None, batch_size=25))
    s3.reset_stats()
    with pytest.raises(AccessDeniedError, match=r"s3://photos/secret/plans\.jpg"):
        ds[0]
    assert object_gets(s3).count("/photos/secret/plans.jpg") == 1


def test_transient_faults_leave_every_array_bit_identical(
    s3: LocalS3, bucket: str, photos: list[tuple[str, bytes]], tmp_path: Path
) -> None:
    options = {"shuffle": True, "seed": 5, "dtype": "uint8"}
    clean_ds = s3cache.image_dataset_from_s3(URL, **dataset_options(s3, tmp_path / "clean", **options))
    clean = [all_batches(clean_ds) for _ in range(2)]

    s3.configure(fail_every=5, drop_every=7)
    ds = s3cache.image_dataset_from_s3(URL, **dataset_options(s3, tmp_path / "faulty", **options))
    s3.reset_stats()
    faulty = [all_batches(ds) for _ in range(2)]

    compared = 0
    for clean_epoch, faulty_epoch in zip(clean, faulty, strict=True):
        for (x1, y1), (x2, y2) in zip(clean_epoch, faulty_epoch, strict=True):
            np.testing.assert_array_equal(x1, x2)
            np.testing.assert_array_equal(y1, y2)
            compared += len(x1)
    assert compared == 48
    # Object GET n failed when 5 or 7 divides it: 24 good reads take 34 GETs, each fault retried once.
    assert s3.faults() == {"slow_down": 6, "dropped": 4, "denied": 0}
    assert len(object_gets(s3)) == 34 and ds.stats["retries"] == 10 and ds.stats["misses"] == 24
    # Nothing half-fetched was cached: every entry is the decode of its whole object.
    assert assert_serves(tmp_path / "faulty", SMALL, decoded(photos, SMALL)) == 24


@pytest.mark.parametrize(("fault", "last_error"), [("fail_every", "SlowDown"), ("drop_every", "bytes")])
def test_persistent_faults_name_the_object_and_the_attempts(
    s3: LocalS3, bucket: str, photos: list[tuple[str, bytes]], cache_dir: Path, fault: str, last_error: str
) -> None:
    key, data = photos[0]
    url = f"{URL}{key}"
    ds = s3cache.image_dataset_from_s3([url], **dataset_options(s3, cache_dir, labels=None, dtype="uint8"))
    s3.configure(**{fault: 1})
    s3.reset_stats()
    started = time.perf_counter()
    with pytest.raises(S3RequestError, match=rf"{re.escape(url)}: GET failed after {DEFAULT_ATTEMPTS} attempts; "
                                             rf"last error: .*{last_error}"):
        ds[0]
    elapsed = time.perf_counter() - started
    assert object_gets(s3) == [f"/{url.removeprefix('s3://')}"] * DEFAULT_ATTEMPTS
    assert ds.stats["retries"] == DEFAULT_ATTEMPTS - 1
    # Backoff sleeps 0.05 s doubling per retry, times 0.5 to 1.5: at least 0.375 s, at most 1.125 s in all.
    assert 0.375 <= elapsed < 5
    assert stored_arrays(cache_dir, SMALL) == {}  # no entry, not even a failure record

    s3.configure()
    s3.reset_stats()
    np.testing.assert_array_equal(ds[0][0], SMALL.decode(data))
    assert len(object_gets(s3)) == 1


# -- 2. a warm killed mid-way --------------------------------------------------------------------------------

# Where each warm is killed: (object GETs sent, value files written, rows committed) by this run to wait for, then
# seconds to wait. The store writes a batch's value files, then commits their rows in one transaction.
KILL_POINTS = {"listing": (0, 0, 0, 0.0), "GET in flight": (1, 0, 0, 0.0), "value file written": (0, 1, 0, 0.0),
               "just after a write": (0, 2, 0, 0.005), "decoding a response": (3, 0, 0, 0.045),
               "just after a commit": (0, 0, 1, 0.0)}


def count_value_files(cache_dir: Path) -> int:
    return len(list((cache_dir / "arrays").rglob("*.val")))


def count_committed_rows(cache_dir: Path) -> int:
    """Rows of file-backed entries committed to the store's database, read without creating it."""
    database = cache_dir / "arrays" / "cache.db"
    if not database.exists():
        return 0
    try:
        with sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True) as con:
            return con.execute("SELECT COUNT(*) FROM Cache WHERE filename IS NOT NULL").fetchone()[0]
    except sqlite3.OperationalError:  # the table is not created yet
        return 0


def verify_and_repair(cache_dir: Path) -> int:
    """Run ``s3cache verify`` (and ``--fix`` when it finds damage); returns the problems found."""
    verify = subprocess.run(s3cache_command("verify", "--cache-dir", str(cache_dir)), capture_output=True, text=True)
    if verify.returncode == 0:
        assert "no problems found" in verify.stdout
        return 0
    assert verify.returncode == 1, verify.stderr
    fixed = subprocess.run(s3cache_command("verify", "--fix", "--cache-dir", str(cache_dir)),
                           capture_output=True, text=True)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    return len(verify.stdout.splitlines()) - 1


@pytest.mark.slow
def test_sigkill_mid_warm_leaves_a_consistent_cache(
    s3: LocalS3, bucket: str, photos: list[tuple[str, bytes]], cache_dir: Path
) -> None:
    reference = decoded(photos, BIG)
    warm = s3cache_command("warm", URL, "--image-size", str(FILE_SIDE), str(FILE_SIDE), "--cache-dir", str(cache_dir),
                           "--endpoint-url", s3.endpoint_url, "--concurrency", "2")
    s3.configure(latency_ms=40)  # a warm then takes long enough to be killed at chosen points
    for point, (gets, files, rows, delay) in KILL_POINTS.items():
        s3.reset_stats()
        files_target = count_value_files(cache_dir) + files
        rows_target = count_committed_rows(cache_dir) + rows
        process = subprocess.Popen(warm, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda gets=gets, files_target=files_target, rows_target=rows_target:
                   s3.requests() > 0 and len(object_gets(s3)) >= gets and count_value_files(cache_dir) >= files_target
                   and count_committed_rows(cache_dir) >= rows_target, process)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL, f"the warm finished before the kill at {point!r}"
        verify_and_repair(cache_dir)
        assert_serves(cache_dir, BIG, reference)

    cached = set(stored_arrays(cache_dir, BIG))
    assert 0 < len(cached) < len(reference)
    s3.reset_stats()
    subprocess.run(warm, env=cli_env(), check=True, capture_output=True)
    assert sorted(object_gets(s3)) == sorted(f"/{url.removeprefix('s3://')}" for url in reference.keys() - cached)
    assert assert_serves(cache_dir, BIG, reference) == len(reference)
    assert verify_and_repair(cache_dir) == 0


def test_verify_fix_removes_what_a_killed_writer_left(s3: LocalS3, bucket: str, cache_dir: Path) -> None:
    all_batches(s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, image_size=(FILE_SIDE, FILE_SIDE))))
    # A writer killed after writing a value file but before its row: the file and its new directories stay.
    orphan = cache_dir / "arrays" / "zz" / "zz" / "0123456789abcdef0123456789ab.val"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(bytes(1000))
    (cache_dir / "arrays" / "zy" / "zy").mkdir(parents=True)
    store = ArrayStore(cache_dir / "arrays")
    try:
        assert {p.reason.split(":")[0] for p in store.verify(fix=True)} == {"unknown file", "empty directory"}
        assert store.verify() == [] and not (cache_dir / "arrays" / "zz").exists()
        assert len(store) == 24
    finally:
        store.close()


# -- 3. concurrent processes -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_concurrent_processes_share_one_cache(
    s3: LocalS3, bucket: str, photos: list[tuple[str, bytes]], cache_dir: Path, tmp_path: Path
) -> None:
    limit = 700_000  # about 12 of the 24 big arrays: every process evicts while others read
    gray = ImageSpec((32, 32), "grayscale")
    train = {"directory": URL, "labels": None, "shuffle": False, "dtype": "uint8", "batch_size": 6,
             "cache_dir": str(cache_dir), "cache_size_limit": limit, "storage_options": s3.storage_options,
             "verbose": False}
    s3.configure(latency_ms=10)
    results = run_together([
        ["warm", "warm", URL, "--image-size", str(FILE_SIDE), str(FILE_SIDE), "--cache-dir", str(cache_dir),
         "--endpoint-url", s3.endpoint_url, "--cache-size-limit", str(limit), "--concurrency", "4"],
        ["train", json.dumps(train | {"image_size": [FILE_SIDE, FILE_SIDE]})],
        ["train", json.dumps(train | {"image_size": [32, 32], "color_mode": "grayscale"})],
    ], tmp_path, cli_env(), timeout=180)
    for result in results:
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr

    # No torn read: each trainer got every image of both epochs bit-identical to a fresh decode.
    for result, spec in zip(results[1:], (BIG, gray), strict=True):
        served = json.loads(result.stdout)
        reference = decoded(photos, spec)
        expected = [hashlib.sha256(reference[url].tobytes()).hexdigest() for url in served["paths"]]
        assert served["epochs"] == [expected, expected]

    store = ArrayStore(cache_dir / "arrays")
    try:
        assert store.verify() == []  # no orphaned or missing value file, no damaged entry
        assert store.volume() <= limit
    finally:
        store.close()
    # No entry stored twice: one value file per big entry, the losers' copies removed.
    big_entries = assert_serves(cache_dir, BIG, decoded(photos, BIG))
    assert 0 < big_entries == len(value_files(cache_dir)) == len(list((cache_dir / "arrays").rglob("*.val")))
    assert_serves(cache_dir, gray, decoded(photos, gray))  # what LRU kept of the small spec


# -- 5. a damaged cache ----------------------------------------------------------------------------------------


def test_damaged_value_files_are_detected_and_refetched_not_served(
    s3: LocalS3, bucket: str, photos: list[tuple[str, bytes]], cache_dir: Path
) -> None:
    options = dataset_options(s3, cache_dir, image_size=(FILE_SIDE, FILE_SIDE), labels=None, dtype="uint8",
                              batch_size=24)
    first = s3cache.image_dataset_from_s3(URL, **options)[0]
    files = value_files(cache_dir)
    flipped, truncated, deleted = sorted(files)[:3]
    data = bytearray(files[flipped].read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one pixel
    files[flipped].write_bytes(bytes(data))
    files[truncated].write_bytes(data[: len(data) // 2])
    files[deleted].unlink()

    store = ArrayStore(cache_dir / "arrays")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # as under `python -W ignore`: verify must not depend on filters
        found = " ".join(f"{problem.key}: {problem.reason}" for problem in store.verify())
    store.close()
    assert f"{flipped}: entry checksum does not match" in found
    assert f"{truncated}: entry holds" in found and f"file not found: {files[deleted]}" in found

    s3.reset_stats()
    again = s3cache.image_dataset_from_s3(URL, **options)
    np.testing.assert_array_equal(again[0], first)  # one call: detected, refetched, served whole
    assert sorted(object_gets(s3)) == sorted(f"/{key.split('/', 2)[2]}" for key in (flipped, truncated, deleted))
    s3.reset_stats()
    np.testing.assert_array_equal(again[0], first)
    assert object_gets(s3) == []  # the refetched arrays were stored again
    store = ArrayStore(cache_dir / "arrays")
    assert store.verify() == []
    store.close()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unopenable_database_names_the_directory_and_the_reset(
    s3: LocalS3, bucket: str, cache_dir: Path, damage: str
) -> None:
    ds = s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir))
    all_batches(ds)
    ds.close()  # no connection of this process may hold or rewrite the file
    database = cache_dir / "arrays" / "cache.db"
    content = database.read_bytes()
    database.write_bytes(b"not a database " * 100 if damage == "garbage" else content[: len(content) // 3])
    with pytest.raises(CacheError, match=rf"cannot open the cache in {re.escape(str(cache_dir))}: .*"
                                         "delete the directory to reset it"):
        s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir))
    cli = subprocess.run(s3cache_command("info", "--cache-dir", str(cache_dir)), capture_output=True, text=True)
    assert cli.returncode == 2 and f"cannot open the cache in {cache_dir}" in cli.stderr
    assert "delete the directory to reset it" in cli.stderr and len(cli.stderr.splitlines()) == 1

    shutil.rmtree(cache_dir)  # the reset the message names
    assert len(s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir))[0][0]) == 8


# -- 6. limits, permissions and credentials ------------------------------------------------------------------------


@pytest.mark.parametrize(("cache", "file"), [("file/cache", "file"), ("file", "file"), (".", "arrays")],
                         ids=["under_a_file", "is_a_file", "arrays_is_a_file"])
def test_unwritable_cache_dir_is_a_clear_error_even_for_root(
    s3: LocalS3, bucket: str, tmp_path: Path, cache: str, file: str
) -> None:
    blocker, cache_dir = tmp_path / file, tmp_path / cache
    blocker.write_text("a regular file")
    with pytest.raises(CacheError, match=f"cannot open the cache in {re.escape(str(cache_dir))}: "):
        s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir))
    cli = subprocess.run(s3cache_command("warm", URL, "--image-size", "8", "8", "--cache-dir", str(cache_dir),
                                         "--endpoint-url", s3.endpoint_url), env=cli_env(), capture_output=True,
                         text=True)
    assert cli.returncode == 2 and f"s3cache: error: cannot open the cache in {cache_dir}: " in cli.stderr
    assert blocker.read_text() == "a regular file" and object_gets(s3) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="permission bits do not stop root")
def test_read_only_cache_dir_is_a_clear_error(s3: LocalS3, bucket: str, cache_dir: Path) -> None:
    ds = s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir))
    all_batches(ds)
    ds.close()
    paths = [cache_dir, *cache_dir.rglob("*")]
    for path in paths:
        path.chmod(0o500 if path.is_dir() else 0o400)
    try:
        with pytest.raises(CacheError, match=f"cannot open the cache in {re.escape(str(cache_dir))}: "):
            s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir))
    finally:
        for path in paths:
            path.chmod(0o700 if path.is_dir() else 0o600)


def test_cache_dir_is_created_owner_only(s3: LocalS3, bucket: str, tmp_path: Path) -> None:
    cache_dir = tmp_path / "new" / "parents" / "cache"
    umask = os.umask(0)  # the most permissive umask: only the mode s3cache asks for restricts it
    try:
        s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir))
    finally:
        os.umask(umask)
    assert stat.S_IMODE(cache_dir.stat().st_mode) == 0o700


KEY_ID = "AKIAS3CACHETESTKEY42"
SECRET = "s3cache/test+Secret/never-to-be-shown"


def test_credentials_never_appear_in_errors_warnings_or_the_cache(
    s3: LocalS3, bucket: str, photos: list[tuple[str, bytes]], cache_dir: Path
) -> None:
    s3.boto3_client().put_object(Bucket=bucket, Key="train/cat/broken.jpg", Body=b"not an image")
    s3.boto3_client().put_object(Bucket=bucket, Key="secret/plans.jpg", Body=photos[0][1])
    storage = s3.storage_options | {"key": KEY_ID, "secret": SECRET}
    options = dataset_options(s3, cache_dir, storage_options=storage, on_error="skip", batch_size=25)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = s3cache.image_dataset_from_s3(URL, **options)
        assert len(ds[0][0]) == 24
    texts = [str(w.message) for w in caught] + [repr(ds.config)]
    assert any("broken.jpg" in text for text in texts)

    dead = storage | {"endpoint_url": "http://127.0.0.1:9"}
    failures: list[tuple[Any, dict[str, Any], dict[str, Any]]] = [
        ("s3://no-such-bucket/x/", {}, storage),
        ("s3://photos/secret/", {"deny": "secret/"}, storage),
        ([f"{URL}cat/missing.jpg"], {}, storage),
        ([f"{URL}{photos[0][0]}"], {"fail_every": 1}, storage),
        (URL, {}, dead),
    ]
    raised: list[type[BaseException]] = []
    for directory, faults, storage_options in failures:
        s3.configure(**faults)
        with pytest.raises(S3CacheError) as info:
            # A new image size: the arrays cached above must not spare the S3 requests.
            s3cache.image_dataset_from_s3(directory, **options | {"storage_options": storage_options,
                                                                  "labels": None, "image_size": (16, 16)})[0]
        raised.append(type(info.value))
        texts.append(error_text(info.value))
    assert raised == [BucketNotFoundError, AccessDeniedError, ObjectNotFoundError, S3RequestError,
                      EndpointUnreachableError]

    s3.configure(deny="secret/")
    cli = subprocess.run(s3cache_command("warm", "s3://photos/", "--image-size", "8", "8", "--cache-dir",
                                         str(cache_dir), "--endpoint-url", s3.endpoint_url),
                         env=cli_env(KEY_ID, SECRET), capture_output=True, text=True)
    assert cli.returncode == 2 and "access denied to s3://photos/secret/plans.jpg" in cli.stderr
    texts += [cli.stdout, cli.stderr]
    texts += [path.read_bytes().decode("latin-1") for path in cache_dir.rglob("*") if path.is_file()]
    for text in texts:
        assert KEY_ID not in text and SECRET not in text
