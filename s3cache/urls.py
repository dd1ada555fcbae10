"""The meaning of an S3 URL: bucket, key, prefix, and which keys are images."""

from __future__ import annotations

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
SCHEMES = ("s3://", "s3a://")


def split_url(url: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into bucket and key.

    Raises:
        ValueError: The URL is not an ``s3://`` URL or names no bucket.
    """
    scheme = next((s for s in SCHEMES if url.startswith(s)), None)
    if scheme is None:
        raise ValueError(f"not an S3 URL: {url!r} (expected s3://bucket/key)")
    bucket, _, key = url[len(scheme):].partition("/")
    if not bucket:
        raise ValueError(f"not an S3 URL: {url!r} (expected s3://bucket/key)")
    return bucket, key


def prefix_of(url: str) -> tuple[str, str]:
    """Bucket and key prefix of a prefix URL; the prefix names a folder, so it ends with ``/`` (or is empty).

    ``s3://bucket/train`` and ``s3://bucket/train/`` both mean the folder ``train/``, as a directory
    does for ``image_dataset_from_directory``.
    """
    bucket, prefix = split_url(url)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return bucket, prefix


def relative_name(key: str, prefix: str) -> str:
    """A key relative to a folder prefix (the key itself if it is not under the prefix)."""
    return key[len(prefix):] if key.startswith(prefix) else key


def is_image_key(key: str) -> bool:
    """Whether a key has an image extension s3cache decodes (any case)."""
    return key.lower().endswith(IMAGE_EXTENSIONS)
