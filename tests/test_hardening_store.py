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
from helpers import FILE_SIDE, all_batches, dataset_options, object_gets

import s3cache
from s3cache import codec, ops
from s3cache.cli import main
from s3cache.cli_format import shown
from s3cache.config import CacheConfig
from s3cache.errors import CacheError
from s3cache.items import Item
from s3cache.keys import cache_key, parse_key
from s3cache.spec import ImageSpec
from s3cache.store import ArrayStore, MetaStore, spectags, writepause
from s3cache.store.directory import TRUST_SHARED_ENV, CacheDirectory, SpecRecords
from s3cache.store.disk import SafeDisk, UnsafeEntryError
from s3cache.store.faults import CacheWritesPausedWarning, DamagedStoreError
from s3cache.store.safecache import open_diskcache
from s3cache.testing.locals3 import ACCESS_KEY, REGION, SECRET_KEY, LocalS3

URL = "s3://photos/train/"
SMALL = ImageSpec((32, 32))  # 3 KB entries: inline rows in SQLite
BIG = ImageSpec((FILE_SIDE, FILE_SIDE))  # value files
OTHER_UID = 4242


# -- helpers ----------------------------------------------------------------------------------------------------


def cli(*args: Any, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the s3cache command in a new process."""
    environment = os.environ | {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                                "AWS_DEFAULT_REGION": REGION} | (env or {})
    return subprocess.run([sys.executable, "-m", "s3cache", *map(str, args)], capture_output=True, text=True,
                          env=environment, timeout=300)


def warm(s3: LocalS3, cache_dir: Path, spec: ImageSpec = SMALL) -> ops.WarmReport:
    report = ops.warm(URL, spec.image_size, cache_dir=cache_dir, storage_options=s3.storage_options)
    gc.collect()  # connections that decode threads opened close here: the WAL is checkpointed into the database
    assert not (cache_dir / "arrays" / "cache.db-wal").exists()
    return report


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


def test_a_metadata_record_that_is_not_json_names_the_repair(s3: LocalS3, bucket: str, cache_dir: Path) -> None:
    warm(s3, cache_dir)
    plant(cache_dir / "meta" / "cache.db", "spec/0123456789abcdef", 1, 1, value=b"\x80 not json")
    info = cli("info", "--cache-dir", cache_dir)
    assert info.returncode == 2 and "is damaged" in info.stderr and "s3cache verify --fix" in info.stderr
    found = cli("verify", "--cache-dir", cache_dir)
    assert found.returncode == 1 and found.stdout.startswith("spec/0123456789abcdef: metadata is not JSON")
    assert cli("verify", "--fix", "--cache-dir", cache_dir).returncode == 0
    assert ops.cache_info(cache_dir)["entries"] == 24


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
    assert codec.FORMAT_VERSION == 3

    # Every entry is checked through codec.checksum alone: replacing it changes what is written and accepted.
    monkeypatch.setattr(codec, "checksum", lambda key, header, payload: len(key) + len(payload))
    swapped = codec.encode_array(array, key="a")
    np.testing.assert_array_equal(codec.decode(swapped, "b"), array)  # this toy checksum ignores the key's bytes
    monkeypatch.undo()
    with pytest.raises(codec.CorruptEntryError):
        codec.decode(swapped, "a")


# -- 4. a full disk ------------------------------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MB tmpfs mounted for this test (skipped where mounting is not allowed); always unmounted."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(mount)],
                                 capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs: {exc}")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield mount
    finally:
        gc.collect()  # close SQLite connections still open on it
        if subprocess.run(["umount", str(mount)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def fill(mount: Path, leave: int = 0) -> Path:
    """Fill the file system with a filler file, leaving about ``leave`` bytes free (none: until ENOSPC)."""
    filler = mount / f"filler-{len(list(mount.glob('filler-*')))}"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if leave:
            os.write(fd, bytes(max(shutil.disk_usage(mount).free - leave, 0)))
            return filler
        for chunk in (1 << 16, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, bytes(chunk)):
                    pass
    finally:
        os.close(fd)
    assert shutil.disk_usage(mount).free < 4096
    return filler


def paused_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, CacheWritesPausedWarning)]


def test_training_on_a_full_disk_goes_on_from_s3_with_one_warning(
    s3: LocalS3, bucket: str, photos: list[tuple[str, bytes]], tmpfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writepause, "SPACE_CHECK_SECONDS", 0.0)  # look at the free space on every write
    cache_dir = tmpfs / "cache"
    reference = decoded(photos, BIG)
    expected = [reference[url] for url in sorted(reference)]
    filler = fill(tmpfs, leave=1_500_000)  # room for a few of the 24 value files of 300 KB, and the database
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = s3cache.image_dataset_from_s3(URL, **dataset_options(
            s3, cache_dir, image_size=BIG.image_size, labels=None, dtype="uint8", batch_size=8))
        store = ds.loader.store
        gets = []
        for _ in range(2):
            s3.reset_stats()
            np.testing.assert_array_equal(np.concatenate(all_batches(ds)), expected)  # every batch served
            gets.append(len(object_gets(s3)))
        cached = len(list(store.keys()))
        assert 0 < cached < 24 and store.writes_paused
        assert gets == [24, 24 - cached]  # what was cached is served from the cache
        # No partial value file, no file without its row, no emptied directory left behind.
        assert store.verify() == []
        assert len(list((cache_dir / "arrays").rglob("*.val"))) == len(value_files(cache_dir)) == cached

        filler.unlink()  # space is back: writes resume by themselves
        for _ in range(2):
            s3.reset_stats()
            np.testing.assert_array_equal(np.concatenate(all_batches(ds)), expected)
            gets.append(len(object_gets(s3)))
        assert gets[2:] == [24 - cached, 0] and not store.writes_paused
        ds.close()
        store.close()
    [message] = paused_warnings(caught)  # one warning over four epochs
    assert f"the file system holding the cache {cache_dir} is full" in message and "writes are paused" in message
    assert not [w for w in caught if issubclass(w.category, ResourceWarning | RuntimeWarning)
                and "s3cache" in str(w.message)]


def test_a_batch_that_overflows_the_disk_stores_what_fits(tmpfs: Path) -> None:
    entry = np.zeros((FILE_SIDE, FILE_SIDE, 3), np.uint8)  # 300 KB: a value file each
    store = ArrayStore(tmpfs / "arrays")
    try:
        fill(tmpfs, leave=1_200_000)
        keys = [f"spec/etag/bucket/{i}.jpg" for i in range(8)]  # 2.4 MB in one batch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            written = store.put_many([(key, codec.encode_array(entry, key=key)) for key in keys], tag="spec")
        stored = sum(written)
        assert 0 < stored < 8 and written == [True] * stored + [False] * (8 - stored)  # in order, up to the first
        assert store.writes_paused and len(paused_warnings(caught)) == 1
        assert sorted(store.keys()) == sorted(keys[:stored]) and store.verify() == []
        for key in keys[:stored]:
            np.testing.assert_array_equal(store.get(key), entry)
    finally:
        store.close()


def test_a_failed_value_file_write_leaves_nothing_behind(tmpfs: Path) -> None:
    disk = SafeDisk(str(tmpfs / "store"))
    (tmpfs / "store").mkdir()
    fill(tmpfs, leave=20_000)
    filename, _ = disk.filename()
    with pytest.raises(OSError) as full:
        disk.write_file(filename, bytes(100_000))
    assert full.value.errno == errno.ENOSPC
    assert list((tmpfs / "store").iterdir()) == []  # neither the partial file nor its two directories


def test_recovery_commands_work_on_a_full_disk(s3: LocalS3, bucket: str, tmpfs: Path) -> None:
    cache_dir = tmpfs / "cache"
    warm(s3, cache_dir, BIG)
    files = value_files(cache_dir)
    damaged = sorted(files)[0]
    data = bytearray(files[damaged].read_bytes())
    data[5000] ^= 0xFF
    files[damaged].write_bytes(bytes(data))
    orphan = cache_dir / "arrays" / "zz" / "zz" / ("0" * 28 + ".val")
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(bytes(3000))  # what a writer killed between file and row leaves
    fill(tmpfs)

    info = cli("info", "--cache-dir", cache_dir)
    assert info.returncode == 0 and "entries    24" in info.stdout, info.stderr
    found = cli("verify", "--cache-dir", cache_dir)
    assert found.returncode == 1, found.stderr
    assert f"{damaged}: entry checksum does not match" in found.stdout and "unknown file" in found.stdout
    fixed = cli("verify", "--fix", "--cache-dir", cache_dir)
    assert fixed.returncode == 0 and "2 problem(s) found and fixed" in fixed.stdout, fixed.stdout + fixed.stderr
    assert not orphan.exists() and not files[damaged].exists()

    fill(tmpfs)
    assert cli("verify", "--cache-dir", cache_dir).returncode == 0
    cleared = cli("clear", "--yes", "--cache-dir", cache_dir)
    assert cleared.returncode == 0 and "23 arrays" in cleared.stdout, cleared.stdout + cleared.stderr
    after = ops.cache_info(cache_dir)
    assert (after["entries"], after["specs"], after["listings"]) == (0, {}, [])
    assert list((cache_dir / "arrays").rglob("*.val")) == [] and ops.verify_cache(cache_dir) == []


# -- 5. damaged databases ------------------------------------------------------------------------------------------


def damage(database: Path, where: str, seed: int = 0) -> None:
    """Random bytes over a database's pages: all after the first (header and schema stay readable), or the
    second half only (the settings stay readable too, the rows do not)."""
    data = bytearray(database.read_bytes())
    pages = len(data) // 4096
    start = 4096 * (1 if where == "all" else pages // 2)
    data[start:] = np.random.default_rng(seed).integers(0, 256, len(data) - start, dtype=np.uint8).tobytes()
    database.write_bytes(bytes(data))


@pytest.mark.parametrize(("store", "where"), [("arrays", "all"), ("arrays", "rows"), ("meta", "all")])
def test_damaged_databases_name_the_repair_and_verify_fix_rebuilds_them(
    s3: LocalS3, bucket: str, photos: list[tuple[str, bytes]], cache_dir: Path, store: str, where: str
) -> None:
    warm(s3, cache_dir)  # closed: no WAL left beside the databases
    damage(cache_dir / store / "cache.db", where)

    with pytest.raises(CacheError) as refused:
        epoch(s3, cache_dir)
    message = str(refused.value)
    assert str(cache_dir) in message and "s3cache verify --fix" in message, message
    assert isinstance(refused.value, DamagedStoreError) or "damaged" in message
    info = cli("info", "--cache-dir", cache_dir)
    assert info.returncode == 2 and "verify --fix" in info.stderr and "Traceback" not in info.stderr

    found = cli("verify", "--cache-dir", cache_dir)
    assert found.returncode == 1 and "Traceback" not in found.stderr, found.stdout + found.stderr
    assert found.stdout.startswith(f"<{store} database>: the database is damaged")
    fixed = cli("verify", "--fix", "--cache-dir", cache_dir)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert f"<{store} database>: the database is damaged" in fixed.stdout and "rebuilt empty" in fixed.stdout
    assert cli("verify", "--cache-dir", cache_dir).returncode == 0

    s3.reset_stats()
    reference = decoded(photos, SMALL)
    np.testing.assert_array_equal(epoch(s3, cache_dir), np.stack([reference[url] for url in sorted(reference)]))
    assert len(object_gets(s3)) == (24 if store == "arrays" else 0)  # arrays refetched; listings relisted only
    assert ops.cache_info(cache_dir)["specs"] and ops.cache_info(cache_dir)["size_limit_bytes"] == 10 * 10**9


# -- 6. CLI output and unrecorded entries ---------------------------------------------------------------------------

ODD_KEYS = ["cat/cr\rforged.jpg", "cat/esc\x1b[2Jclear.jpg", "cat/rtl\u202egpj.exe.jpg", "cat/sep\u2028line.jpg",
            "cat/back\\slash.jpg"]


def test_cli_escapes_control_characters_in_keys(s3: LocalS3, bucket: str, photos: list[tuple[str, bytes]],
                                                cache_dir: Path) -> None:
    client = s3.boto3_client()
    for key in ODD_KEYS:
        client.put_object(Bucket=bucket, Key=f"train/{key}", Body=photos[0][1])
    warm(s3, cache_dir)

    listed = cli("ls", URL, "--image-size", 32, 32, "--cache-dir", cache_dir, "--endpoint-url", s3.endpoint_url)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()  # splitlines() also breaks at \r and \u2028
    assert len(lines) == 24 + len(ODD_KEYS) + 1
    for key in ODD_KEYS:
        assert any(line.endswith(f"  {shown(URL + key)}") for line in lines), key
    assert "\\r" in listed.stdout and "\\x1b" in listed.stdout and "\\u202e" in listed.stdout
    assert "back\\\\slash" in listed.stdout

    # A stored listing whose object key holds a newline (real S3 allows it; the local endpoint does not).
    with CacheDirectory(cache_dir) as cache:
        stored = cache.meta.get_listing(URL)
        assert stored is not None
        forged = Item.from_json(stored["objects"][0])
        evil = Item(forged.bucket, "train/cat/a\ncached      1.0 KB  s3://photos/forged.jpg", "e", 10)
        stored["objects"].append(evil.to_json())
        cache.meta.put_listing(URL, stored)
        cache.meta.put_listing("s3://photos/x\nforged listing/", stored)
    offline = cli("ls", URL, "--offline", "--image-size", 32, 32, "--cache-dir", cache_dir)
    assert offline.returncode == 0, offline.stderr
    assert len(offline.stdout.splitlines()) == 24 + len(ODD_KEYS) + 2
    assert "a\\ncached      1.0 KB  s3://photos/forged.jpg" in offline.stdout
    info = cli("info", "--cache-dir", cache_dir)
    assert "s3://photos/x\\nforged listing/" in info.stdout
    assert not any(line.startswith("forged") for line in info.stdout.splitlines())

    # verify names a damaged entry of such a key on one line.
    key = cache_key(SMALL.fingerprint, evil)
    with ArrayStore(cache_dir / "arrays") as store:
        store.put(key, codec.encode_array(np.zeros((32, 32, 3), np.uint8)), tag=SMALL.fingerprint)
    with contextlib.closing(sqlite3.connect(cache_dir / "arrays" / "cache.db")) as con, con:
        con.execute("UPDATE Cache SET value = substr(value, 1, 100) WHERE key = ?", (key,))
    found = cli("verify", "--cache-dir", cache_dir)
    assert found.returncode == 1 and len(found.stdout.splitlines()) == 2, found.stdout
    assert found.stdout.startswith(shown(key) + ": entry holds")

    # An error message about such a key (warm meeting a denied object) stays one escaped line.
    s3.configure(deny="rtl")
    failed = cli("warm", URL, "--image-size", 16, 16, "--cache-dir", cache_dir, "--endpoint-url", s3.endpoint_url)
    [error] = [line for line in failed.stderr.splitlines() if "error" in line]  # (the rest: the progress bar)
    assert failed.returncode == 2 and error.startswith("s3cache: error: access denied to"), failed.stderr
    assert "rtl\\u202egpj.exe.jpg" in error and "\u202e" not in failed.stderr


def test_shown_escapes_what_would_forge_or_hide_output() -> None:
    assert shown("s3://b/plain key.jpg") == "s3://b/plain key.jpg"
    assert shown("s3://b/café/猫.jpg") == "s3://b/café/猫.jpg"
    assert shown("a\nb\rc\td\x1be\x7ff\u202eg\u2028h\\i") == "a\\nb\\rc\\td\\x1be\\x7ff\\u202eg\\u2028h\\\\i"
    assert shown("lone \udc80 surrogate") == "lone \\udc80 surrogate"


def test_entries_written_after_clear_are_accounted_and_their_spec_recorded_again(
    s3: LocalS3, bucket: str, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spectags, "RECORD_CHECK_SECONDS", 3600.0)
    recorded: list[str] = []
    call = SpecRecords.__call__
    monkeypatch.setattr(SpecRecords, "__call__", lambda self, tag: (recorded.append(tag), call(self, tag))[1])
    ds = s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, labels=None))
    all_batches(ds)
    assert recorded == []  # 24 writes, no spec check yet: at most one per RECORD_CHECK_SECONDS
    ops.clear_cache(cache_dir)  # another process clears the cache while this one trains
    assert ops.cache_info(cache_dir)["entries"] == 0

    all_batches(ds)  # every image fetched and written again, under a spec that is no longer recorded
    info = ops.cache_info(cache_dir)
    assert info["specs"] == {} and info["entries"] == 24
    assert info["unrecorded"] == {"entries": 24, "size_bytes": 24 * (32 * 32 * 3 + codec.HEADER_SIZE)}
    assert main(["info", "--cache-dir", str(cache_dir)]) == 0

    ds.loader.store.record_specs()  # what the next write after RECORD_CHECK_SECONDS (or closing) does
    assert recorded == [SMALL.fingerprint]
    info = ops.cache_info(cache_dir)
    assert info["specs"][SMALL.fingerprint]["entries"] == 24 and info["unrecorded"]["entries"] == 0

    ops.clear_cache(cache_dir)
    monkeypatch.setattr(spectags, "RECORD_CHECK_SECONDS", 0.0)
    ds.loader.store.record_specs()  # (the next check is due at once)
    all_batches(ds)
    assert ops.cache_info(cache_dir)["specs"][SMALL.fingerprint]["entries"] == 24
    ds.close()


def test_info_text_shows_unrecorded_entries(s3: LocalS3, bucket: str, cache_dir: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    warm(s3, cache_dir)
    meta = MetaStore(cache_dir / "meta")
    meta.delete_spec(SMALL.fingerprint)  # as `clear` while another process kept writing would leave it
    meta.close()
    assert main(["info", "--cache-dir", str(cache_dir)]) == 0
    out = capsys.readouterr().out
    assert "specs:    none" in out and re.search(r"unrecorded .* 24 entries \(7\d\.\d KB\)", out), out
