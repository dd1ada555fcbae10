"""Cache keys: the one place that builds and parses them.

An array is stored under ``<spec fingerprint>/<etag>/<bucket>/<key>``, and an image inside a tar
shard under ``<spec fingerprint>/<shard etag>/<bucket>/<shard key>#<member>``. In the key and member
parts ``%`` and ``#`` are written ``%25`` and ``%23``, so a ``#`` always separates a member and any
object key or member name reads back exactly. Keys without those characters read as themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

from s3cache.items import Item


@dataclass(frozen=True)
class CacheKey:
    """The parts of a cache key."""

    fingerprint: str
    etag: str
    bucket: str
    key: str
    member: str | None = None

    @property
    def url(self) -> str:
        """The image's URL (see :attr:`s3cache.items.Item.url`)."""
        url = f"s3://{self.bucket}/{self.key}"
        return url if self.member is None else f"{url}#{self.member}"


def cache_key(fingerprint: str, item: Item, etag: str | None = None) -> str:
    """The cache key of an item's array under a spec.

    Args:
        fingerprint: The spec fingerprint (:attr:`s3cache.spec.ImageSpec.fingerprint`).
        item: The item.
        etag: The ETag actually read, when it differs from the listed one.
    """
    key = f"{fingerprint}/{etag or item.etag}/{item.bucket}/{_quote(item.key)}"
    return key if item.member is None else f"{key}#{_quote(item.member)}"


def parse_key(key: str) -> CacheKey:
    """Split a cache key into its parts.

    Raises:
        ValueError: The key was not built by :func:`cache_key`.
    """
    parts = key.split("/", 3)
    if len(parts) != 4 or not all(parts[:3]):
        raise ValueError(f"not an s3cache key: {key!r}")
    fingerprint, etag, bucket, rest = parts
    name, sep, member = rest.partition("#")
    return CacheKey(fingerprint, etag, bucket, _unquote(name), _unquote(member) if sep else None)


def fingerprint_of(key: str) -> str:
    """The spec fingerprint a cache key belongs to."""
    return key.partition("/")[0]


def _quote(text: str) -> str:
    if "%" in text or "#" in text:
        return text.replace("%", "%25").replace("#", "%23")
    return text


def _unquote(text: str) -> str:
    if "%" in text:
        return text.replace("%23", "#").replace("%25", "%")
    return text
