"""Tar shards: writing member headers, and reading headers safely without ``tarfile``.

Writing uses ``tarfile``'s own header encoder in POSIX pax format, so any tar reader understands the
shards. Reading is ours: :func:`scan_tar` walks the headers of a shard given as bytes or a binary stream
(ustar, GNU long names and pax ``path``/``size`` records) and yields the regular files with their data
offset and size. Nothing is ever extracted and no member name becomes a local path. Members that a
careful reader must not trust are skipped with a reason (names with ``..`` or a leading ``/``, links,
devices, FIFOs, directories, sparse files); a member declaring more than ``max_member_size`` bytes, a
damaged header or a shard cut short is a :class:`~s3cache.errors.ShardError` naming the shard and member.
"""

from __future__ import annotations

import io
import struct
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from s3cache.errors import ShardError

BLOCK = 512
END_OF_ARCHIVE = bytes(2 * BLOCK)
DEFAULT_MAX_MEMBER_SIZE = 64 * 2**20
# GNU long names and pax records are read into memory, so they get a bound of their own.
MAX_EXTENDED_HEADER = 2**20
_SKIP_CHUNK = 2**20
_ZERO_BLOCK = bytes(BLOCK)

_REGULAR = {b"0", b"\0", b"7"}
_LONG_NAME, _LONG_LINK, _PAX, _PAX_GLOBAL = b"L", b"K", b"x", b"g"
_NOT_FILES = {b"1": "hard link", b"2": "symbolic link", b"3": "character device", b"4": "block device",
              b"5": "directory", b"6": "FIFO", b"S": "sparse file"}
_USTAR_MAGIC = b"ustar\x00"


@dataclass(frozen=True)
class TarMember:
    """A regular file in a tar shard.

    Attributes:
        name: Member name, with any leading ``./`` removed.
        offset: Byte offset of the member's data in the shard.
        size: Data length in bytes.
        data: The bytes, for members the caller asked to read; else ``None``.
    """

    name: str
    offset: int
    size: int
    data: bytes | None = None


@dataclass(frozen=True)
class SkippedMember:
    """A member :func:`scan_tar` did not yield, and why."""

    name: str
    reason: str


def member_header(name: str, size: int) -> bytes:
    """The header blocks of a regular file member (pax format: any name length, UTF-8, any size).

    Mode 0644 and mtime 0, so the same members always give the same shard bytes.
    """
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "strict")


def padding(size: int) -> bytes:
    """The zero bytes that follow ``size`` bytes of member data up to the next block."""
    return bytes(-size % BLOCK)


def entry_size(name: str, size: int) -> int:
    """Bytes one member takes in a shard: header, data and padding."""
    return len(member_header(name, size)) + size + (-size % BLOCK)


def member_name_problem(name: str) -> str | None:
    r"""Why a name must not be a member name (of a shard we write or read), or ``None`` if it may.

    Backslashes count as separators too, so ``..\x`` is refused as well.
    """
    if not name:
        return "empty name"
    if name.startswith(("/", "\\")):
        return "absolute name"
    if "\0" in name:
        return "name contains a NUL character"
    if ".." in name.replace("\\", "/").split("/"):
        return "name contains a '..' component"
    return None


def scan_tar(
    source: bytes | BinaryIO,
    url: str,
    *,
    max_member_size: int = DEFAULT_MAX_MEMBER_SIZE,
    read: Callable[[str], bool] | None = None,
    on_skip: Callable[[SkippedMember], None] | None = None,
) -> Iterator[TarMember]:
    """Yield the regular files of a tar shard, in order, without extracting anything.

    Args:
        source: The whole shard, or a binary stream positioned at its start (seekable or not).
        url: The shard's URL, e.g. ``s3://bucket/packed/shard-000003.tar``, for messages.
        max_member_size: Most bytes a member may declare.
        read: Says, by member name, whose data to read into :attr:`TarMember.data`.
        on_skip: Called for every member that is not yielded.

    Raises:
        ShardError: A member declares more than ``max_member_size`` bytes, a header is damaged, or the
            shard ends before a member's data or before the end-of-archive blocks.
    """
    stream = _Stream(io.BytesIO(source) if isinstance(source, bytes | bytearray) else source)
    extended = _Extended()
    last = "the start"
    while (header := _next_header(stream, url, last)) is not None:
        if header.kind in (_LONG_NAME, _LONG_LINK, _PAX, _PAX_GLOBAL):
            extended.read(stream, header, url)
            continue
        name, size, problem = extended.apply(header, url)
        extended = _Extended()
        where = f"{url}#{name}"
        if size > max_member_size:
            raise ShardError(f"{where}: declares {size} bytes, more than the limit of {max_member_size}; "
                             "pass a larger max_member_size if the shard is trusted")
        last = f"member {name}"
        offset = stream.position
        reason = problem or _skip_reason(header.kind, name)
        data = stream.read(size) if reason is None and read is not None and read(name) else None
        got = len(data) if data is not None else stream.skip(size)
        if got < size or stream.skip(-size % BLOCK) < -size % BLOCK:
            raise ShardError(f"{where}: truncated: the member declares {size} bytes at offset {offset}, but the "
                             "shard ends before them; re-create or re-upload the shard")
        if reason is None:
            yield TarMember(name, offset, size, data)
        elif on_skip is not None:
            on_skip(SkippedMember(name, reason))


def _next_header(stream: _Stream, url: str, last: str) -> _Header | None:
    """The next header, or ``None`` at the end-of-archive block."""
    offset = stream.position
    block = stream.read(BLOCK)
    if not block:
        raise ShardError(f"{url}: truncated after {last}: the end-of-archive blocks are missing, so members may "
                         "be lost; re-create or re-upload the shard")
    if len(block) < BLOCK:
        raise ShardError(f"{url}: truncated in the header at offset {offset} (after {last})")
    return None if block == _ZERO_BLOCK else _Header.parse(block, url, offset)


def _skip_reason(kind: bytes, name: str) -> str | None:
    if kind not in _REGULAR:
        return _NOT_FILES.get(kind, f"unsupported member type {kind!r}")
    if kind == b"\0" and name.endswith("/"):  # old tars mark directories by the name alone
        return "directory"
    return member_name_problem(name)


class _Stream:
    """Reads and skips forward, counting the position (seeks where the stream allows it)."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.position = 0
        self._end: int | None = None
        if raw.seekable():
            start = raw.tell()
            self._end = raw.seek(0, io.SEEK_END) - start
            raw.seek(start)

    def read(self, count: int) -> bytes:
        chunks = []
        while count > 0 and (chunk := self._raw.read(count)):
            chunks.append(chunk)
            count -= len(chunk)
        data = b"".join(chunks)
        self.position += len(data)
        return data

    def skip(self, count: int) -> int:
        """Move ``count`` bytes on (fewer at the end of the stream); return how many."""
        if self._end is not None:
            count = min(count, self._end - self.position)
            self._raw.seek(count, io.SEEK_CUR)
            self.position += count
            return count
        skipped = 0
        while skipped < count and (chunk := self.read(min(_SKIP_CHUNK, count - skipped))):
            skipped += len(chunk)
        return skipped


@dataclass(frozen=True)
class _Header:
    name: bytes
    size: int
    kind: bytes

    @classmethod
    def parse(cls, block: bytes, url: str, offset: int) -> _Header:
        """Decode one ustar/GNU header block (checksum verified)."""
        try:
            stored = _number(block[148:156])
            size = _number(block[124:136])
        except ValueError as error:
            raise ShardError(f"{url}: no valid tar header at offset {offset} ({error}); the shard is damaged "
                             "or not a tar file") from None
        # Writers disagree on whether header bytes are signed; tarfile accepts both sums, and so do we.
        unsigned = sum(block[:148]) + sum(block[156:]) + 8 * 0x20
        signed = sum(struct.unpack_from("148b", block)) + sum(struct.unpack_from("356b", block, 156)) + 8 * 0x20
        if stored not in (unsigned, signed):
            raise ShardError(f"{url}: no valid tar header at offset {offset} (bad checksum); the shard is damaged "
                             "or not a tar file")
        name = block[:100].split(b"\0", 1)[0]
        prefix = block[345:500].split(b"\0", 1)[0]
        if block[257:263] == _USTAR_MAGIC and prefix:  # GNU headers keep other fields there
            name = prefix + b"/" + name
        return cls(name, size, block[156:157])


class _Extended:
    """GNU long names and pax records waiting for the member header they apply to."""

    def __init__(self) -> None:
        self.long_name: bytes | None = None
        self.pax: dict[str, bytes] = {}

    def read(self, stream: _Stream, header: _Header, url: str) -> None:
        if header.size > MAX_EXTENDED_HEADER:
            raise ShardError(f"{url}: an extended header at offset {stream.position - BLOCK} declares "
                             f"{header.size} bytes, more than the limit of {MAX_EXTENDED_HEADER}")
        data = stream.read(header.size)
        if len(data) < header.size or stream.skip(-header.size % BLOCK) < -header.size % BLOCK:
            raise ShardError(f"{url}: truncated in an extended header; re-create or re-upload the shard")
        if header.kind == _LONG_NAME:
            self.long_name = data.split(b"\0", 1)[0]
        elif header.kind == _PAX:
            self.pax.update(_pax_records(data, url))
        # Long link names and global pax records say nothing about regular files' names or sizes.

    def apply(self, header: _Header, url: str) -> tuple[str, int, str | None]:
        """The member's name and size, extended records applied, and why it cannot be a file (or ``None``)."""
        raw = self.pax.get("path", self.long_name if self.long_name is not None else header.name)
        try:
            name, problem = raw.decode("utf-8"), None
        except UnicodeDecodeError:
            name, problem = raw.decode("utf-8", "backslashreplace"), "name is not UTF-8"
        while name.startswith("./"):
            name = name[2:]
        size = header.size
        if "size" in self.pax:
            text = self.pax["size"]
            if not text.isdigit():
                raise ShardError(f"{url}#{name}: bad pax size record {text!r}; the shard is damaged")
            size = int(text)
        if any(key.startswith("GNU.sparse.") for key in self.pax):
            problem = "sparse file"
        return name, size, problem


def _pax_records(data: bytes, url: str) -> dict[str, bytes]:
    """Parse pax records: ``<length> <key>=<value>`` and a newline, each."""
    records: dict[str, bytes] = {}
    position = 0
    while position < len(data) and data[position] != 0:
        space = data.find(b" ", position)
        length_text = data[position:space]
        length = int(length_text) if space > position and length_text.isdigit() else 0
        record = data[space + 1 : position + length]
        if length <= len(length_text) or position + length > len(data) or not record.endswith(b"\n"):
            raise ShardError(f"{url}: malformed pax record at byte {position} of an extended header")
        key, equals, value = record[:-1].partition(b"=")
        if not equals:
            raise ShardError(f"{url}: malformed pax record at byte {position} of an extended header")
        records[key.decode("utf-8", "replace")] = value
        position += length
    return records


def _number(field: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 for large values.

    Raises:
        ValueError: Not a number, or negative.
    """
    if field[0] & 0x80:
        if field[0] != 0x80:
            raise ValueError("negative or malformed base-256 number")
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    if not all(48 <= byte <= 55 for byte in text):
        raise ValueError(f"bad number {text!r}")
    return int(text, 8)
