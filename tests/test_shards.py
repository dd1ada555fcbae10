"""Tar scanning and shard indexes, on tars written by Python's tarfile (the reference writer)."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from s3cache.errors import ShardError
from s3cache.shards import INDEX_NAME, MemberInfo, ShardIndex, ShardInfo
from s3cache.tarformat import (
    BLOCK,
    DEFAULT_MAX_MEMBER_SIZE,
    SkippedMember,
    TarMember,
    entry_size,
    member_header,
    member_name_problem,
    padding,
    scan_tar,
)
from s3cache.webdataset import index_from_tars, is_label_member, sample_key

URL = "s3://bucket/set/shard-000000.tar"
BASE = "s3://bucket/set/"


def build_tar(members: list[tuple[tarfile.TarInfo, bytes]], fmt: int = tarfile.PAX_FORMAT, **options: Any) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt, **options) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def special(name: str, kind: bytes, **fields: Any) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in fields.items():
        setattr(info, key, value)
    return info, b""


def reference(raw: bytes) -> list[tuple[str, int, int, bytes]]:
    """(name, data offset, size, data) of each regular file, as tarfile reads them."""
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return [(m.name, m.offset_data, m.size, raw[m.offset_data : m.offset_data + m.size])
                for m in tar.getmembers() if m.isreg()]


def scanned(raw: bytes | Any, **options: Any) -> list[tuple[str, int, int, bytes | None]]:
    return [(m.name, m.offset, m.size, m.data) for m in scan_tar(raw, URL, read=lambda name: True, **options)]


class ForwardOnly(io.RawIOBase):
    """A stream that can only be read forward, as an HTTP body."""

    def __init__(self, data: bytes) -> None:
        self._inner = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self._inner.read(min(len(buffer), 700))  # short reads, as a socket gives
        buffer[: len(chunk)] = chunk
        return len(chunk)


MEMBERS = [regular("cat/0001.jpg", b"\xff\xd8" + b"x" * 1000), regular("empty.txt", b""),
           regular("dir/" + "long-name-" * 20 + ".png", b"png" * 300), regular("unicodé/ñame.gif", b"GIF89a")]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_scan_matches_tarfile_for_each_header_format(fmt: int) -> None:
    # ustar has no long names or UTF-8, but splits a long path into its prefix field.
    members = MEMBERS if fmt != tarfile.USTAR_FORMAT else [*MEMBERS[:2], regular("a/" * 70 + "x.png", b"p")]
    raw = build_tar(members, fmt, encoding="utf-8")
    expected = reference(raw)
    assert [name for name, *_ in expected] == [info.name for info, _ in members]
    assert scanned(raw) == expected
    assert scanned(ForwardOnly(raw)) == expected  # a non-seekable stream gives the same
    assert scanned(io.BytesIO(raw)) == expected


def test_data_is_read_only_for_requested_members_and_global_pax_headers_are_passed_over() -> None:
    raw = build_tar(MEMBERS, pax_headers={"comment": "written by a test"})
    found = list(scan_tar(raw, URL, read=lambda name: name.endswith(".gif")))
    assert [(m.name, m.data) for m in found] == [(info.name, data if info.name.endswith(".gif") else None)
                                                 for info, data in MEMBERS]


def test_our_headers_are_read_by_tarfile_and_by_the_scanner() -> None:
    names = ["cat/0001.jpg", "x" * 150 + ".jpg", "ünï/cödé.png"]
    payloads = [b"a" * 700, b"b" * 512, b""]
    raw = b"".join(member_header(n, len(d)) + d + padding(len(d)) for n, d in zip(names, payloads, strict=True))
    raw += bytes(2 * BLOCK)
    assert len(raw) == sum(entry_size(n, len(d)) for n, d in zip(names, payloads, strict=True)) + 2 * BLOCK
    assert [(n, s, d) for n, _, s, d in reference(raw)] == list(zip(names, map(len, payloads), payloads, strict=True))
    assert scanned(raw) == reference(raw)


def test_hostile_members_are_skipped_with_a_reason_and_nothing_touches_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    raw = build_tar([
        regular("../escape.jpg", b"evil"), regular("/etc/passwd.jpg", b"evil"), regular("a/../../b.jpg", b"evil"),
        regular("..\\windows.jpg", b"evil"),
        special("link.jpg", tarfile.SYMTYPE, linkname="/etc/passwd"),
        special("hard.jpg", tarfile.LNKTYPE, linkname="ok.jpg"),
        special("tty.jpg", tarfile.CHRTYPE, devmajor=4, devminor=1),
        special("disk.jpg", tarfile.BLKTYPE, devmajor=8, devminor=0),
        special("pipe.jpg", tarfile.FIFOTYPE), special("folder", tarfile.DIRTYPE),
        regular("./ok.jpg", b"fine"),
    ])
    skipped: list[SkippedMember] = []
    found = list(scan_tar(raw, URL, on_skip=skipped.append))
    assert [(m.name, raw[m.offset : m.offset + m.size]) for m in found] == [("ok.jpg", b"fine")]
    assert [(s.name, s.reason) for s in skipped] == [
        ("../escape.jpg", "name contains a '..' component"), ("/etc/passwd.jpg", "absolute name"),
        ("a/../../b.jpg", "name contains a '..' component"), ("..\\windows.jpg", "name contains a '..' component"),
        ("link.jpg", "symbolic link"), ("hard.jpg", "hard link"), ("tty.jpg", "character device"),
        ("disk.jpg", "block device"), ("pipe.jpg", "FIFO"), ("folder/", "directory"),
    ]
    assert list(tmp_path.iterdir()) == [] and not (tmp_path.parent / "escape.jpg").exists()


def header_only(name: str, size: int, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(fmt, "utf-8", "strict")


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_a_member_declaring_more_than_the_bound_is_refused(fmt: int) -> None:
    huge = 9 * 2**30  # past ustar's octal field: a pax size record, or GNU base-256
    raw = member_header("ok.jpg", 2) + b"ok" + padding(2) + header_only("bomb.jpg", huge, fmt) + b"x" * 100
    with pytest.raises(ShardError, match=rf"{URL}#bomb\.jpg: declares {huge} bytes, more than the limit of "
                                         rf"{DEFAULT_MAX_MEMBER_SIZE}"):
        list(scan_tar(raw, URL))
    with pytest.raises(ShardError, match=r"#bomb\.jpg: declares \d+ bytes, more than the limit of 1000"):
        list(scan_tar(build_tar([regular("bomb.jpg", b"z" * 1001)]), URL, max_member_size=1000))


@pytest.mark.parametrize(("cut", "message"), [
    (lambda raw, data_end: data_end - 300, r"#second\.jpg: truncated: the member declares 2000 bytes"),
    (lambda raw, data_end: data_end + 10, r"#second\.jpg: truncated"),  # in the padding
    (lambda raw, data_end: data_end + (-data_end % BLOCK), r": truncated after member second\.jpg: the end-of-arch"),
    (lambda raw, data_end: data_end + (-data_end % BLOCK) + 100, r": truncated in the header at offset"),
])
def test_a_truncated_shard_is_an_error_naming_the_shard_and_member(
    cut: Callable[[bytes, int], int], message: str
) -> None:
    raw = build_tar([regular("first.jpg", b"1" * 700), regular("second.jpg", b"2" * 2000)])
    data_end = reference(raw)[1][1] + 2000
    shard = raw[: cut(raw, data_end)]
    with pytest.raises(ShardError, match=URL + message):
        list(scan_tar(shard, URL))
    with pytest.raises(ShardError, match=URL + message):
        list(scan_tar(ForwardOnly(shard), URL))


def test_a_damaged_header_is_an_error() -> None:
    raw = bytearray(build_tar([regular("first.jpg", b"1" * 10), regular("second.jpg", b"2")]))
    raw[BLOCK * 2 + 5] ^= 0x20  # a name byte of the second header: the checksum no longer fits
    with pytest.raises(ShardError, match=rf"{URL}: no valid tar header at offset {BLOCK * 2} \(bad checksum\)"):
        list(scan_tar(bytes(raw), URL))
    with pytest.raises(ShardError, match="no valid tar header at offset 0"):
        list(scan_tar(b"not a tar file at all".ljust(BLOCK, b"!"), URL))


@pytest.mark.parametrize(("name", "problem"), [
    ("cat/0001.jpg", None), ("a..b/c.jpg", None), ("", "empty name"), ("/abs.jpg", "absolute name"),
    ("\\abs.jpg", "absolute name"), ("a/../b", "name contains a '..' component"), ("..", "name contains a '..' "
                                                                                     "component"),
    ("a\0b", "name contains a NUL character"),
])
def test_member_name_problems(name: str, problem: str | None) -> None:
    assert member_name_problem(name) == problem


# -- the index -------------------------------------------------------------------------------------------


def sample_index() -> ShardIndex:
    return ShardIndex("s3://photos/train/",
                      (ShardInfo("shard-000000.tar", "e0", 4096), ShardInfo("shard-000001.tar", "e1-2", 3072)),
                      (MemberInfo("cat/1.jpg", 0, 512, 1000, "a"), MemberInfo("cat/2.jpg", 0, 2048, 1500, "b"),
                       MemberInfo("dog/3.jpg", 1, 512, 10, None, label=7)))


def test_index_round_trips_through_json() -> None:
    index = sample_index()
    assert ShardIndex.loads(index.dumps(), BASE + INDEX_NAME) == index
    data = json.loads(index.dumps())
    assert data["format"] == "s3cache-shards" and data["version"] == 1
    assert data["members"][0] == {"name": "cat/1.jpg", "shard": 0, "offset": 512, "size": 1000, "etag": "a"}
    assert data["members"][2]["label"] == 7


def test_single_shards_combine_back_into_the_index() -> None:
    index = sample_index()
    parts = [index.single(0), index.single(1)]
    assert parts[1].members == (MemberInfo("dog/3.jpg", 0, 512, 10, None, label=7),)
    assert ShardIndex.combine(index.source, parts) == index


def mutate(change: Callable[[dict[str, Any]], None]) -> bytes:
    data = sample_index().to_json()
    change(data)
    return json.dumps(data).encode()


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.update(format="webdataset"), "not an s3cache shard index"),
    (lambda d: d.update(version=2), "version 2; this s3cache reads version 1"),
    (lambda d: d.pop("source"), r"missing fields \['source'\]"),
    (lambda d: d["shards"][0].update(extra=1), r"unknown fields \['extra'\]"),
    (lambda d: d["shards"][0].update(size=True), "shard-000000.tar is not a non-negative integer"),
    (lambda d: d["shards"][1].update(name="../x.tar"), "not a plain file name"),
    (lambda d: d["shards"][1].update(name="shard-000000.tar"), "a shard is listed twice"),
    (lambda d: d["members"][0].update(shard=2), "names shard 2, but there are 2 shards"),
    (lambda d: d["members"][0].update(name="/etc/x.jpg"), "absolute name"),
    (lambda d: d["members"][1].update(name="cat/1.jpg"), r"shard-000000\.tar#cat/1\.jpg: a second member"),
    (lambda d: d["members"][1].update(offset=1024), r"shard-000000\.tar#cat/2\.jpg: offset 1024 is not after a "
                                                     "header block clear of the previous member"),
    (lambda d: d["members"][1].update(offset=1000), "offset 1000 is not after a header block"),
    (lambda d: d["members"][1].update(size=3000), r"shard-000000\.tar#cat/2\.jpg: ends at byte 5120, past the end "
                                                   r"of the shard \(4096 bytes\)"),
    (lambda d: d["members"][2].update(label="seven"), "the label of 'dog/3.jpg' is not an integer"),
])
def test_index_validation_is_strict(change: Callable[[dict[str, Any]], None], message: str) -> None:
    with pytest.raises(ShardError, match=message) as raised:
        ShardIndex.loads(mutate(change), BASE + INDEX_NAME)
    assert str(raised.value).startswith(BASE) and "s3cache pack" in str(raised.value)


def test_index_that_is_not_json_is_an_error() -> None:
    with pytest.raises(ShardError, match=rf"{BASE}{INDEX_NAME}: not a JSON shard index"):
        ShardIndex.loads(b'{"format": ', BASE + INDEX_NAME)


def test_index_checked_against_the_listed_shards_names_the_shard() -> None:
    index = sample_index()
    index.check_listing(BASE, {"shard-000000.tar": ("e0", 4096), "shard-000001.tar": ("e1-2", 3072), "x": ("", 1)})
    with pytest.raises(ShardError, match=rf"{BASE}shard-000001\.tar: listed in the index but missing"):
        index.check_listing(BASE, {"shard-000000.tar": ("e0", 4096)})
    with pytest.raises(ShardError, match=rf"{BASE}shard-000000\.tar: changed since the index was written "
                                         r"\(ETag e9, 4096 bytes; the index says ETag e0, 4096 bytes\)"):
        index.check_listing(BASE, {"shard-000000.tar": ("e9", 4096), "shard-000001.tar": ("e1-2", 3072)})


def test_index_checked_against_a_shards_headers_names_the_member() -> None:
    index = sample_index()
    index.check_scan(BASE, 0, [TarMember("cat/1.jpg", 512, 1000), TarMember("cat/2.jpg", 2048, 1500)])
    with pytest.raises(ShardError, match=rf"{BASE}shard-000000\.tar#cat/2\.jpg: in the index but not in the shard"):
        index.check_scan(BASE, 0, [TarMember("cat/1.jpg", 512, 1000)])
    with pytest.raises(ShardError, match=r"shard-000000\.tar#cat/1\.jpg: the shard has it at offset 1024"):
        index.check_scan(BASE, 0, [TarMember("cat/1.jpg", 1024, 1000), TarMember("cat/2.jpg", 2048, 1500)])


# -- shards written by other tools ---------------------------------------------------------------------


def test_webdataset_keys() -> None:
    assert sample_key("cat/0001.jpg") == ("cat/0001", "jpg")
    assert sample_key("a.b/c.seg.png") == ("a.b/c", "seg.png")
    assert sample_key("README") is None and sample_key("dir/.hidden") is None
    assert is_label_member("x/1.cls") and not is_label_member("x/1.cls.txt") and not is_label_member("x/1.jpg")


def index_of(shards: list[tuple[str, bytes]], skipped: list[SkippedMember]) -> ShardIndex:
    scans = [(ShardInfo(name, "etag", len(raw)), scan_tar(raw, BASE + name, read=is_label_member))
             for name, raw in shards]
    return index_from_tars(BASE, scans, skipped.append)


def test_index_from_webdataset_shards_groups_members_by_key() -> None:
    first = build_tar([
        regular("a/0001.jpg", b"jpeg-1"), regular("a/0001.cls", b"3\n"), regular("a/0002.png", b"png-2"),
        regular("a/0003.cls", b"5"), regular("a/0004.json", b"{}"), regular("a/0004.JPG", b"jpeg-4"),
        regular("a/0004.png", b"second image"), regular("README", b"hello"),
    ])
    second = build_tar([regular("b/0005.cls", b"0"), regular("b/0005.jpeg", b"jpeg-5"),
                        regular("a/0001.jpg", b"again")])
    skipped: list[SkippedMember] = []
    index = index_of([("part-0.tar", first), ("part-1.tar", second)], skipped)
    raws = [first, second]
    assert [(m.name, m.shard, m.label, m.etag) for m in index.members] == [
        ("a/0001.jpg", 0, 3, None), ("a/0002.png", 0, None, None), ("a/0004.JPG", 0, None, None),
        ("b/0005.jpeg", 1, 0, None)]
    assert [raws[m.shard][m.offset : m.offset + m.size] for m in index.members] == [
        b"jpeg-1", b"png-2", b"jpeg-4", b"jpeg-5"]
    assert sorted((s.name, s.reason) for s in skipped) == [
        ("README", "no sample key (no extension)"), ("a/0001.jpg", "same name as a member of an earlier shard"),
        ("a/0003.cls", "label of sample a/0003 without an image"), ("a/0004.json", "not an image or a .cls label"),
        ("a/0004.png", "second image of sample a/0004")]
    assert ShardIndex.loads(index.dumps(), BASE + INDEX_NAME) == index


def test_a_label_that_is_not_an_integer_names_the_member() -> None:
    raw = build_tar([regular("k/1.jpg", b"j"), regular("k/1.cls", b"cat")])
    with pytest.raises(ShardError, match=rf"{BASE}part\.tar#k/1\.cls: a \.cls label must be an integer, not 'cat'"):
        index_of([("part.tar", raw)], [])
