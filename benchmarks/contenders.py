"""The contenders of ``compare.py``, one per process so each starts with fresh memory and TensorFlow state.

``compare.py`` runs them; to run one by hand against a workload it wrote::

    python benchmarks/contenders.py --contender s3cache --workload WORKLOAD.json --result OUT.json

Every reading contender delivers float32 batches of ``(batch, height, width, 3)`` images (the capacity
limits only GET the bytes) and times ``workload.epochs`` passes; heavy libraries are imported inside each
contender so that the others' memory figures do not include them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from harness import (
    RECENCY_SETTINGS,
    Epoch,
    Run,
    Workload,
    batches,
    collect_setup_garbage,
    median_epoch,
    recency,
    repeated_passes,
    stamp_recency,
    timed_epoch,
    timed_epochs,
)

# Requests in flight for every concurrent contender: s3cache's default, so all get the same budget.
CONCURRENCY = 32
# Connection pools twice that, as s3cache sizes its own: the endpoint closes every connection after one
# response, and closing ones still count against the pool for a moment, so a pool of exactly 32 would
# hold fewer than 32 requests in flight.
POOL = 2 * CONCURRENCY
LRU_LABELS = {"off": "s3cache warm, LRU recency off",
              "fresh": "s3cache warm, LRU on, entries used just now",
              "stale": "s3cache warm, LRU on, entries used an hour ago"}


# -- helpers -----------------------------------------------------------------------------------------


def _boto3_client(workload: Workload) -> Any:
    import boto3
    from botocore.config import Config

    options = workload.storage_options
    return boto3.session.Session().client(
        "s3", endpoint_url=options["endpoint_url"], aws_access_key_id=options["key"],
        aws_secret_access_key=options["secret"], config=Config(max_pool_connections=POOL),
        **options.get("client_kwargs", {}),
    )


def _list_keys(client: Any, workload: Workload) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=workload.bucket, Prefix=workload.prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def _labels(keys: list[str], prefix: str) -> np.ndarray:
    """Class index of each key, from its first folder under the prefix (as Keras infers labels)."""
    folders = [key[len(prefix):].split("/", 1)[0] for key in keys]
    names = sorted(set(folders))
    return np.array([names.index(f) for f in folders], dtype="int32")


def _order(count: int, epoch: int) -> np.ndarray:
    """A fresh shuffle per epoch, the same for every contender."""
    return np.random.default_rng([0, epoch]).permutation(count)


def _pillow_array(data: bytes, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        resized = image.convert("RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def _count_tf_epoch(dataset: Any) -> int:
    return sum(int(images.shape[0]) for images, _ in dataset)


# -- 1. the seed recipe ------------------------------------------------------------------------------


def seed_recipe(workload: Workload) -> list[Run]:
    """Sequential boto3 GET, ``keras.utils.load_img`` with resize, ``img_to_array``; no cache."""
    import keras

    client = _boto3_client(workload)
    keys = _list_keys(client, workload)
    # A random subset, so every class is represented; the same one in every epoch.
    subset = [keys[i] for i in np.random.default_rng(1).permutation(len(keys))[:workload.seed_images]]

    def run_epoch(epoch: int) -> int:
        delivered = 0
        for batch in batches([subset[i] for i in _order(len(subset), epoch)], workload.batch_size):
            arrays = []
            for key in batch:
                data = client.get_object(Bucket=workload.bucket, Key=key)["Body"].read()
                image = keras.utils.load_img(io.BytesIO(data), target_size=workload.image_size,
                                             interpolation="bilinear")
                arrays.append(keras.utils.img_to_array(image, dtype="float32"))
            delivered += len(np.stack(arrays))
        return delivered

    note = "" if len(subset) == len(keys) else f"rate measured on {len(subset)} of {len(keys)} images"
    return [Run("seed", "seed recipe: boto3 GET + load_img, sequential", timed_epochs(workload, run_epoch),
                note=note)]


# -- 2. Keras on the local copy -------------------------------------------------------------------------


def keras_local(workload: Workload) -> list[Run]:
    """``keras.utils.image_dataset_from_directory`` on the local copy (no S3 at all)."""
    import keras

    dataset = keras.utils.image_dataset_from_directory(
        workload.local_dir, image_size=workload.image_size, batch_size=workload.batch_size, shuffle=True, seed=0,
        verbose=False,
    )
    epochs = timed_epochs(workload, lambda _: _count_tf_epoch(dataset))
    return [Run("keras-local", "keras image_dataset_from_directory, local disk", epochs)]


# -- 3. tf.data --------------------------------------------------------------------------------------


def tf_data(workload: Workload) -> list[Run]:
    """S3 GET in a parallel ``map`` (``tf.py_function``), decode, resize, ``cache(filename)``, prefetch."""
    import tensorflow as tf

    client = _boto3_client(workload)
    keys = _list_keys(client, workload)
    order = _order(len(keys), 0)
    keys_in_order = [keys[i] for i in order]
    labels = _labels(keys, workload.prefix)[order]

    def fetch(key: Any) -> bytes:
        return client.get_object(Bucket=workload.bucket, Key=key.numpy().decode())["Body"].read()

    def load(key: Any, label: Any) -> tuple[Any, Any]:
        data = tf.py_function(fetch, [key], tf.string)
        image = tf.image.resize(tf.io.decode_jpeg(data, channels=3), workload.image_size)
        image.set_shape((*workload.image_size, 3))
        return image, label

    dataset = (
        tf.data.Dataset.from_tensor_slices((keys_in_order, labels))
        .map(load, num_parallel_calls=CONCURRENCY)
        .cache(str(workload.scratch("tfdata") / "cache"))
        .batch(workload.batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
    # A parallel map runs on a pool sized to the CPU count (2 threads here), too few for blocking GETs.
    options = tf.data.Options()
    options.threading.private_threadpool_size = CONCURRENCY
    dataset = dataset.with_options(options)
    epochs = timed_epochs(workload, lambda _: _count_tf_epoch(dataset), ["1 (fill)", "2 (cached)"])
    return [Run("tfdata", f"tf.data: py_function GET x{CONCURRENCY} + cache(file)", epochs)]


# -- 4. fsspec ----------------------------------------------------------------------------------------


def fsspec_simplecache(workload: Workload) -> list[Run]:
    """``simplecache::s3`` whole-file cache (one concurrent ``cat`` per batch) + Pillow decode every epoch."""
    import fsspec

    fs = fsspec.filesystem("simplecache", target_protocol="s3", target_options=workload.storage_options,
                           cache_storage=str(workload.scratch("fsspec")))
    paths = sorted(fs.find(f"{workload.bucket}/{workload.prefix}"))

    def run_epoch(epoch: int) -> int:
        delivered = 0
        for batch in batches([paths[i] for i in _order(len(paths), epoch)], workload.batch_size):
            blobs = fs.cat(batch)
            delivered += len(np.stack([_pillow_array(blobs[p], workload.image_size) for p in batch]))
        return delivered

    epochs = timed_epochs(workload, run_epoch, ["1 (fill)", "2 (cached)"])
    return [Run("fsspec", "fsspec simplecache::s3 + Pillow decode", epochs)]


# -- 5. s3cache -----------------------------------------------------------------------------------------


# A Keras training script on the TensorFlow backend has imported TensorFlow, so decoder="auto" decodes with it
# there; a process training with JAX or PyTorch (or a Keras worker process) decodes with NumPy. Both are timed.
DECODER_LABELS = {"tensorflow": "TensorFlow decoder (auto in a TensorFlow process)",
                  "numpy": "NumPy decoder (auto elsewhere)"}


def _s3cache_dataset(workload: Workload, offline: bool, decoder: str = "tensorflow", cache: str = "") -> Any:
    from s3cache import image_dataset_from_s3

    return image_dataset_from_s3(
        workload.url, image_size=workload.image_size, batch_size=workload.batch_size, shuffle=True, seed=0,
        cache_dir=workload.scratch(cache) if cache else workload.cache_dir, offline=offline,
        storage_options=None if offline else workload.storage_options, verbose=False, decoder=decoder,
    )


def _s3cache_epoch(dataset: Any) -> int:
    """One pass as Keras makes it with ``workers=1``: the epoch hooks around every batch in order."""
    dataset.on_epoch_begin()
    delivered = 0
    for index in range(len(dataset)):
        images, _ = dataset[index]
        delivered += len(images)
    dataset.on_epoch_end()
    return delivered


def s3cache_online(workload: Workload) -> list[Run]:
    """``image_dataset_from_s3`` on an empty cache: epoch 1 fills it (cold), epoch 2 reads it (warm)."""
    return _s3cache_online(workload, "s3cache", "tensorflow")


def s3cache_online_numpy(workload: Workload) -> list[Run]:
    """As :func:`s3cache_online`, decoding with NumPy, into a cache of its own."""
    return _s3cache_online(workload, "s3cache-numpy", "numpy", cache="numpy-cache")


def _s3cache_online(workload: Workload, name: str, decoder: str, cache: str = "") -> list[Run]:
    """Epoch 1 cold, epoch 2 warm, then more warm passes (:func:`~harness.repeated_passes`), as their median."""
    dataset = _s3cache_dataset(workload, offline=False, decoder=decoder, cache=cache)
    try:
        epochs = timed_epochs(workload, lambda _: _s3cache_epoch(dataset), ["1 (cold)", "2 (warm)"])
        warm, rates = repeated_passes(workload, lambda _: _s3cache_epoch(dataset), len(epochs))
    finally:
        dataset.close()
    return [Run(name, f"s3cache image_dataset_from_s3, {DECODER_LABELS[decoder]}", [*epochs, warm],
                extra={"stats": dataset.stats, "decoder": decoder, "warm_passes": rates})]


def s3cache_offline(workload: Workload) -> list[Run]:
    """A new process reading the filled cache with ``offline=True`` (stored listing, no S3 client)."""
    dataset = _s3cache_dataset(workload, offline=True)
    try:
        epochs = timed_epochs(workload, lambda _: _s3cache_epoch(dataset))
    finally:
        dataset.close()
    return [Run("s3cache-offline", "s3cache offline rerun (new process)", epochs)]


def s3cache_lru(workload: Workload) -> list[Run]:
    """Warm passes with LRU recency off, on over fresh entries and on over stale ones, each as its median."""
    dataset = _s3cache_dataset(workload, offline=True)
    rounds: dict[str, list[Epoch]] = {setting: [] for setting in RECENCY_SETTINGS}
    try:
        _s3cache_epoch(dataset)  # untimed: opens the store and settles the page cache
        for number in range(workload.lru_rounds):
            # Alternate the order of the settings, so drift over the run hits all alike.
            for setting in RECENCY_SETTINGS if number % 2 == 0 else RECENCY_SETTINGS[::-1]:
                stamp_recency(workload.cache_dir, setting)
                with recency(setting):
                    epoch = timed_epoch(str(number + 1), workload, lambda: _s3cache_epoch(dataset))
                rounds[setting].append(epoch)
    finally:
        dataset.close()
    return [_median_run(f"s3cache-lru-{setting}", LRU_LABELS[setting], epochs) for setting, epochs in rounds.items()]


PACKED_SHARD_SIZE = "16MB"


def s3cache_packed(workload: Workload) -> list[Run]:
    """The photos packed into 16 MB tar shards (``s3cache.pack``, timed apart), then read cold and warm."""
    packing = _pack(workload)
    run = _s3cache_packed(workload, "s3cache-packed", "tensorflow")
    run.extra["packing"] = packing
    return [run]


def s3cache_packed_numpy(workload: Workload) -> list[Run]:
    """As :func:`s3cache_packed`, decoding with NumPy, into a cache of its own (the shards are packed already)."""
    _pack(workload)
    return [_s3cache_packed(workload, "s3cache-packed-numpy", "numpy")]


def _pack(workload: Workload) -> dict[str, Any]:
    """Pack the photos (or find them packed), timed."""
    import resource

    from s3cache.pack import pack

    collect_setup_garbage()
    started, cpu = time.perf_counter(), time.process_time()
    report = pack(workload.url, workload.packed_url, shard_size=PACKED_SHARD_SIZE,
                  storage_options=workload.storage_options)
    pack_seconds, pack_cpu = time.perf_counter() - started, time.process_time() - cpu
    packing = {"images": report.members, "shards": report.shards, "seconds": pack_seconds,
               "images_per_s": report.members / pack_seconds,
               "cpu_ms_per_image": pack_cpu / report.members * 1e3,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    return packing


def _s3cache_packed(workload: Workload, name: str, decoder: str) -> Run:
    from s3cache import image_dataset_from_s3

    dataset = image_dataset_from_s3(
        workload.packed_url, image_size=workload.image_size, batch_size=workload.batch_size, shuffle=True,
        seed=0, cache_dir=workload.scratch(f"{name}-cache"), storage_options=workload.storage_options,
        verbose=False, decoder=decoder,
    )
    try:
        epochs = timed_epochs(workload, lambda _: _s3cache_epoch(dataset), ["1 (cold)", "2 (warm)"])
    finally:
        dataset.close()
    return Run(name, f"s3cache on tar shards (16 MB, packed by s3cache pack), {DECODER_LABELS[decoder]}", epochs,
               extra={"stats": dataset.stats, "decoder": decoder})


def _median_run(name: str, label: str, epochs: list[Epoch]) -> Run:
    summary = median_epoch("passes", epochs)
    spread = {"images_per_s": [e.images_per_s for e in epochs],
              "stdev_images_per_s": statistics.stdev([e.images_per_s for e in epochs]) if len(epochs) > 1 else 0.0}
    return Run(name, label, [summary], extra=spread)


# -- 6. the limits --------------------------------------------------------------------------------------


def raw_limit(workload: Workload) -> list[Run]:
    """The same resized arrays as raw files in the page cache: ``os.read`` + ``np.frombuffer`` into each batch.

    The tightest Python read of the arrays: one open/read/close per file into a ``uint8`` batch, then one
    float32 conversion per batch (``np.fromfile`` per image into float32 is about half as fast).
    """
    from s3cache.spec import ImageSpec

    spec = ImageSpec(workload.image_size)
    folder = workload.scratch("raw")
    paths = []
    for number, source in enumerate(sorted(Path(workload.local_dir).rglob("*.jpg"))):
        path = folder / f"{number:06d}.u8"
        spec.decode(source.read_bytes()).tofile(path)
        paths.append(path)
    for path in paths:  # untimed: make sure every file is in the page cache
        path.read_bytes()

    size = int(np.prod(spec.shape))

    def run_epoch(epoch: int) -> int:
        delivered = 0
        for batch in batches([paths[i] for i in _order(len(paths), epoch)], workload.batch_size):
            raw = np.empty((len(batch), *spec.shape), dtype=np.uint8)
            for slot, path in enumerate(batch):
                fd = os.open(path, os.O_RDONLY)
                try:
                    raw[slot] = np.frombuffer(os.read(fd, size), dtype=np.uint8).reshape(spec.shape)
                finally:
                    os.close(fd)
            delivered += len(raw.astype(np.float32))
        return delivered

    epochs = timed_epochs(workload, run_epoch)
    repeated, rates = repeated_passes(workload, run_epoch, len(epochs))
    return [Run("raw", "limit: os.read + np.frombuffer of resized arrays, page cache", [*epochs, repeated],
                extra={"warm_passes": rates})]


def capacity_boto3(workload: Workload) -> list[Run]:
    """The endpoint's capacity as a bare loop of boto3 GETs on a thread pool (bytes read, nothing decoded)."""
    client = _boto3_client(workload)
    keys = _list_keys(client, workload)

    def get(key: str) -> int:
        return len(client.get_object(Bucket=workload.bucket, Key=key)["Body"].read())

    def run_epoch(epoch: int) -> int:
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            return sum(1 for _ in pool.map(get, [keys[i] for i in _order(len(keys), epoch)]))

    return [Run("capacity-boto3", f"limit: endpoint capacity, boto3 GET x{CONCURRENCY} threads",
                timed_epochs(workload, run_epoch))]


def capacity_aiobotocore(workload: Workload) -> list[Run]:
    """The endpoint's capacity as an ``asyncio.gather`` of aiobotocore GETs (s3cache's client stack)."""
    keys = _list_keys(_boto3_client(workload), workload)
    loop = asyncio.new_event_loop()
    clients = contextlib.AsyncExitStack()
    try:
        # One client for both epochs, opened outside the timed passes.
        client = loop.run_until_complete(clients.enter_async_context(_aio_client(workload)))
        epochs = timed_epochs(workload, lambda epoch: loop.run_until_complete(
            _gather_gets(client, workload.bucket, [keys[i] for i in _order(len(keys), epoch)])))
    finally:
        loop.run_until_complete(clients.aclose())
        loop.close()
    return [Run("capacity-aio", f"limit: endpoint capacity, aiobotocore GET x{CONCURRENCY} in flight", epochs)]


def _aio_client(workload: Workload) -> Any:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    options = workload.storage_options
    return get_session().create_client(
        "s3", endpoint_url=options["endpoint_url"], aws_access_key_id=options["key"],
        aws_secret_access_key=options["secret"], config=AioConfig(max_pool_connections=POOL),
        **options.get("client_kwargs", {}),
    )


async def _gather_gets(client: Any, bucket: str, keys: list[str]) -> int:
    limit = asyncio.Semaphore(CONCURRENCY)

    async def get(key: str) -> int:
        async with limit:
            response = await client.get_object(Bucket=bucket, Key=key)
            async with response["Body"] as body:
                return len(await body.read())

    return len(await asyncio.gather(*(get(key) for key in keys)))


CONTENDERS: dict[str, Callable[[Workload], list[Run]]] = {
    "capacity-boto3": capacity_boto3,
    "capacity-aio": capacity_aiobotocore,
    "seed": seed_recipe,
    "keras-local": keras_local,
    "tfdata": tf_data,
    "fsspec": fsspec_simplecache,
    "s3cache": s3cache_online,
    "s3cache-numpy": s3cache_online_numpy,
    "s3cache-offline": s3cache_offline,
    "s3cache-lru": s3cache_lru,
    "s3cache-packed": s3cache_packed,
    "s3cache-packed-numpy": s3cache_packed_numpy,
    "raw": raw_limit,
}


def main(argv: list[str] | None = None) -> None:
    """Run one contender and write its runs as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contender", required=True, choices=sorted(CONTENDERS))
    parser.add_argument("--workload", required=True, type=Path, help="JSON written by compare.py")
    parser.add_argument("--result", required=True, type=Path, help="where to write the runs (JSON)")
    args = parser.parse_args(argv)
    if os.environ.get("KERAS_BACKEND") != "tensorflow":
        raise SystemExit("run with KERAS_BACKEND=tensorflow (compare.py sets it)")
    runs = CONTENDERS[args.contender](Workload.load(args.workload))
    args.result.write_text(json.dumps([run.to_json() for run in runs]))


if __name__ == "__main__":
    main()
