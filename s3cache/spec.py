"""What an image becomes: size, color mode, interpolation, crop or pad.

An :class:`ImageSpec` turns encoded image bytes into a ``uint8`` array of shape
``(height, width, channels)`` and names the cache namespace those arrays live in
(:attr:`ImageSpec.fingerprint`), so that any change to the spec or to the decoding
algorithm lands in a fresh namespace instead of serving stale pixels.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from s3cache.errors import DecodeError, ImageTooLargeError

# Bump when decode() changes its output for the same inputs: old entries then stop matching.
DECODER_VERSION = 1

COLOR_MODES = {"rgb": ("RGB", 3), "rgba": ("RGBA", 4), "grayscale": ("L", 1)}

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
    "lanczos3": Image.Resampling.LANCZOS,
    "lanczos5": Image.Resampling.LANCZOS,
}

# Pillow's own bomb limit is a warning at 89 MP; we refuse before allocating instead.
DEFAULT_MAX_PIXELS = 89_478_485

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


@dataclass(frozen=True)
class ImageSpec:
    """How raw images are turned into fixed-size arrays.

    Attributes:
        image_size: Target ``(height, width)``, as in Keras.
        color_mode: ``"rgb"``, ``"rgba"`` or ``"grayscale"``.
        interpolation: Resampling filter name (``"bilinear"``, ``"nearest"``, ``"bicubic"``,
            ``"area"``, ``"lanczos3"``, ...).
        crop_to_aspect_ratio: Center-crop to the target aspect ratio before resizing.
        pad_to_aspect_ratio: Pad (black) to the target aspect ratio before resizing.
        max_pixels: Refuse images that declare more pixels than this. Pillow's own refusal (over twice
            ``PIL.Image.MAX_IMAGE_PIXELS``) applies as well, also as :class:`ImageTooLargeError`.
    """

    image_size: tuple[int, int] = (256, 256)
    color_mode: str = "rgb"
    interpolation: str = "bilinear"
    crop_to_aspect_ratio: bool = False
    pad_to_aspect_ratio: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        size = tuple(int(v) for v in self.image_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"image_size must be two positive integers (height, width), got {self.image_size!r}")
        object.__setattr__(self, "image_size", size)
        if self.color_mode not in COLOR_MODES:
            raise ValueError(f"color_mode must be one of {sorted(COLOR_MODES)}, got {self.color_mode!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}")
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

    @property
    def fingerprint(self) -> str:
        """A short stable hash naming this spec's cache namespace."""
        canonical = json.dumps(self.to_dict() | {"decoder": DECODER_VERSION}, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def decode(self, data: bytes, url: str = "<bytes>") -> np.ndarray:
        """Decode encoded image bytes into a ``uint8`` array of :attr:`shape`.

        Args:
            data: The encoded image (JPEG, PNG, BMP, GIF, ...).
            url: Where the bytes came from, for error messages.

        Returns:
            A C-contiguous ``uint8`` array of shape ``(height, width, channels)``.

        Raises:
            ImageTooLargeError: The image declares more than ``max_pixels`` pixels.
            DecodeError: The bytes are not a decodable image.
        """
        try:
            with Image.open(io.BytesIO(data)) as image:
                # Image.open reads only the header: check the size before any pixel is allocated.
                width, height = image.size
                if width * height > self.max_pixels:
                    raise ImageTooLargeError(
                        f"{url}: image is {width}x{height} = {width * height} pixels, "
                        f"over the limit of {self.max_pixels} (ImageSpec.max_pixels)"
                    )
                image.load()
                array = self._resize(self._convert(image))
        except DecodeError:
            raise
        except Image.DecompressionBombError as exc:
            # Pillow refuses over twice its own limit inside Image.open, before our check can run.
            raise ImageTooLargeError(f"{url}: image refused before decoding, as a decompression bomb: {exc}") from exc
        except (OSError, ValueError, SyntaxError) as exc:
            raise DecodeError(f"{url}: cannot decode image ({len(data)} bytes): {exc}") from exc
        return array

    def _convert(self, image: Image.Image) -> Image.Image:
        """Convert any Pillow mode to the spec's color mode."""
        target = COLOR_MODES[self.color_mode][0]
        if image.mode in _SIXTEEN_BIT_MODES:
            # Pillow would clip 16-bit samples to 255; scale them to 8 bits instead.
            wide = np.asarray(image, dtype=np.uint32)
            image = Image.fromarray((wide // 257).clip(0, 255).astype(np.uint8), mode="L")
        elif image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        return image if image.mode == target else image.convert(target)

    def _resize(self, image: Image.Image) -> np.ndarray:
        """Crop or pad to the target aspect ratio (if asked), then resize."""
        height, width = self.image_size
        resample = INTERPOLATIONS[self.interpolation]
        if self.pad_to_aspect_ratio:
            image = _pad_to_aspect(image, width / height)
        box = _center_box(image.size, width / height) if self.crop_to_aspect_ratio else None
        if image.size != (width, height) or box is not None:
            image = image.resize((width, height), resample=resample, box=box)
        array = np.asarray(image, dtype=np.uint8)
        return np.ascontiguousarray(array.reshape(self.shape))


def _center_box(size: tuple[int, int], aspect: float) -> tuple[float, float, float, float]:
    """The largest centered box of the given aspect ratio (width / height) inside ``size``."""
    width, height = size
    crop_w, crop_h = min(width, height * aspect), min(height, width / aspect)
    left, top = (width - crop_w) / 2, (height - crop_h) / 2
    return (left, top, left + crop_w, top + crop_h)


def _pad_to_aspect(image: Image.Image, aspect: float) -> Image.Image:
    """Center the image on a black canvas of the given aspect ratio (width / height)."""
    width, height = image.size
    pad_w, pad_h = max(width, round(height * aspect)), max(height, round(width / aspect))
    if (pad_w, pad_h) == (width, height):
        return image
    canvas = Image.new(image.mode, (pad_w, pad_h))
    canvas.paste(image, ((pad_w - width) // 2, (pad_h - height) // 2))
    return canvas
