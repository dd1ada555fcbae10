"""The on-disk cache: arrays under a size limit, and metadata (listings, specs).

Layout of a cache directory (created owner-only, ``0700``)::

    <cache_dir>/arrays/   diskcache store of encoded arrays, size-limited, evicted by a policy
    <cache_dir>/meta/     diskcache store of listings and spec descriptions, never evicted

Modules: :mod:`~s3cache.store.disk` (diskcache storage that never pickles),
:mod:`~s3cache.store.safecache` (a diskcache store that sees only s3cache's rows and survives faults),
:mod:`~s3cache.store.faults` (full disks and damaged databases), :mod:`~s3cache.store.repair`
(database checks, rebuilds, writes on a full disk), :mod:`~s3cache.store.connection` (s3cache's own
connections), :mod:`~s3cache.store.arrays` (the array store), :mod:`~s3cache.store.rows` (its rows),
:mod:`~s3cache.store.layout` (rows or value files, page sizes, what an entry takes on disk),
:mod:`~s3cache.store.limit` (its size limit), :mod:`~s3cache.store.writepause` (writes paused by a
full disk), :mod:`~s3cache.store.spectags` (specs recorded again), :mod:`~s3cache.store.verify`
(checking and fixing it), :mod:`~s3cache.store.meta` (listings and specs),
:mod:`~s3cache.store.recency` (batched read recency), :mod:`~s3cache.store.policy` (which entries
an eviction removes), :mod:`~s3cache.store.directory` (a cache directory and its trust rules).
"""

from s3cache.store.arrays import ArrayStore
from s3cache.store.meta import MetaStore
from s3cache.store.verify import Problem

__all__ = ["ArrayStore", "MetaStore", "Problem"]
