"""``s3cache demo``: a small CNN trained through the cache, then a pass with S3 out of reach.

With nothing configured, the demo starts an embedded S3 endpoint on 127.0.0.1, uploads real photos
(cut from the images bundled with scikit-image) and uses a temporary cache (``--cache-dir`` or
``$S3CACHE_DIR`` to keep one). Every epoch first makes one pass over the dataset alone, which
measures the data pipeline (loading only: images/s, cache hits and misses, S3 requests), then
trains the model one epoch (read from the cache, timed apart). The first epoch's pass fills the
cache, later ones read it. Then the endpoint is stopped and one more pass runs with ``offline=True``,
followed by an evaluation of the model on it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from s3cache.config import default_cache_dir

if TYPE_CHECKING:
    from s3cache.dataset import S3ImageDataset
    from s3cache.testing.locals3 import LocalS3

DEMO_BUCKET = "s3cache-demo"
DEMO_PREFIX = "photos/"
# A modest first-byte latency, so the embedded endpoint behaves a little like a remote one.
DEMO_LATENCY_MS = 20.0


@dataclass(frozen=True)
class EpochReport:
    """One epoch: a pass of the data pipeline alone, then the model's epoch (or evaluation).

    Attributes:
        name: ``"epoch 1/3"``, ..., or ``"offline"``.
        images: Images in the pass.
        seconds: Wall time of the loading pass alone (no model).
        hits: Arrays the pass read from the cache.
        misses: Arrays the pass fetched from S3 (``hits + misses == images``).
        s3_requests: S3 requests the pass made (one per miss, plus retries).
        server_requests: S3 requests the embedded endpoint received during the pass; ``None``
            for other storage.
        model_seconds: Wall time of the training epoch (for ``"offline"``: of the evaluation).
        loss: The model's loss over that epoch (or evaluation).
        accuracy: The model's accuracy over that epoch (or evaluation).
    """

    name: str
    images: int
    seconds: float
    hits: int
    misses: int
    s3_requests: int
    server_requests: int | None
    model_seconds: float
    loss: float
    accuracy: float

    @property
    def images_per_second(self) -> float:
        """Throughput of the data pipeline alone."""
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        """A one-line summary for the console."""
        server = "" if self.server_requests is None else f" (endpoint received {self.server_requests})"
        model = "evaluated" if self.name == "offline" else "trained"
        return (f"{self.name}: loaded {self.images} images in {self.seconds:.1f} s "
                f"({self.images_per_second:.0f} images/s): {self.hits} cache hits + {self.misses} misses, "
                f"S3 requests {self.s3_requests}{server}; {model} in {self.model_seconds:.1f} s: "
                f"loss {self.loss:.3f}, accuracy {self.accuracy:.2f}")


@dataclass(frozen=True)
class DemoReport:
    """What :func:`run_demo` measured.

    Attributes:
        url: The prefix trained on.
        cache_dir: The cache used (already deleted if it was temporary).
        epochs: One report per training epoch.
        offline: The pass run with ``offline=True`` after training, and the evaluation on it.
        seconds: Wall time of the whole demo.
    """

    url: str
    cache_dir: str
    epochs: list[EpochReport]
    offline: EpochReport
    seconds: float


def run_demo(
    *,
    images: int = 300,
    epochs: int = 3,
    image_size: Sequence[int] = (96, 96),
    batch_size: int = 32,
    url: str | None = None,
    storage_options: dict[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    out: Callable[[str], None] = print,
) -> DemoReport:
    """Train a small CNN through the cache for a few epochs, then make one pass offline.

    Args:
        images: Photos uploaded to the embedded endpoint (ignored with ``url``).
        epochs: Training epochs.
        image_size: ``(height, width)`` of the arrays.
        batch_size: Images per batch.
        url: Your own ``s3://`` prefix with one folder per class; default: the embedded endpoint.
        storage_options: Options for ``s3fs.S3FileSystem`` to reach ``url``.
        cache_dir: Cache directory; default ``$S3CACHE_DIR`` if set, else a temporary one, deleted afterwards.
        out: Where progress lines go.

    Returns:
        A :class:`DemoReport`.

    Raises:
        S3CacheError: S3 could not be read.
        ValueError: Inconsistent arguments.
    """
    if images < 1 or epochs < 1 or batch_size < 1:
        raise ValueError("images, epochs and batch size must be at least 1")
    if storage_options and url is None:
        raise ValueError("S3 options (endpoint, profile, anon) need --url; the embedded endpoint needs none")
    if cache_dir is None and os.environ.get("S3CACHE_DIR"):
        cache_dir = default_cache_dir()
    started = time.perf_counter()
    keras = _import_keras()
    from s3cache.api import image_dataset_from_s3

    with ExitStack() as stack:
        server = None
        if url is None:
            server = _start_embedded_s3(stack, images, out)
            url, storage_options = f"s3://{DEMO_BUCKET}/{DEMO_PREFIX}", server.storage_options
        if cache_dir is None:
            cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="s3cache-demo-"))
        options: dict[str, Any] = {"image_size": tuple(image_size), "batch_size": batch_size,
                                   "cache_dir": cache_dir, "storage_options": storage_options, "verbose": False}
        train = image_dataset_from_s3(url, seed=0, **options)
        stack.callback(train.close)
        if not train.num_classes:
            raise ValueError(f"{url} has no class folders to learn (expected <prefix>/<class>/<image>)")
        out(f"training on {len(train.items)} images in {train.num_classes} classes from {url}, cache in {cache_dir}")
        out("each epoch: one pass of the data pipeline alone (loading only), then one training epoch")
        keras.utils.set_random_seed(0)
        model = _build_model(keras, train.image_shape, train.num_classes)
        reports = []
        for epoch in range(epochs):
            loading = _loading_pass(train, server)
            began = time.perf_counter()
            logs = model.fit(train, epochs=1, verbose=0).history
            reports.append(loading(f"epoch {epoch + 1}/{epochs}", time.perf_counter() - began,
                                   logs["loss"][-1], logs["accuracy"][-1]))
            out(reports[-1].describe())
        if server is not None:
            server.stop()
        out(("stopped the S3 endpoint; " if server is not None else "") + "one more pass with offline=True:")
        offline = image_dataset_from_s3(url, shuffle=False, offline=True, **options)
        stack.callback(offline.close)
        loading = _loading_pass(offline, None)
        began = time.perf_counter()
        logs = model.evaluate(offline, verbose=0, return_dict=True)
        offline_report = loading("offline", time.perf_counter() - began, logs["loss"], logs["accuracy"])
        out(offline_report.describe())
    return DemoReport(url, str(cache_dir), reports, offline_report, time.perf_counter() - started)


def _loading_pass(ds: S3ImageDataset, server: LocalS3 | None) -> Callable[[str, float, float, float], EpochReport]:
    """Make one pass over the dataset alone (an epoch of it), timed; returns a maker of its report."""
    if server is not None:
        server.reset_stats()
    before = ds.stats
    began = time.perf_counter()
    for _ in ds:
        pass
    seconds = time.perf_counter() - began
    after = ds.stats
    server_requests = None if server is None else server.requests()

    def report(name: str, model_seconds: float, loss: float, accuracy: float) -> EpochReport:
        return EpochReport(name, len(ds.items), seconds, after["hits"] - before["hits"],
                           after["misses"] - before["misses"], after["s3_requests"] - before["s3_requests"],
                           server_requests, model_seconds, float(loss), float(accuracy))

    return report


def _import_keras() -> Any:
    """Import Keras (and TensorFlow) without their start-up chatter, unless the user asked for it.

    ``TF_CPP_MIN_LOG_LEVEL=3`` keeps TensorFlow's C++ logs quiet (a CPU-only machine's ``cuInit``
    error included). The lines absl writes before its logging is initialized ignore that setting,
    so the import and device discovery run with the process's stderr captured; it is replayed
    if the import fails.
    """
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with _captured_stderr() as captured:
        try:
            import keras

            if keras.backend.backend() == "tensorflow":
                import tensorflow as tf

                tf.config.list_physical_devices()
        except BaseException:
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
    logging.getLogger("absl").setLevel(logging.ERROR)
    return keras


@contextlib.contextmanager
def _captured_stderr() -> Iterator[Any]:
    """Send file descriptor 2 to a temporary file for the duration (C++ libraries write there directly)."""
    with tempfile.TemporaryFile() as captured:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):  # no usable descriptor 2: nothing to capture
            yield captured
            return
        os.dup2(captured.fileno(), 2)
        try:
            yield captured
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _start_embedded_s3(stack: ExitStack, images: int, out: Callable[[str], None]) -> LocalS3:
    from s3cache.testing.locals3 import LocalS3
    from s3cache.testing.sampledata import make_photos, upload_photos

    server = stack.enter_context(LocalS3(latency_ms=DEMO_LATENCY_MS))
    photos = make_photos(images)
    upload_photos(server.storage_options, DEMO_BUCKET, DEMO_PREFIX, photos)
    size = sum(len(data) for _, data in photos) / 1e6
    out(f"embedded S3 at {server.endpoint_url} ({DEMO_LATENCY_MS:.0f} ms latency per request): "
        f"uploaded {len(photos)} photos ({size:.1f} MB) to s3://{DEMO_BUCKET}/{DEMO_PREFIX}")
    server.reset_stats()
    return server


def _build_model(keras: Any, shape: tuple[int, int, int], classes: int) -> Any:
    model = keras.Sequential([
        keras.Input(shape),
        keras.layers.Rescaling(1 / 255),
        keras.layers.Conv2D(16, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(classes, activation="softmax"),
    ])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model
