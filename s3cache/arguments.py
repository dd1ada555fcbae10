"""Checks of user arguments shared by the library and the command line, before anything is read or written.

Nothing here imports Keras, TensorFlow or s3fs: the ``s3cache`` command uses it to refuse a bad
URL or image size before it opens a cache or contacts S3.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

from s3cache.errors import EmptyListingError
from s3cache.urls import prefix_of, split_url

# One image array at most 256 MiB (8192 x 8192 RGBA): far above any training size, far below what
# brings a machine down when a batch of them is allocated.
MAX_ARRAY_BYTES = 2**28

_CHANNELS = {"grayscale": 1, "rgb": 3, "rgba": 4}


def image_size_of(image_size: Any) -> tuple[int, int]:
    """``(height, width)`` from an int (a square, as Keras accepts) or a pair of ints.

    Raises:
        ValueError: Not an int or a pair of positive ints (Keras's wording).
    """
    if _is_int(image_size):
        image_size = (image_size, image_size)
    if not isinstance(image_size, list | tuple) or len(image_size) != 2 or not all(map(_is_int, image_size)):
        raise ValueError("Invalid `image_size` value. Expected a tuple of 2 integers. "
                         f"Received: image_size={image_size}")
    height, width = (int(v) for v in image_size)
    if height < 1 or width < 1:
        raise ValueError(f"image_size must be two positive integers (height, width), got {image_size!r}")
    return height, width


def check_array_size(image_size: Sequence[int], color_mode: str = "rgb") -> None:
    """Refuse an image size whose arrays would be absurdly large (before any spec is recorded).

    Raises:
        ValueError: One array would exceed :data:`MAX_ARRAY_BYTES`.
    """
    height, width = image_size
    size = height * width * _CHANNELS.get(color_mode, 4)
    if size > MAX_ARRAY_BYTES:
        raise ValueError(f"image_size {height}x{width} ({color_mode}) makes arrays of {size / 2**20:,.0f} MiB each, "
                         f"over the limit of {MAX_ARRAY_BYTES // 2**20} MiB per image (8192x8192 RGBA)")


def check_directory(directory: Any) -> None:
    """A prefix URL or a list of object URLs, all ``s3://``.

    Raises:
        EmptyListingError: An empty list (a ``ValueError``).
        ValueError: Not a string or a list of strings, or a URL that is not ``s3://bucket/...``.
    """
    if isinstance(directory, str):
        prefix_of(directory)
        return
    if not isinstance(directory, list | tuple) or not all(isinstance(url, str) for url in directory):
        raise ValueError(f"directory must be an s3:// prefix URL or a list of s3:// object URLs, got {directory!r}")
    if not directory:
        raise EmptyListingError("No images found: the list of URLs is empty.")
    for url in directory:
        _, key = split_url(url)
        if not key or key.endswith("/"):
            raise ValueError(f"not an object URL: {url!r} (a list of URLs names objects; give a prefix as a string)")


def _is_int(value: Any) -> bool:
    """An int, NumPy's included, but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
