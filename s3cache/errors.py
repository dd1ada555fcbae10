"""Exceptions raised by s3cache.

Every class derives from :class:`S3CacheError` and from the builtin exception that
callers would already catch for the same situation, so ``except FileNotFoundError``
keeps working around s3cache calls.
"""

from __future__ import annotations

from collections.abc import Sequence


class S3CacheError(Exception):
    """Base class of every error raised by s3cache."""


class BucketNotFoundError(S3CacheError, FileNotFoundError):
    """The bucket does not exist."""


class ObjectNotFoundError(S3CacheError, FileNotFoundError):
    """An object does not exist (or vanished between listing and reading)."""


class EmptyListingError(S3CacheError, FileNotFoundError, ValueError):
    """A prefix holds no image objects (a ``ValueError`` too, as Keras raises for an empty directory)."""


class AccessDeniedError(S3CacheError, PermissionError):
    """S3 refused the request (403, or a bucket policy)."""


class CredentialsError(S3CacheError, PermissionError):
    """No usable AWS credentials were found."""


class EndpointUnreachableError(S3CacheError, ConnectionError):
    """The S3 endpoint could not be reached at all."""


class S3RequestError(S3CacheError, ConnectionError):
    """A request kept failing after every retry."""


class FetchTimeoutError(S3RequestError, TimeoutError):
    """An object's bytes did not arrive within their deadline, in any attempt."""


class ObjectChangedError(S3CacheError, FileNotFoundError):
    """The version of an object that was listed is gone: a tar shard was rewritten since its listing."""


class DecodeError(S3CacheError, ValueError):
    """An object's bytes are not an image Pillow can decode."""


class ImageTooLargeError(DecodeError):
    """An image declares more pixels than the configured limit (a decompression bomb)."""


class ShardError(S3CacheError, ValueError):
    """A tar shard or a shard set's index is damaged, hostile, or does not match the shards."""


class ObjectTooLargeError(DecodeError):
    """An object is larger than the configured maximum object size, or sent more bytes than it was listed with.

    Like a decode failure it concerns one object: ``on_error="skip"`` skips it. It is never stored
    as a failure record, since raising the limit must make the object readable again.
    """


class CacheError(S3CacheError, OSError):
    """The cache directory cannot be opened, created or written."""


class NotCachedError(S3CacheError, LookupError):
    """Offline mode needs objects (or a listing) that the cache does not hold."""

    def __init__(self, message: str, urls: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.urls = list(urls)

    @classmethod
    def for_objects(cls, urls: Sequence[str]) -> NotCachedError:
        """Build the error for uncached objects, naming a few of them and how many."""
        shown = ", ".join(urls[:5]) + (", ..." if len(urls) > 5 else "")
        return cls(
            f"offline mode: {len(urls)} object(s) are not in the cache: {shown}. "
            "Run once with offline=False (or `s3cache warm`) to fill the cache.",
            urls,
        )
