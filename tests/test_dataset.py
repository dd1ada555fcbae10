"""image_dataset_from_s3 against a real S3 endpoint: caching, offline reruns, labels, errors, Keras."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from helpers import all_batches, dataset_options, encode, listings, object_gets, stack_images
from PIL import Image

import s3cache
from s3cache.errors import (
    BucketNotFoundError,
    CredentialsError,
    DecodeError,
    EmptyListingError,
    EndpointUnreachableError,
    NotCachedError,
)
from s3cache.store import ArrayStore
from s3cache.testing.locals3 import LocalS3

URL = "s3://photos/train/"


def test_later_epochs_make_no_s3_requests(s3: LocalS3, bucket: str, cache_dir: Path) -> None:
    ds = s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir))
    assert len(listings(s3)) == 1 and s3.requests() == 1  # building lists once, nothing else
    first = stack_images(all_batches(ds))
    assert len(object_gets(s3)) == 24
    s3.reset_stats()
    for _ in range(2):
        again = stack_images(all_batches(ds))
        np.testing.assert_array_equal(first, again)
    assert s3.requests() == 0
    assert ds.stats["hits"] == 48 and ds.stats["misses"] == 24 and ds.stats["s3_requests"] == 24


def test_the_first_batch_reads_through_the_client_that_listed(s3: LocalS3, bucket: str, cache_dir: Path) -> None:
    ds = s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, batch_size=1))
    ds.readahead = 0
    ds[0]
    listing, get = s3.records()
    assert listing.query and get.method == "GET" and not get.query
    # One client, one kept-alive connection: the loader created no second client (about 70 ms of CPU).
    assert get.connection == listing.connection


def test_dataset_shape_labels_and_paths(s3: LocalS3, bucket: str, cache_dir: Path) -> None:
    ds = s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, label_mode="categorical"))
    x, y = ds[0]
    assert x.shape == (8, 32, 32, 3) and x.dtype == np.float32 and x.min() >= 0 and x.max() <= 255
    assert ds.class_names == sorted(ds.class_names) and y.shape == (8, len(ds.class_names))
    assert ds.file_paths == sorted(ds.file_paths) and ds.file_paths[0].startswith(URL)
    for path, label in zip(ds.file_paths[:8], y.argmax(axis=1), strict=True):
        assert path[len(URL):].split("/")[0] == ds.class_names[label]
    by_url = s3cache.image_dataset_from_s3(ds.file_paths[::-1], **dataset_options(s3, cache_dir))
    assert by_url.file_paths == ds.file_paths[::-1] and by_url.class_names == ds.class_names
    unlabeled = s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, labels=None, dtype="uint8"))
    assert isinstance(unlabeled[0], np.ndarray) and unlabeled[0].dtype == np.uint8


def test_validation_split_is_disjoint_and_complete(s3: LocalS3, bucket: str, cache_dir: Path) -> None:
    train, val = s3cache.image_dataset_from_s3(
        URL, **dataset_options(s3, cache_dir, shuffle=True, seed=7, validation_split=0.25, subset="both"))
    assert len(train.file_paths) == 18 and len(val.file_paths) == 6
    assert not set(train.file_paths) & set(val.file_paths)
    with pytest.raises(ValueError, match="seed"):
        s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, shuffle=True, validation_split=0.2,
                                                             subset="training"))


def test_shuffle_reorders_each_epoch_reproducibly(s3: LocalS3, bucket: str, cache_dir: Path) -> None:
    def labels_of_two_epochs(seed: int) -> list[np.ndarray]:
        ds = s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, shuffle=True, seed=seed))
        return [np.concatenate([y for _, y in all_batches(ds)]) for _ in range(2)]

    first, second = labels_of_two_epochs(3), labels_of_two_epochs(3)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert sorted(first[0]) == sorted(first[1])


@pytest.mark.slow
def test_cache_is_shared_across_processes_and_keyed_by_spec(s3: LocalS3, bucket: str, cache_dir: Path) -> None:
    all_batches(s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir)))
    s3.reset_stats()
    script = (
        "import s3cache, json, sys\n"
        f"ds = s3cache.image_dataset_from_s3({URL!r}, image_size=(32, 32), batch_size=8, shuffle=False, "
        f"cache_dir={str(cache_dir)!r}, storage_options={s3.storage_options!r}, verbose=False)\n"
        "[ds[i] for i in range(len(ds))]\n"
        "print(json.dumps(ds.stats))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert '"hits": 24' in out.stdout and object_gets(s3) == []

    all_batches(s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, image_size=(16, 16))))
    all_batches(s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, color_mode="grayscale")))
    assert len(object_gets(s3)) == 48  # each new spec is its own namespace


def test_overwritten_object_is_fetched_again(s3: LocalS3, bucket: str, cache_dir: Path) -> None:
    before = stack_images(all_batches(s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir))))
    ds = s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir))
    key = ds.file_paths[0].removeprefix("s3://photos/")
    s3.boto3_client().put_object(Bucket="photos", Key=key, Body=encode(np.full((40, 40, 3), 200, np.uint8)))
    s3.reset_stats()
    after = stack_images(all_batches(s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir))))
    assert object_gets(s3) == [f"/photos/{key}"]
    assert np.all(after[0] == 200) and np.array_equal(after[1:], before[1:])


def test_offline_rerun_is_bit_identical_and_opens_no_connection(s3: LocalS3, bucket: str, cache_dir: Path) -> None:
    online = all_batches(s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir)))
    s3.reset_stats()
    dead = {"endpoint_url": "http://127.0.0.1:9", "key": "x", "secret": "y"}
    offline_ds = s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, offline=True,
                                                                      storage_options=dead))
    offline = all_batches(offline_ds)
    assert s3.requests() == 0 and offline_ds.stats["s3_requests"] == 0
    for (x1, y1), (x2, y2) in zip(online, offline, strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)


def test_offline_names_missing_objects_and_listings(s3: LocalS3, bucket: str, cache_dir: Path) -> None:
    with pytest.raises(NotCachedError, match="no stored listing"):
        s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, offline=True))
    online = s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir))  # stores the listing only
    with pytest.raises(NotCachedError, match="24 object") as info:  # when the dataset is built, not partway
        s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, offline=True))
    assert info.value.urls == online.file_paths
    assert isinstance(info.value, LookupError)


def test_unreachable_endpoint_points_to_offline(cache_dir: Path) -> None:
    dead = {"endpoint_url": "http://127.0.0.1:9", "key": "x", "secret": "y"}
    with pytest.raises(EndpointUnreachableError, match="offline=True") as info:
        s3cache.image_dataset_from_s3(URL, cache_dir=cache_dir, storage_options=dead, verbose=False)
    assert "s3://photos/train/" in str(info.value) and isinstance(info.value, ConnectionError)


def test_listing_errors_name_the_bucket(s3: LocalS3, bucket: str, cache_dir: Path) -> None:
    with pytest.raises(BucketNotFoundError, match="no-such-bucket"):
        s3cache.image_dataset_from_s3("s3://no-such-bucket/x/", **dataset_options(s3, cache_dir))
    with pytest.raises(EmptyListingError, match="s3://photos/nothing-here/"):
        s3cache.image_dataset_from_s3("s3://photos/nothing-here/", **dataset_options(s3, cache_dir))
    no_credentials = {k: v for k, v in s3.storage_options.items() if k not in ("key", "secret")}
    with pytest.raises(CredentialsError, match="s3://photos/train/"):
        s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, storage_options=no_credentials))


def test_undecodable_object_raises_or_is_skipped(s3: LocalS3, bucket: str, cache_dir: Path) -> None:
    s3.boto3_client().put_object(Bucket="photos", Key="train/cat/broken.jpg", Body=b"not an image at all")
    ds = s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, batch_size=25))
    with pytest.raises(DecodeError, match="s3://photos/train/cat/broken.jpg"):
        ds[0]
    skipping = s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, batch_size=25, on_error="skip"))
    s3.reset_stats()
    with pytest.warns(UserWarning, match="broken.jpg"):
        x, y = skipping[0]
    assert x.shape[0] == y.shape[0] == 24 and skipping.stats["skipped"] == 1
    assert object_gets(s3) == []  # the failure was remembered, not fetched again


@pytest.mark.parametrize("name", ["a b.jpg", "br[ack]ets.png", "star*.jpg", "what?.jpg", "plus+eq=.jpg",
                                  "ünïcödé-画像.jpg", "deep//double.jpg"])
def test_awkward_keys(s3: LocalS3, cache_dir: Path, name: str) -> None:
    client = s3.boto3_client()
    client.create_bucket(Bucket="odd")
    client.put_object(Bucket="odd", Key=f"data/cls/{name}", Body=encode(np.zeros((8, 8, 3), np.uint8), "PNG"))
    ds = s3cache.image_dataset_from_s3("s3://odd/data/", **dataset_options(s3, cache_dir))
    assert ds.file_paths == [f"s3://odd/data/cls/{name}"]
    assert ds[0][0].shape == (1, 32, 32, 3)
    by_url = s3cache.image_dataset_from_s3(ds.file_paths, **dataset_options(s3, cache_dir, labels=None))
    assert by_url.file_paths == ds.file_paths and by_url[0].shape == (1, 32, 32, 3)


def test_pixels_match_keras_and_cold_warm_offline_agree(s3: LocalS3, photos: list, cache_dir: Path) -> None:
    client = s3.boto3_client()
    client.create_bucket(Bucket="pix")
    _key, jpeg = photos[0]
    png = encode(np.asarray(Image.open(io.BytesIO(jpeg))), "PNG")
    client.put_object(Bucket="pix", Key="p/a/photo.jpg", Body=jpeg)
    client.put_object(Bucket="pix", Key="p/a/photo.png", Body=png)
    options = dataset_options(s3, cache_dir, image_size=(48, 40), labels=None, dtype="uint8")
    cold = s3cache.image_dataset_from_s3("s3://pix/p/", **options)[0]
    warm = s3cache.image_dataset_from_s3("s3://pix/p/", **options)[0]
    offline = s3cache.image_dataset_from_s3("s3://pix/p/", **options | {"offline": True})[0]
    np.testing.assert_array_equal(cold, warm)
    np.testing.assert_array_equal(cold, offline)
    for got, data in zip(cold, (jpeg, png), strict=True):
        # As Keras's loader decodes and resizes (tests/test_parity.py checks every option).
        reference = tf.image.resize(tf.io.decode_image(data, channels=3, expand_animations=False), (48, 40))
        assert np.abs(got - reference.numpy().clip(0, 255)).mean() < 2


def test_misses_of_next_batches_are_read_ahead(s3: LocalS3, bucket: str, cache_dir: Path) -> None:
    ds = s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, batch_size=4, concurrency=2))
    assert ds.readahead == 2
    ds[0]
    deadline = time.monotonic() + 10
    while len(object_gets(s3)) < 4 + 4 * ds.readahead and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(object_gets(s3)) == 4 + 4 * ds.readahead
    s3.reset_stats()
    ds[1]
    assert ds.stats["hits"] == 0 and len(object_gets(s3)) <= 4 * ds.readahead  # batch 1 came from read-ahead


def test_read_ahead_skips_items_held_and_an_evicted_one_is_read_with_its_batch(
        s3: LocalS3, bucket: str, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, batch_size=4, shuffle=True, seed=3))
    expected = dict(zip(ds.file_paths, stack_images(all_batches(ds)), strict=True))  # cold: Keras's order
    all_batches(ds)  # warm: every item served from the store
    looked_up: list[str] = []
    existing = ArrayStore.existing
    monkeypatch.setattr(ArrayStore, "existing", lambda store, keys: looked_up.extend(keys) or existing(store, keys))
    s3.reset_stats()
    all_batches(ds)
    assert looked_up == [] and s3.requests() == 0  # nothing to read ahead: no lookup at all
    evicted = ds.items[5]
    with ArrayStore(cache_dir / "arrays") as other_process:
        assert other_process.delete(ds.loader.key(evicted))
    order = ds._order
    served = stack_images(all_batches(ds))
    assert object_gets(s3) == [f"/photos/{evicted.key}"]  # read when its batch was served, once
    np.testing.assert_array_equal(served, [expected[ds.file_paths[i]] for i in order])


def test_keras_fit_evaluate_predict(s3: LocalS3, bucket: str, cache_dir: Path) -> None:
    import keras

    ds = s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, shuffle=True, seed=1))
    model = keras.Sequential([
        keras.Input((32, 32, 3)), keras.layers.Rescaling(1 / 255), keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(len(ds.class_names)),
    ])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    history = model.fit(ds, epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2
    assert len(object_gets(s3)) == 24
    model.evaluate(ds, verbose=0)
    unlabeled = s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, labels=None))
    assert model.predict(unlabeled, verbose=0).shape == (24, len(ds.class_names))
    assert len(object_gets(s3)) == 24


BAD_ARGUMENTS = {
    "url-scheme": {"directory": "http://photos/train/"},
    "url-slash": {"directory": "s3:/photos/train/"},
    "url-list": {"directory": ["s3://photos/train/cat/", "photos/x.jpg"]},
    "url-list-empty": {"directory": []},
    "labels": {"labels": "folders"},
    "labels-floats": {"labels": [0.5, 1.5]},
    "label-mode": {"label_mode": "sparse"},
    "class-names-without-labels": {"labels": None, "class_names": ["cat"]},
    "color-mode": {"color_mode": "cmyk"},
    "image-size": {"image_size": (32, 32, 3)},
    "image-size-huge": {"image_size": (100_000, 100_000)},
    "interpolation": {"interpolation": "sharpest"},
    "crop-and-pad": {"crop_to_aspect_ratio": True, "pad_to_aspect_ratio": True},
    "batch-size": {"batch_size": 0},
    "dtype": {"dtype": "float16"},
    "decoder": {"decoder": "fastest"},
    "data-format": {"data_format": "channels_middle"},
    "format": {"format": "grain"},
    "split": {"validation_split": 0.2, "subset": "training", "shuffle": True},
    "seed": {"seed": -1},
    "on-error": {"on_error": "ignore"},
    "cache-size-limit": {"cache_size_limit": "lots"},
    "concurrency": {"concurrency": 0},
    "workers": {"workers": 0},
    "shard": {"shard": (3, 2)},
    "storage-options": {"storage_options": "anon"},
}


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_bad_arguments_are_refused_before_any_request(s3: LocalS3, bucket: str, cache_dir: Path, case: str) -> None:
    kwargs = dataset_options(s3, cache_dir) | {"directory": URL} | BAD_ARGUMENTS[case]
    with pytest.raises(ValueError):
        s3cache.image_dataset_from_s3(**kwargs)
    assert s3.requests() == 0 and not cache_dir.exists()


def test_keras_argument_forms_are_accepted(s3: LocalS3, bucket: str, cache_dir: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    options = dataset_options(s3, cache_dir) | {"verbose": True}
    square = s3cache.image_dataset_from_s3(URL, **options | {"image_size": 20, "follow_links": True})
    assert square[0][0].shape == (8, 20, 20, 3)
    subset = s3cache.image_dataset_from_s3(URL, **options | {"class_names": ["rocket", "astronaut"]})
    assert subset.class_names == ["rocket", "astronaut"] and len(subset.file_paths) == 8
    assert all("/rocket/" in path for path in subset.file_paths[:4]) and all(subset.labels == [0] * 4 + [1] * 4)
    unlabeled = s3cache.image_dataset_from_s3(URL, **options | {"label_mode": None})
    assert unlabeled.class_names is None and isinstance(unlabeled[0], np.ndarray)
    first = s3cache.image_dataset_from_s3(URL, **options | {"data_format": "channels_first"})[0][0]
    assert first.shape == (8, 3, 32, 32) and first.flags.c_contiguous
    np.testing.assert_array_equal(first, square_free(s3, cache_dir).transpose(0, 3, 1, 2))
    printed = capsys.readouterr().out.splitlines()
    assert printed[:4] == ["Found 24 files belonging to 6 classes.", "Found 8 files belonging to 2 classes.",
                           "Found 24 files.", "Found 24 files belonging to 6 classes."]


def square_free(s3: LocalS3, cache_dir: Path) -> np.ndarray:
    return s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir))[0][0]


def test_unbatched_yields_single_images(s3: LocalS3, bucket: str, cache_dir: Path) -> None:
    s3.boto3_client().put_object(Bucket="photos", Key="train/cat/broken.jpg", Body=b"not an image")
    ds = s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, batch_size=None, on_error="skip",
                                                              label_mode="categorical"))
    assert len(ds) == 25
    broken = ds.file_paths.index("s3://photos/train/cat/broken.jpg")
    with pytest.warns(UserWarning, match="broken.jpg"):
        elements = list(ds)
    assert len(elements) == 24 and ds.epoch == 1
    image, label = elements[0]
    assert image.shape == (32, 32, 3) and label.shape == (6,) and label.sum() == 1
    with pytest.raises(DecodeError, match="broken.jpg.*skipped"), pytest.warns(UserWarning):
        ds[broken]
    tfds = ds.to_tf_dataset()
    assert tuple(tfds.element_spec[0].shape) == (32, 32, 3) and tfds.class_names == ds.class_names
    with pytest.warns(UserWarning):
        assert len(list(tfds)) == 24
    assert tfds.file_paths == ds.file_paths


def test_a_direct_pass_is_an_epoch(s3: LocalS3, bucket: str, cache_dir: Path) -> None:
    ds = s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, shuffle=True, seed=4, batch_size=5))

    def one_pass() -> list[int]:
        return [int(label) for _, labels in ds for label in labels]

    first, second = one_pass(), one_pass()
    assert ds.epoch == 2 and first != second and sorted(first) == sorted(second)
    assert first == list(ds.labels)  # the first epoch is in file_paths order, as Keras lists them
    for _ in ds:  # a pass left early ...
        break
    third = one_pass()  # ... and the next one is a new epoch all the same
    assert ds.epoch == 4 and third not in (first, second)
    ds[0]  # looked at: the next pass starts a new epoch, and ends it
    assert one_pass() != third and ds.epoch == 6


def test_fit_counts_its_own_epochs(s3: LocalS3, bucket: str, cache_dir: Path) -> None:
    import keras

    ds = s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, shuffle=True, seed=2))
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(len(ds.class_names))])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    # Keras reads batches 0 and 1 to learn the shapes, calls on_epoch_end once before the first epoch
    # (EpochIterator.reset) and once after each: the direct-pass bookkeeping adds no call of its own.
    model.fit(ds, epochs=2, verbose=0)
    assert ds.epoch == 3
    list(ds)
    assert ds.epoch == 4
    model.fit(ds, epochs=1, verbose=0)
    assert ds.epoch == 6
    assert ds.stats["misses"] == 24 and len(object_gets(s3)) == 24


def test_to_tf_dataset_has_class_names_and_file_paths(s3: LocalS3, bucket: str, cache_dir: Path) -> None:
    train, val = s3cache.image_dataset_from_s3(URL, **dataset_options(
        s3, cache_dir, shuffle=True, seed=9, validation_split=0.25, subset="both", format="tf"))
    assert train.class_names == val.class_names and len(train.class_names) == 6
    assert len(train.file_paths) == 18 and len(val.file_paths) == 6
    assert not set(train.file_paths) & set(val.file_paths)
    labels = np.concatenate([y.numpy() for _, y in val])
    folders = [path.removeprefix(URL).split("/")[0] for path in val.file_paths]
    assert [val.class_names[label] for label in labels] == folders  # validation keeps file_paths order
