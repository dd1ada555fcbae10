"""The on-disk cache: arrays under a size limit, and metadata (listings, specs).

Layout of a cache directory (created owner-only, ``0700``)::

    <cache_dir>/arrays/   diskcache store of encoded arrays, size-limited, evicted by a policy
    <cache_dir>/meta/     diskcache store of listings and spec descriptions, never evicted

Modules: :mod:`~s3cache.store.disk` (diskcache storage that never pickles),
:mod:`~s3cache.store.arrays` (the array store), :mod:`~s3cache.store.meta` (listings and specs),
:mod:`~s3cache.store.recency` (batched read recency), :mod:`~s3cache.store.policy` (which entries
an eviction removes).
"""

from s3cache.store.arrays import ArrayStore, Problem
from s3cache.store.meta import MetaStore

__all__ = ["ArrayStore", "MetaStore", "Problem"]
