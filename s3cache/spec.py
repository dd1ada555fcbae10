"""What an image becomes: size, color mode, interpolation, crop or pad.

An :class:`ImageSpec` turns encoded image bytes into a ``uint8`` array of shape
``(height, width, channels)`` and names the cache namespace those arrays live in
(:attr:`ImageSpec.fingerprint`), so that any change to the spec or to the decoding
algorithm lands in a fresh namespace instead of serving stale pixels.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from s3cache.errors import DecodeError, ImageTooLargeError
from s3cache.jpeglayout import layout_of
from s3cache.tfcolor import JpegPixels, luma
from s3cache.tfimage import PixelSource, crop_box, pad_layout, pixels_in, resize
from s3cache.tfkernels import INTERPOLATIONS

# Bump when decode() changes its output for the same inputs: old entries then stop matching.
# 2: pixels as Keras's loader computes them (TensorFlow's JPEG decoding, resize kernels, crop/pad geometry).
DECODER_VERSION = 2

COLOR_MODES = {"rgb": ("RGB", 3), "rgba": ("RGBA", 4), "grayscale": ("L", 1)}

# The only readers Image.open may pick: widespread formats whose plugins decode in-process. Others (EPS
# hands the bytes to Ghostscript, and rarer readers fail in unexpected ways) are refused unread.
FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP")

# Pillow filters equal to TensorFlow's antialiased kernels (triangle, Keys cubic a=-0.5, Lanczos a=3),
# used for speed when antialiasing; the other kernels go through s3cache.tfimage.
_PILLOW_ANTIALIAS_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos3": Image.Resampling.LANCZOS,
}
# Pillow mode per channel count for those resizes. "RGBa" is resized channel by channel, where Pillow
# would premultiply "RGBA" by its alpha; TensorFlow treats alpha as one more channel.
_PILLOW_RESIZE_MODES = {1: "L", 3: "RGB", 4: "RGBa"}

# Pillow's own bomb limit is a warning at 89 MP; we refuse before allocating instead.
DEFAULT_MAX_PIXELS = 89_478_485

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")
_FIX = "fix or remove the object, or pass on_error='skip' to skip it"


@dataclass(frozen=True)
class ImageSpec:
    """How raw images are turned into fixed-size arrays, pixel for pixel as Keras's loader does by default.

    With the defaults, :meth:`decode` gives the pixels ``keras.utils.image_dataset_from_directory`` gives
    (TensorFlow's JPEG decoding, channel conversions, resize kernels and crop and pad geometry), rounded to
    ``uint8`` and clipped to 0..255. JPEGs coded in RGB, or with chroma sampled other than 4:4:4, 4:2:2 or
    4:2:0, are decoded with libjpeg's accurate DCT instead of TensorFlow's fast one: about 1 level apart.
    Cropping also works with ``"gaussian"`` and ``"mitchellcubic"``, which Keras's crop refuses.

    Attributes:
        image_size: Target ``(height, width)``, as in Keras.
        color_mode: ``"rgb"``, ``"rgba"`` or ``"grayscale"``.
        interpolation: One of Keras's ``"bilinear"``, ``"nearest"``, ``"bicubic"``, ``"area"``, ``"lanczos3"``,
            ``"lanczos5"``, ``"gaussian"``, ``"mitchellcubic"``, in any case.
        crop_to_aspect_ratio: Center-crop to the target aspect ratio before resizing, as Keras does.
        pad_to_aspect_ratio: Resize to fit inside the target, then pad with black, as Keras does.
        max_pixels: Refuse images that declare more pixels than this. Pillow's own refusal (over twice
            ``PIL.Image.MAX_IMAGE_PIXELS``) applies as well, also as :class:`ImageTooLargeError`.
        antialias: Low-pass filter when shrinking, as ``tf.image.resize(..., antialias=True)`` and Pillow's
            ``Image.resize`` do: smoother small images, but no longer Keras's pixels. ``"nearest"`` and
            ``"area"`` ignore it, as in TensorFlow.
        jpeg_draft: Let libjpeg decode large JPEGs at 1/2, 1/4 or 1/8 scale (never below the target size)
            before resizing: faster, but the pixels differ from Keras's.
    """

    image_size: tuple[int, int] = (256, 256)
    color_mode: str = "rgb"
    interpolation: str = "bilinear"
    crop_to_aspect_ratio: bool = False
    pad_to_aspect_ratio: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    antialias: bool = False
    jpeg_draft: bool = False

    def __post_init__(self) -> None:
        size = tuple(int(v) for v in self.image_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"image_size must be two positive integers (height, width), got {self.image_size!r}")
        object.__setattr__(self, "image_size", size)
        if self.color_mode not in COLOR_MODES:
            raise ValueError(f"color_mode must be one of {sorted(COLOR_MODES)}, got {self.color_mode!r}")
        # Keras lowercases the name; so do we, before it reaches the fingerprint.
        interpolation = str(self.interpolation).lower()
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {list(INTERPOLATIONS)}, got {self.interpolation!r}")
        object.__setattr__(self, "interpolation", interpolation)
        if self.crop_to_aspect_ratio and self.pad_to_aspect_ratio:
            raise ValueError("crop_to_aspect_ratio and pad_to_aspect_ratio cannot both be True")

    @property
    def channels(self) -> int:
        """Number of channels of the arrays this spec produces."""
        return COLOR_MODES[self.color_mode][1]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape ``(height, width, channels)`` of one decoded array."""
        return (*self.image_size, self.channels)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description of the spec."""
        return asdict(self) | {"image_size": list(self.image_size)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageSpec:
        """Rebuild a spec from :meth:`to_dict` output."""
        return cls(**(data | {"image_size": tuple(data["image_size"])}))

    @functools.cached_property
    def fingerprint(self) -> str:
        """A short stable hash naming this spec's cache namespace (computed once: it is in every cache key)."""
        canonical = json.dumps(self.to_dict() | {"decoder": DECODER_VERSION}, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def decode(self, data: bytes, url: str = "<bytes>") -> np.ndarray:
        """Decode encoded image bytes into a ``uint8`` array of :attr:`shape`.

        Args:
            data: The encoded image: JPEG, PNG, BMP, GIF (its first frame) or WebP.
            url: Where the bytes came from, for error messages.

        Returns:
            A C-contiguous ``uint8`` array of shape ``(height, width, channels)``.

        Raises:
            ImageTooLargeError: The image declares more than ``max_pixels`` pixels.
            DecodeError: The bytes are not a decodable image of a supported format (any failure while
                decoding them, whatever Pillow or NumPy raised, is chained as the cause).
        """
        try:
            return self._fit(self._read(data, url))
        except DecodeError:
            raise
        except Image.DecompressionBombError as exc:
            # Pillow refuses over twice its own limit inside Image.open, before our check can run.
            raise ImageTooLargeError(
                f"{url}: image refused before decoding, as a decompression bomb: {exc} "
                "Raise PIL.Image.MAX_IMAGE_PIXELS to accept such images."
            ) from exc
        except Image.UnidentifiedImageError as exc:
            raise DecodeError(
                f"{url}: not a JPEG, PNG, BMP, GIF or WebP image ({len(data)} bytes starting {data[:8]!r}); "
                f"other formats are not supported: {_FIX}"
            ) from exc
        except MemoryError as exc:
            raise DecodeError(
                f"{url}: out of memory decoding the image ({len(data)} bytes); "
                "lower ImageSpec.max_pixels to refuse such images before decoding"
            ) from exc
        except Exception as exc:
            detail = _OBJECT_REPR.sub("the image bytes", str(exc)) or "no detail"
            raise DecodeError(
                f"{url}: cannot decode image ({len(data)} bytes): {type(exc).__name__}: {detail}; {_FIX}"
            ) from exc

    def _read(self, data: bytes, url: str) -> np.ndarray | PixelSource:
        """Decode the bytes into ``uint8`` pixels of the spec's channels, at the image's own size."""
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            # Image.open reads only the header: check the size before any pixel is allocated.
            width, height = image.size
            if width * height > self.max_pixels:
                raise ImageTooLargeError(
                    f"{url}: image is {width}x{height} = {width * height} pixels, over the limit of "
                    f"{self.max_pixels} (ImageSpec.max_pixels); raise it to accept such images"
                )
            sampling = self._configure_jpeg(image) if image.format in ("JPEG", "MPO") else None
            image.load()
            if sampling:
                return JpegPixels(np.asarray(image), sampling, alpha=self.color_mode == "rgba")
            pixels = self._convert(image)
        return pixels.reshape(*pixels.shape[:2], self.channels)

    def _configure_jpeg(self, image: Image.Image) -> list[tuple[int, int]] | None:
        """Set the JPEG decoder up as TensorFlow's, before it runs.

        Returns:
            The components' sampling factors when the decoder was asked for raw YCbCr planes, which
            :class:`~s3cache.tfcolor.JpegPixels` turns into TensorFlow's RGB; None otherwise.
        """
        if self.jpeg_draft:
            height, width = self.image_size
            image.draft("L" if self.color_mode == "grayscale" else None, (width, height))
            return None
        grayscale = self.color_mode == "grayscale"
        layout = layout_of(image)
        if not layout.decodes_as_tensorflow(grayscale):
            return None  # Pillow's own (accurate) decode
        sampling = layout.sampling
        upsampled = len(set(sampling)) > 1
        # A gray output is libjpeg's own (the luma plane, for YCbCr), as TensorFlow asks for it; JpegPixels
        # rebuilds RGB from the raw planes where chroma is upsampled.
        rebuild = upsampled and not grayscale
        if image.mode == "RGB" and (grayscale or rebuild):
            image.draft("L" if grayscale else "YCbCr", None)
        # (DCT scale 1, draft flag): the flag selects libjpeg's fast integer DCT, which TensorFlow uses. It
        # also turns smooth chroma upsampling off, which JpegPixels redoes.
        image.decoderconfig = (1, 1)
        return sampling if rebuild else None

    def _convert(self, image: Image.Image) -> np.ndarray:
        """Convert any other Pillow mode to the spec's color mode, as TensorFlow's decoders do."""
        if image.mode in _SIXTEEN_BIT_MODES:
            # Keep the high byte, as TensorFlow does (Pillow would clip 16-bit samples to 255).
            image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).astype(np.uint8))
        elif image.mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        target = COLOR_MODES[self.color_mode][0]
        if target == "L" and image.mode not in ("L", "LA", "1"):
            return luma(np.asarray(image.convert("RGB")))
        return np.asarray(image if image.mode == target else image.convert(target))

    def _fit(self, source: np.ndarray | PixelSource) -> np.ndarray:
        """Crop or pad to the target aspect ratio (if asked) and resize, with Keras's geometry."""
        height, width = source.shape[:2]
        if self.crop_to_aspect_ratio:
            return self._resize(source, self.image_size, crop_box(height, width, self.image_size))
        if self.pad_to_aspect_ratio:
            top, left, fit_h, fit_w = pad_layout(height, width, self.image_size)
            canvas = np.zeros(self.shape, np.uint8)
            canvas[top : top + fit_h, left : left + fit_w] = self._resize(source, (fit_h, fit_w))
            return canvas
        return self._resize(source, self.image_size)

    def _resize(
        self,
        source: np.ndarray | PixelSource,
        size: tuple[int, int],
        window: tuple[int, int, int, int] | None = None,
    ) -> np.ndarray:
        """Resize the source (or its ``(top, left, height, width)`` window) to ``size``, as ``uint8``."""
        pillow_filter = _PILLOW_ANTIALIAS_FILTERS.get(self.interpolation) if self.antialias else None
        if pillow_filter is not None:
            return _pillow_resize(pixels_in(source, window), size, pillow_filter)
        resized = resize(source, size, self.interpolation, antialias=self.antialias, window=window)
        if resized.dtype != np.uint8:
            resized = np.rint(resized, out=resized).clip(0, 255).astype(np.uint8)
        return np.ascontiguousarray(resized)


def _pillow_resize(pixels: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """Resize with Pillow's (antialiasing) ``Image.resize``, every channel on its own."""
    height, width, channels = pixels.shape
    mode = _PILLOW_RESIZE_MODES[channels]
    image = Image.frombuffer(mode, (width, height), np.ascontiguousarray(pixels), "raw", mode, 0, 1)
    resized = np.asarray(image.resize((size[1], size[0]), resample), dtype=np.uint8)
    return np.ascontiguousarray(resized.reshape(*size, channels))
