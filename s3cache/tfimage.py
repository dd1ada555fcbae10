"""The arithmetic of Keras's image loader (TensorFlow's decoders and resize kernels), with Pillow and NumPy.

- Resizing: every method is separable, each output row (then column) a weighted sum of a few input rows
  (columns). :func:`axis_taps` builds those weights once per ``(input size, output size, method)`` from the
  float32 formulas of TensorFlow's kernels (half-pixel centers; ``area`` without them, as ``resize_area``),
  and :func:`resize` applies them. Outputs are float32, as TensorFlow's, except ``nearest``, which gathers.
  Without antialiasing a kernel reads few source pixels (bilinear: 256 rows and columns for a 128x128
  output, whatever the source size), so :func:`resize` asks its source for those pixels only.
- Geometry: :func:`crop_box` and :func:`pad_layout` place the image as ``crop_to_aspect_ratio`` and
  ``pad_to_aspect_ratio`` do.
- Color: TensorFlow decodes JPEGs with libjpeg's fast integer DCT and converts color PNGs to grayscale
  with libpng's weights. Pillow decodes with the accurate DCT (a mean difference of about 1 on 0-255), so
  :class:`JpegPixels` rebuilds TensorFlow's RGB from the planes libjpeg decodes in fast mode (at the
  pixels a resize reads), and :func:`luma` weighs colors as libpng does.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

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


class PixelSource(Protocol):
    """Pixels computed on demand, for sources whose every pixel is costly (see :class:`JpegPixels`)."""

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(height, width, channels)``."""
        ...

    def take(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """The ``uint8`` pixels at the crossings of ascending ``rows`` and ``cols``: ``(rows, cols, channels)``."""
        ...


def _span(positions: np.ndarray) -> slice | np.ndarray:
    """A slice for a run of consecutive positions (a view, not a copy), else the positions."""
    first, last = int(positions[0]), int(positions[-1])
    return slice(first, last + 1) if last - first + 1 == len(positions) else positions


def _take(source: np.ndarray | PixelSource, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    if not isinstance(source, np.ndarray):
        return source.take(rows, cols)
    row_span, col_span = _span(rows), _span(cols)
    picked = source[row_span] if isinstance(row_span, slice) else np.take(source, row_span, axis=0)
    return picked[:, col_span] if isinstance(col_span, slice) else np.take(picked, col_span, axis=1)


def pixels_in(source: np.ndarray | PixelSource, window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """All pixels of a source, or of its ``(top, left, height, width)`` window, as an array."""
    top, left, height, width = window or (0, 0, *source.shape[:2])
    return _take(source, np.arange(top, top + height), np.arange(left, left + width))


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
        method: One of :data:`INTERPOLATIONS`.
        antialias: See :func:`axis_taps`.
        window: ``(top, left, height, width)`` of the part of the source to resize; all of it by default.

    Returns:
        The resized ``(height, width, channels)`` array: float32, or ``uint8`` for ``nearest``.
    """
    top, left, height, width = window or (0, 0, *source.shape[:2])
    rows = axis_taps(height, size[0], method, antialias)
    cols = axis_taps(width, size[1], method, antialias)
    # Only the pixels the taps read, renumbered: the taps index into this block.
    block = _take(source, rows.sources + top, cols.sources + left)
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


# -- color -----------------------------------------------------------------------------------------------------

# libpng's rgb_to_gray weights for (0.299, 0.587), in 1/32768 and truncated, as TensorFlow's PNG decoder asks.
_LUMA_WEIGHTS = (9797, 19234, 3737)


def luma(rgb: np.ndarray) -> np.ndarray:
    """The ``(height, width)`` gray ``uint8`` image libpng makes of an ``(height, width, 3)`` RGB one."""
    red, green, blue = (rgb[..., i].astype(np.uint32) * weight for i, weight in enumerate(_LUMA_WEIGHTS))
    return ((red + green + blue) >> 15).astype(np.uint8)


def _fixed(value: float) -> int:
    """A coefficient in 16-bit fixed point, as libjpeg's FIX() rounds it."""
    return int(value * (1 << 16) + 0.5)


# libjpeg's YCbCr -> RGB coefficients (jdcolor.c); each offset is rounded (+1/2) and floored (>> 16).
_CR_TO_R, _CB_TO_B = _fixed(1.40200), _fixed(1.77200)
_CB_TO_G, _CR_TO_G = -_fixed(0.34414), -_fixed(0.71414)
_HALF = 1 << 15
# Pixels per block of JpegPixels.take: its int32 temporaries then fit in a core's cache.
_CONVERT_BLOCK = 1 << 16


@dataclass(frozen=True)
class JpegPixels:
    """The RGB pixels libjpeg outputs for a YCbCr JPEG, rebuilt from the planes it decodes in fast mode.

    With Pillow's draft flag, libjpeg decodes with the fast integer DCT, as TensorFlow does, but it also
    repeats each chroma sample over the pixels it covers, where TensorFlow's decode interpolates ("fancy"
    upsampling: weights 3/4 and 1/4 per doubled axis). :meth:`take` redoes that interpolation and the
    YCbCr -> RGB conversion with libjpeg's integer arithmetic, at the requested pixels only.

    Attributes:
        ycbcr: ``(height, width, 3)`` ``uint8`` planes, chroma repeated over the pixels each sample covers.
        sampling: ``(horizontal, vertical)`` sampling factors of the Y, Cb and Cr components; each chroma
            plane has Y's, or half as many columns, or half as many columns and rows (4:4:4, 4:2:2, 4:2:0).
        alpha: Append an opaque alpha channel.
    """

    ycbcr: np.ndarray
    sampling: list[tuple[int, int]]
    alpha: bool = False

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(height, width, channels)``."""
        return (*self.ycbcr.shape[:2], 4 if self.alpha else 3)

    def take(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """The ``uint8`` RGB(A) pixels at the crossings of ``rows`` and ``cols``."""
        luma_plane = _take(self.ycbcr[..., 0], rows, cols)
        cb, cr = (self._chroma(channel, rows, cols) for channel in (1, 2))
        out = np.empty((len(rows), len(cols), self.shape[2]), np.uint8)
        if self.alpha:
            out[..., 3] = 255
        # A few rows at a time, so that the int32 temporaries stay in cache on large images.
        step = max(1, _CONVERT_BLOCK // max(1, len(cols)))
        for start in range(0, len(rows), step):
            block = slice(start, start + step)
            _ycbcr_to_rgb(luma_plane[block], cb[block], cr[block], out[block])
        return out

    def _chroma(self, channel: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """One chroma plane upsampled as libjpeg's fancy upsampling does, at ``rows`` x ``cols``, as int16."""
        (max_h, max_v), (h, v) = self.sampling[0], self.sampling[channel]
        across, down = max_h // h, max_v // v
        samples = self.ycbcr[::down, ::across, channel]
        # libjpeg interpolates doubled columns (and rows with them) only in planes over 2 samples wide.
        if across != 2 or samples.shape[1] <= 2:
            return _take(self.ycbcr[..., channel], rows, cols).astype(np.int16)
        if down == 2:
            # Column sums: 3 x the nearer sample row + the farther one (the next for odd rows, else the previous).
            nearer = rows // 2
            farther = np.clip(nearer + np.where(rows % 2, 1, -1), 0, samples.shape[0] - 1)
            sums = 3 * samples[nearer].astype(np.int16) + samples[farther]
            wide = _widen(sums, (8, 7), 4)  # h2v2: in 16ths
        else:
            wide = _widen(samples[rows].astype(np.int16), (1, 2), 2)  # h2v1: in quarters
        return _take(wide, np.arange(len(rows)), cols)


def _widen(sums: np.ndarray, biases: tuple[int, int], shift: int) -> np.ndarray:
    """Double the columns: 3 x the nearer column + the farther one, plus libjpeg's biases, shifted down.

    The farther column is the previous one for even outputs, the next for odd ones, repeated at the edges.
    """
    left = np.concatenate([sums[:, :1], sums[:, :-1]], axis=1)
    right = np.concatenate([sums[:, 1:], sums[:, -1:]], axis=1)
    out = np.empty((sums.shape[0], 2 * sums.shape[1]), sums.dtype)
    out[:, 0::2] = (3 * sums + left + biases[0]) >> shift
    out[:, 1::2] = (3 * sums + right + biases[1]) >> shift
    return out


def _ycbcr_to_rgb(luma_plane: np.ndarray, cb: np.ndarray, cr: np.ndarray, out: np.ndarray) -> None:
    """Write libjpeg's RGB for ``uint8`` luma and int16 chroma planes into ``out[..., :3]``."""
    cb, cr = cb.astype(np.int32) - 128, cr.astype(np.int32) - 128
    for channel, offset in enumerate(
        (_CR_TO_R * cr + _HALF, _CB_TO_G * cb + _CR_TO_G * cr + _HALF, _CB_TO_B * cb + _HALF)
    ):
        offset >>= 16
        offset += luma_plane
        np.maximum(offset, 0, out=offset)
        np.minimum(offset, 255, out=offset)
        out[..., channel] = offset
