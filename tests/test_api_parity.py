"""image_dataset_from_s3 side by side with keras.utils.image_dataset_from_directory on the same files.

The same tree of images is uploaded to the local S3 server and written to a local directory; both
functions get the same arguments. File order, the files a seed puts in each subset, class names,
labels, element shapes and the wording of argument errors must agree. (Pixel values are compared
in test_parity.py.)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import dataset_options

import s3cache
from s3cache.testing.locals3 import LocalS3
from s3cache.testing.sampledata import make_photos, upload_photos, write_photos

BUCKET = "parity"
URL = f"s3://{BUCKET}/data/"

# Relative names chosen so that Keras's walk order differs from S3's key order: a folder's own files
# come before its subfolders' ("cat/z.png" first), and "cat/a/" sorts before "cat/a b/" and "cat/a-b/".
TREE = [
    "cat/a b/x.jpg", "cat/a-b/y.png", "cat/a/z.jpg", "cat/a/A.jpg", "cat/c1.jpg", "cat/C2.JPG", "cat/sub/s1.jpg",
    "cat/z.png", "cat/.dotfile.jpg",
    "dog/d1.jpg", "dog/d2.jpeg", "dog/d10.jpg", "dog/deep/er/d3.jpg", "dog/readme.txt",
    "bird/b1.png", "bird/b2.jpg", "bird/b3.bmp", "bird/b4.gif", "bird/zz/b5.jpg",
    "top.jpg", ".hidden/h1.jpg", "zebra/only.jpg",
]
IMAGES = [name for name in TREE if not name.endswith(".txt")]


def keras() -> Any:
    import keras

    return keras


@pytest.fixture(scope="module")
def tree_files() -> list[tuple[str, bytes]]:
    photos = make_photos(len(TREE), seed=4, size_range=(24, 48))
    files = []
    for name, (_, jpeg) in zip(TREE, photos, strict=True):
        data = jpeg if name.lower().endswith((".jpg", ".jpeg")) else _reencode(jpeg, name)
        files.append((name, data))
    return files


def _reencode(jpeg: bytes, name: str) -> bytes:
    import io

    from PIL import Image

    if name.endswith(".txt"):
        return b"not an image\n"
    fmt = {"png": "PNG", "bmp": "BMP", "gif": "GIF"}[name.rsplit(".", 1)[1].lower()]
    buffer = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture
def both(s3: LocalS3, tree_files: list[tuple[str, bytes]], tmp_path: Path) -> Path:
    """The tree, uploaded under s3://parity/data/ and written under a local directory (returned)."""
    upload_photos(s3.storage_options, BUCKET, "data/", tree_files)
    local = tmp_path / "data"
    write_photos(local, tree_files)
    s3.reset_stats()
    return local


def from_keras(local: Path, **kwargs: Any) -> Any:
    kwargs = {"image_size": (16, 16), "verbose": False} | kwargs
    return keras().utils.image_dataset_from_directory(str(local), **kwargs)


def from_s3(s3: LocalS3, tmp_path: Path, **kwargs: Any) -> Any:
    options = dataset_options(s3, tmp_path / "cache", image_size=(16, 16), shuffle=True, batch_size=32)
    return s3cache.image_dataset_from_s3(URL, **options | kwargs)


def relative(paths: list[str], root: str) -> list[str]:
    root = root.rstrip("/") + "/"
    assert all(path.startswith(root) for path in paths)
    return [path[len(root):] for path in paths]


def pairs(keras_ds: Any, ours: Any) -> list[tuple[Any, Any]]:
    return list(zip(keras_ds, ours, strict=True)) if isinstance(keras_ds, list) else [(keras_ds, ours)]


CASES = {
    "shuffled": {"seed": 1337},
    "sorted": {"shuffle": False},
    "training": {"seed": 1337, "validation_split": 0.25, "subset": "training"},
    "validation": {"seed": 1337, "validation_split": 0.25, "subset": "validation"},
    "both-seed-0": {"seed": 0, "validation_split": 0.3, "subset": "both"},
    "both-seed-7": {"seed": 7, "validation_split": 0.2, "subset": "both"},
    "both-unshuffled": {"shuffle": False, "validation_split": 0.2, "subset": "both"},
    "class-subset": {"seed": 3, "class_names": ["dog", "cat"]},
    "no-labels": {"seed": 5, "labels": None},
    "no-label-mode": {"seed": 5, "label_mode": None, "validation_split": 0.5, "subset": "both"},
    "given-labels": {"seed": 11, "labels": [i % 3 for i in range(len(IMAGES))]},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_files_in_the_same_order_as_keras(s3: LocalS3, both: Path, tmp_path: Path, case: str) -> None:
    kwargs = CASES[case]
    expected, ours = from_keras(both, **kwargs), from_s3(s3, tmp_path, **kwargs)
    for keras_ds, our_ds in pairs(expected, ours):
        assert relative(our_ds.file_paths, URL) == relative(keras_ds.file_paths, str(both))
        assert our_ds.class_names == keras_ds.class_names
    if isinstance(expected, list):
        assert len(expected[1].file_paths) == int(kwargs["validation_split"] * len(expected[0].file_paths
                                                                                 + expected[1].file_paths))


@pytest.mark.parametrize("kwargs", [{}, {"class_names": ["dog", "cat"]}, {"label_mode": "categorical"},
                                    {"labels": "given"}, {"label_mode": "binary", "class_names": ["bird", "dog"]}],
                         ids=["inferred", "class-subset", "categorical", "given", "binary"])
def test_same_labels_as_keras(s3: LocalS3, both: Path, tmp_path: Path, kwargs: dict[str, Any]) -> None:
    if kwargs.get("labels") == "given":
        kwargs = {"labels": [(i * 7) % 4 for i in range(len(IMAGES))]}
    kwargs = kwargs | {"shuffle": False}
    expected, ours = from_keras(both, **kwargs), from_s3(s3, tmp_path, **kwargs)
    keras_labels = np.concatenate([y.numpy() for _, y in expected])
    our_labels = np.concatenate([y for _, y in ours])
    assert our_labels.dtype == keras_labels.dtype and our_labels.shape == keras_labels.shape
    np.testing.assert_array_equal(our_labels, keras_labels)
    assert ours.class_names == expected.class_names


ELEMENT_CASES = {
    "default": {},
    "unbatched": {"batch_size": None},
    "unbatched-categorical": {"batch_size": None, "label_mode": "categorical"},
    "binary": {"label_mode": "binary", "class_names": ["cat", "dog"]},
    "no-labels-gray": {"labels": None, "color_mode": "grayscale"},
    "rgba-int-size": {"color_mode": "rgba", "image_size": 12},
    "channels-first": {"data_format": "channels_first", "label_mode": "categorical"},
    "unbatched-channels-first-binary": {"batch_size": None, "data_format": "channels_first",
                                        "label_mode": "binary", "class_names": ["dog", "bird"]},
}


@pytest.mark.parametrize("case", sorted(ELEMENT_CASES))
def test_same_element_shapes_and_dtypes_as_keras(s3: LocalS3, both: Path, tmp_path: Path, case: str) -> None:
    kwargs = ELEMENT_CASES[case] | {"seed": 2}
    expected = from_keras(both, **kwargs)
    ours = from_s3(s3, tmp_path, **kwargs, format="tf")
    assert str(ours.element_spec) == str(expected.element_spec)
    assert ours.class_names == expected.class_names
    assert relative(ours.file_paths, URL) == relative(expected.file_paths, str(both))
    if kwargs.get("color_mode", "rgb") == "rgb":  # Keras cannot decode the tree's GIF in other color modes
        for keras_part, our_part in zip(parts_of(next(iter(expected))), parts_of(next(iter(ours))), strict=True):
            assert keras_part.shape == our_part.shape and keras_part.dtype == our_part.dtype
    # The PyDataset serves what the tf.data.Dataset declares.
    for part, spec in zip(parts_of(from_s3(s3, tmp_path, **kwargs)[0]), parts_of(ours.element_spec), strict=True):
        assert spec.shape.is_compatible_with(part.shape) and part.dtype == spec.dtype.as_numpy_dtype


def parts_of(element: Any) -> tuple[Any, ...]:
    return element if isinstance(element, tuple) else (element,)


ERROR_CASES = {
    "labels-kind": {"labels": "folders"},
    "label-mode": {"label_mode": "sparse"},
    "class-names-without-labels": {"labels": None, "class_names": ["cat"]},
    "class-names-with-given-labels": {"labels": [0, 1], "class_names": ["cat"]},
    "color-mode": {"color_mode": "cmyk"},
    "image-size": {"image_size": "big"},
    "split-range": {"validation_split": 1.5, "subset": "training", "seed": 1},
    "subset-alone": {"subset": "training"},
    "split-alone": {"validation_split": 0.2, "seed": 1},
    "subset-kind": {"validation_split": 0.2, "subset": "testing", "seed": 1},
    "split-without-seed": {"validation_split": 0.2, "subset": "training"},
    "labels-count": {"labels": [0, 1, 0]},
    "class-names-not-folders": {"class_names": ["cat", "unicorn"]},
    "binary-three-classes": {"label_mode": "binary"},
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_argument_errors_in_keras_words(s3: LocalS3, both: Path, tmp_path: Path, case: str) -> None:
    kwargs = ERROR_CASES[case]
    with pytest.raises(ValueError) as keras_error:
        from_keras(both, **kwargs)
    with pytest.raises(ValueError) as our_error:
        from_s3(s3, tmp_path, **kwargs)
    assert str(our_error.value).replace(URL, "<dir>") == str(keras_error.value).replace(str(both), "<dir>")


@pytest.mark.parametrize("what", ["empty", "no-class-folders"])
def test_no_images_in_keras_words(s3: LocalS3, both: Path, tmp_path: Path, what: str) -> None:
    local = tmp_path / what
    local.mkdir()
    if what == "no-class-folders":
        write_photos(local, [("loose.jpg", (both / "top.jpg").read_bytes())])
        upload_photos(s3.storage_options, BUCKET, f"{what}/", [("loose.jpg", (both / "top.jpg").read_bytes())])
    with pytest.raises(ValueError) as keras_error:
        from_keras(local)
    with pytest.raises(ValueError) as our_error:
        s3cache.image_dataset_from_s3(f"s3://{BUCKET}/{what}/", **dataset_options(s3, tmp_path / "cache"))
    assert isinstance(our_error.value, FileNotFoundError)  # as before: EmptyListingError is both
    expected = str(keras_error.value).replace(str(local), "<dir>")
    assert re.sub(r"s3://\S+/(?=\.)", "<dir>", str(our_error.value)) == expected
