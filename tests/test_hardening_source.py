"""Hardening of the S3 side: what bucket content and a misbehaving endpoint can do to memory, time,
repeated fetches and logs. Each finding is checked against a real endpoint, counting the requests it received."""

from __future__ import annotations

import concurrent.futures
import io
import logging
import os
import re
import socket
import sqlite3
import subprocess
import sys
import tarfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import all_batches, dataset_options, encode, object_gets, run_together, stack_images

import s3cache
from s3cache.config import CacheConfig
from s3cache.errors import FetchTimeoutError, ObjectChangedError, ObjectTooLargeError, S3RequestError
from s3cache.items import Item
from s3cache.keys import cache_key
from s3cache.loader import Loader
from s3cache.source import Payload, SourceCounters
from s3cache.source.ledger import FILENAME, FetchLedger
from s3cache.source.s3 import S3Source
from s3cache.spec import ImageSpec
from s3cache.store import ArrayStore
from s3cache.testing.locals3 import ACCESS_KEY, REGION, SECRET_KEY, LocalS3
from s3cache.testing.sampledata import make_photos, upload_photos

URL = "s3://photos/train/"
SPEC = ImageSpec((32, 32))


# -- helpers ------------------------------------------------------------------------------------------


def noise_png(height: int, width: int, seed: int = 0) -> bytes:
    """A PNG of random pixels: it hardly compresses, so its size is about height * width * 3 bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return encode(pixels, "PNG", compress_level=0)


def open_loader(s3: LocalS3, cache_dir: Path, **config: Any) -> Loader:
    return CacheConfig.create(cache_dir, storage_options=s3.storage_options, **config).open_loader(SPEC)


def listed(loader: Loader, url: str = URL) -> list[Item]:
    assert isinstance(loader.source, S3Source)
    return loader.source.list_prefix(url)


def gets_of(s3: LocalS3, key: str) -> int:
    return object_gets(s3).count(f"/photos/{key}")


class RecordingSource:
    """A Source that passes everything to another one and records the listed bytes being read at once."""

    def __init__(self, inner: S3Source) -> None:
        self.inner = inner
        self._lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0
        self.reads: list[str] = []

    @property
    def counters(self) -> SourceCounters:
        return self.inner.counters

    def list_prefix(self, url: str) -> list[Item]:
        return self.inner.list_prefix(url)

    def resolve_urls(self, urls: Sequence[str]) -> list[Item]:
        return self.inner.resolve_urls(urls)

    def read(self, item: Item) -> concurrent.futures.Future[Payload]:
        with self._lock:
            self.in_flight += item.size
            self.peak = max(self.peak, self.in_flight)
            self.reads.append(item.url)
        future = self.inner.read(item)
        future.add_done_callback(lambda _: self._done(item.size))
        return future

    def _done(self, size: int) -> None:
        with self._lock:
            self.in_flight -= size

    def close(self) -> None:
        self.inner.close()


# -- 1. memory is bounded, whatever the bucket holds -----------------------------------------------------------


def test_objects_listed_larger_than_the_limit_are_refused_without_a_request(
    s3: LocalS3, bucket: str, photos: list[tuple[str, bytes]], cache_dir: Path
) -> None:
    big = noise_png(700, 700)  # about 1.5 MB
    s3.boto3_client().put_object(Bucket=bucket, Key="train/cat/huge.png", Body=big)
    skipping = open_loader(s3, cache_dir, max_object_size="1MB", on_error="skip")
    raising = open_loader(s3, cache_dir, max_object_size="1MB")
    try:
        items = listed(skipping)
        huge = next(i for i, item in enumerate(items) if item.key == "train/cat/huge.png")
        s3.reset_stats()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            arrays = skipping.load(items)
        assert arrays[huge] is None and sum(a is not None for a in arrays) == 24
        assert any("huge.png" in str(w.message) and "max_object_size" in str(w.message) for w in caught)
        assert gets_of(s3, "train/cat/huge.png") == 0 and len(object_gets(s3)) == 24
        # Not remembered as a failure: the limit is a setting, so nothing is stored for the object.
        assert cache_key(SPEC.fingerprint, items[huge]) not in skipping.store

        with pytest.raises(ObjectTooLargeError) as info:
            raising.load([items[huge]])
        message = str(info.value)
        assert "s3://photos/train/cat/huge.png" in message and str(len(big)) in message and "1000000" in message
        assert isinstance(info.value, ValueError)  # a DecodeError, as an undecodable object is
        events: list[Any] = []
        raising.fill(items, events.append)
        assert [(e.item.key, e.hit, e.failed) for e in events if e.failed] == [("train/cat/huge.png", False, True)]
        assert gets_of(s3, "train/cat/huge.png") == 0
    finally:
        skipping.close()
        raising.close()

    # Raising the limit makes it readable at once.
    roomy = open_loader(s3, cache_dir, max_object_size="2MB")
    try:
        assert roomy.load([items[huge]])[0].shape == (32, 32, 3)
        assert gets_of(s3, "train/cat/huge.png") == 1
    finally:
        roomy.close()


def test_listed_bytes_in_flight_stay_within_the_budget(
    s3: LocalS3, bucket: str, photos: list[tuple[str, bytes]], cache_dir: Path
) -> None:
    sizes = sorted(len(data) for _, data in photos)
    budget = sizes[-1] + sizes[-2] + sizes[-3]  # room for three of the largest photos at once
    s3.configure(latency_ms=30)  # slow enough that reads overlap whenever the budget lets them
    config = CacheConfig.create(cache_dir, storage_options=s3.storage_options, max_bytes_in_flight=budget)
    source = RecordingSource(S3Source(s3.storage_options))
    with config.open_cache() as cache:
        loader = Loader(SPEC, cache.arrays, source, max_bytes_in_flight=config.max_bytes_in_flight)
        try:
            items = source.list_prefix(URL)
            s3.reset_stats()
            arrays = loader.load(items)
        finally:
            loader.close()
    assert all(a is not None for a in arrays)
    assert sizes[-1] < source.peak <= budget  # reads overlapped, and never beyond the budget
    assert len(source.reads) == len(object_gets(s3)) == 24 and source.in_flight == 0


def test_the_budget_bounds_the_memory_of_a_batch_not_just_its_requests(s3: LocalS3, cache_dir: Path) -> None:
    import tracemalloc

    mib = 2**20
    client = s3.boto3_client()
    client.create_bucket(Bucket="heavy")
    for i in range(6):
        client.put_object(Bucket="heavy", Key=f"big/{i}.jpg", Body=os.urandom(4 * mib))  # undecodable: skipped
    s3.configure(latency_ms=100)  # all six requests would be in flight together without a budget
    peaks = {}
    for budget in (64 * mib, 4 * mib):
        loader = open_loader(s3, cache_dir / str(budget), on_error="skip", max_bytes_in_flight=budget)
        try:
            items = listed(loader, "s3://heavy/big/")
            tracemalloc.start()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    assert loader.load(items) == [None] * 6
                peaks[budget] = tracemalloc.get_traced_memory()[1] / mib
            finally:
                tracemalloc.stop()
        finally:
            loader.close()
    # One body at a time (plus the copy that joins its chunks), where a roomy budget holds several at once.
    assert peaks[4 * mib] < 12 and peaks[64 * mib] > peaks[4 * mib] + 8, peaks


def test_a_body_larger_than_its_listed_size_is_refused_unread(
    s3: LocalS3, bucket: str, photos: list[tuple[str, bytes]], cache_dir: Path
) -> None:
    loader = open_loader(s3, cache_dir)
    try:
        items = listed(loader)
        target = items[0]
        bigger = noise_png(1000, 1000)  # 3 MB where the listing said a few kB
        s3.boto3_client().put_object(Bucket=bucket, Key=target.key, Body=bigger)
        s3.reset_stats()
        with pytest.raises(ObjectTooLargeError, match=re.escape(target.url)) as info:
            loader.load([target])
        assert f"listed at {target.size} bytes" in str(info.value) and str(len(bigger)) in str(info.value)
        assert gets_of(s3, target.key) == 1  # refused, not retried
        assert loader.stats["s3_bytes"] == 0  # and not read
        assert loader.store.get(loader.key(target)) is None
    finally:
        loader.close()
    skipping = open_loader(s3, cache_dir, on_error="skip")
    try:
        with pytest.warns(UserWarning, match="listed at"):
            assert skipping.load([target]) == [None]
    finally:
        skipping.close()


def test_a_tar_member_is_read_only_from_the_listed_shard_version(s3: LocalS3, bucket: str,
                                                                 photos: list[tuple[str, bytes]]) -> None:
    def shard(members: list[tuple[str, bytes]]) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return buffer.getvalue()

    client = s3.boto3_client()
    first = shard([("a.jpg", photos[0][1]), ("b.jpg", photos[1][1])])
    client.put_object(Bucket=bucket, Key="packed/shard.tar", Body=first)
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        member = tar.getmember("b.jpg")
    etag = client.head_object(Bucket=bucket, Key="packed/shard.tar")["ETag"].strip('"')
    item = Item(bucket, "packed/shard.tar", etag, member.size, "b.jpg", member.offset_data)
    source = S3Source(s3.storage_options)
    assert source.read(item).result(timeout=30).data == photos[1][1]

    client.put_object(Bucket=bucket, Key="packed/shard.tar", Body=shard([("b.jpg", photos[1][1])]))
    s3.reset_stats()
    with pytest.raises(ObjectChangedError, match=r"s3://photos/packed/shard\.tar#b\.jpg.*list it again"):
        source.read(item).result(timeout=30)
    assert len(object_gets(s3)) == 1  # not retried


# -- 2. a deadline per object -----------------------------------------------------------------------------------


class TrickleServer:
    """An S3-shaped HTTP server on 127.0.0.1 that answers every GET with a body sent one byte at a time."""

    def __init__(self, body: bytes, interval: float) -> None:
        self.body = body
        self.interval = interval
        self.requests = 0
        self.stopping = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                outer.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(outer.body)))
                self.send_header("ETag", '"0123456789abcdef0123456789abcdef"')
                self.send_header("Last-Modified", "Wed, 01 Jan 2025 00:00:00 GMT")
                self.end_headers()
                try:
                    for offset in range(len(outer.body)):
                        if outer.stopping.wait(outer.interval):
                            return
                        self.wfile.write(outer.body[offset:offset + 1])
                        self.wfile.flush()
                except OSError:
                    return  # the client gave up

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> TrickleServer:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": f"http://127.0.0.1:{self.server.server_port}", "key": ACCESS_KEY,
                "secret": SECRET_KEY, "client_kwargs": {"region_name": REGION}}


def test_a_trickling_body_misses_its_deadline_and_fails_naming_the_url(
    photos: list[tuple[str, bytes]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    body = photos[3][1]  # 2.8 kB at one byte per 50 ms: over two minutes; the read timeout never fires
    with TrickleServer(body, interval=0.05) as server:
        source = S3Source(server.storage_options, attempts=2, fetch_timeout=1.0)
        item = Item("slow", "train/cat/1.jpg", "0123456789abcdef0123456789abcdef", len(body))
        assert source.deadline(item) == pytest.approx(1.0 + len(body) / 2**20)
        store = ArrayStore(tmp_path / "arrays")
        loader = Loader(SPEC, store, source, ledger=False)
        started = time.monotonic()
        try:
            with caplog.at_level(logging.INFO, logger="s3cache"), pytest.raises(FetchTimeoutError) as info:
                loader.load([item])
        finally:
            loader.close()
            store.close()
        elapsed = time.monotonic() - started
        give_up = time.monotonic() + 5  # the server's handler threads may lag behind the client
        while server.requests < 2 and time.monotonic() < give_up:
            time.sleep(0.01)
    assert isinstance(info.value, S3RequestError) and isinstance(info.value, TimeoutError)
    assert "s3://slow/train/cat/1.jpg" in str(info.value) and "after 2 attempts" in str(info.value)
    assert "deadline" in str(info.value)
    assert server.requests == 2 and elapsed < 10
    retries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("retrying GET")]
    assert len(retries) == 1 and "DeadlineExceeded" in retries[0] and "s3://slow/train/cat/1.jpg" in retries[0]


# -- 3. an object rewritten between listing and reading ---------------------------------------------------------


def test_an_object_rewritten_after_listing_is_fetched_once_and_served_offline(
    s3: LocalS3, bucket: str, photos: list[tuple[str, bytes]], cache_dir: Path
) -> None:
    options = dataset_options(s3, cache_dir, labels=None, dtype="uint8", batch_size=8)
    ds = s3cache.image_dataset_from_s3(URL, **options)
    key = f"train/{photos[0][0]}"
    new_bytes = noise_png(40, 50, seed=7)
    s3.boto3_client().put_object(Bucket=bucket, Key=key, Body=new_bytes)
    s3.reset_stats()
    epoch1 = stack_images(all_batches(ds))
    assert gets_of(s3, key) == 1 and len(object_gets(s3)) == 24
    index = ds.file_paths.index(f"s3://photos/{key}")
    np.testing.assert_array_equal(epoch1[index], SPEC.decode(new_bytes))  # the version read is served

    s3.reset_stats()
    epoch2 = stack_images(all_batches(ds))
    assert object_gets(s3) == [] and ds.stats["misses"] == 24
    np.testing.assert_array_equal(epoch2, epoch1)
    ds.close()

    offline = s3cache.image_dataset_from_s3(URL, **options | {"offline": True})
    np.testing.assert_array_equal(stack_images(all_batches(offline)), epoch1)
    offline.close()
    relisted = s3cache.image_dataset_from_s3(URL, **options)  # a new listing names the new version
    np.testing.assert_array_equal(stack_images(all_batches(relisted)), epoch1)
    relisted.close()
    assert object_gets(s3) == []


# -- 4. processes sharing a cache fetch each object once ----------------------------------------------------------


def test_processes_warming_one_prefix_fetch_each_object_once(s3: LocalS3, cache_dir: Path, tmp_path: Path) -> None:
    many = make_photos(96, seed=3)
    upload_photos(s3.storage_options, "photos", "many/", many)
    s3.reset_stats()
    s3.configure(latency_ms=10)
    env = os.environ | {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                        "AWS_DEFAULT_REGION": REGION}
    warm = ["warm", "warm", "s3://photos/many/", "--image-size", "32", "32", "--cache-dir", str(cache_dir),
            "--endpoint-url", s3.endpoint_url, "--concurrency", "8"]
    results = run_together([warm] * 4, tmp_path, env)
    for result in results:
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    gets = Counter(object_gets(s3))
    assert len(gets) == 96 and set(gets.values()) == {1}, [path for path, n in gets.items() if n > 1]
    fetched = [int(re.search(r"(\d+) fetched", result.stdout).group(1)) for result in results]
    assert sum(fetched) == 96, fetched
    with sqlite3.connect(cache_dir / FILENAME) as con:
        assert con.execute("SELECT COUNT(*) FROM claims").fetchone() == (0,)  # every claim given back


def claim_for_another_process(cache_dir: Path, key: str, *, host: str, pid: int, seconds: float) -> None:
    """Write a claim as another process's ledger would, without its renewals."""
    ledger = FetchLedger.in_directory(cache_dir)
    ledger.claim(["-"])  # creates the database and its tables
    ledger.close()
    with sqlite3.connect(cache_dir / FILENAME) as con:
        con.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?, ?)",
                    (key, host, pid, "another", time.time() + seconds))


def test_a_claim_of_a_dead_or_frozen_process_blocks_nobody(
    s3: LocalS3, bucket: str, photos: list[tuple[str, bytes]], cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    loader = open_loader(s3, cache_dir)
    try:
        items = listed(loader)[:2]
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
        claim_for_another_process(cache_dir, loader.key(items[0]), host=socket.gethostname(),
                                  pid=int(dead.stdout), seconds=600)
        claim_for_another_process(cache_dir, loader.key(items[1]), host="elsewhere", pid=1, seconds=1.5)
        s3.reset_stats()
        started = time.monotonic()
        with caplog.at_level(logging.DEBUG, logger="s3cache"):
            first = loader.load(items[:1])  # its claimer has exited: taken over at once
            after_first = time.monotonic() - started
            second = loader.load(items[1:])  # its claimer stopped renewing: taken over once the claim expires
        elapsed = time.monotonic() - started
    finally:
        loader.close()
    assert first[0] is not None and second[0] is not None
    assert after_first < 1.0 and 1.0 < elapsed < 10
    assert len(object_gets(s3)) == 2
    messages = [r.getMessage() for r in caplog.records]
    assert any("being fetched by another process" in m and items[1].url in m for m in messages)
    assert any("gone or gave up" in m and items[1].url in m for m in messages)


def test_a_process_waiting_on_a_live_claim_is_served_what_the_claimer_stored(
    s3: LocalS3, bucket: str, photos: list[tuple[str, bytes]], cache_dir: Path
) -> None:
    waiter = open_loader(s3, cache_dir)
    claimer = open_loader(s3, cache_dir)
    try:
        item = listed(waiter)[0]
        assert claimer.ledger is not None and claimer.ledger.claim([claimer.key(item)])
        s3.reset_stats()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(waiter.load, [item])
            time.sleep(0.5)
            assert not waiting.done()
            fetched = claimer.load([item])[0]  # fetches under its own claim, stores, releases
            served = waiting.result(timeout=30)[0]
        np.testing.assert_array_equal(served, fetched)
        assert len(object_gets(s3)) == 1
        assert waiter.stats["shared"] == 1 and waiter.stats["misses"] == 0 and claimer.stats["misses"] == 1
    finally:
        waiter.close()
        claimer.close()


# -- 5. logs: what happened, never a credential ---------------------------------------------------------------

KEY_ID = "AKIAS3CACHELOGTEST42"
SECRET = "s3cache/log+Secret/never-to-be-logged"


@pytest.fixture
def every_log_record() -> Iterator[list[logging.LogRecord]]:
    """Every record of every logger at DEBUG (botocore's and s3fs's too), as a DEBUG handler would see them."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    root = logging.getLogger()
    handler, level = Keep(logging.DEBUG), root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def test_logs_tell_retries_skips_refusals_and_waits_but_never_a_credential(
    s3: LocalS3, bucket: str, photos: list[tuple[str, bytes]], cache_dir: Path,
    every_log_record: list[logging.LogRecord],
) -> None:
    client = s3.boto3_client()
    client.put_object(Bucket=bucket, Key="train/cat/broken.jpg", Body=b"not an image")
    client.put_object(Bucket=bucket, Key="train/cat/huge.png", Body=noise_png(700, 700))
    storage = s3.storage_options | {"key": KEY_ID, "secret": SECRET}
    config = CacheConfig.create(cache_dir, storage_options=storage, on_error="skip", max_object_size="1MB")
    s3.configure(fail_every=4)
    loader = config.open_loader(SPEC)
    try:
        items = listed(loader)
        claim_for_another_process(cache_dir, loader.key(items[0]), host="elsewhere", pid=1, seconds=0.5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arrays = loader.load(items)
    finally:
        loader.close()
    assert sum(a is None for a in arrays) == 2

    ours = [r for r in every_log_record if r.name.startswith("s3cache")]
    messages = [r.getMessage() for r in ours]

    def logged(*parts: str, level: int = logging.INFO) -> bool:
        return any(all(p in r.getMessage() for p in parts) and r.levelno >= level for r in ours)

    assert logged("retrying GET", "SlowDown")
    assert logged("skipping s3://photos/train/cat/broken.jpg")
    assert logged("refusing s3://photos/train/cat/huge.png", "max_object_size")
    assert logged(items[0].url, "being fetched by another process", level=logging.DEBUG)
    assert logged(f"listed {URL}")
    for record in every_log_record:
        text = record.getMessage()
        assert SECRET not in text, record.name
        if record.name.startswith("s3cache"):
            assert KEY_ID not in text, text
    assert len(every_log_record) > len(messages)  # botocore's DEBUG records were seen (and checked) too


def test_an_unwritable_ledger_switches_itself_off_and_everyone_fetches(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = FetchLedger(tmp_path / "no-such-directory" / FILENAME)
    with caplog.at_level(logging.INFO, logger="s3cache"):
        assert ledger.claim(["a", "b"]) == {"a", "b"}  # nobody to coordinate with: the caller fetches
        assert ledger.claim(["a"]) == {"a"} and ledger.unclaimed(["a"]) == {"a"}
    assert not ledger.enabled
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "fetch coordination" in warned[0].getMessage()
    ledger.close()
    offline = FetchLedger(tmp_path / FILENAME, read_only=True)  # nothing recorded yet: nothing to read
    assert offline.stored_keys(["a"]) == {} and offline.claim(["a"]) == {"a"}
    offline.close()
