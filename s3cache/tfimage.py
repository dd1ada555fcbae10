"""Resizing and placing an image as Keras's image loader does (TensorFlow's ``tf.image``), with NumPy.

- Resizing: :func:`resize` applies the per-axis weights of TensorFlow's kernels
  (:func:`s3cache.tfkernels.axis_taps`). Outputs are float32, as TensorFlow's, except ``nearest``,
  which gathers. A kernel reads few source pixels without antialiasing, so :func:`resize` asks its
  source for those pixels only: an array, or a :class:`PixelSource` that computes them on demand
  (:class:`s3cache.tfcolor.JpegPixels`).
- Geometry: :func:`crop_box` and :func:`pad_layout` place the image as ``crop_to_aspect_ratio`` and
  ``pad_to_aspect_ratio`` do.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from s3cache.tfkernels import F32, axis_taps


class PixelSource(Protocol):
    """Pixels computed on demand, for sources whose every pixel is costly (see :class:`~s3cache.tfcolor.JpegPixels`)."""

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(height, width, channels)``."""
        ...

    def take(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """The ``uint8`` pixels at the crossings of ascending ``rows`` and ``cols``: ``(rows, cols, channels)``."""
        ...


def positions_span(positions: np.ndarray) -> slice | np.ndarray:
    """A slice for a run of consecutive positions (a view, not a copy), else the positions."""
    first, last = int(positions[0]), int(positions[-1])
    return slice(first, last + 1) if last - first + 1 == len(positions) else positions


def take_pixels(source: np.ndarray | PixelSource, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The pixels of a source at the crossings of ascending ``rows`` and ``cols`` (slicing runs of them)."""
    if not isinstance(source, np.ndarray):
        return source.take(rows, cols)
    row_span, col_span = positions_span(rows), positions_span(cols)
    picked = source[row_span] if isinstance(row_span, slice) else np.take(source, row_span, axis=0)
    return picked[:, col_span] if isinstance(col_span, slice) else np.take(picked, col_span, axis=1)


def pixels_in(source: np.ndarray | PixelSource, window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """All pixels of a source, or of its ``(top, left, height, width)`` window, as an array."""
    top, left, height, width = window or (0, 0, *source.shape[:2])
    return take_pixels(source, np.arange(top, top + height), np.arange(left, left + width))


def _resample_axis(pixels: np.ndarray, weights: np.ndarray, indices: np.ndarray, axis: int) -> np.ndarray:
    """Resample axis 0 or 1 of a ``(height, width, channels)`` array into float32, one tap at a time."""
    shape = (-1, 1, 1) if axis == 0 else (1, -1, 1)
    out = weights[:, 0].reshape(shape) * np.take(pixels, indices[:, 0], axis=axis)
    for k in range(1, indices.shape[1]):
        out += weights[:, k].reshape(shape) * np.take(pixels, indices[:, k], axis=axis)
    return out


def resize(
    source: np.ndarray | PixelSource,
    size: tuple[int, int],
    method: str,
    antialias: bool = False,
    window: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Resize an image as ``tf.image.resize(image, size, method, antialias=antialias)`` does.

    Unlike ``tf.image.resize`` with static shapes, an image already of the target size is still filtered
    (``gaussian`` and ``mitchellcubic`` blur it), as Keras's loaders do with their dynamic shapes.

    Args:
        source: ``(height, width, channels)`` array, or a :class:`PixelSource`.
        size: Target ``(height, width)``.
        method: One of :data:`~s3cache.tfkernels.INTERPOLATIONS`.
        antialias: See :func:`~s3cache.tfkernels.axis_taps`.
        window: ``(top, left, height, width)`` of the part of the source to resize; all of it by default.

    Returns:
        The resized ``(height, width, channels)`` array: float32, or ``uint8`` for ``nearest``.
    """
    top, left, height, width = window or (0, 0, *source.shape[:2])
    rows = axis_taps(height, size[0], method, antialias)
    cols = axis_taps(width, size[1], method, antialias)
    # Only the pixels the taps read, renumbered: the taps index into this block.
    block = take_pixels(source, rows.sources + top, cols.sources + left)
    if method == "nearest":
        return np.take(np.take(block, rows.local_indices[:, 0], axis=0), cols.local_indices[:, 0], axis=1)
    # Rows first: gathering whole rows is fast, and the column pass then gathers within the output's rows only.
    out = block if rows.is_identity else _resample_axis(block, rows.weights, rows.local_indices, 0)
    out = out if cols.is_identity else _resample_axis(out, cols.weights, cols.local_indices, 1)
    return out.astype(F32, copy=False)


def crop_box(height: int, width: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The centered crop Keras's ``smart_resize`` takes before resizing: ``(top, left, height, width)``.

    Computed in float32 and truncated, as Keras does in its data pipelines.
    """
    target_h, target_w = size
    crop_h = max(min(height, int(F32(width * target_h) / F32(target_w))), 1)
    crop_w = max(min(width, int(F32(height * target_w) / F32(target_h))), 1)
    return int(F32(height - crop_h) / F32(2)), int(F32(width - crop_w) / F32(2)), crop_h, crop_w


def pad_layout(height: int, width: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Where ``tf.image.resize_with_pad`` puts the resized image: ``(top, left, height, width)``.

    The image is resized to fit the target with its aspect ratio kept (sizes floored in float32), then
    centered on a black canvas. An image too thin to keep a whole pixel keeps one, where TensorFlow fails.
    """
    f_h, f_w, f_th, f_tw = F32(height), F32(width), F32(size[0]), F32(size[1])
    ratio = max(f_w / f_tw, f_h / f_th)
    resized_h, resized_w = f_h / ratio, f_w / ratio
    top = max(0, int(np.floor((f_th - resized_h) / F32(2))))
    left = max(0, int(np.floor((f_tw - resized_w) / F32(2))))
    return top, left, max(1, int(np.floor(resized_h))), max(1, int(np.floor(resized_w)))
