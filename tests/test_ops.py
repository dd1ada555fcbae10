"""The library functions behind the s3cache command, in-process against the local S3 server."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import object_gets

from s3cache import ops
from s3cache.errors import CacheError, NotCachedError
from s3cache.loader import FillProgress
from s3cache.testing.locals3 import LocalS3

URL = "s3://photos/train/"


def test_warm_reports_progress_and_bytes(
    s3: LocalS3, bucket: str, photos: list[tuple[str, bytes]], cache_dir: Path
) -> None:
    events: list[FillProgress] = []
    listed: list[int] = []
    report = ops.warm(URL, (32, 32), cache_dir=cache_dir, storage_options=s3.storage_options,
                      progress=events.append, on_listed=listed.append)
    assert listed == [24] and len(events) == 24 and not any(e.hit or e.failed for e in events)
    assert (report.total, report.hits, report.fetched, report.failed) == (24, 0, 24, 0)
    assert report.bytes_fetched == sum(len(data) for _, data in photos)
    assert report.cache_dir == str(cache_dir) and report.seconds > 0


def test_list_objects_marks_per_spec_and_works_offline(s3: LocalS3, bucket: str, cache_dir: Path) -> None:
    with pytest.raises(CacheError, match="no s3cache cache"):
        ops.list_objects(URL, image_size=(32, 32), cache_dir=cache_dir, offline=True)
    ops.warm(URL, (32, 32), cache_dir=cache_dir, storage_options=s3.storage_options)
    s3.reset_stats()
    with pytest.raises(NotCachedError, match="no stored listing"):
        ops.list_objects("s3://photos/elsewhere/", image_size=(32, 32), cache_dir=cache_dir, offline=True)
    rows = ops.list_objects(URL, image_size=(32, 32), cache_dir=cache_dir, offline=True)
    assert len(rows) == 24 and all(cached for _, cached in rows) and s3.requests() == 0
    other = ops.list_objects(URL, image_size=(32, 32), color_mode="grayscale", cache_dir=cache_dir,
                             storage_options=s3.storage_options)
    assert not any(cached for _, cached in other) and object_gets(s3) == []


def test_list_objects_writes_nothing(s3: LocalS3, bucket: str, cache_dir: Path) -> None:
    rows = ops.list_objects(URL, image_size=(32, 32), cache_dir=cache_dir, storage_options=s3.storage_options)
    assert len(rows) == 24 and not any(cached for _, cached in rows)
    assert not cache_dir.exists()
    ops.warm(URL, (32, 32), cache_dir=cache_dir, storage_options=s3.storage_options)
    before = ops.cache_info(cache_dir)
    ops.list_objects(URL, image_size=(48, 48), cache_dir=cache_dir, storage_options=s3.storage_options)
    assert ops.cache_info(cache_dir) == before  # no spec record, no listing for the new spec


def test_cache_info_lists_a_listing_with_nothing_cached(s3: LocalS3, bucket: str, cache_dir: Path) -> None:
    report = ops.warm(URL, (32, 32), cache_dir=cache_dir, storage_options=s3.storage_options)
    ops.clear_cache(cache_dir, spec=report.fingerprint)
    info = ops.cache_info(cache_dir)
    assert info["entries"] == 0
    assert info["listings"] == [{"url": URL, "spec": None, "objects": 24, "cached": 0, "fraction": 0.0}]


def test_clear_cache_refuses_unknown_or_ambiguous_targets(s3: LocalS3, bucket: str, cache_dir: Path) -> None:
    with pytest.raises(CacheError, match="no s3cache cache"):
        ops.clear_cache(cache_dir)
    assert not cache_dir.exists()  # inspecting never creates a cache
    ops.warm(URL, (32, 32), cache_dir=cache_dir, storage_options=s3.storage_options)
    with pytest.raises(ValueError, match="not both"):
        ops.clear_cache(cache_dir, spec="x", url=URL)
    with pytest.raises(NotCachedError, match="no spec"):
        ops.clear_cache(cache_dir, spec="0123456789abcdef")
    with pytest.raises(NotCachedError, match="no stored listing"):
        ops.clear_cache(cache_dir, url="s3://photos/elsewhere/")
    assert ops.cache_info(cache_dir)["entries"] == 24
