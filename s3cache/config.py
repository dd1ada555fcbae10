"""The composition root: one place that resolves settings and opens the cache, the source and the loader.

Everything that trains, warms or inspects goes through :class:`CacheConfig`: the default cache
directory and size parsing are decided here once, and each process (Keras worker processes
included) opens its own handles from the same picklable config.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from s3cache.codec import entry_size
from s3cache.decoders import decoder_name
from s3cache.items import Item, any_members
from s3cache.source.base import DEFAULT_BYTES_IN_FLIGHT, DEFAULT_FETCH_TIMEOUT, DEFAULT_MAX_OBJECT_SIZE
from s3cache.store.directory import CacheDirectory, trust_shared_from_env
from s3cache.store.layout import page_size_for

if TYPE_CHECKING:
    from s3cache.loader import Loader
    from s3cache.source import Source
    from s3cache.source.s3 import S3Source
    from s3cache.spec import ImageSpec

DEFAULT_CONCURRENCY = 32
ON_ERROR_CHOICES = ("raise", "skip")

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: int | str) -> int:
    """Parse a byte count: an int, or a string such as ``"500MB"``, ``"10GB"``, ``"2GiB"``.

    Raises:
        ValueError: The value is negative or not understood.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        if not match or match.group(2).upper() not in _UNITS:
            raise ValueError(f"cannot parse size {value!r}: use bytes or a string like '500MB' or '10GB'")
        size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size < 0:
        raise ValueError(f"size must not be negative, got {value!r}")
    return size


def size_text(count: float) -> str:
    """A byte count in decimal units (``512 B``, ``1.5 MB``), as messages and the command print sizes."""
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def reading_members_by_chunk(source: Source, items: Sequence[Item]) -> Source:
    """``source``, reading the tar-shard members among ``items`` chunk by chunk (several MB per request)."""
    if not any_members(items):
        return source
    from s3cache.source.chunks import ChunkedSource, ChunkPlan

    return ChunkedSource(source, ChunkPlan(items))


def default_cache_dir() -> Path:
    """``$S3CACHE_DIR`` if set, else ``~/.cache/s3cache``."""
    return Path(os.environ.get("S3CACHE_DIR") or Path.home() / ".cache" / "s3cache").expanduser()


@dataclass(frozen=True)
class CacheConfig:
    """Everything a process needs to open its own cache, S3 source and loader.

    Build it with :meth:`create`, which resolves defaults and checks values.

    Attributes:
        cache_dir: The cache directory.
        size_limit: Size limit of the arrays in bytes; ``None`` keeps the stored limit.
        storage_options: Options for ``s3fs.S3FileSystem``; ignored offline.
        offline: Never contact S3.
        on_error: ``"raise"`` or ``"skip"`` for undecodable objects.
        concurrency: Most S3 requests in flight per process.
        max_object_size: Objects listed larger than this many bytes are refused before any request
            (skipped or raised as ``on_error`` says); ``None`` accepts any size.
        max_bytes_in_flight: Most listed bytes of objects being fetched and decoded at once, per process.
        fetch_timeout: Seconds each attempt at an S3 request may take; an object's GET gets this plus
            one second per MiB of its size.
        decoder: ``"auto"``, ``"numpy"`` or ``"tensorflow"``: how fetched images are decoded (see
            :func:`s3cache.decoders.open_decoder`; the arrays are the same). Default: ``$S3CACHE_DECODER``,
            else ``"auto"``.
        trust_shared_cache: Accept a cache directory that someone else owns or that group or
            others can write (a team cache); by default such a directory is refused, since it could
            hold planted entries. Default: ``$S3CACHE_TRUST_SHARED``.
    """

    cache_dir: Path
    size_limit: int | None = None
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)  # may hold credentials
    offline: bool = False
    on_error: str = "raise"
    concurrency: int = DEFAULT_CONCURRENCY
    max_object_size: int | None = DEFAULT_MAX_OBJECT_SIZE
    max_bytes_in_flight: int = DEFAULT_BYTES_IN_FLIGHT
    fetch_timeout: float = DEFAULT_FETCH_TIMEOUT
    trust_shared_cache: bool = False
    decoder: str = "auto"

    @classmethod
    def create(
        cls,
        cache_dir: str | os.PathLike[str] | None = None,
        size_limit: int | str | None = None,
        storage_options: dict[str, Any] | None = None,
        *,
        offline: bool = False,
        on_error: str = "raise",
        concurrency: int = DEFAULT_CONCURRENCY,
        max_object_size: int | str | None = DEFAULT_MAX_OBJECT_SIZE,
        max_bytes_in_flight: int | str = DEFAULT_BYTES_IN_FLIGHT,
        fetch_timeout: float = DEFAULT_FETCH_TIMEOUT,
        trust_shared_cache: bool | None = None,
        decoder: str | None = None,
    ) -> CacheConfig:
        """Resolve defaults (``$S3CACHE_DIR``, else ``~/.cache/s3cache``) and check the values.

        Raises:
            ValueError: A value is out of range or not understood.
        """
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
        decoder = decoder_name(decoder)
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        directory = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        limit = None if size_limit is None else parse_size(size_limit)
        largest = None if max_object_size is None else parse_size(max_object_size)
        in_flight = parse_size(max_bytes_in_flight)
        if largest == 0 or in_flight == 0:
            raise ValueError("max_object_size and max_bytes_in_flight must be positive")
        if not fetch_timeout > 0:
            raise ValueError(f"fetch_timeout must be positive, got {fetch_timeout}")
        trust = trust_shared_from_env() if trust_shared_cache is None else bool(trust_shared_cache)
        return cls(directory, limit, dict(storage_options or {}), offline, on_error, concurrency, largest, in_flight,
                   float(fetch_timeout), trust, decoder)

    def open_cache(self, *, must_exist: bool = False, spec: ImageSpec | None = None) -> CacheDirectory:
        """Open the cache directory's stores (creating them unless ``must_exist``).

        Args:
            must_exist: Refuse a directory that holds no cache.
            spec: The spec of the arrays to store, which picks a new array store's page size
                (:func:`~s3cache.store.layout.page_size_for`).

        Raises:
            CacheError: No cache there (with ``must_exist``), a directory someone else owns or can
                write (unless :attr:`trust_shared_cache`), or it cannot be opened.
        """
        page_size = None if spec is None else page_size_for(entry_size(spec.shape))
        return CacheDirectory(self.cache_dir, self.size_limit, must_exist=must_exist,
                              trust_shared=self.trust_shared_cache, page_size=page_size)

    def open_s3(self) -> S3Source | None:
        """A new S3 source (its client is created on first use), or ``None`` offline."""
        if self.offline:
            return None
        from s3cache.source.s3 import S3Source

        return S3Source(self.storage_options, concurrency=self.concurrency, fetch_timeout=self.fetch_timeout)

    def open_source(self, items: Sequence[Item] = (), s3: S3Source | None = None) -> Source | None:
        """The source a dataset reads through, or ``None`` offline.

        Args:
            items: The items a dataset will read; tar-shard members among them are read in chunks.
            s3: An S3 source to read through, such as one sharing the client that listed the items
                (:meth:`S3Source.sharing_client <s3cache.source.s3.S3Source.sharing_client>`):
                creating a client costs about 70 ms of CPU. A new one by default.
        """
        source = s3 or self.open_s3()
        return None if source is None else reading_members_by_chunk(source, items)

    def open_loader(self, spec: ImageSpec, items: Sequence[Item] = (), s3: S3Source | None = None) -> Loader:
        """Open the cache and the source, record the spec, and build a loader over them.

        Args:
            spec: How images are decoded.
            items: The items the loader will serve (see :meth:`open_source`).
            s3: An S3 source to read through (see :meth:`open_source`).
        """
        from s3cache.loader import Loader

        cache = self.open_cache(spec=spec)
        # Recorded now, and again by the array store if `s3cache clear` removes the record meanwhile.
        cache.record_spec(spec.fingerprint, spec.to_dict())
        return Loader(spec, cache.arrays, self.open_source(items, s3), on_error=self.on_error,
                      decoder=self.decoder, max_object_size=self.max_object_size,
                      max_bytes_in_flight=self.max_bytes_in_flight)
