"""What a dataset is made of: references to images stored in S3.

An :class:`Item` names one image: a whole object (``s3://bucket/cat/1.jpg``) or a member inside a
tar shard (``s3://bucket/packed/shard-000001.tar#cat/1.jpg``), with the version (ETag) of the object
it was listed from. Items are plain values: listings store them, cache keys are derived from them,
and sources read them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Item:
    """One image as listed.

    Attributes:
        bucket: The bucket.
        key: The object's key (for a member, the shard's key).
        etag: The object's ETag as listed (for a member, the shard's ETag).
        size: Bytes of the image (for a member, the member's size).
        member: The member's name inside the shard, or ``None`` for a whole object.
        offset: Where the member's data starts inside the shard, or ``None`` for a whole object.
        label: A class number stored with the image (a WebDataset ``.cls`` member), or ``None``.
    """

    bucket: str
    key: str
    etag: str
    size: int
    member: str | None = None
    offset: int | None = None
    label: int | None = None

    @property
    def object_url(self) -> str:
        """The ``s3://bucket/key`` URL of the object holding the image."""
        return f"s3://{self.bucket}/{self.key}"

    @property
    def url(self) -> str:
        """The image's URL: ``s3://bucket/key``, or ``s3://bucket/shard.tar#member`` for a member."""
        return self.object_url if self.member is None else f"{self.object_url}#{self.member}"

    @property
    def name(self) -> str:
        """The image's path-like name: the object key, or the member name inside a shard."""
        return self.key if self.member is None else self.member

    def to_json(self) -> list[Any]:
        """A compact JSON form (for stored listings)."""
        row: list[Any] = [self.bucket, self.key, self.etag, self.size]
        if self.member is None:
            return row
        return [*row, self.member, self.offset] + ([] if self.label is None else [self.label])

    @classmethod
    def from_json(cls, row: Sequence[Any]) -> Item:
        """Inverse of :meth:`to_json`.

        Raises:
            ValueError: The row is not a stored item.
        """
        if len(row) not in (4, 6, 7):
            raise ValueError(f"not a stored item: {row!r}")
        bucket, key, etag, size = str(row[0]), str(row[1]), str(row[2]), int(row[3])
        if len(row) == 4:
            return cls(bucket, key, etag, size)
        return cls(bucket, key, etag, size, str(row[4]), int(row[5]), int(row[6]) if len(row) == 7 else None)


def any_members(items: Iterable[Item]) -> bool:
    """Whether any of the items is a member of a tar shard (rather than a whole object)."""
    return any(item.member is not None for item in items)
