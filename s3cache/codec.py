"""The byte format of one cache entry: a 24-byte header, then raw pixels.

Nothing here unpickles: an entry is either a ``uint8`` image array or a *failure
record* (the message of an object that could not be decoded, so that later epochs
skip or re-raise without another S3 request). A CRC32 of the payload catches torn or
damaged entries, which are reported as :class:`CorruptEntryError` and never served.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

MAGIC = b"S3CA"
FORMAT_VERSION = 1
KIND_ARRAY = 0
KIND_FAILURE = 1

# magic, format version, kind, 2 pad bytes, height, width, channels, crc32 of the payload
_HEADER = struct.Struct("<4sBB2xIIII")
HEADER_SIZE = _HEADER.size


class CorruptEntryError(ValueError):
    """Stored bytes do not form a valid entry (bad header, length or checksum)."""


@dataclass(frozen=True)
class Failure:
    """A stored record that an object could not be decoded."""

    message: str


def encode_array(array: np.ndarray) -> bytes:
    """Serialize a ``(height, width, channels)`` ``uint8`` array with its header."""
    if array.dtype != np.uint8 or array.ndim != 3:
        raise ValueError(f"expected a 3-d uint8 array, got {array.dtype} with shape {array.shape}")
    payload = np.ascontiguousarray(array).data
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, KIND_ARRAY, *array.shape, zlib.crc32(payload))
    return header + payload.tobytes()


def encode_failure(message: str) -> bytes:
    """Serialize a failure record."""
    payload = message.encode("utf-8")
    return _HEADER.pack(MAGIC, FORMAT_VERSION, KIND_FAILURE, 0, 0, 0, zlib.crc32(payload)) + payload


def decode(data: bytes) -> np.ndarray | Failure:
    """Parse an entry, verifying its header, length and checksum.

    Returns:
        A read-only view of the stored ``uint8`` array, or a :class:`Failure`.

    Raises:
        CorruptEntryError: The entry is damaged or not in this format.
    """
    if len(data) < HEADER_SIZE:
        raise CorruptEntryError(f"entry is {len(data)} bytes, shorter than its header")
    magic, version, kind, height, width, channels, crc = _HEADER.unpack_from(data)
    if magic != MAGIC or version != FORMAT_VERSION or kind not in (KIND_ARRAY, KIND_FAILURE):
        raise CorruptEntryError("entry header is not an s3cache header")
    payload = memoryview(data)[HEADER_SIZE:]
    if kind == KIND_ARRAY and len(payload) != height * width * channels:
        raise CorruptEntryError(f"entry holds {len(payload)} bytes, header says {height * width * channels}")
    if zlib.crc32(payload) != crc:
        raise CorruptEntryError("entry checksum does not match")
    if kind == KIND_FAILURE:
        return Failure(bytes(payload).decode("utf-8", errors="replace"))
    return np.frombuffer(data, dtype=np.uint8, offset=HEADER_SIZE).reshape(height, width, channels)
