"""ImageSpec: decoding, resizing, crop and pad, color modes, and the fingerprint."""

from __future__ import annotations

import io

import numpy as np
import pytest
from helpers import encode
from PIL import Image

from s3cache.spec import ImageSpec


def wide_image() -> np.ndarray:
    """A 40x80 image: left quarter red, middle half green, right quarter blue."""
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, :20, 0] = image[:, 20:60, 1] = image[:, 60:, 2] = 255
    return image


def test_resize_matches_pillow_and_uses_height_width_order() -> None:
    data = encode(wide_image(), "PNG")
    out = ImageSpec((10, 30)).decode(data)
    expected = np.asarray(Image.open(io.BytesIO(data)).resize((30, 10), Image.BILINEAR))
    assert out.shape == (10, 30, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, expected)


def test_crop_to_aspect_ratio_keeps_the_center() -> None:
    out = ImageSpec((20, 20), interpolation="nearest", crop_to_aspect_ratio=True).decode(encode(wide_image(), "PNG"))
    assert (out[..., 1] == 255).all() and (out[..., 0] == 0).all()  # only the green middle survives


def test_pad_to_aspect_ratio_adds_black_bands() -> None:
    out = ImageSpec((80, 80), interpolation="nearest", pad_to_aspect_ratio=True).decode(encode(wide_image(), "PNG"))
    assert (out[:15] == 0).all() and (out[-15:] == 0).all() and out[40].max() == 255


@pytest.mark.parametrize(("mode", "channels"), [("grayscale", 1), ("rgba", 4), ("rgb", 3)])
def test_color_modes(mode: str, channels: int) -> None:
    out = ImageSpec((8, 8), color_mode=mode).decode(encode(wide_image(), "PNG"))
    assert out.shape == (8, 8, channels)


def test_fingerprint_names_the_spec() -> None:
    base = ImageSpec((32, 32))
    assert base.fingerprint == ImageSpec([32, 32]).fingerprint  # type: ignore[arg-type]
    others = [ImageSpec((32, 33)), ImageSpec((32, 32), "grayscale"), ImageSpec((32, 32), interpolation="nearest"),
              ImageSpec((32, 32), crop_to_aspect_ratio=True), ImageSpec((32, 32), pad_to_aspect_ratio=True)]
    assert len({base.fingerprint, *(o.fingerprint for o in others)}) == 6
    assert ImageSpec.from_dict(base.to_dict()) == base


@pytest.mark.parametrize("kwargs", [{"image_size": (0, 3)}, {"color_mode": "cmyk"}, {"interpolation": "magic"},
                                    {"crop_to_aspect_ratio": True, "pad_to_aspect_ratio": True}])
def test_invalid_specs_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ImageSpec(**kwargs)
