"""Parity with Keras's image loader: ImageSpec.decode against keras.utils.image_dataset_from_directory.

The ``keras_tree`` fixture writes real JPEG and PNG files into class folders, the layout Keras reads; the
tests run Keras's loader on them and compare its output with ``ImageSpec(...).decode(bytes)``, image by
image. Dataset-level comparisons (classes, order, labels, validation split) can reuse the same trees.

Keras returns float32 pixels; the cache holds ``uint8``, so the reference is Keras's output clipped to
0..255 (cubic and Lanczos kernels overshoot at sharp edges) and each pixel may differ by rounding.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from s3cache.spec import ImageSpec
from s3cache.testing.sampledata import make_photos, write_photos
from s3cache.tfimage import crop_box
from s3cache.tfkernels import INTERPOLATIONS

# Not square, so that a swapped height and width cannot pass; the photos are smaller and larger than this.
IMAGE_SIZE = (24, 32)
MEAN_BOUND, MAX_BOUND = 1.0, 12.0
GEOMETRIES = {"stretch": {}, "crop": {"crop_to_aspect_ratio": True}, "pad": {"pad_to_aspect_ratio": True}}
# Keras's crop path resizes through keras.ops, which has no such kernels: checked separately below.
KERAS_CROP_REFUSES = ("gaussian", "mitchellcubic")


@dataclass(frozen=True)
class KerasTree:
    """Image files in Keras's layout, one folder per class under each root.

    Attributes:
        root: Every file: photos as JPEG (4:2:0, 4:2:2, 4:4:4, progressive, RGB-coded, multi-picture) and
            PNG, grayscale JPEG and PNG, an RGBA PNG, a palette PNG with a transparent color, a 16-bit PNG.
        png_root: The PNG files only, for RGBA: Keras cannot decode JPEGs to four channels.
    """

    root: Path
    png_root: Path

    def files(self, root: Path) -> list[Path]:
        """The image files under one of the roots, sorted."""
        return sorted(path for path in root.rglob("*") if path.is_file())


def _saved(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _odd_images(photo: np.ndarray) -> dict[str, bytes]:
    """Files that exercise each decoding path, cut from one photo."""
    rgb = Image.fromarray(photo)
    height, width = photo.shape[:2]
    ramp = np.linspace(0, 255, width, dtype=np.uint8)[np.newaxis, :].repeat(height, axis=0)
    palette = rgb.quantize(colors=16)
    second = Image.fromarray(photo[::-1].copy())
    return {
        "subsampled_422.jpg": _saved(rgb, "JPEG", quality=90, subsampling=1),
        "unsubsampled_444.jpg": _saved(rgb, "JPEG", quality=90, subsampling=0),
        "progressive.jpg": _saved(rgb, "JPEG", quality=90, progressive=True),
        "rgb_coded.jpg": _saved(rgb, "JPEG", quality=90, keep_rgb=True),
        "multi_picture.jpg": _saved(rgb, "MPO", quality=90, save_all=True, append_images=[second]),
        "gray.jpg": _saved(rgb.convert("L"), "JPEG", quality=90),
        "gray.png": _saved(rgb.convert("L"), "PNG"),
        "rgba.png": _saved(Image.fromarray(np.dstack([photo, ramp])), "PNG"),
        "palette.png": _saved(palette, "PNG", transparency=3),
        "deep.png": _saved(Image.fromarray(photo[..., 1].astype(np.uint16) * 257 + 31), "PNG"),
    }


@pytest.fixture(scope="module")
def keras_tree(tmp_path_factory: pytest.TempPathFactory) -> KerasTree:
    root = tmp_path_factory.mktemp("keras_tree")
    jpegs = make_photos(4, seed=21, size_range=(16, 72))
    pngs = make_photos(3, seed=22, size_range=(16, 72), fmt="png")
    write_photos(root / "all", jpegs + pngs)
    write_photos(root / "png", pngs)
    photo = np.asarray(Image.open(io.BytesIO(pngs[0][1])).convert("RGB"))
    for name, data in _odd_images(photo).items():
        write_photos(root / "all", [(f"odd/{name}", data)])
        if name.endswith(".png"):
            write_photos(root / "png", [(f"odd/{name}", data)])
    return KerasTree(root / "all", root / "png")


def keras_images(root: Path, **options: object) -> list[tuple[Path, np.ndarray]]:
    """Each file Keras's loader reads under ``root`` with its output image, in Keras's order."""
    dataset = keras.utils.image_dataset_from_directory(
        root, labels=None, shuffle=False, batch_size=None, image_size=IMAGE_SIZE, verbose=False, **options
    )
    images = [np.asarray(image, np.float64) for image in dataset.as_numpy_iterator()]
    return [(Path(path), image) for path, image in zip(dataset.file_paths, images, strict=True)]


def assert_close(ours: np.ndarray, reference: np.ndarray, name: str) -> None:
    """Within rounding of the reference, which is clipped to what ``uint8`` holds."""
    assert ours.dtype == np.uint8 and ours.shape == reference.shape, name
    diff = np.abs(ours - reference.clip(0, 255))
    assert diff.mean() <= MEAN_BOUND and diff.max() <= MAX_BOUND, f"{name}: mean {diff.mean():.3f} max {diff.max()}"


COMBINATIONS = [
    pytest.param(color_mode, interpolation, geometry, id=f"{color_mode}-{interpolation}-{geometry}")
    for color_mode in ("rgb", "grayscale", "rgba")
    for interpolation in INTERPOLATIONS
    for geometry in GEOMETRIES
    if not (geometry == "crop" and interpolation in KERAS_CROP_REFUSES)
]


@pytest.mark.parametrize(("color_mode", "interpolation", "geometry"), COMBINATIONS)
def test_decode_matches_keras(keras_tree: KerasTree, color_mode: str, interpolation: str, geometry: str) -> None:
    root = keras_tree.png_root if color_mode == "rgba" else keras_tree.root
    options = {"color_mode": color_mode, "interpolation": interpolation, **GEOMETRIES[geometry]}
    pairs = keras_images(root, **options)
    assert [path for path, _ in pairs] == keras_tree.files(root)
    spec = ImageSpec(IMAGE_SIZE, **options)
    for path, expected in pairs:
        assert_close(spec.decode(path.read_bytes(), str(path)), expected, path.name)


@pytest.mark.parametrize("interpolation", KERAS_CROP_REFUSES)
def test_crop_with_the_kernels_keras_crop_refuses(keras_tree: KerasTree, interpolation: str) -> None:
    # The crop Keras would take, resized as tf.image.resize does it in Keras's loader.
    spec = ImageSpec(IMAGE_SIZE, interpolation=interpolation, crop_to_aspect_ratio=True)
    for path in keras_tree.files(keras_tree.png_root):
        image = tf.io.decode_png(path.read_bytes(), channels=3)
        top, left, height, width = crop_box(*image.shape[:2], IMAGE_SIZE)
        crop = tf.image.crop_to_bounding_box(image, top, left, height, width)
        expected = tf.image.resize(crop, IMAGE_SIZE, method=interpolation).numpy().astype(np.float64)
        assert_close(spec.decode(path.read_bytes()), expected, path.name)


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_antialias_matches_tf_image_resize(keras_tree: KerasTree, interpolation: str) -> None:
    spec = ImageSpec(IMAGE_SIZE, interpolation=interpolation, antialias=True)
    for path in keras_tree.files(keras_tree.png_root):
        image = tf.io.decode_png(path.read_bytes(), channels=3)
        expected = tf.image.resize(image, IMAGE_SIZE, method=interpolation, antialias=True).numpy()
        assert_close(spec.decode(path.read_bytes()), expected.astype(np.float64), path.name)


def test_interpolation_names_are_case_insensitive_as_in_keras(keras_tree: KerasTree) -> None:
    path = keras_tree.files(keras_tree.root)[0]
    assert ImageSpec(IMAGE_SIZE, interpolation="Lanczos3") == ImageSpec(IMAGE_SIZE, interpolation="lanczos3")
    [(_, expected)] = [pair for pair in keras_images(keras_tree.root, interpolation="LANCZOS3") if pair[0] == path]
    assert_close(ImageSpec(IMAGE_SIZE, interpolation="LANCZOS3").decode(path.read_bytes()), expected, path.name)
