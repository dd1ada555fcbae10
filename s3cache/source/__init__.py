"""Where image bytes come from: the :class:`Source` protocol and its S3 implementation.

The loader depends on :class:`Source` only. :class:`~s3cache.source.s3.S3Source` reads S3 through
s3fs; tests may use any other honest implementation of the protocol.
"""

from s3cache.source.base import (
    DEFAULT_BYTES_IN_FLIGHT,
    DEFAULT_FETCH_TIMEOUT,
    DEFAULT_MAX_OBJECT_SIZE,
    DEFAULT_MIN_RATE,
    Payload,
    Source,
    SourceCounters,
)

__all__ = [
    "DEFAULT_BYTES_IN_FLIGHT",
    "DEFAULT_FETCH_TIMEOUT",
    "DEFAULT_MAX_OBJECT_SIZE",
    "DEFAULT_MIN_RATE",
    "Payload",
    "Source",
    "SourceCounters",
]
