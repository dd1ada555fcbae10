"""TensorFlow's JPEG and PNG colour arithmetic, with NumPy.

TensorFlow decodes JPEGs with libjpeg's fast integer DCT and converts color PNGs to grayscale with
libpng's weights. Pillow decodes with the accurate DCT (a mean difference of about 1 on 0-255), so
:class:`JpegPixels` rebuilds TensorFlow's RGB from the planes libjpeg decodes in fast mode (at the
pixels a resize reads: it is a :class:`~s3cache.tfimage.PixelSource`), and :func:`luma` weighs
colors as libpng does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from s3cache.tfimage import positions_span, take_pixels

# libpng's rgb_to_gray weights for (0.299, 0.587), in 1/32768 and truncated, as TensorFlow's PNG decoder asks.
_LUMA_WEIGHTS = (9797, 19234, 3737)


def luma(rgb: np.ndarray) -> np.ndarray:
    """The ``(height, width)`` gray ``uint8`` image libpng makes of an ``(height, width, 3)`` RGB one."""
    red, green, blue = (rgb[..., i].astype(np.uint32) * weight for i, weight in enumerate(_LUMA_WEIGHTS))
    return ((red + green + blue) >> 15).astype(np.uint8)


def _fixed(value: float) -> int:
    """A coefficient in 16-bit fixed point, as libjpeg's FIX() rounds it."""
    return int(value * (1 << 16) + 0.5)


# libjpeg's YCbCr -> RGB coefficients (jdcolor.c), each applied to a chroma value minus 128, rounded (+1/2)
# and floored (>> 16). The biases fold the -128 and the +1/2 into one addition.
_CR_TO_R, _CB_TO_B = _fixed(1.40200), _fixed(1.77200)
_CB_TO_G, _CR_TO_G = -_fixed(0.34414), -_fixed(0.71414)
_HALF = 1 << 15
_R_BIAS, _B_BIAS = _HALF - 128 * _CR_TO_R, _HALF - 128 * _CB_TO_B
_G_BIAS = _HALF - 128 * (_CB_TO_G + _CR_TO_G)
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
        luma_plane = take_pixels(self.ycbcr[..., 0], rows, cols)
        # Both chroma planes in one array where they are sampled alike (as good as always): half the steps.
        if self.sampling[1] == self.sampling[2]:
            cb, cr = self._chroma(slice(1, 3), rows, cols)
        else:
            (cb,), (cr,) = (self._chroma(slice(c, c + 1), rows, cols) for c in (1, 2))
        out = np.empty((len(rows), len(cols), self.shape[2]), np.uint8)
        if self.alpha:
            out[..., 3] = 255
        # A few rows at a time, so that the int32 temporaries stay in cache on large images.
        step = max(1, _CONVERT_BLOCK // max(1, len(cols)))
        for start in range(0, len(rows), step):
            block = slice(start, start + step)
            _ycbcr_to_rgb(luma_plane[block], cb[block], cr[block], out[block])
        return out

    def _chroma(self, channels: slice, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Chroma planes sampled alike, upsampled as libjpeg's fancy upsampling does, at ``rows`` x ``cols``.

        Returns:
            ``(planes, rows, cols)`` int16: planes first, so that every step runs along long rows.
        """
        (max_h, max_v), (h, v) = self.sampling[0], self.sampling[channels.start]
        across, down = max_h // h, max_v // v
        planes = np.moveaxis(self.ycbcr[..., channels], 2, 0)
        # libjpeg interpolates doubled columns (and rows with them) only in planes over 2 samples wide.
        if across != 2 or planes.shape[2] <= 2 * across:
            return _take_columns(planes[:, positions_span(rows)], cols).astype(np.int16)
        samples = np.ascontiguousarray(planes[:, ::down, ::across])
        if down == 2:
            # Column sums: 3 x the nearer sample row + the farther one (the next for odd rows, else the previous).
            nearer = rows // 2
            farther = np.clip(nearer + np.where(rows % 2, 1, -1), 0, samples.shape[1] - 1)
            sums = np.multiply(samples[:, nearer], 3, dtype=np.int16)
            sums += samples[:, farther]
            wide = _widen(sums, (8, 7), 4)  # h2v2: in 16ths
        else:
            wide = _widen(samples[:, rows].astype(np.int16), (1, 2), 2)  # h2v1: in quarters
        return _take_columns(wide, cols)


def _take_columns(planes: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The ascending columns ``cols`` (last axis) of ``planes``: a view where they are a run."""
    span = positions_span(cols)
    return planes[..., span] if isinstance(span, slice) else np.take(planes, span, axis=-1)


def _widen(sums: np.ndarray, biases: tuple[int, int], shift: int) -> np.ndarray:
    """Double the columns (last axis): 3 x the nearer column + the farther one, plus libjpeg's biases, shifted down.

    The farther column is the previous one for even outputs, the next for odd ones, repeated at the edges.
    """
    triple = 3 * sums
    left = np.concatenate([sums[..., :1], sums[..., :-1]], axis=-1)
    left += triple
    left += biases[0]
    right = np.concatenate([sums[..., 1:], sums[..., -1:]], axis=-1)
    right += triple
    right += biases[1]
    out = np.empty((*sums.shape[:-1], 2 * sums.shape[-1]), sums.dtype)
    np.right_shift(left, shift, out=out[..., 0::2])
    np.right_shift(right, shift, out=out[..., 1::2])
    return out


def _ycbcr_to_rgb(luma_plane: np.ndarray, cb: np.ndarray, cr: np.ndarray, out: np.ndarray) -> None:
    """Write libjpeg's RGB for ``uint8`` luma and int16 chroma planes into ``out[..., :3]``."""
    _add_luma(np.multiply(cr, _CR_TO_R, dtype=np.int32), _R_BIAS, luma_plane, out[..., 0])
    green = np.multiply(cb, _CB_TO_G, dtype=np.int32)
    green += np.multiply(cr, _CR_TO_G, dtype=np.int32)
    _add_luma(green, _G_BIAS, luma_plane, out[..., 1])
    _add_luma(np.multiply(cb, _CB_TO_B, dtype=np.int32), _B_BIAS, luma_plane, out[..., 2])


def _add_luma(scaled: np.ndarray, bias: int, luma_plane: np.ndarray, out: np.ndarray) -> None:
    """``out = clip(luma + (scaled + bias) >> 16)``, in place in ``scaled`` (int32)."""
    scaled += bias
    scaled >>= 16
    scaled += luma_plane
    np.clip(scaled, 0, 255, out=scaled)
    out[...] = scaled
