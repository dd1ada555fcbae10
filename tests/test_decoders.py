"""Decoders: TensorFlow's batches give Keras's own pixels (and NumPy's to within rounding), bad images fail
alone, "auto" picks TensorFlow only where a process runs it, and a fetch decodes arrivals together."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from helpers import all_batches, dataset_options, encode, object_gets, stack_images
from memory_source import MemorySource

import s3cache
from s3cache.config import CacheConfig
from s3cache.decoders import Decoded, NumpyDecoder, TensorFlowDecoder, open_decoder
from s3cache.errors import DecodeError, ImageTooLargeError
from s3cache.loader import Loader
from s3cache.pack import pack
from s3cache.spec import ImageSpec
from s3cache.store import ArrayStore
from s3cache.testing.locals3 import LocalS3
from s3cache.testing.sampledata import make_photos, write_photos
from s3cache.tfkernels import INTERPOLATIONS

tf = pytest.importorskip("tensorflow")

URL = "s3://photos/train/"
SIZE = (24, 32)  # not square: a swapped height and width cannot pass
# Both decoders are Keras's to within float rounding: one level apart on a few values at most (about 1 in
# 20,000 at 128x128; small images with sharp kernels show more).
ROUNDING_SHARE = 0.01


def assert_within_rounding(ours: Sequence[Decoded], reference: Sequence[Decoded]) -> None:
    diffs = []
    for a, b in zip(ours, reference, strict=True):
        assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape and a.dtype == np.uint8
        diffs.append(np.abs(a.astype(int) - b.astype(int)).ravel())
    diff = np.concatenate(diffs)
    assert diff.max() <= 1 and (diff > 0).mean() <= ROUNDING_SHARE


@pytest.fixture(scope="module")
def jpegs() -> list[tuple[str, bytes]]:
    return make_photos(6, seed=31, size_range=(16, 200))


@pytest.mark.parametrize("color_mode", ["rgb", "grayscale"])
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_tensorflow_batches_give_keras_pixels(jpegs: list[tuple[str, bytes]], tmp_path: Path, color_mode: str,
                                              interpolation: str) -> None:
    import keras

    write_photos(tmp_path, jpegs)
    dataset = keras.utils.image_dataset_from_directory(tmp_path, labels=None, shuffle=False, batch_size=None,
                                                       image_size=SIZE, color_mode=color_mode,
                                                       interpolation=interpolation, verbose=False)
    keras_pixels = [np.rint(image).clip(0, 255).astype(np.uint8) for image in dataset.as_numpy_iterator()]
    blobs = [Path(path).read_bytes() for path in dataset.file_paths]
    spec = ImageSpec(SIZE, color_mode, interpolation)
    ours = TensorFlowDecoder(spec).decode_many(blobs, dataset.file_paths)
    for path, array, expected in zip(dataset.file_paths, ours, keras_pixels, strict=True):
        np.testing.assert_array_equal(array, expected, err_msg=path)  # Keras's own calls: equal, not close
    assert_within_rounding(NumpyDecoder(spec).decode_many(blobs, dataset.file_paths), ours)


def test_bad_images_in_a_batch_fail_alone(jpegs: list[tuple[str, bytes]]) -> None:
    spec = ImageSpec((32, 32), max_pixels=250 * 250)
    good = [data for _, data in jpegs]
    huge = encode(np.zeros((300, 300, 3), np.uint8))
    png = encode(np.full((40, 50, 3), 200, np.uint8), "PNG")
    truncated = good[0][: len(good[0]) // 2]  # its header reads: it goes to TensorFlow, whose batch then fails
    blobs = [good[0], truncated, b"not an image", huge, png, *good[1:]]
    urls = [f"s3://b/{i}.jpg" for i in range(len(blobs))]
    results = TensorFlowDecoder(spec).decode_many(blobs, urls)
    expected = NumpyDecoder(spec).decode_many(blobs, urls)
    for url, result, reference in zip(urls, results, expected, strict=True):
        if isinstance(reference, DecodeError):
            assert type(result) is type(reference) and str(result) == str(reference) and url in str(result)
        else:
            assert_within_rounding([result], [reference])
    assert isinstance(results[3], ImageTooLargeError) and isinstance(results[2], DecodeError)


def test_the_graph_is_warmed_up_on_a_thread_before_the_first_batch(jpegs: list[tuple[str, bytes]]) -> None:
    spec = ImageSpec((27, 29))  # a shape no other test uses: a graph of its own
    decoder = TensorFlowDecoder(spec)
    graph = decoder._run_graph
    graph.warm_up.join()
    assert graph.traces == 1  # traced (and run) before any image arrived
    urls = [f"s3://b/{name}" for name, _ in jpegs]
    decoded = decoder.decode_many([data for _, data in jpegs], urls)
    assert graph.traces == 1  # the first real batch reused that trace
    assert_within_rounding(decoded, NumpyDecoder(spec).decode_many([data for _, data in jpegs], urls))


@pytest.mark.parametrize("options", [{"crop_to_aspect_ratio": True}, {"pad_to_aspect_ratio": True},
                                     {"antialias": True}, {"jpeg_draft": True}, {"color_mode": "rgba"}])
def test_tensorflow_is_refused_where_its_pixels_would_differ(options: dict[str, object]) -> None:
    spec = ImageSpec((32, 32), **options)
    with pytest.raises(ValueError, match="decoder='tensorflow' cannot decode"):
        open_decoder(spec, "tensorflow")
    assert open_decoder(spec, "auto").name == "numpy"  # TensorFlow is imported here, but does not apply


def _auto_decoder_name() -> str:
    return open_decoder(ImageSpec((32, 32)), "auto").name


def test_auto_picks_tensorflow_only_where_this_process_imported_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _auto_decoder_name() == "tensorflow"  # this process imported TensorFlow
    with multiprocessing.get_context("fork").Pool(1) as pool:  # a fork inherits the module, not its runtime
        assert pool.apply(_auto_decoder_name) == "numpy"
    env = {name: value for name, value in os.environ.items() if name != "S3CACHE_DECODER"}
    script = ("import sys; from s3cache.decoders import open_decoder; from s3cache.spec import ImageSpec; "
              "print(open_decoder(ImageSpec()).name, 'tensorflow' in sys.modules)")
    fresh = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert fresh.stdout.split() == ["numpy", "False"]  # never imported for decoding
    monkeypatch.setenv("S3CACHE_DECODER", "tensorflow")
    assert open_decoder(ImageSpec()).name == "tensorflow"
    monkeypatch.setenv("S3CACHE_DECODER", "fastest")
    with pytest.raises(ValueError, match="decoder must be one of"):
        CacheConfig.create()


class RecordingDecoder(NumpyDecoder):
    """A NumPy decoder that records the size of each batch it is given, holding the first until released."""

    def __init__(self, spec: ImageSpec) -> None:
        super().__init__(spec)
        self.batches: list[int] = []
        self.release = threading.Event()

    def decode_many(self, blobs: Sequence[bytes], urls: Sequence[str]) -> list[Decoded]:
        assert self.release.wait(10)
        self.batches.append(len(blobs))
        return super().decode_many(blobs, urls)


def test_reads_that_arrive_while_a_batch_decodes_form_one_batch(jpegs: list[tuple[str, bytes]],
                                                               tmp_path: Path) -> None:
    source = MemorySource({("b", f"train/cat/{key}"): data for key, data in jpegs})
    items = source.list_prefix("s3://b/train/")
    spec = ImageSpec((32, 32))
    decoder = RecordingDecoder(spec)
    with ArrayStore(tmp_path / "arrays") as store:
        loader = Loader(spec, store, source, decoder=decoder, ledger=False)
        try:
            loader.prefetch(items)
            deadline = time.monotonic() + 10
            while sum(source.reads.values()) < len(items) and time.monotonic() < deadline:
                time.sleep(0.005)
            decoder.release.set()  # the first arrival's batch was held: the others queued behind it
            arrays = loader.load(items)
        finally:
            loader.close()
    assert sum(decoder.batches) == len(items) and len(decoder.batches) < len(items)
    for item, array in zip(items, arrays, strict=True):
        np.testing.assert_array_equal(array, spec.decode(source.objects[item.bucket, item.key]))


def test_a_tensorflow_decoded_epoch_counts_its_requests(s3: LocalS3, bucket: str, tmp_path: Path) -> None:
    def dataset(url: str, cache: str, decoder: str) -> s3cache.S3ImageDataset:
        return s3cache.image_dataset_from_s3(url, **dataset_options(s3, tmp_path / cache, decoder=decoder,
                                                                    dtype="uint8"))

    loose = dataset(URL, "loose", "tensorflow")
    assert loose.loader.decoder == "tensorflow"
    first = stack_images(all_batches(loose))
    assert len(object_gets(s3)) == 24
    s3.reset_stats()
    np.testing.assert_array_equal(stack_images(all_batches(loose)), first)
    assert object_gets(s3) == []
    assert_within_rounding(list(first), list(stack_images(all_batches(dataset(URL, "numpy", "numpy")))))

    s3.boto3_client().create_bucket(Bucket="shards")
    pack(URL, "s3://shards/set/", shard_size=100_000, storage_options=s3.storage_options)
    s3.reset_stats()
    packed = dataset("s3://shards/set/", "packed", "tensorflow")
    np.testing.assert_array_equal(stack_images(all_batches(packed)), first)  # the same members, the same arrays
    assert 1 < len([path for path in object_gets(s3) if path.endswith(".tar")]) < 24  # per shard, not per image


def test_a_tf_data_pipeline_decodes_through_tensorflow_without_waiting_on_itself(
    s3: LocalS3, bucket: str, cache_dir: Path
) -> None:
    # tf.data calls the dataset from TensorFlow's own threads while the decoder runs TensorFlow graphs.
    ds = s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, format="tf", decoder="tensorflow"))
    assert sum(int(images.shape[0]) for images, _ in ds) == 24
    assert len(object_gets(s3)) == 24
