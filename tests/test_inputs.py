"""Hostile and odd objects read through S3 and the cache: broken files, unusual image modes,
decompression bombs and keys with path-like parts."""

from __future__ import annotations

import io
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import dataset_options, encode, object_gets
from PIL import Image

import s3cache
from s3cache.errors import DecodeError, ImageTooLargeError
from s3cache.spec import ImageSpec
from s3cache.testing.locals3 import LocalS3

BUCKET = "odd"
PIXELS = np.random.default_rng(7).integers(0, 256, (12, 16, 3), dtype=np.uint8)


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` RGB pixels (its data holds a few)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")


def gif_declaring(width: int, height: int) -> bytes:
    """A tiny GIF whose screen and single frame declare ``width`` x ``height`` pixels."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame + b";"


def saved(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def put(s3: LocalS3, objects: dict[str, bytes]) -> None:
    client = s3.boto3_client()
    client.create_bucket(Bucket=BUCKET)
    for key, data in objects.items():
        client.put_object(Bucket=BUCKET, Key=key, Body=data)
    s3.reset_stats()


def read_one(s3: LocalS3, cache_dir: Path, key: str, **overrides: object) -> np.ndarray:
    """The uint8 array served for one object, read by URL through a fresh dataset."""
    options = dataset_options(s3, cache_dir, labels=None, dtype="uint8") | overrides
    return s3cache.image_dataset_from_s3([f"s3://{BUCKET}/{key}"], **options)[0][0]


# -- objects that are not images, or images too large to decode ----------------------------------------------

JPEG = encode(PIXELS)
BROKEN = {
    "truncated.jpg": JPEG[: len(JPEG) // 2],
    "empty.jpg": b"",
    "text.jpg": b"these are not the pixels you are looking for\n" * 3,
    "bomb-100mp.png": png_declaring(10_000, 10_000),
    "bomb-3600mp.png": png_declaring(60_000, 60_000),
    "bomb-4300mp.gif": gif_declaring(65_535, 65_535),
}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_object_follows_on_error_and_names_its_key(s3: LocalS3, cache_dir: Path, name: str) -> None:
    put(s3, {f"in/cls/{name}": BROKEN[name], "in/cls/good.png": encode(PIXELS, "PNG")})
    url = f"s3://{BUCKET}/in/cls/{name}"
    options = dataset_options(s3, cache_dir, labels=None, dtype="uint8", image_size=(12, 16))
    with pytest.raises(DecodeError, match=re.escape(url)) as info:
        s3cache.image_dataset_from_s3(f"s3://{BUCKET}/in/", **options)[0]
    if name.startswith("bomb"):
        assert "pixels" in str(info.value)
    s3.reset_stats()
    skipping = s3cache.image_dataset_from_s3(f"s3://{BUCKET}/in/", **options | {"on_error": "skip"})
    with pytest.warns(UserWarning, match=f"skipping {re.escape(url)}"):
        batch = skipping[0]
    np.testing.assert_array_equal(batch, PIXELS[np.newaxis])  # only the good image
    assert skipping.stats["skipped"] == 1
    assert object_gets(s3) == []  # the failure was cached with the good image, not fetched again


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("name", [name for name in sorted(BROKEN) if name.startswith("bomb")])
def test_decompression_bombs_are_refused_by_the_pixel_limit(name: str) -> None:
    with pytest.raises(ImageTooLargeError, match=rf"^s3://b/{name}: .*pixels"):
        ImageSpec((8, 8)).decode(BROKEN[name], f"s3://b/{name}")


NEVER_ALLOCATED = """
import resource, sys
from s3cache.spec import ImageSpec
data = open(sys.argv[1], "rb").read()
with open("/proc/self/status") as status:
    size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
# 256 MiB more address space: far less than the 400 MB of pixels the header declares.
resource.setrlimit(resource.RLIMIT_AS, (size + 2**28, resource.RLIM_INFINITY))
for spec in (ImageSpec((8, 8)), ImageSpec((8, 8), max_pixels=10**9)):
    try:
        spec.decode(data)
    except BaseException as exc:
        print(type(exc).__name__, type(exc.__cause__).__name__)
"""


def test_a_refused_bomb_is_never_allocated(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(BROKEN["bomb-100mp.png"])
    run = subprocess.run([sys.executable, "-W", "ignore", "-c", NEVER_ALLOCATED, str(bomb)],
                         capture_output=True, text=True, check=True)
    # Refused within the limit; with the pixel limit raised, decoding it would need the memory.
    assert run.stdout.split() == ["ImageTooLargeError", "NoneType", "DecodeError", "MemoryError"]


# -- unusual but valid images --------------------------------------------------------------------------------


def palette_image() -> Image.Image:
    """Four palette colors; index 3 is fully transparent."""
    image = Image.fromarray((np.arange(12 * 16).reshape(12, 16) % 4).astype(np.uint8), mode="P")
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9])
    return image


def test_palette_png_with_transparency(s3: LocalS3, cache_dir: Path) -> None:
    image = palette_image()
    put(s3, {"p.png": saved(image, "PNG", transparency=3)})
    expected = np.asarray(image.convert("RGBA")).copy()
    expected[..., 3] = np.where(np.asarray(image) == 3, 0, 255)
    np.testing.assert_array_equal(read_one(s3, cache_dir, "p.png", image_size=(12, 16), color_mode="rgba"), expected)
    np.testing.assert_array_equal(read_one(s3, cache_dir, "p.png", image_size=(12, 16)), expected[..., :3])


def test_sixteen_bit_png_is_scaled_not_clipped(s3: LocalS3, cache_dir: Path) -> None:
    gray = PIXELS[..., 0]
    put(s3, {"deep.png": saved(Image.fromarray(gray.astype(np.uint16) * 257), "PNG")})
    got = read_one(s3, cache_dir, "deep.png", image_size=(12, 16), color_mode="grayscale")
    np.testing.assert_array_equal(got[..., 0], gray)


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grayscale_and_cmyk_jpegs(s3: LocalS3, cache_dir: Path, mode: str) -> None:
    smooth = np.asarray(Image.fromarray(PIXELS).resize((64, 48), Image.Resampling.BICUBIC))
    source = Image.fromarray(smooth).convert(mode)
    put(s3, {"j.jpg": saved(source, "JPEG", quality=95)})
    got = read_one(s3, cache_dir, "j.jpg", image_size=(48, 64))
    # Close to the pixels before JPEG: colors are neither inverted (CMYK) nor lost (gray to RGB).
    original = np.asarray(source.convert("RGB")).astype(int)
    assert np.abs(got.astype(int) - original).mean() < 3


def test_animated_gif_gives_its_first_frame(s3: LocalS3, cache_dir: Path) -> None:
    frames = [Image.new("RGB", (16, 12), color) for color in ((200, 30, 30), (30, 30, 200), (30, 200, 30))]
    put(s3, {"anim.gif": saved(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)})
    got = read_one(s3, cache_dir, "anim.gif", image_size=(12, 16))
    assert got.shape == (12, 16, 3) and np.all(got == (200, 30, 30))


# -- keys with path-like parts -------------------------------------------------------------------------------

ODD_KEYS = [
    "data/cls/../up.png",
    "data/../../../../escape.png",
    "data/cls/./dot.png",
    "data//cls//double.png",
    "data/cls/%2e%2e/encoded.png",
    "data/cls/..png",
    "data/cls/" + "k" * 1000 + ".png",  # S3 keys are at most 1024 bytes
]


def test_path_like_keys_are_read_verbatim(s3: LocalS3, cache_dir: Path) -> None:
    shades = {key: np.full((4, 4, 3), 20 * (i + 1), np.uint8) for i, key in enumerate(ODD_KEYS)}
    put(s3, {key: encode(shade, "PNG") for key, shade in shades.items()})
    options = dataset_options(s3, cache_dir, labels=None, dtype="uint8", image_size=(4, 4), batch_size=len(ODD_KEYS))
    ds = s3cache.image_dataset_from_s3(f"s3://{BUCKET}/data/", **options)
    assert sorted(ds.file_paths) == sorted(f"s3://{BUCKET}/{key}" for key in ODD_KEYS)
    # Each key was fetched as written (no path normalization) and got its own shade.
    for url, image in zip(ds.file_paths, ds[0], strict=True):
        np.testing.assert_array_equal(image, shades[url.removeprefix(f"s3://{BUCKET}/")])
    assert sorted(object_gets(s3)) == sorted(f"/{BUCKET}/{key}" for key in ODD_KEYS)
    by_url = s3cache.image_dataset_from_s3(ds.file_paths, **options)
    s3.reset_stats()
    np.testing.assert_array_equal(by_url[0], ds[0])
    assert object_gets(s3) == []
