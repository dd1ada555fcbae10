"""``s3cache demo``: train a small CNN through the cache, then once more with S3 out of reach.

With nothing configured, the demo starts an embedded S3 endpoint on 127.0.0.1, uploads real photos
(cut from the images bundled with scikit-image) and uses a temporary cache. Every epoch reports its
time, throughput, cache hits and S3 requests; the first epoch fills the cache, later ones read it.
Then the endpoint is stopped and one more pass runs with ``offline=True``.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from s3cache.dataset import S3ImageDataset
    from s3cache.testing.locals3 import LocalS3

DEMO_BUCKET = "s3cache-demo"
DEMO_PREFIX = "photos/"
# A modest first-byte latency, so the embedded endpoint behaves a little like a remote one.
DEMO_LATENCY_MS = 20.0


@dataclass(frozen=True)
class EpochReport:
    """One pass over the dataset.

    Attributes:
        name: ``"epoch 1/3"``, ..., or ``"offline"``.
        seconds: Wall time of the pass.
        images: Images in the dataset.
        hits: Arrays read from the cache; more than ``images`` when Keras first reads a
            couple of batches to learn the input shapes.
        s3_requests: S3 requests made by the dataset (retries included).
        server_requests: S3 requests the embedded endpoint received; ``None`` for other storage.
        loss: The model's loss over the pass.
        accuracy: The model's accuracy over the pass.
    """

    name: str
    seconds: float
    images: int
    hits: int
    s3_requests: int
    server_requests: int | None
    loss: float
    accuracy: float

    @property
    def images_per_second(self) -> float:
        """Throughput of the pass."""
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        """A one-line summary for the console."""
        server = "" if self.server_requests is None else f" (endpoint received {self.server_requests})"
        return (f"{self.name}: {self.seconds:.1f} s, {self.images_per_second:.0f} images/s, "
                f"cache hits {self.hits}, S3 requests {self.s3_requests}{server}, "
                f"loss {self.loss:.3f}, accuracy {self.accuracy:.2f}")


@dataclass(frozen=True)
class DemoReport:
    """What :func:`run_demo` measured.

    Attributes:
        url: The prefix trained on.
        cache_dir: The cache used (already deleted if it was temporary).
        epochs: One report per training epoch.
        offline: The pass run with ``offline=True`` after training.
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
        cache_dir: Cache directory; default: a temporary one, deleted afterwards.
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
        keras.utils.set_random_seed(0)
        model = _build_model(keras, train.spec.shape, train.num_classes)
        reports = _train(keras, model, train, server, epochs, out)
        if server is not None:
            server.stop()
        out(("stopped the S3 endpoint; " if server is not None else "") + "one more pass with offline=True:")
        offline = image_dataset_from_s3(url, shuffle=False, offline=True, **options)
        stack.callback(offline.close)
        offline_report = _evaluate_offline(model, offline, out)
    return DemoReport(url, str(cache_dir), reports, offline_report, time.perf_counter() - started)


def _import_keras() -> Any:
    # Only the demo needs Keras; TensorFlow's start-up chatter stays quiet unless the user chose otherwise.
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    return keras


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


class _Meter:
    """Time and counters of a dataset (and of the embedded endpoint) since the last lap."""

    def __init__(self, ds: S3ImageDataset, server: LocalS3 | None) -> None:
        self.ds, self.server = ds, server
        self._restart()

    def _restart(self) -> None:
        if self.server is not None:
            self.server.reset_stats()
        self.stats, self.start = self.ds.stats, time.perf_counter()

    def lap(self, name: str, logs: dict[str, Any]) -> EpochReport:
        seconds = time.perf_counter() - self.start
        stats = self.ds.stats
        report = EpochReport(name, seconds, len(self.ds.items), stats["hits"] - self.stats["hits"],
                             stats["s3_requests"] - self.stats["s3_requests"],
                             None if self.server is None else self.server.requests(),
                             float(logs["loss"]), float(logs["accuracy"]))
        self._restart()
        return report


def _train(keras: Any, model: Any, ds: S3ImageDataset, server: LocalS3 | None, epochs: int,
           out: Callable[[str], None]) -> list[EpochReport]:
    """One ``fit`` call (Keras calls the dataset's ``on_epoch_end`` itself), measured per epoch.

    The first epoch's numbers include what Keras does before it: reading two batches to learn the
    input shapes (read again from the cache during the epoch) and tracing the model.
    """
    reports: list[EpochReport] = []
    meter = _Meter(ds, server)

    def lap(epoch: int, logs: dict[str, Any]) -> None:
        reports.append(meter.lap(f"epoch {epoch + 1}/{epochs}", logs))
        out(reports[-1].describe())

    model.fit(ds, epochs=epochs, verbose=0, callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=lap)])
    return reports


def _evaluate_offline(model: Any, ds: S3ImageDataset, out: Callable[[str], None]) -> EpochReport:
    meter = _Meter(ds, None)
    report = meter.lap("offline", model.evaluate(ds, verbose=0, return_dict=True))
    out(report.describe())
    return report
