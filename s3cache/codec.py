"""The byte format of one cache entry: a 28-byte header, then raw pixels.

Nothing here unpickles: an entry is either a ``uint8`` image array or a *failure
record* (the message of an object that could not be decoded, so that later epochs
skip or re-raise without another S3 request).

Every stored entry is *bound to its cache key*: its checksum covers the key, the header and the
payload (:func:`checksum`). A torn or damaged entry, and an intact entry read under another key
(two value files or rows swapped), both fail :func:`decode` with :class:`CorruptEntryError` and are
never served.

Entries are encoded either bound at once (``encode_array(array, key=...)``) or unbound and bound
later by the store (:func:`bind`), so that an encoder need not know the key. Only bound entries
decode.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import xxhash

MAGIC = b"S3CA"
# 2: the checksum covers the cache key and the header besides the payload (1 covered the payload only).
# 3: the checksum is a 64-bit XXH3 instead of a CRC32 (about 10x cheaper per entry).
FORMAT_VERSION = 3
KIND_ARRAY = 0
KIND_FAILURE = 1
# Header flag: the checksum includes the entry's cache key.
FLAG_BOUND = 0x01

# magic, format version, kind, flags, 1 pad byte, height, width, channels, checksum
_HEADER = struct.Struct("<4sBBBxIIIQ")
HEADER_SIZE = _HEADER.size
_CHECKSUM_SIZE = 8
# The part of the header the checksum covers: everything before the checksum field.
_CHECKED_HEADER = HEADER_SIZE - _CHECKSUM_SIZE


class CorruptEntryError(ValueError):
    """Stored bytes do not form a valid entry (bad header, length or checksum, or another key's entry)."""


@dataclass(frozen=True)
class Failure:
    """A stored record that an object could not be decoded."""

    message: str


def entry_size(shape: tuple[int, int, int]) -> int:
    """Bytes of the entry of an array of ``shape`` (header and pixels)."""
    height, width, channels = shape
    return HEADER_SIZE + height * width * channels


def checksum(key: bytes, header: bytes | memoryview, payload: bytes | memoryview) -> int:
    """The one checksum of an entry: XXH3-64 over the key, the header up to its checksum field, and the payload.

    Every entry is written and checked through this function alone, so another checksum replaces
    it here, with a new :data:`FORMAT_VERSION`. XXH3 reads a 49 KB entry in about 2-4 us where
    zlib's CRC32 takes 15-20 us on the same machine; it detects damage and misplaced entries, which
    is its job here (it is not a defence against an attacker who can write the cache: see the
    trust rules of :mod:`s3cache.store.directory`). An unbound entry (not yet stored) is checked
    with an empty key.
    """
    digest = xxhash.xxh3_64(key)
    digest.update(header)
    digest.update(payload)
    return digest.intdigest()


def key_bytes(key: str) -> bytes:
    """A cache key as the checksum sees it (UTF-8; lone surrogates kept, not refused)."""
    return key.encode("utf-8", "surrogatepass")


def encode_array(array: np.ndarray, key: str | None = None) -> bytes:
    """Serialize a ``(height, width, channels)`` ``uint8`` array with its header.

    Args:
        array: The array.
        key: The cache key it will be stored under, to bind it at once; without it the store
            binds the entry when it is stored (one more checksum pass over the payload).
    """
    if array.dtype != np.uint8 or array.ndim != 3:
        raise ValueError(f"expected a 3-d uint8 array, got {array.dtype} with shape {array.shape}")
    payload = np.ascontiguousarray(array).data.cast("B")  # flat bytes, whatever checksum function reads them
    return _encode(KIND_ARRAY, array.shape, payload, key)


def encode_failure(message: str, key: str | None = None) -> bytes:
    """Serialize a failure record (bound to ``key`` if given, see :func:`encode_array`)."""
    return _encode(KIND_FAILURE, (0, 0, 0), message.encode("utf-8", "replace"), key)


def bind(entry: bytes, key: str) -> bytes:
    """Bind an entry to the cache key it is stored under; an entry bound already is returned as is.

    Raises:
        CorruptEntryError: The entry is damaged (its unbound checksum does not match).
    """
    _, _, kind, flags, height, width, channels, crc = _parse_header(entry)
    if flags & FLAG_BOUND:
        return entry
    payload = memoryview(entry)[HEADER_SIZE:]
    if checksum(b"", memoryview(entry)[:_CHECKED_HEADER], payload) != crc:
        raise CorruptEntryError("entry checksum does not match")
    return _encode(kind, (height, width, channels), payload, key)


def decode(data: bytes, key: str) -> np.ndarray | Failure:
    """Parse an entry read under ``key``, verifying its header, length and checksum.

    Returns:
        A read-only view of the stored ``uint8`` array, or a :class:`Failure`.

    Raises:
        CorruptEntryError: The entry is damaged, not in this format, not bound, or bound to
            another key.
    """
    # The warm path runs this for every image: one header unpack, one hash, no copy.
    _, _, kind, flags, height, width, channels, crc = _parse_header(data)
    if not flags & FLAG_BOUND:
        raise CorruptEntryError("entry is not bound to a cache key")
    view = memoryview(data)
    if kind == KIND_ARRAY and len(view) - HEADER_SIZE != height * width * channels:
        raise CorruptEntryError(f"entry holds {len(view) - HEADER_SIZE} bytes, header says {height * width * channels}")
    if checksum(key_bytes(key), view[:_CHECKED_HEADER], view[HEADER_SIZE:]) != crc:
        raise CorruptEntryError("entry checksum does not match (damaged, or stored under another key)")
    if kind == KIND_FAILURE:
        return Failure(bytes(view[HEADER_SIZE:]).decode("utf-8", errors="replace"))
    return np.ndarray((height, width, channels), np.uint8, data, HEADER_SIZE)  # read-only, like the bytes


def _encode(kind: int, shape: tuple[int, ...], payload: bytes | memoryview, key: str | None) -> bytes:
    flags = 0 if key is None else FLAG_BOUND
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, kind, flags, *shape, 0)
    crc = checksum(b"" if key is None else key_bytes(key), header[:_CHECKED_HEADER], payload)
    return b"".join((header[:_CHECKED_HEADER], crc.to_bytes(_CHECKSUM_SIZE, "little"), payload))


def _parse_header(data: bytes) -> tuple[bytes, int, int, int, int, int, int, int]:
    if len(data) < HEADER_SIZE:
        raise CorruptEntryError(f"entry is {len(data)} bytes, shorter than its header")
    fields = _HEADER.unpack_from(data)
    magic, version, kind = fields[:3]
    if magic != MAGIC:
        raise CorruptEntryError("entry header is not an s3cache header")
    if version != FORMAT_VERSION:
        raise CorruptEntryError(f"entry is in format version {version}, this s3cache reads {FORMAT_VERSION}")
    if kind not in (KIND_ARRAY, KIND_FAILURE):
        raise CorruptEntryError(f"entry header has an unknown kind {kind}")
    return fields
