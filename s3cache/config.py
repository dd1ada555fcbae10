"""The composition root: one place that resolves settings and opens the cache, the source and the loader.

Everything that trains, warms or inspects goes through :class:`CacheConfig`: the default cache
directory and size parsing are decided here once, and each process (Keras worker processes
included) opens its own handles from the same picklable config.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from s3cache.store.directory import CacheDirectory, trust_shared_from_env

if TYPE_CHECKING:
    from s3cache.loader import Loader
    from s3cache.source import Source
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
    trust_shared_cache: bool = False

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
        trust_shared_cache: bool | None = None,
    ) -> CacheConfig:
        """Resolve defaults (``$S3CACHE_DIR``, else ``~/.cache/s3cache``) and check the values.

        Raises:
            ValueError: A value is out of range or not understood.
        """
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        directory = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        limit = None if size_limit is None else parse_size(size_limit)
        trust = trust_shared_from_env() if trust_shared_cache is None else bool(trust_shared_cache)
        return cls(directory, limit, dict(storage_options or {}), offline, on_error, concurrency, trust)

    def open_cache(self, *, must_exist: bool = False) -> CacheDirectory:
        """Open the cache directory's stores (creating them unless ``must_exist``).

        Raises:
            CacheError: No cache there (with ``must_exist``), a directory someone else owns or can
                write (unless :attr:`trust_shared_cache`), or it cannot be opened.
        """
        return CacheDirectory(self.cache_dir, self.size_limit, must_exist=must_exist,
                              trust_shared=self.trust_shared_cache)

    def open_source(self) -> Source | None:
        """The S3 source, or ``None`` offline."""
        if self.offline:
            return None
        from s3cache.source.s3 import S3Source

        return S3Source(self.storage_options, concurrency=self.concurrency)

    def open_loader(self, spec: ImageSpec) -> Loader:
        """Open the cache and the source, record the spec, and build a loader over them."""
        from s3cache.loader import Loader

        cache = self.open_cache()
        # Recorded now, and again by the array store if `s3cache clear` removes the record meanwhile.
        cache.record_spec(spec.fingerprint, spec.to_dict())
        return Loader(spec, cache.arrays, self.open_source(), on_error=self.on_error)
