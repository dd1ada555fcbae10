"""Datasets larger than the cache: what the cache keeps, recency between datasets, the limit, offline lists, stats.

Every claim about S3 traffic is proven with the local endpoint's own request log.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import random
import sqlite3
import subprocess
import sys
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import all_batches, dataset_options, listings, object_gets, stack_images

import s3cache
from s3cache import cli, ops
from s3cache.errors import NotCachedError, ObjectNotFoundError
from s3cache.items import Item
from s3cache.listing import resolve_url_list
from s3cache.source import SourceCounters
from s3cache.spec import ImageSpec
from s3cache.stats import CacheStatsCallback, CacheTooSmallWarning, StatsRecorder, cache_bytes_needed, read_stats
from s3cache.store import ArrayStore, layout
from s3cache.testing.locals3 import LocalS3
from s3cache.testing.sampledata import upload_photos

URL = "s3://photos/train/"


def empty_store_bytes(tmp_path: Path) -> int:
    with ArrayStore(tmp_path / "empty" / "arrays") as store:
        return store.volume()


def cached_keys(cache_dir: Path) -> set[str]:
    with ArrayStore(cache_dir / "arrays") as store:
        return set(store.keys())


def gets_per_epoch(ds: Any, s3: LocalS3, epochs: int) -> list[int]:
    """Object GETs the server saw during each of ``epochs`` epochs."""
    counts = []
    for _ in range(epochs):
        s3.reset_stats()
        all_batches(ds)
        counts.append(len(object_gets(s3)))
    return counts


def bytes_per_entry(s3: LocalS3, tmp_path: Path, **options: Any) -> float:
    """What one cached 32x32 photo counts toward the limit, measured on an unlimited cache."""
    cache_dir = tmp_path / "calibrate"
    ds = s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, **options))
    all_batches(ds)
    ds.close()
    with ArrayStore(cache_dir / "arrays") as store:
        return (store.volume() - empty_store_bytes(tmp_path)) / len(store)


# -- 1. a shuffled dataset larger than the cache keeps what the cache holds ---------------------------------


def test_shuffled_epochs_hit_what_the_cache_holds(s3: LocalS3, bucket: str, cache_dir: Path, tmp_path: Path) -> None:
    per_entry = bytes_per_entry(s3, tmp_path)
    limit = int(empty_store_bytes(tmp_path) + 12.5 * per_entry)  # room for 12 of the 24 photos: c = 0.5
    s3.reset_stats()
    with pytest.warns(CacheTooSmallWarning, match=r"24 images .* need about .* size limit of .*Expect about 5\d% "):
        ds = s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, shuffle=True, seed=4,
                                                                  cache_size_limit=limit))
    gets = gets_per_epoch(ds, s3, 2)
    held = cached_keys(cache_dir)
    gets += gets_per_epoch(ds, s3, 2)
    assert cached_keys(cache_dir) == held  # nothing cycled out: the run keeps its own entries
    assert len(held) >= 0.95 * 12
    # Every epoch after the first hits exactly what the cache holds; a plain LRU hits 13-17% at c = 0.5.
    assert gets == [24, 24 - len(held), 24 - len(held), 24 - len(held)]
    assert [epoch["hits"] for epoch in ds.stats["epochs"]] == [0] + [len(held)] * 3
    assert ds.stats["epochs"][1]["hit_rate"] == pytest.approx(len(held) / 24)
    with ArrayStore(cache_dir / "arrays") as store:
        assert store.volume() <= limit


def test_a_larger_dataset_evicts_older_datasets_first(s3: LocalS3, bucket: str, cache_dir: Path,
                                                      tmp_path: Path) -> None:
    small = s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, image_size=(16, 16)))
    all_batches(small)  # another run's 24 small entries, used before
    limit = int(empty_store_bytes(tmp_path) + 12.5 * bytes_per_entry(s3, tmp_path))
    with pytest.warns(CacheTooSmallWarning):
        large = s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, shuffle=True, seed=1,
                                                                     cache_size_limit=limit))
    all_batches(large)
    held = cached_keys(cache_dir)
    # The older run's entries all went to make room; then the run kept its own.
    assert held <= {large.loader.key(item) for item in large.items} and len(held) >= 0.95 * 12


def test_keras_worker_processes_share_the_run(s3: LocalS3, bucket: str, cache_dir: Path, tmp_path: Path) -> None:
    per_entry = bytes_per_entry(s3, tmp_path, batch_size=4)
    limit = int(empty_store_bytes(tmp_path) + 12.5 * per_entry)
    s3.reset_stats()
    with pytest.warns(CacheTooSmallWarning):
        ds = s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, batch_size=4, shuffle=True, seed=2,
                                                                  workers=2, use_multiprocessing=True,
                                                                  cache_size_limit=limit))
    history = tiny_model(len(ds.class_names)).fit(ds, epochs=3, verbose=0, callbacks=[CacheStatsCallback(ds)])
    held = len(cached_keys(cache_dir))
    assert held >= 0.95 * 12
    # Worker processes of one epoch, and of the next epochs (Keras starts new ones), keep one run's entries.
    assert history.history["cache_hits"][1:] == [held, held]
    assert history.history["cache_misses"][1:] == [24 - held, 24 - held]
    assert history.history["cache_hit_rate"][2] == pytest.approx(held / 24)
    assert ds.stats["misses"] == len(object_gets(s3)) == 24 + 2 * (24 - held)


def test_warm_fills_the_cache_with_what_fits_and_training_keeps_it(s3: LocalS3, bucket: str, cache_dir: Path,
                                                                     tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    limit = int(empty_store_bytes(tmp_path) + 12.5 * bytes_per_entry(s3, tmp_path))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.storage_options["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.storage_options["secret"])
    s3.reset_stats()
    assert cli.main(["warm", URL, "--image-size", "32", "32", "--cache-dir", str(cache_dir), "--endpoint-url",
                     s3.endpoint_url, "--cache-size-limit", str(limit)]) == 0
    out, err = capsys.readouterr()
    held = len(cached_keys(cache_dir))
    assert held >= 0.9 * 12 and f"{24 - held} left out (the cache is full)" in out
    assert "s3cache: the 24 images of this dataset need about" in err and "Expect about 5" in err
    assert len(object_gets(s3)) == held  # nothing fetched that the cache could not keep
    with pytest.warns(CacheTooSmallWarning):
        ds = s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, shuffle=True, seed=3))
    warmed = cached_keys(cache_dir)
    assert gets_per_epoch(ds, s3, 2) == [24 - held, 24 - held]  # training is the same run: it keeps them
    assert cached_keys(cache_dir) == warmed


# -- 2. exact LRU order between datasets, whatever the timing -------------------------------------------------


def test_lru_order_between_datasets_within_seconds(s3: LocalS3, bucket: str, cache_dir: Path, tmp_path: Path) -> None:
    cat, coffee = URL + "cat/", URL + "coffee/"
    rockets_and_galaxies = [f"s3://photos/train/{name}" for name, _ in _photo_names(s3) if
                            name.startswith(("rocket/", "galaxy/"))]
    all_batches(s3cache.image_dataset_from_s3(cat, **dataset_options(s3, cache_dir, labels=None)))
    all_batches(s3cache.image_dataset_from_s3(coffee, **dataset_options(s3, cache_dir, labels=None)))
    with ArrayStore(cache_dir / "arrays") as store:
        assert len(store) == 8
        per_entry = (store.volume() - empty_store_bytes(tmp_path)) / len(store)
    limit = int(empty_store_bytes(tmp_path) + 12.5 * per_entry)
    options = dataset_options(s3, cache_dir, labels=None, cache_size_limit=limit)
    assert gets_per_epoch(s3cache.image_dataset_from_s3(cat, **options), s3, 1) == [0]  # cat again, moments later
    assert gets_per_epoch(s3cache.image_dataset_from_s3(rockets_and_galaxies, **options), s3, 1) == [8]
    # 16 entries for room for 12: coffee's 4, used longest ago, went; cat's stayed although read within seconds.
    assert gets_per_epoch(s3cache.image_dataset_from_s3(cat, **options), s3, 1) == [0]
    assert gets_per_epoch(s3cache.image_dataset_from_s3(coffee, **options), s3, 1) == [4]


def test_recency_writes_only_entries_another_run_stamped(tmp_path: Path) -> None:
    from s3cache import codec

    entry = codec.encode_array(np.zeros((8, 8, 3), np.uint8))
    store = ArrayStore(tmp_path / "arrays")
    store.begin_run("a")
    for i in range(600):
        store.put(f"k{i}", entry, tag="t")
    keys = [f"k{i}" for i in range(600)]
    noted: list[int] = []
    original = store.recency.note
    store.recency.note = lambda rowids: (noted.extend(rowids), original(rowids))  # type: ignore[method-assign]

    def epoch() -> None:  # as S3ImageDataset.on_epoch_end does
        assert all(value is not None for value in store.get_many(keys))
        store.recency.flush()
        store.recency.refresh()

    for _ in range(3):  # epochs of the run that stored them: nothing to write
        epoch()
    assert noted == []
    store.begin_run("b")
    for _ in range(3):  # a dataset sharing these images: each entry once, in its first epoch
        epoch()
    assert sorted(noted) == sorted(set(noted)) and len(noted) == 600
    store.put("b-only", entry, tag="t")
    store.begin_run("c")
    store.put("c-only", entry, tag="t")
    store.begin_run("b")  # b again after c: its entries become the newest with one row written, none per entry
    epoch()
    assert len(noted) == 600
    order = [run for (run,) in sqlite3.connect(tmp_path / "arrays" / "cache.db").execute(
        "SELECT run FROM S3cacheGeneration ORDER BY ord")]
    assert order[-3:] == ["a", "c", "b"]
    store.close()


# -- 3. the size limit is the cache's own -----------------------------------------------------------------


def test_size_limit_is_kept_in_the_cache_and_applied_at_once(s3: LocalS3, bucket: str, cache_dir: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    all_batches(s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir)))  # default: keeps 10 GB
    other_process = ArrayStore(cache_dir / "arrays")
    full = other_process.volume()
    assert other_process.size_limit == 10 * 10**9 and len(other_process) == 24
    lower = full // 2
    with pytest.warns(CacheTooSmallWarning):
        s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, cache_size_limit=lower))
    # Evicted when the limit was set, before any write; every handle on the cache follows the new limit.
    assert other_process.volume() <= lower < full and 0 < len(other_process) < 24
    assert other_process.size_limit == lower
    other_process.close()
    with warnings.catch_warnings(record=True):
        s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir))  # None keeps it
    assert ops.cache_info(cache_dir)["size_limit_bytes"] == lower
    capsys.readouterr()
    assert cli.main(["info", "--cache-dir", str(cache_dir)]) == 0
    assert f"limit      {lower / 1000:.1f} KB, kept in the cache" in capsys.readouterr().out


# -- 4. offline URL lists and sub-prefixes, through the object index ------------------------------------


def test_url_list_trains_offline_after_warming_by_prefix(s3: LocalS3, bucket: str, cache_dir: Path) -> None:
    ops.warm(URL, (32, 32), cache_dir=cache_dir, storage_options=s3.storage_options)
    online = s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, labels=None))
    reference = dict(zip(online.file_paths, stack_images(all_batches(online)), strict=True))
    urls = online.file_paths[::-2]  # 12 URLs, in an order of their own: never listed as such
    s3.reset_stats()
    dead = {"endpoint_url": "http://127.0.0.1:9", "key": "x", "secret": "y"}
    offline = dataset_options(s3, cache_dir, labels=None, offline=True, storage_options=dead)
    ds = s3cache.image_dataset_from_s3(urls, **offline)
    assert ds.file_paths == urls
    np.testing.assert_array_equal(stack_images(all_batches(ds)), np.stack([reference[url] for url in urls]))
    sub = s3cache.image_dataset_from_s3(URL + "cat", **offline)  # cut from the stored listing of train/
    assert sub.file_paths == [url for url in online.file_paths if url.startswith(URL + "cat/")]
    assert s3.requests() == 0

    never = ["s3://photos/train/cat/never-listed.jpg", "s3://photos/elsewhere/x.jpg"]
    with pytest.raises(NotCachedError, match=r"2 of 14 URL\(s\) were never listed") as info:
        s3cache.image_dataset_from_s3(urls + never, **offline)
    assert info.value.urls == never
    with pytest.raises(NotCachedError, match=r"12 object\(s\) are not in the cache") as info:
        s3cache.image_dataset_from_s3(urls, **offline | {"image_size": (16, 16)})  # listed, not cached at 16x16
    assert sorted(info.value.urls) == sorted(urls)


# -- 5. long URL lists resolve through listings -----------------------------------------------------------


def _photo_names(s3: LocalS3) -> list[tuple[str, str]]:
    client = s3.boto3_client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="photos", Prefix="train/")
    names = [(entry["Key"].removeprefix("train/"), entry["ETag"]) for page in pages for entry in page["Contents"]]
    s3.reset_stats()
    return names


def test_a_manifest_of_1000_urls_resolves_in_a_handful_of_listings(s3: LocalS3, cache_dir: Path) -> None:
    objects = [(f"m/{cls}/{i:04d}.jpg", f"{cls}{i}".encode()) for cls in ("a", "b", "c", "d", "e", "f")
               for i in range(200)]
    upload_photos(s3.storage_options, "manifests", "", objects)
    s3.reset_stats()
    manifest = [f"s3://manifests/{key}" for key, _ in random.Random(3).sample(objects, 1000)]
    ds = s3cache.image_dataset_from_s3(manifest, **dataset_options(s3, cache_dir))
    heads = [entry for entry in s3.log() if entry[0] == "HEAD"]
    assert heads == [] and 1 <= len(listings(s3)) <= 3 and s3.requests() == len(listings(s3))
    assert ds.file_paths == manifest
    etags = {f"s3://manifests/{key}": hashlib.md5(data).hexdigest() for key, data in objects}
    assert all(item.etag == etags[item.url] for item in ds.items)
    assert ds.class_names == ["a", "b", "c", "d", "e", "f"]

    s3.reset_stats()
    with pytest.raises(ObjectNotFoundError, match="s3://manifests/m/c/missing.jpg"):
        s3cache.image_dataset_from_s3([*manifest, "s3://manifests/m/c/missing.jpg"],
                                      **dataset_options(s3, cache_dir))
    assert len(listings(s3)) <= 3 and s3.requests("HEAD") == 1


class SortedKeys:
    """A source over a sorted key space: pages of 1,000 keys after a key, one HEAD per URL; counts both."""

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = sorted(keys)
        self.counters = SourceCounters()
        self.calls = Counter[str]()

    def list_page(self, bucket: str, prefix: str, start_after: str) -> tuple[list[Item], bool]:
        self.calls["list"] += 1
        start = bisect.bisect_right(self.keys, start_after)
        keys = [key for key in self.keys[start:start + 1000] if key.startswith(prefix)]
        return [Item(bucket, key, "e", 1) for key in keys], start + 1000 < len(self.keys)

    def resolve_urls(self, urls: Sequence[str]) -> list[Item]:
        self.calls["head"] += len(urls)
        return [Item("b", url.removeprefix("s3://b/"), "e", 1) for url in urls]


def test_sparse_url_lists_fall_back_to_a_head_per_url() -> None:
    keys = [f"k/{i:07d}.jpg" for i in range(200_000)]
    dense = SortedKeys(keys)
    wanted = [f"s3://b/{key}" for key in keys[50_000:60_000]]
    assert [item.url for item in resolve_url_list(wanted, dense)] == wanted
    assert dense.calls == {"list": 10}  # 10,000 URLs, 10 requests
    sparse = SortedKeys(keys)
    wanted = [f"s3://b/{key}" for key in keys[::5000]]  # 40 URLs, 5,000 keys apart
    assert [item.url for item in resolve_url_list(wanted, sparse)] == wanted
    assert sparse.calls["list"] <= 2 and sparse.calls["list"] + sparse.calls["head"] <= len(wanted) + 2


# -- 6. telling the user ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("side", "page_size"), [(32, 4096), (64, 4096), (96, 8192), (128, 16384)])
def test_need_estimate_matches_the_store(s3: LocalS3, bucket: str, cache_dir: Path, side: int, page_size: int) -> None:
    ds = s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, image_size=(side, side)))
    all_batches(ds)
    with ArrayStore(cache_dir / "arrays") as store:
        assert store.page_size == page_size  # picked for the first dataset's entries
        used = store.volume() - layout.empty_store_bytes(page_size)
    assert cache_bytes_needed(ds.items, ImageSpec((side, side)), page_size) == pytest.approx(used, rel=0.15)


def test_no_warning_when_the_dataset_fits(s3: LocalS3, bucket: str, cache_dir: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheTooSmallWarning)
        s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, cache_size_limit="1MB"))


STATS_SCRIPT = """
import json, sys, keras, s3cache
ds = s3cache.image_dataset_from_s3({url!r}, image_size=(32, 32), batch_size=4, shuffle=True, seed=1,
                                   cache_dir={cache_dir!r}, storage_options={options!r}, verbose=False,
                                   workers=2, use_multiprocessing=sys.argv[1] == "processes")
model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(6)])
model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
history = model.fit(ds, epochs=2, verbose=0, callbacks=[s3cache.CacheStatsCallback(ds)])
print(json.dumps({{"history": history.history, "stats": ds.stats}}))
"""


def test_totals_taken_before_newer_ones_take_nothing_back(tmp_path: Path) -> None:
    recorder = StatsRecorder(tmp_path / "stats")
    # Two Keras threads: the one that loaded first records last, with the totals it took before the other's batch.
    recorder.record(0, {"hits": 8, "misses": 6})
    recorder.record(0, {"hits": 4, "misses": 6})
    recorder.record(1, {"hits": 10, "misses": 6})
    recorder.close()
    epochs = read_stats(tmp_path / "stats")["epochs"]
    assert [(epoch["hits"], epoch["misses"]) for epoch in epochs] == [(8, 6), (2, 0)]


@pytest.mark.parametrize("workers", ["threads", "processes"])
def test_stats_add_up_over_keras_workers(s3: LocalS3, bucket: str, cache_dir: Path, workers: str) -> None:
    script = STATS_SCRIPT.format(url=URL, cache_dir=str(cache_dir), options=s3.storage_options)
    run = subprocess.run([sys.executable, "-c", script, workers], capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    stats, history = result["stats"], result["history"]
    assert stats["misses"] == len(object_gets(s3)) == 24  # each object fetched once, counted once
    # Dataset epochs: Keras's look at the input shapes (epoch 0), then the two epochs of fit.
    assert len(stats["epochs"]) == 3 and sum(epoch["hits"] + epoch["misses"] for epoch in stats["epochs"][1:]) == 48
    assert stats["epochs"][2]["s3_requests"] == 0 and sum(history["cache_misses"]) == 24
    if workers == "threads":
        # Keras's thread pool and its tf.data generator can load batches across an epoch's end (seen once on a busy
        # machine: 12 of epoch 1's 24 reads counted in epoch 2), so only the totals above are exact there.
        return
    assert stats["epochs"][2] == {"epoch": 2, "hits": 24, "misses": 0, "skipped": 0, "s3_requests": 0, "s3_bytes": 0,
                                  "retries": 0, "shared": 0, "hit_rate": 1.0}
    assert history["cache_hits"][1] == 24 and history["cache_hit_rate"][1] == 1.0
    assert history["cache_misses"] == [24, 0]  # the first epoch includes Keras's look at the input shapes


def tiny_model(classes: int):  # keras is imported lazily, so no return annotation
    import keras

    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(classes)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model
