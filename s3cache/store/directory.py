"""A cache directory: where it is, how it is created, and the two stores inside it."""

from __future__ import annotations

import os
from pathlib import Path

from s3cache.errors import CacheError
from s3cache.store.arrays import ArrayStore
from s3cache.store.meta import MetaStore


class CacheDirectory:
    """The array store and the metadata store of one cache directory.

    Args:
        path: The cache directory (created ``0700`` if missing, unless ``must_exist``).
        size_limit: Size limit of the arrays in bytes; ``None`` keeps the stored one.
        must_exist: Refuse a directory that holds no cache instead of creating one.

    Raises:
        CacheError: The directory holds no cache (with ``must_exist``), or cannot be created or opened.
    """

    def __init__(self, path: str | os.PathLike[str], size_limit: int | None = None, *,
                 must_exist: bool = False) -> None:
        self.path = Path(path)
        if must_exist and not (self.path / "arrays").is_dir():
            raise CacheError(f"no s3cache cache in {self.path} (nothing cached yet; run `s3cache warm` first)")
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot open the cache in {self.path}: {exc}. "
                             "Check that it is a writable directory, or choose another cache_dir.") from exc
        self.arrays = ArrayStore(self.path / "arrays", size_limit)
        try:
            self.meta = MetaStore(self.path / "meta")
        except BaseException:
            self.arrays.close()
            raise

    def __enter__(self) -> CacheDirectory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close both stores."""
        self.arrays.close()
        self.meta.close()
