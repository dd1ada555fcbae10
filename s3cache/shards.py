"""The index of a shard set: which member lives in which tar shard, where, as one small JSON document.

A shard set is a folder of uncompressed tar shards (``shard-000000.tar``, ...) plus ``index.json``::

    {"format": "s3cache-shards", "version": 1, "source": "s3://photos/train/",
     "shards": [{"name": "shard-000000.tar", "etag": "...", "size": 16776704}, ...],
     "members": [{"name": "cat/0001.jpg", "shard": 0, "offset": 512, "size": 20311, "etag": "..."}, ...]}

``shard`` is a position in ``shards``, ``offset`` where the member's data starts in that shard and
``etag`` the source object's ETag when it was packed (``null`` for shards written by other tools). An
optional integer ``label`` comes from a WebDataset ``.cls`` member (see :mod:`s3cache.webdataset`).
Reading is strict: anything malformed, and an index that does not match the shards it names, is a
:class:`~s3cache.errors.ShardError` naming the shard (and member) and saying how to repair it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from s3cache.errors import ShardError
from s3cache.tarformat import BLOCK, TarMember, member_name_problem

FORMAT = "s3cache-shards"
VERSION = 1
INDEX_NAME = "index.json"
_SHARD_NAME = re.compile(r"shard-(\d{6,})\.tar")
_REPAIR = "re-run `s3cache pack` for this shard set (or rebuild its index)"


def shard_name(number: int) -> str:
    """The name of shard ``number`` in sets written by ``s3cache pack``: ``shard-000003.tar``."""
    return f"shard-{number:06d}.tar"


def shard_number(name: str) -> int | None:
    """Inverse of :func:`shard_name`; ``None`` for other names."""
    match = _SHARD_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def manifest_name(shard: str) -> str:
    """The name of a shard's manifest (a one-shard index written after the shard): ``shard-000003.json``."""
    return shard.removesuffix(".tar") + ".json"


@dataclass(frozen=True)
class ShardInfo:
    """One shard as uploaded: its name in the set's folder, ETag and size in bytes."""

    name: str
    etag: str
    size: int


@dataclass(frozen=True)
class MemberInfo:
    """Where one member's bytes are.

    Attributes:
        name: Member name, e.g. ``cat/0001.jpg`` (the source key relative to the packed prefix).
        shard: Position of its shard in :attr:`ShardIndex.shards`.
        offset: Byte offset of its data in the shard.
        size: Data length.
        etag: The source object's ETag when packed; ``None`` when unknown.
        label: Class number from a ``.cls`` member; ``None`` when there is none.
    """

    name: str
    shard: int
    offset: int
    size: int
    etag: str | None
    label: int | None = None


@dataclass(frozen=True)
class ShardIndex:
    """A shard set's index (also the form of one shard's manifest).

    Attributes:
        source: The prefix URL the members were packed from (or the shard set's URL for foreign shards).
        shards: The shards, in order.
        members: Every member, in shard order and, within a shard, in offset order.
    """

    source: str
    shards: tuple[ShardInfo, ...]
    members: tuple[MemberInfo, ...]

    def to_json(self) -> dict[str, Any]:
        """The JSON object of the index format."""
        return {"format": FORMAT, "version": VERSION, "source": self.source,
                "shards": [{"name": s.name, "etag": s.etag, "size": s.size} for s in self.shards],
                "members": [_member_json(m) for m in self.members]}

    def dumps(self) -> bytes:
        """The index as UTF-8 JSON."""
        return json.dumps(self.to_json(), ensure_ascii=False, separators=(",", ":")).encode()

    @classmethod
    def loads(cls, raw: bytes, url: str) -> ShardIndex:
        """Parse and validate an index read from ``url`` (the URL only names it in messages)."""
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ShardError(f"{url}: not a JSON shard index ({error}); {_REPAIR}") from None
        return cls.from_json(data, url)

    @classmethod
    def from_json(cls, data: Any, url: str) -> ShardIndex:
        """Validate a parsed index strictly.

        Raises:
            ShardError: Unknown format or version, missing or mistyped fields, unsafe or duplicate names, or
                members outside their shard or overlapping each other.
        """
        check = _Checker(url)
        top = check.fields(data, {"format", "version", "source", "shards", "members"}, set(), "the index")
        if top["format"] != FORMAT:
            raise ShardError(f"{url}: not an s3cache shard index (format {top['format']!r}); {_REPAIR}")
        if top["version"] != VERSION:
            raise ShardError(f"{url}: shard index version {top['version']!r}; this s3cache reads version "
                             f"{VERSION} (upgrade s3cache, or {_REPAIR})")
        shards = tuple(check.shard(row) for row in check.rows(top["shards"], "shards"))
        members = tuple(check.member(row, shards) for row in check.rows(top["members"], "members"))
        check.layout(shards, members)
        return cls(check.text(top["source"], "source"), shards, members)

    def shard_members(self, position: int) -> tuple[MemberInfo, ...]:
        """The members of the shard at ``position``."""
        return tuple(member for member in self.members if member.shard == position)

    def single(self, position: int) -> ShardIndex:
        """The one-shard index (manifest) of the shard at ``position``."""
        members = tuple(replace(member, shard=0) for member in self.shard_members(position))
        return ShardIndex(self.source, (self.shards[position],), members)

    @classmethod
    def combine(cls, source: str, parts: Iterable[ShardIndex]) -> ShardIndex:
        """One index from several (e.g. the manifests of a set's shards), shards in the given order."""
        shards: list[ShardInfo] = []
        members: list[MemberInfo] = []
        for part in parts:
            members.extend(replace(member, shard=member.shard + len(shards)) for member in part.members)
            shards.extend(part.shards)
        return cls(source, tuple(shards), tuple(members))

    def check_listing(self, base_url: str, listed: Mapping[str, tuple[str, int]]) -> None:
        """Check that every shard exists as indexed.

        Args:
            base_url: The shard set's folder URL, ending in ``/``.
            listed: ``{shard name: (ETag, size)}`` as listed now.

        Raises:
            ShardError: A shard is missing or has another ETag or size than the index says.
        """
        for shard in self.shards:
            where = f"{base_url}{shard.name}"
            if shard.name not in listed:
                raise ShardError(f"{where}: listed in the index but missing; {_REPAIR}")
            etag, size = listed[shard.name]
            if (etag, size) != (shard.etag, shard.size):
                raise ShardError(f"{where}: changed since the index was written (ETag {etag}, {size} bytes; the "
                                 f"index says ETag {shard.etag}, {shard.size} bytes); {_REPAIR}")

    def check_scan(self, base_url: str, position: int, scanned: Iterable[TarMember]) -> None:
        """Check a shard's tar headers (from :func:`~s3cache.tarformat.scan_tar`) against the index.

        Raises:
            ShardError: An indexed member is absent from the shard, or at another offset or size.
        """
        found = {member.name: member for member in scanned}
        for member in self.shard_members(position):
            where = f"{base_url}{self.shards[position].name}#{member.name}"
            actual = found.get(member.name)
            if actual is None:
                raise ShardError(f"{where}: in the index but not in the shard; {_REPAIR}")
            if (actual.offset, actual.size) != (member.offset, member.size):
                raise ShardError(f"{where}: the shard has it at offset {actual.offset}, {actual.size} bytes; the "
                                 f"index says offset {member.offset}, {member.size} bytes; {_REPAIR}")


def _member_json(member: MemberInfo) -> dict[str, Any]:
    row: dict[str, Any] = {"name": member.name, "shard": member.shard, "offset": member.offset,
                           "size": member.size, "etag": member.etag}
    if member.label is not None:
        row["label"] = member.label
    return row


class _Checker:
    """Strict field checks for :meth:`ShardIndex.from_json`, with messages naming the index and shard."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.base = url[: url.rfind("/") + 1]

    def fail(self, problem: str) -> ShardError:
        return ShardError(f"{self.url}: {problem}; {_REPAIR}")

    def fields(self, value: Any, required: set[str], optional: set[str], what: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(f"{what} is not a JSON object")
        missing, unknown = required - value.keys(), value.keys() - required - optional
        if missing or unknown:
            raise self.fail(f"{what} has missing fields {sorted(missing)} or unknown fields {sorted(unknown)}")
        return value

    def rows(self, value: Any, what: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(f"{what} is not a JSON list")
        return value

    def text(self, value: Any, what: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(f"{what} is not a non-empty string")
        return value

    def count(self, value: Any, what: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.fail(f"{what} is not a non-negative integer")
        return value

    def shard(self, row: Any) -> ShardInfo:
        row = self.fields(row, {"name", "etag", "size"}, set(), "a shard entry")
        name = self.text(row["name"], "a shard name")
        if "/" in name or member_name_problem(name):
            raise self.fail(f"shard name {name!r} is not a plain file name")
        return ShardInfo(name, self.text(row["etag"], f"the ETag of {name}"), self.count(row["size"], name))

    def member(self, row: Any, shards: tuple[ShardInfo, ...]) -> MemberInfo:
        row = self.fields(row, {"name", "shard", "offset", "size", "etag"}, {"label"}, "a member entry")
        name = self.text(row["name"], "a member name")
        if problem := member_name_problem(name):
            raise self.fail(f"member {name!r}: {problem}")
        position = self.count(row["shard"], f"the shard of {name}")
        if position >= len(shards):
            raise self.fail(f"member {name!r} names shard {position}, but there are {len(shards)} shards")
        etag, label = row["etag"], row.get("label")
        if etag is not None:
            etag = self.text(etag, f"the ETag of {name}")
        if label is not None and (isinstance(label, bool) or not isinstance(label, int)):
            raise self.fail(f"the label of {name!r} is not an integer")
        return MemberInfo(name, position, self.count(row["offset"], f"the offset of {name}"),
                          self.count(row["size"], f"the size of {name}"), etag, label)

    def layout(self, shards: tuple[ShardInfo, ...], members: tuple[MemberInfo, ...]) -> None:
        """Names unique; each member after a header, inside its shard, clear of the previous member."""
        if len({shard.name for shard in shards}) < len(shards):
            raise self.fail("a shard is listed twice")
        seen: set[str] = set()
        ends = [0] * len(shards)
        for member in sorted(members, key=lambda m: (m.shard, m.offset)):
            shard = shards[member.shard]
            where = f"{self.base}{shard.name}#{member.name}"
            if member.name in seen:
                raise ShardError(f"{where}: a second member of this name; {_REPAIR}")
            seen.add(member.name)
            if member.offset % BLOCK or member.offset < ends[member.shard] + BLOCK:
                raise ShardError(f"{where}: offset {member.offset} is not after a header block clear of the "
                                 f"previous member; {_REPAIR}")
            ends[member.shard] = member.offset + member.size + (-member.size % BLOCK)
            if ends[member.shard] > shard.size:
                raise ShardError(f"{where}: ends at byte {ends[member.shard]}, past the end of the shard "
                                 f"({shard.size} bytes); {_REPAIR}")
