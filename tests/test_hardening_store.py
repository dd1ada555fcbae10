"""Hardening of the cache side, one section per finding: nothing read from a cache is unpickled, a cache
directory someone else can write is refused, entries are bound to their keys, a full disk pauses cache writes
(and the recovery commands still work), damaged databases name their repair, and CLI output escapes keys.

Everything runs against real files, real SQLite databases, a real tmpfs and the local S3 endpoint."""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import pickle
import re
import shutil
import sqlite3
import stat
import struct
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import all_batches, dataset_options, object_gets

import s3cache
from s3cache import codec, ops
from s3cache.cli import main, shown
from s3cache.config import CacheConfig
from s3cache.errors import CacheError
from s3cache.items import Item
from s3cache.keys import cache_key, parse_key
from s3cache.spec import ImageSpec
from s3cache.store import ArrayStore, MetaStore
from s3cache.store import arrays as arrays_module
from s3cache.store.directory import TRUST_SHARED_ENV, CacheDirectory, SpecRecords
from s3cache.store.disk import (
    CacheWritesPausedWarning,
    DamagedStoreError,
    SafeDisk,
    UnsafeEntryError,
    open_diskcache,
)
from s3cache.testing.locals3 import ACCESS_KEY, REGION, SECRET_KEY, LocalS3

URL = "s3://photos/train/"
SMALL = ImageSpec((32, 32))  # 3 KB entries: inline rows in SQLite
BIG = ImageSpec((128, 128))  # 48 KB entries: value files
OTHER_UID = 4242


# -- helpers ----------------------------------------------------------------------------------------------------


def cli(*args: Any, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the s3cache command in a new process."""
    environment = os.environ | {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                                "AWS_DEFAULT_REGION": REGION} | (env or {})
    return subprocess.run([sys.executable, "-m", "s3cache", *map(str, args)], capture_output=True, text=True,
                          env=environment, timeout=300)


def warm(s3: LocalS3, cache_dir: Path, spec: ImageSpec = SMALL) -> ops.WarmReport:
    return ops.warm(URL, spec.image_size, cache_dir=cache_dir, storage_options=s3.storage_options)


def decoded(photos: list[tuple[str, bytes]], spec: ImageSpec) -> dict[str, np.ndarray]:
    return {f"{URL}{key}": spec.decode(data) for key, data in photos}


def rows(cache_dir: Path, store: str = "arrays") -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(cache_dir / store / "cache.db")) as con:
        return con.execute("SELECT rowid, key, raw, mode, filename FROM Cache ORDER BY rowid").fetchall()


def value_files(cache_dir: Path) -> dict[str, Path]:
    """The value file of each file-backed entry, by key."""
    return {key: cache_dir / "arrays" / filename for _, key, _, _, filename in rows(cache_dir) if filename}


def epoch(s3: LocalS3, cache_dir: Path, spec: ImageSpec = SMALL, **options: Any) -> np.ndarray:
    """One epoch of a fresh unlabelled uint8 dataset over URL, in key order."""
    ds = s3cache.image_dataset_from_s3(URL, **dataset_options(
        s3, cache_dir, image_size=spec.image_size, labels=None, dtype="uint8", batch_size=8) | options)
    try:
        return np.concatenate(all_batches(ds))
    finally:
        ds.close()
        del ds
        gc.collect()  # close every SQLite connection of the dataset's store


class Planted:
    """Unpickling this runs ``open(marker, "w")``: the marker file's existence proves code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def plant(database: Path, key: Any, raw: int, mode: int, *, value: Any = None, filename: str | None = None,
          tag: str | None = None) -> None:
    """Insert a row into a store's database by hand, as an attacker with write access could."""
    with contextlib.closing(sqlite3.connect(database)) as con, con:
        con.execute("INSERT INTO Cache(key, raw, store_time, expire_time, access_time, access_count, tag, size, "
                    "mode, filename, value) VALUES (?, ?, 0, NULL, 0, 0, ?, ?, ?, ?, ?)",
                    (key, raw, tag, 0 if value is None else len(value), mode, filename, value))


# -- 1. nothing read from a cache is ever unpickled ------------------------------------------------------------


def plant_everywhere(cache_dir: Path, tmp_path: Path, victim: Path) -> tuple[list[Path], str]:
    """Plant rows that would run code if unpickled, and rows naming files outside the store, in both stores.

    Returns the marker files that unpickling would create and the key of a real, listed image whose entry
    was replaced by a pickled one.
    """
    markers = [tmp_path / f"unpickled-{i}" for i in range(8)]
    arrays, meta = cache_dir / "arrays" / "cache.db", cache_dir / "meta" / "cache.db"
    # A real image's key, its entry replaced by a pickle (a dataset read meets it).
    real_key = next(key for _, key, _, _, _ in rows(cache_dir) if key.endswith("cat_00001.jpg"))
    with contextlib.closing(sqlite3.connect(arrays)) as con, con:
        con.execute("DELETE FROM Cache WHERE key = ?", (real_key,))
    plant(arrays, real_key, 1, 4, value=pickle.dumps(Planted(markers[0])), tag=SMALL.fingerprint)
    # A pickled key (raw = 0): diskcache unpickles it whenever keys are iterated.
    plant(arrays, pickle.dumps(Planted(markers[1])), 0, 1, value=b"x", tag=SMALL.fingerprint)
    # A pickled value in a value file, and a text-mode value.
    pickled_file = "ab/cd/" + "e" * 28 + ".val"
    (cache_dir / "arrays" / "ab" / "cd").mkdir(parents=True)
    (cache_dir / "arrays" / pickled_file).write_bytes(pickle.dumps(Planted(markers[2])))
    plant(arrays, f"{SMALL.fingerprint}/x/photos/pickled-file.jpg", 1, 4, filename=pickled_file,
          tag=SMALL.fingerprint)
    plant(arrays, f"{SMALL.fingerprint}/x/photos/text.jpg", 1, 3, filename=pickled_file, tag=SMALL.fingerprint)
    # Rows naming files outside the store: no read, eviction or clear may touch them.
    plant(arrays, f"{SMALL.fingerprint}/x/photos/escape.jpg", 1, 2, filename=os.path.relpath(victim, arrays.parent),
          tag=SMALL.fingerprint)
    plant(arrays, f"{SMALL.fingerprint}/x/photos/absolute.jpg", 1, 2, filename=str(victim), tag=SMALL.fingerprint)
    # The metadata store: a pickled key, a pickled spec record and a pickled listing.
    plant(meta, pickle.dumps(Planted(markers[3])), 0, 1, value=b"{}")
    plant(meta, "spec/0123456789abcdef", 1, 4, value=pickle.dumps(Planted(markers[4])))
    plant(meta, "listing/s3://photos/planted/", 1, 4, value=pickle.dumps(Planted(markers[5])))
    return markers, real_key


def test_planted_pickles_never_run_through_info_verify_clear_or_reads(
    s3: LocalS3, bucket: str, photos: list[tuple[str, bytes]], cache_dir: Path, tmp_path: Path
) -> None:
    warm(s3, cache_dir)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    markers, real_key = plant_everywhere(cache_dir, tmp_path, victim)

    def nothing_ran() -> None:
        assert not [marker for marker in markers if marker.exists()]
        assert victim.read_text() == "keep me"

    info = cli("info", "--cache-dir", cache_dir)
    assert info.returncode == 0, info.stderr
    # 23 images and the 2 planted rows in s3cache's form (their file names are refused when read); none decoded.
    assert "entries    25" in info.stdout
    nothing_ran()

    found = cli("verify", "--cache-dir", cache_dir)
    assert found.returncode == 1, found.stderr
    lines = found.stdout.splitlines()
    assert any(line.startswith(f"{real_key}: a value stored pickled (mode 4)") for line in lines)
    assert any(re.match(r"<row \d+>: a key stored pickled", line) for line in lines)
    assert any(line.startswith(f"{SMALL.fingerprint}/x/photos/text.jpg: a value stored text") for line in lines)
    assert any("escape.jpg: unexpected storage form" in line for line in lines)
    assert any(re.match(r"<meta row \d+>: a key stored pickled", line) for line in lines)
    assert any(line.startswith("spec/0123456789abcdef: a value stored in an unexpected form") for line in lines)
    assert "9 problem(s) found" in lines[-1]
    nothing_ran()

    # A dataset reading the cache: the pickled entry of a real image is dropped and that image fetched again.
    s3.reset_stats()
    images = epoch(s3, cache_dir)
    reference = decoded(photos, SMALL)
    np.testing.assert_array_equal(images, np.stack([reference[url] for url in sorted(reference)]))
    assert object_gets(s3) == [f"/photos/{parse_key(real_key).key}"]
    nothing_ran()

    # diskcache's own paths over the planted stores (a copy): listing, checks, eviction, lookups, clearing.
    copy = tmp_path / "copy"
    shutil.copytree(cache_dir, copy)
    for store in ("arrays", "meta"):
        cache = open_diskcache(copy / store)
        try:
            listed = list(cache.iterkeys()) + list(cache) + list(reversed(cache))
            assert listed and all(isinstance(key, str) for key in listed)
            assert cache.get("spec/0123456789abcdef") is None  # a pickled value reads as missing
            assert "spec/0123456789abcdef" in cache or store == "arrays"
            for call in (lambda c=cache: c.pop("spec/0123456789abcdef"), lambda c=cache: c.peekitem()):
                with contextlib.suppress(UnsafeEntryError, KeyError):
                    call()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache.check()
            cache.evict(SMALL.fingerprint)
            cache.cull()
            cache.clear()
        finally:
            cache.close()
    nothing_ran()

    fixed = cli("verify", "--fix", "--cache-dir", cache_dir)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "problem(s) found and fixed" in fixed.stdout
    clean = cli("verify", "--cache-dir", cache_dir)
    assert clean.returncode == 0 and "no problems found" in clean.stdout, clean.stdout
    assert not (cache_dir / "arrays" / "ab").exists()  # the planted value file went with its row
    nothing_ran()

    # Planted again, then cleared: nothing runs, and no file outside the store is removed.
    (tmp_path / "again").mkdir()
    markers, _ = plant_everywhere(cache_dir, tmp_path / "again", victim)
    cleared = cli("clear", "--yes", "--cache-dir", cache_dir)
    assert cleared.returncode == 0, cleared.stderr
    nothing_ran()
    assert cli("verify", "--fix", "--cache-dir", cache_dir).returncode == 0
    assert ops.cache_info(cache_dir)["entries"] == 0


def test_store_never_reads_or_removes_files_outside_itself(tmp_path: Path) -> None:
    disk = SafeDisk(str(tmp_path / "store"))
    outside = tmp_path / "outside.val"
    outside.write_bytes(b"data")
    for name in ("../outside.val", str(outside), "ab/../../outside.val"):
        disk.remove(name)
        with pytest.raises(UnsafeEntryError):
            disk.fetch(2, name, None, False)
    assert outside.read_bytes() == b"data"
    for mode in (3, 4):  # text and pickle modes are refused before any file is opened
        with pytest.raises(UnsafeEntryError):
            disk.fetch(mode, None, pickle.dumps(1), False)


def test_planted_settings_are_not_applied(tmp_path: Path) -> None:
    store = ArrayStore(tmp_path / "arrays", 10**6)
    store.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "arrays" / "cache.db")) as con, con:
        con.execute("INSERT INTO Settings VALUES ('close', 'not a method')")  # diskcache would setattr it
        con.execute("INSERT INTO Settings VALUES ('disk_store', 1)")
        con.execute("INSERT INTO Settings VALUES ('sqlite_foo', 'bar')")
    store = ArrayStore(tmp_path / "arrays")
    store.put("k", codec.encode_array(np.zeros((2, 2, 3), np.uint8)), tag="t")
    assert store.get("k") is not None and store.size_limit == 10**6
    store.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "arrays" / "cache.db")) as con, con:
        con.execute("UPDATE Settings SET value = 'wal; PRAGMA writable_schema = 1' WHERE key = 'sqlite_journal_mode'")
    with pytest.raises(CacheError, match="unexpected value"):
        ArrayStore(tmp_path / "arrays")


# -- 2. a cache directory someone else can write is refused ------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX ownership")
@pytest.mark.parametrize("case", ["other_owner", "group_writable", "other_writable", "arrays_other_owner",
                                  "meta_database_writable", "symlink_to_other_owner"])
def test_untrusted_cache_directory_is_refused(s3: LocalS3, bucket: str, tmp_path: Path, case: str) -> None:
    cache_dir = tmp_path / "cache"
    warm(s3, cache_dir)
    target, reason = {
        "other_owner": (cache_dir, f"owned by {OTHER_UID}, not by you"),
        "group_writable": (cache_dir, "writable by group (mode 0770)"),
        "other_writable": (cache_dir, "writable by others (mode 0702)"),
        "arrays_other_owner": (cache_dir / "arrays", f"owned by {OTHER_UID}"),
        "meta_database_writable": (cache_dir / "meta" / "cache.db", "writable by group and others (mode 0666)"),
        "symlink_to_other_owner": (cache_dir, f"owned by {OTHER_UID}"),
    }[case]
    used = cache_dir
    if case in ("other_owner", "arrays_other_owner", "symlink_to_other_owner"):
        os.chown(target, OTHER_UID, OTHER_UID)
    else:
        target.chmod({"group_writable": 0o770, "other_writable": 0o702, "meta_database_writable": 0o666}[case])
    if case == "symlink_to_other_owner":
        used = tmp_path / "link"
        used.symlink_to(cache_dir)
    s3.reset_stats()

    pattern = rf"refusing the cache directory {re.escape(str(used))}: .*{re.escape(reason)}"
    with pytest.raises(CacheError, match=pattern) as refused:
        s3cache.image_dataset_from_s3(URL, **dataset_options(s3, used))
    message = str(refused.value)
    assert ("chown" in message or "chmod go-w" in message) and f"{TRUST_SHARED_ENV}=1" in message
    if case == "symlink_to_other_owner":
        assert f"a symlink to {cache_dir}" in message
    assert s3.requests() == 0  # refused before anything was listed or read
    for command in (["info"], ["verify"], ["verify", "--fix"], ["clear", "--yes"]):
        result = cli(*command, "--cache-dir", used)
        assert result.returncode == 2 and "refusing the cache directory" in result.stderr, (command, result)
        assert len(result.stderr.splitlines()) == 1

    # The opt-in: a shared team cache, by environment or by config.
    result = cli("info", "--cache-dir", used, env={TRUST_SHARED_ENV: "1"})
    assert result.returncode == 0 and "entries    24" in result.stdout, result.stderr
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(TRUST_SHARED_ENV, "1")
        s3.reset_stats()
        assert len(epoch(s3, used)) == 24 and object_gets(s3) == []
    config = CacheConfig.create(used, trust_shared_cache=True)
    with config.open_cache(must_exist=True) as cache:
        assert len(list(cache.arrays.keys())) == 24


def test_new_cache_files_are_owner_only_whatever_the_umask(s3: LocalS3, bucket: str, cache_dir: Path) -> None:
    umask = os.umask(0)
    try:
        warm(s3, cache_dir, BIG)
    finally:
        os.umask(umask)
    for path in [cache_dir, *cache_dir.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.suffix == ".val":
            assert mode == 0o600, path
        elif path.is_dir():
            assert mode == 0o700, path
        assert not mode & 0o022, path


# -- 3. entries are bound to their keys ------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [BIG, SMALL], ids=["value_files", "inline_rows"])
def test_swapped_entries_are_detected_like_damaged_ones(
    s3: LocalS3, bucket: str, photos: list[tuple[str, bytes]], cache_dir: Path, spec: ImageSpec
) -> None:
    warm(s3, cache_dir, spec)
    first, second = sorted(key for _, key, _, _, _ in rows(cache_dir))[:2]
    if spec is BIG:
        files = value_files(cache_dir)
        a, b = files[first].read_bytes(), files[second].read_bytes()
        files[first].write_bytes(b)
        files[second].write_bytes(a)
    else:
        with contextlib.closing(sqlite3.connect(cache_dir / "arrays" / "cache.db")) as con, con:
            values = dict(con.execute("SELECT key, value FROM Cache WHERE key IN (?, ?)", (first, second)))
            con.execute("UPDATE Cache SET value = ? WHERE key = ?", (values[second], first))
            con.execute("UPDATE Cache SET value = ? WHERE key = ?", (values[first], second))

    found = ops.verify_cache(cache_dir)
    assert sorted(problem.key for problem in found) == [first, second]
    assert all("stored under another key" in problem.reason for problem in found)

    s3.reset_stats()
    images = epoch(s3, cache_dir, spec)
    reference = decoded(photos, spec)
    np.testing.assert_array_equal(images, np.stack([reference[url] for url in sorted(reference)]))
    assert sorted(object_gets(s3)) == sorted(f"/photos/{parse_key(key).key}" for key in (first, second))
    assert ops.verify_cache(cache_dir) == []


def test_codec_binds_entries_to_keys_in_one_swappable_checksum(monkeypatch: pytest.MonkeyPatch) -> None:
    array = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    entry = codec.encode_array(array, key="a")
    np.testing.assert_array_equal(codec.decode(entry, "a"), array)
    with pytest.raises(codec.CorruptEntryError, match="another key"):
        codec.decode(entry, "b")
    with pytest.raises(codec.CorruptEntryError, match="not bound"):
        codec.decode(codec.encode_array(array), "a")
    assert codec.bind(entry, "b") is entry  # bound already: kept as it is
    transposed = bytearray(entry)
    struct.pack_into("<II", transposed, 8, 5, 4)  # height and width swapped: the length still matches
    with pytest.raises(codec.CorruptEntryError, match="checksum"):
        codec.decode(bytes(transposed), "a")
    old = bytearray(entry)
    old[4] = 1  # a version 1 entry (unbound checksum) from an older s3cache
    with pytest.raises(codec.CorruptEntryError, match="format version 1"):
        codec.decode(bytes(old), "a")
    assert codec.FORMAT_VERSION == 2

    # Every entry is checked through codec.checksum alone: replacing it changes what is written and accepted.
    monkeypatch.setattr(codec, "checksum", lambda key, header, payload: len(key) + len(payload))
    swapped = codec.encode_array(array, key="a")
    np.testing.assert_array_equal(codec.decode(swapped, "b"), array)  # this toy checksum ignores the key's bytes
    monkeypatch.undo()
    with pytest.raises(codec.CorruptEntryError):
        codec.decode(swapped, "a")
