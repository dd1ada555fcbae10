"""TensorFlow's resize kernels as separable per-axis weights, computed with NumPy.

Every method is separable: each output row (then column) is a weighted sum of a few input rows
(columns). :func:`axis_taps` builds those weights once per ``(input size, output size, method)`` from
the float32 formulas of TensorFlow's kernels (half-pixel centers; ``area`` without them, as
``resize_area``); :func:`s3cache.tfimage.resize` applies them. Without antialiasing a kernel reads few
source pixels (bilinear: 256 rows and columns for a 128x128 output, whatever the source size), which
:attr:`Taps.sources` names.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

F32 = np.float32

# The interpolations Keras's image loaders accept, in the order Keras lists them.
INTERPOLATIONS = ("bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5", "gaussian", "mitchellcubic")

# Weights below this are zero in TensorFlow's kernels (1000 * the smallest normal float32).
_TINY_WEIGHT_SUM = 1000 * float(np.finfo(np.float32).tiny)
# resize_bicubic looks its weights up in a table of this many steps per pixel.
_BICUBIC_TABLE_SIZE = 1024


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5."""
    return np.where(x >= 2, 0, np.where(x >= 1, ((-0.5 * x + 2.5) * x - 4) * x + 2, ((1.5 * x - 2.5) * x) * x + 1))


def _mitchell_cubic(x: np.ndarray) -> np.ndarray:
    """Mitchell-Netravali cubic kernel with B = C = 1/3."""
    near = ((7 / 6 * x - 2) * x) * x + 8 / 9
    far = ((-7 / 18 * x + 2) * x - 10 / 3) * x + 16 / 9
    return np.where(x >= 2, 0, np.where(x >= 1, far, near))


def _lanczos(radius: int) -> Callable[[np.ndarray], np.ndarray]:
    def kernel(x: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            value = radius * np.sin(np.pi * x) * np.sin(np.pi * x / radius) / (np.pi**2 * x * x)
        return np.where(x > radius, 0, np.where(x <= 1e-3, 1, value))

    return kernel


def _gaussian(x: np.ndarray) -> np.ndarray:
    """Gaussian of sigma 0.5 cut at radius 1.5 (three sigmas)."""
    return np.where(x >= 1.5, 0, np.exp(-x * x / (2 * 0.5**2)))


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.maximum(0, 1 - x)


# Kernel and radius of each method that TensorFlow resizes with scale_and_translate. bilinear and bicubic
# take this path only when antialiasing; without it they have dedicated kernels (below).
_SCALE_AND_TRANSLATE: dict[str, tuple[Callable[[np.ndarray], np.ndarray], float]] = {
    "bilinear": (_triangle, 1.0),
    "bicubic": (_keys_cubic, 2.0),
    "lanczos3": (_lanczos(3), 3.0),
    "lanczos5": (_lanczos(5), 5.0),
    "gaussian": (_gaussian, 1.5),
    "mitchellcubic": (_mitchell_cubic, 2.0),
}


@dataclass(frozen=True)
class Taps:
    """How one axis is resampled: output ``i`` is ``sum(weights[i, k] * input[indices[i, k]])``.

    Attributes:
        indices: ``(output size, taps)`` input positions, all within the input.
        weights: ``(output size, taps)`` float32 weights; unused taps have weight 0.
    """

    indices: np.ndarray
    weights: np.ndarray

    @functools.cached_property
    def is_identity(self) -> bool:
        """Whether this axis maps every output to the input at the same position, unchanged."""
        size = len(self.indices)
        picks = np.argmax(self.weights, axis=1)
        chosen = self.indices[np.arange(size), picks]
        return bool(
            np.array_equal(chosen, np.arange(size))
            and (self.weights[np.arange(size), picks] == 1).all()
            and np.count_nonzero(self.weights) == size
        )

    @functools.cached_property
    def sources(self) -> np.ndarray:
        """The input positions these taps weigh (nonzero weights), ascending."""
        weighed = self.indices[self.weights != 0]
        return np.unique(weighed if weighed.size else self.indices)

    @functools.cached_property
    def local_indices(self) -> np.ndarray:
        """:attr:`indices` as positions within :attr:`sources` (any position, for a tap of weight 0)."""
        return np.minimum(np.searchsorted(self.sources, self.indices), len(self.sources) - 1)


def _half_pixel_source(in_size: int, out_size: int, shift: float) -> np.ndarray:
    """``(x + 0.5) * in / out - shift`` in float32 for each output ``x``, as TensorFlow's scalers compute it."""
    scale = F32(in_size) / F32(out_size)
    return (np.arange(out_size, dtype=F32) + F32(0.5)) * scale - F32(shift)


def _nearest_taps(in_size: int, out_size: int) -> Taps:
    source = np.floor(_half_pixel_source(in_size, out_size, 0.0)).astype(np.int64)
    indices = np.clip(source, 0, in_size - 1)[:, None]
    return Taps(indices, np.ones_like(indices, dtype=F32))


def _bilinear_taps(in_size: int, out_size: int) -> Taps:
    source = _half_pixel_source(in_size, out_size, 0.5)
    floor = np.floor(source)
    lerp = (source - floor).astype(F32)
    lower = np.maximum(floor.astype(np.int64), 0)
    upper = np.minimum(np.ceil(source).astype(np.int64), in_size - 1)
    return Taps(np.stack([lower, upper], axis=1), np.stack([1 - lerp, lerp], axis=1))


def _bicubic_taps(in_size: int, out_size: int) -> Taps:
    """resize_bicubic with half-pixel centers: Keys' kernel sampled from a table, outside taps dropped."""
    source = _half_pixel_source(in_size, out_size, 0.5)
    base = np.floor(source).astype(np.int64)
    delta = np.rint((source - np.floor(source)) * _BICUBIC_TABLE_SIZE) / _BICUBIC_TABLE_SIZE
    offsets = np.arange(-1, 3)
    indices = base[:, None] + offsets
    weights = _keys_cubic(np.abs(delta[:, None] - offsets)).astype(F32)
    return _normalized(indices, weights, in_size)


def _area_taps(in_size: int, out_size: int) -> Taps:
    """resize_area: each output averages the input span it covers, partial pixels by their overlap."""
    scale = F32(in_size) / F32(out_size)
    starts = np.arange(out_size, dtype=F32) * scale
    ends = np.arange(1, out_size + 1, dtype=F32) * scale
    first = np.floor(starts).astype(np.int64)
    count = int((np.ceil(ends).astype(np.int64) - first).max())
    pixels = first[:, None] + np.arange(count)
    overlap = np.minimum(pixels + 1, ends[:, None]) - np.maximum(pixels, starts[:, None])
    weights = (np.maximum(overlap, 0) / scale).astype(F32)
    return Taps(np.minimum(pixels, in_size - 1), weights)


def _scale_and_translate_taps(in_size: int, out_size: int, method: str, antialias: bool) -> Taps:
    """scale_and_translate: the kernel centered on each sample, widened by the shrink factor if antialiasing."""
    kernel, radius = _SCALE_AND_TRANSLATE[method]
    inv_scale = F32(1) / (F32(out_size) / F32(in_size))
    kernel_scale = max(float(inv_scale), 1.0) if antialias else 1.0
    reach = F32(radius * kernel_scale)
    sample = (np.arange(out_size, dtype=F32) + F32(0.5)) * inv_scale
    starts = np.clip(np.ceil(sample - reach - F32(0.5)).astype(np.int64), 0, in_size - 1)
    ends = np.clip(np.floor(sample + reach - F32(0.5)).astype(np.int64), 0, in_size - 1) + 1
    span = min(2 * math.ceil(radius * kernel_scale) + 1, in_size)
    indices = starts[:, None] + np.arange(span)
    distance = np.abs((indices.astype(F32) + F32(0.5) - sample[:, None]) / F32(kernel_scale))
    weights = np.where(indices < ends[:, None], kernel(distance), 0).astype(F32)
    return _normalized(indices, weights, in_size)


def _normalized(indices: np.ndarray, weights: np.ndarray, in_size: int) -> Taps:
    """Drop taps outside the input and rescale the rest to sum to 1, as TensorFlow does at the borders."""
    inside = (indices >= 0) & (indices < in_size)
    weights = np.where(inside, weights, F32(0))
    totals = weights.sum(axis=1, keepdims=True, dtype=F32)
    usable = np.abs(totals) >= _TINY_WEIGHT_SUM
    weights = np.where(usable, weights / np.where(usable, totals, F32(1)), F32(0)).astype(F32)
    return Taps(np.clip(indices, 0, in_size - 1), weights)


@functools.lru_cache(maxsize=512)
def axis_taps(in_size: int, out_size: int, method: str, antialias: bool = False) -> Taps:
    """The taps that resample one axis of ``in_size`` pixels to ``out_size`` pixels.

    Args:
        in_size: Input length in pixels.
        out_size: Output length in pixels.
        method: One of :data:`INTERPOLATIONS`.
        antialias: Widen the kernel when shrinking, as ``tf.image.resize(..., antialias=True)`` does;
            ``nearest`` and ``area`` ignore it there, and here.

    Returns:
        The axis's :class:`Taps` (cached: treat them as read-only).
    """
    if method == "nearest":
        return _nearest_taps(in_size, out_size)
    if method == "area":
        return _area_taps(in_size, out_size)
    if antialias or method not in ("bilinear", "bicubic"):
        return _scale_and_translate_taps(in_size, out_size, method, antialias)
    return _bilinear_taps(in_size, out_size) if method == "bilinear" else _bicubic_taps(in_size, out_size)
