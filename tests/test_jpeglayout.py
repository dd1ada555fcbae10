"""JPEG layouts: read from the bytes, they equal Pillow's on every header both read, plain or mutated."""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
import pytest
from PIL import Image

from s3cache.decoders import pillow_layout
from s3cache.jpeglayout import JpegLayout, read_layout
from s3cache.testing.sampledata import make_photos

MUTATIONS = 4000


def saved(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85, **options)
    return buffer.getvalue()


def segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body


def after_soi(data: bytes, *segments: bytes) -> bytes:
    return data[:2] + b"".join(segments) + data[2:]


def without_jfif(data: bytes) -> bytes:
    length = struct.unpack(">H", data[4:6])[0]
    assert data[2:4] == b"\xff\xe0"
    return data[:2] + data[4 + length:]


def with_component_ids(data: bytes, ids: bytes) -> bytes:
    """The JPEG with its frame's component IDs replaced."""
    sof = next(data.index(bytes([0xFF, m])) for m in (0xC0, 0xC2) if bytes([0xFF, m]) in data)
    body = bytearray(data)
    for i, component_id in enumerate(ids):
        body[sof + 10 + 3 * i] = component_id
    return bytes(body)


def pillows(data: bytes) -> JpegLayout | None:
    """The layout Pillow reads (the decoder's own fallback), or None where it reads no JPEG."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pillow_layout(data)
        except Exception:
            return None


@pytest.fixture(scope="module")
def variants() -> dict[str, bytes]:
    (_, photo), = make_photos(1, seed=5, size_range=(40, 60))
    rgb = Image.open(io.BytesIO(photo)).convert("RGB")
    plain = saved(rgb)
    exif = Image.Exif()
    exif[0x0110] = "camera"
    return {
        "4:2:0": plain,
        "4:2:2": saved(rgb, subsampling=1),
        "4:4:4": saved(rgb, subsampling=0),
        "progressive": saved(rgb, progressive=True),
        "gray": saved(rgb.convert("L")),
        "rgb coded": saved(rgb, keep_rgb=True),
        "icc profile": saved(rgb, icc_profile=b"\0" * 300),
        "comment": saved(rgb, comment=b"a comment"),
        "no jfif": without_jfif(plain),
        "no jfif, R G B ids": with_component_ids(without_jfif(saved(rgb, subsampling=1)), b"RGB"),
        "adobe transform 0": after_soi(without_jfif(saved(rgb, subsampling=1)),
                                       segment(0xEE, b"Adobe" + bytes([0, 100, 0, 0, 0, 0, 0]))),
        "adobe transform 1": after_soi(plain, segment(0xEE, b"Adobe" + bytes([0, 100, 0, 0, 0, 0, 1]))),
        "adobe, no transform": after_soi(without_jfif(plain), segment(0xEE, b"Adobe\0\x64")),
        "adobe twice": after_soi(without_jfif(plain), segment(0xEE, b"Adobe" + bytes([0, 100, 0, 0, 0, 0, 0])),
                                 segment(0xEE, b"Adobe\0\x64")),
        # Headers only Pillow judges: the layout reader leaves them to it.
        "exif": saved(rgb, exif=exif),
        "cmyk": saved(rgb.convert("CMYK")),
        "multi-picture": _multi_picture(rgb),
        "photoshop": after_soi(plain, segment(0xED, b"Photoshop 3.0\x008BIM")),
        "fill bytes": plain[:2] + b"\xff" + plain[2:],
    }


def _multi_picture(rgb: Image.Image) -> bytes:
    buffer = io.BytesIO()
    rgb.save(buffer, "MPO", save_all=True, append_images=[rgb.rotate(90)])
    return buffer.getvalue()


LEFT_TO_PILLOW = {"exif", "cmyk", "multi-picture", "photoshop", "fill bytes"}


def test_plain_headers_are_read_as_pillow_reads_them(variants: dict[str, bytes]) -> None:
    for name, data in variants.items():
        ours, theirs = read_layout(data), pillows(data)
        if name in LEFT_TO_PILLOW:
            assert ours is None, name
        else:
            assert ours is not None and ours == theirs, name
    decisions = {name: read_layout(data).decodes_as_tensorflow(grayscale=False)  # type: ignore[union-attr]
                 for name, data in variants.items() if name not in LEFT_TO_PILLOW}
    assert decisions == {"4:2:0": True, "4:2:2": True, "4:4:4": True, "progressive": True, "gray": True,
                         "rgb coded": True, "icc profile": True, "comment": True, "no jfif": True,
                         "no jfif, R G B ids": False, "adobe transform 0": False, "adobe transform 1": True,
                         "adobe, no transform": True, "adobe twice": False}


@pytest.mark.parametrize("kind", ["flip", "truncate", "insert"])
def test_mutated_headers_are_read_as_pillow_reads_them_or_left_to_it(variants: dict[str, bytes], kind: str) -> None:
    """Random damage: whatever the reader answers, Pillow answers the same."""
    rng = np.random.default_rng(["flip", "truncate", "insert"].index(kind))
    read = 0
    for name in sorted(variants):
        data = variants[name]
        header_end = data.index(b"\xff\xda") + 14
        for _ in range(MUTATIONS // len(variants)):
            mutated = _mutate(data, header_end, kind, rng)
            ours = read_layout(mutated)
            if ours is not None:
                read += 1
                assert ours == pillows(mutated), (name, kind, mutated[:header_end].hex())
    assert read > 50  # the mutations left many headers plain enough to read


def _mutate(data: bytes, header_end: int, kind: str, rng: np.random.Generator) -> bytes:
    """Bytes flipped in the header, or the file cut, or bytes inserted, anywhere from just past its start."""
    at = int(rng.integers(2, len(data)))
    if kind == "truncate":
        return data[:at]
    if kind == "insert":
        return data[:at] + rng.integers(0, 256, int(rng.integers(1, 4)), dtype=np.uint8).tobytes() + data[at:]
    mutated = bytearray(data)
    for position in rng.integers(2, header_end, int(rng.integers(1, 3))):
        mutated[position] = int(rng.integers(0, 256))
    return bytes(mutated)


def test_images_past_pillows_pixel_limit_are_left_to_it(variants: dict[str, bytes],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    layout = read_layout(variants["4:2:0"])
    assert layout is not None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", layout.pixels - 1)
    assert read_layout(variants["4:2:0"]) is None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert read_layout(variants["4:2:0"]) == layout
