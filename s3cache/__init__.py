"""s3cache: Keras datasets from images in S3, served from an on-disk LRU cache of resized arrays.

Importing the package is cheap: TensorFlow, Keras and s3fs load on first use of a name
that needs them.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "image_dataset_from_s3": "s3cache.api",
    "S3ImageDataset": "s3cache.dataset",
    "CacheStatsCallback": "s3cache.stats",
    "CacheTooSmallWarning": "s3cache.stats",
    "ImageSpec": "s3cache.spec",
    "warm": "s3cache.ops",
    "cache_info": "s3cache.ops",
    "list_objects": "s3cache.ops",
    "verify_cache": "s3cache.ops",
    "clear_cache": "s3cache.ops",
}

__all__ = ["__version__", *_EXPORTS]

def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 's3cache' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
