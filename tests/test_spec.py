"""ImageSpec: decoding, resizing, crop and pad, color modes, options, the fingerprint, and hostile bytes.

Pixel parity with Keras's loader is checked in test_parity.py.
"""

from __future__ import annotations

import re
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import skimage.data
from helpers import encode
from PIL import Image

from s3cache.errors import DecodeError, ImageTooLargeError
from s3cache.spec import DECODER_VERSION, INTERPOLATIONS, ImageSpec

URL = "s3://bucket/cls/image.jpg"
UNSUPPORTED = "not a JPEG, PNG, BMP, GIF or WebP image"


def wide_image() -> np.ndarray:
    """A 40x80 image: left quarter red, middle half green, right quarter blue."""
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, :20, 0] = image[:, 20:60, 1] = image[:, 60:, 2] = 255
    return image


def photo(size: int = 96) -> np.ndarray:
    """A real photo, resized to ``size`` x ``size``."""
    return np.asarray(Image.fromarray(skimage.data.astronaut()).resize((size, size), Image.Resampling.BICUBIC))


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` RGB pixels (its data holds a few)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")


# -- geometry and color --------------------------------------------------------------------------------------


def test_output_is_contiguous_uint8_in_height_width_order() -> None:
    out = ImageSpec((10, 30)).decode(encode(wide_image(), "PNG"))
    assert out.shape == (10, 30, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert (out[:, :5, 0] == 255).all() and (out[:, 10:20, 1] == 255).all() and (out[:, -5:, 2] == 255).all()


def test_crop_to_aspect_ratio_keeps_the_center() -> None:
    out = ImageSpec((20, 20), interpolation="nearest", crop_to_aspect_ratio=True).decode(encode(wide_image(), "PNG"))
    assert (out[..., 1] == 255).all() and (out[..., 0] == 0).all()  # only the green middle survives


def test_pad_to_aspect_ratio_adds_black_bands() -> None:
    out = ImageSpec((80, 80), interpolation="nearest", pad_to_aspect_ratio=True).decode(encode(wide_image(), "PNG"))
    assert (out[:20] == 0).all() and (out[-20:] == 0).all() and out[40].max() == 255


@pytest.mark.parametrize(("mode", "channels"), [("grayscale", 1), ("rgba", 4), ("rgb", 3)])
def test_color_modes(mode: str, channels: int) -> None:
    out = ImageSpec((8, 8), color_mode=mode).decode(encode(wide_image(), "PNG"))
    assert out.shape == (8, 8, channels)


def test_sixteen_bit_samples_keep_their_high_byte() -> None:
    # As TensorFlow decodes them: 0xFF00 is 255 (dividing by 257 would give 254), and nothing is clipped.
    samples = np.array([[0x0000, 0x00FF, 0x7F80, 0xFF00, 0xFFFF]], np.uint16)
    out = ImageSpec((1, 5), color_mode="grayscale", interpolation="nearest").decode(encode(samples, "PNG"))
    assert out[0, :, 0].tolist() == [0, 0, 127, 255, 255]


def test_jpeg_as_rgba_is_opaque() -> None:
    out = ImageSpec((16, 16), color_mode="rgba").decode(encode(photo(32), "JPEG"))
    assert (out[..., 3] == 255).all() and out[..., :3].std() > 10


# -- options -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resample", ["bilinear", "bicubic", "lanczos3"])
def test_antialias_is_pillows_resize(resample: str) -> None:
    pixels = photo()
    pillow = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
              "lanczos3": Image.Resampling.LANCZOS}[resample]
    expected = np.asarray(Image.fromarray(pixels).resize((40, 30), pillow))
    data = encode(pixels, "PNG")
    np.testing.assert_array_equal(ImageSpec((30, 40), interpolation=resample, antialias=True).decode(data), expected)
    keras_like = ImageSpec((30, 40), interpolation=resample).decode(data)
    assert np.abs(keras_like - expected.astype(int)).max() > 20  # without antialiasing, fine detail aliases


def test_antialias_resizes_alpha_as_a_channel_of_its_own() -> None:
    # Pillow premultiplies RGBA by alpha when resizing; TensorFlow (and ImageSpec) resize each channel alone.
    pixels = np.dstack([photo(), np.tile(np.linspace(0, 255, 96).astype(np.uint8), (96, 1))])
    out = ImageSpec((30, 40), color_mode="rgba", antialias=True).decode(encode(pixels, "PNG"))
    for channel in range(4):
        band = Image.fromarray(np.ascontiguousarray(pixels[..., channel]))
        np.testing.assert_array_equal(out[..., channel], np.asarray(band.resize((40, 30), Image.Resampling.BILINEAR)))


@pytest.mark.parametrize("color_mode", ["rgb", "grayscale"])
def test_jpeg_draft_is_close_to_the_exact_decode_but_not_it(color_mode: str) -> None:
    data = encode(skimage.data.astronaut(), "JPEG", quality=90)  # 512x512: libjpeg can decode it at 1/4
    exact = ImageSpec((64, 64), color_mode=color_mode, interpolation="area").decode(data)
    drafted = ImageSpec((64, 64), color_mode=color_mode, interpolation="area", jpeg_draft=True).decode(data)
    difference = np.abs(exact.astype(int) - drafted)
    assert drafted.shape == exact.shape and 0 < difference.mean() < 3


def test_every_keras_interpolation_in_any_case() -> None:
    assert INTERPOLATIONS == ("bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5", "gaussian",
                              "mitchellcubic")
    for name in INTERPOLATIONS:
        spec = ImageSpec((8, 8), interpolation=name.upper())
        assert spec.interpolation == name and spec.fingerprint == ImageSpec((8, 8), interpolation=name).fingerprint


def test_fingerprint_names_the_spec_and_decoder() -> None:
    base = ImageSpec((32, 32))
    assert base.fingerprint == ImageSpec([32, 32]).fingerprint  # type: ignore[arg-type]
    others = [ImageSpec((32, 33)), ImageSpec((32, 32), "grayscale"), ImageSpec((32, 32), interpolation="nearest"),
              ImageSpec((32, 32), crop_to_aspect_ratio=True), ImageSpec((32, 32), pad_to_aspect_ratio=True),
              ImageSpec((32, 32), antialias=True), ImageSpec((32, 32), jpeg_draft=True)]
    assert len({base.fingerprint, *(o.fingerprint for o in others)}) == 8
    assert ImageSpec.from_dict(base.to_dict()) == base
    assert DECODER_VERSION == 2  # pixels as Keras computes them: entries of version 1 are another namespace


@pytest.mark.parametrize("kwargs", [{"image_size": (0, 3)}, {"color_mode": "cmyk"}, {"interpolation": "magic"},
                                    {"interpolation": "hamming"}, {"interpolation": "box"},
                                    {"crop_to_aspect_ratio": True, "pad_to_aspect_ratio": True}])
def test_invalid_specs_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ImageSpec(**kwargs)


# -- hostile bytes -------------------------------------------------------------------------------------------

EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 16 16
%%EndComments
0 0 moveto 16 16 lineto stroke
showpage
%%EOF
"""

# Records process spawns (an EPS reader hands its bytes to Ghostscript) while ImageSpec decodes EPS bytes,
# then while Pillow loads them with every reader allowed, to show the watch sees such a spawn.
SPAWN_WATCH = """
import io, sys
from PIL import Image
from s3cache.spec import ImageSpec
data = sys.stdin.buffer.read()
spawns = []
sys.addaudithook(lambda event, args: spawns.append(event) if event.split(".")[0] in ("subprocess", "os") and
                 event.split(".")[1].startswith(("exec", "spawn", "posix_spawn", "system", "fork", "Popen")) else None)
try:
    ImageSpec((8, 8)).decode(data, "s3://bucket/cls/drawing.jpg")
except Exception as exc:
    print(type(exc).__name__, exc)
print("decode spawned:", len(spawns))
try:
    Image.open(io.BytesIO(data)).load()
except Exception:
    pass
print("pillow spawned:", len(spawns))
"""


def test_eps_named_jpg_is_refused_unread_and_nothing_is_spawned() -> None:
    run = subprocess.run([sys.executable, "-c", SPAWN_WATCH], input=EPS, capture_output=True, check=True)
    error, decode_spawned, pillow_spawned = run.stdout.decode().splitlines()
    assert error.startswith(f"DecodeError s3://bucket/cls/drawing.jpg: {UNSUPPORTED}")
    assert decode_spawned == "decode spawned: 0" and pillow_spawned != "pillow spawned: 0"


@pytest.mark.parametrize("data", [b"", b"these are not the pixels you are looking for\n", EPS,
                                  encode(photo(32), "TIFF"), encode(photo(32), "JPEG")[:200]])
def test_undecodable_bytes_are_the_objects_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        ImageSpec((8, 8)).decode(data, URL)
    message = str(info.value)
    assert message.startswith(f"{URL}: ") and "on_error='skip'" in message
    assert not re.search(r" at 0x[0-9a-f]+>", message)  # no <_io.BytesIO object at 0x...> reprs


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pillows_own_bomb_refusal_is_image_too_large() -> None:
    # 3.6 gigapixels: over twice Pillow's limit, so Pillow refuses inside Image.open, before our own check.
    with pytest.raises(ImageTooLargeError, match=rf"^{re.escape(URL)}: .*MAX_IMAGE_PIXELS") as info:
        ImageSpec((8, 8), max_pixels=10**10).decode(png_declaring(60_000, 60_000), URL)
    assert type(info.value) is ImageTooLargeError


def test_the_pixel_limit_is_image_too_large() -> None:
    with pytest.raises(ImageTooLargeError, match=rf"^{re.escape(URL)}: image is 100x100 = 10000 pixels"):
        ImageSpec((8, 8), max_pixels=9_999).decode(encode(photo(100), "PNG"), URL)
