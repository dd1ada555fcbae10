"""Decoding many images at once: with TensorFlow's own ops where a process already runs them, else with NumPy.

:meth:`ImageSpec.decode <s3cache.spec.ImageSpec.decode>` reproduces Keras's loader (TensorFlow's JPEG
decoding and ``tf.image.resize``) with Pillow and NumPy. :class:`TensorFlowDecoder` runs Keras's own
calls, in one TensorFlow graph per batch, on the JPEGs for which the two agree (see
:meth:`~s3cache.jpeglayout.JpegLayout.decodes_as_tensorflow`, read from each header), and every other
image through ``ImageSpec.decode``. The arrays are the same, but for float rounding: one level apart on
about one pixel in 20,000 (both are Keras's to within rounding), so entries from either share the cache.
The decoder changes the speed: a batch of 64 photos resized to 128x128 costs about 0.45 ms of CPU per
image through TensorFlow, spread over every core, against 1.7-2.1 ms through NumPy, whose short steps
mostly hold the GIL.

``decoder="auto"`` (the default, unless ``$S3CACHE_DECODER`` names another) uses TensorFlow only in a
process that has imported it already (a Keras training script on the TensorFlow backend) and that is
not a ``multiprocessing`` child, since TensorFlow's runtime does not survive a fork. Importing
TensorFlow costs seconds and, on a machine with GPUs, may claim their memory: a process training with
JAX or PyTorch must not pay that for decoding.
"""

from __future__ import annotations

import functools
import io
import logging
import multiprocessing
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from PIL import Image

from s3cache.errors import DecodeError
from s3cache.jpeglayout import JpegLayout, layout_of, read_layout
from s3cache.spec import FORMATS, ImageSpec

DECODERS = ("auto", "numpy", "tensorflow")
DECODER_ENV = "S3CACHE_DECODER"
"""The environment variable naming the decoder where none is passed (``"auto"`` when unset)."""

Decoded = np.ndarray | DecodeError
"""One image's outcome: its ``uint8`` array, or why it cannot be decoded."""

log = logging.getLogger(__name__)


class Decoder(Protocol):
    """Turns encoded images into arrays of one :class:`~s3cache.spec.ImageSpec`."""

    name: str
    """``"numpy"`` or ``"tensorflow"``."""

    def decode_many(self, blobs: Sequence[bytes], urls: Sequence[str]) -> list[Decoded]:
        """Decode each image; a failure is returned in its place (a :class:`DecodeError` naming its URL)."""
        ...


class NumpyDecoder:
    """Decodes each image with :meth:`ImageSpec.decode <s3cache.spec.ImageSpec.decode>` (Pillow and NumPy)."""

    name = "numpy"

    def __init__(self, spec: ImageSpec) -> None:
        self.spec = spec

    def decode_many(self, blobs: Sequence[bytes], urls: Sequence[str]) -> list[Decoded]:
        """See :meth:`Decoder.decode_many`."""
        return [_decode_one(self.spec, blob, url) for blob, url in zip(blobs, urls, strict=True)]


class TensorFlowDecoder:
    """Decodes JPEGs in batches with Keras's TensorFlow calls, and other images with ``ImageSpec.decode``.

    Args:
        spec: A spec :func:`tensorflow_applies` to.

    Raises:
        ValueError: TensorFlow does not give this spec's pixels (crop, pad, antialias, draft or RGBA).
        ImportError: TensorFlow is not installed.
    """

    name = "tensorflow"

    def __init__(self, spec: ImageSpec) -> None:
        if not tensorflow_applies(spec):
            raise ValueError(f"decoder='tensorflow' cannot decode {spec}: use decoder='numpy' or 'auto'")
        self.spec = spec
        self._numpy = NumpyDecoder(spec)
        self._run_graph = _jpeg_graph(spec.image_size, spec.channels, spec.interpolation)

    def decode_many(self, blobs: Sequence[bytes], urls: Sequence[str]) -> list[Decoded]:
        """See :meth:`Decoder.decode_many`."""
        results: list[Decoded | None] = [None] * len(blobs)
        jpegs = [i for i, blob in enumerate(blobs) if self._takes(blob)]
        if jpegs:
            try:
                arrays = self._run_graph([blobs[i] for i in jpegs])
            except Exception as exc:  # a JPEG whose header reads but whose data does not: find which, one by one
                log.debug("a batch of %d JPEGs failed in TensorFlow (%s): decoding them one by one", len(jpegs), exc)
            else:
                for i, array in zip(jpegs, arrays, strict=True):
                    results[i] = array
        rest = [i for i, result in enumerate(results) if result is None]
        for i, decoded in zip(rest, self._numpy.decode_many([blobs[i] for i in rest], [urls[i] for i in rest]),
                              strict=True):
            results[i] = decoded
        return results  # type: ignore[return-value]  # every place was filled above

    def _takes(self, blob: bytes) -> bool:
        """Whether an image goes through TensorFlow: a JPEG within ``max_pixels`` that both decoders agree on.

        Only the header is read: by :func:`~s3cache.jpeglayout.read_layout` where it is plain, else by
        Pillow (its safe readers only). Anything unusual is left to ``ImageSpec.decode``, which names the problem.
        """
        try:
            layout = read_layout(blob) or pillow_layout(blob)
            return (layout is not None and layout.pixels <= self.spec.max_pixels
                    and layout.decodes_as_tensorflow(self.spec.color_mode == "grayscale"))
        except Exception:
            return False


def pillow_layout(blob: bytes) -> JpegLayout | None:
    """The layout of a JPEG as Pillow reads its header (safe readers only); ``None`` for another format.

    Raises:
        Exception: Whatever Pillow raises for a file it cannot identify or read.
    """
    with Image.open(io.BytesIO(blob), formats=FORMATS) as image:
        return layout_of(image) if image.format == "JPEG" else None


def tensorflow_applies(spec: ImageSpec) -> bool:
    """Whether Keras's plain decode-and-resize gives this spec's pixels: RGB or gray, no crop, pad or filters."""
    return (spec.color_mode in ("rgb", "grayscale") and not spec.crop_to_aspect_ratio
            and not spec.pad_to_aspect_ratio and not spec.antialias and not spec.jpeg_draft)


def decoder_from_env() -> str:
    """``$S3CACHE_DECODER`` (lowercased), else ``"auto"``."""
    return os.environ.get(DECODER_ENV, "").strip().lower() or "auto"


def decoder_name(decoder: str | None) -> str:
    """A decoder's name checked, ``None`` meaning :func:`decoder_from_env`.

    Raises:
        ValueError: Not one of :data:`DECODERS`.
    """
    decoder = decoder_from_env() if decoder is None else decoder
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    return decoder


def open_decoder(spec: ImageSpec, decoder: str | Decoder | None = None) -> Decoder:
    """The decoder for a spec.

    Args:
        spec: How images are decoded and resized.
        decoder: ``"numpy"``, ``"tensorflow"`` (for JPEGs, where :func:`tensorflow_applies`), or
            ``"auto"``: TensorFlow where it applies, is imported already, and this process is not a
            ``multiprocessing`` child; else NumPy. Default: :func:`decoder_from_env`. A
            :class:`Decoder` is used as it is.

    Raises:
        ValueError: An unknown decoder, or ``"tensorflow"`` for a spec it cannot decode.
    """
    if decoder is not None and not isinstance(decoder, str):
        return decoder
    decoder = decoder_name(decoder)
    if decoder == "tensorflow" or (decoder == "auto" and _tensorflow_running() and tensorflow_applies(spec)):
        return TensorFlowDecoder(spec)
    return NumpyDecoder(spec)


def _tensorflow_running() -> bool:
    """Whether this process imported TensorFlow itself (a forked child inherits the module, not its runtime)."""
    return "tensorflow" in sys.modules and multiprocessing.parent_process() is None


def _decode_one(spec: ImageSpec, blob: bytes, url: str) -> Decoded:
    try:
        return spec.decode(blob, url)
    except DecodeError as exc:
        return _detached(exc)


def _detached(error: DecodeError) -> DecodeError:
    """The error without tracebacks down its chain of causes.

    A failure kept as a value must not keep the frames it was raised in, and with them the image's bytes,
    alive: they would outlive the fetch's byte budget until the garbage collector ran.
    """
    link: BaseException | None = error
    while link is not None:
        link.__traceback__ = None
        link = link.__cause__ or link.__context__
    return error


@functools.lru_cache(maxsize=16)
def _jpeg_graph(size: tuple[int, int], channels: int, method: str) -> JpegGraph:
    """The process's :class:`JpegGraph` for an output shape and kernel (tracing one costs about 0.1 s)."""
    return JpegGraph(size, channels, method)


class JpegGraph:
    """Decodes a batch of JPEGs to one ``uint8`` array, as Keras's loader does, in one TensorFlow graph.

    The graph is traced, and run once on a tiny JPEG, on a thread started at creation: the first
    call otherwise pays about 70 ms of tracing and kernel set-up, while a loader's first objects are
    still on their way from S3.

    Args:
        size: Output ``(height, width)``.
        channels: 1 or 3.
        method: The ``tf.image.resize`` kernel.
    """

    def __init__(self, size: tuple[int, int], channels: int, method: str) -> None:
        import tensorflow as tf

        self._tf = tf

        def one(blob: Any) -> Any:
            # Keras's load_image: decode_image, then resize; the cache keeps uint8, rounded half to even as np.rint.
            image = tf.io.decode_image(blob, channels=channels, expand_animations=False)
            image.set_shape([None, None, channels])
            resized = tf.cast(tf.image.resize(image, size, method=method), tf.float32)
            return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)], autograph=False)
        def batch(blobs: Any) -> Any:
            with tf.device("/CPU:0"):  # a process training on a GPU keeps it for the model
                return tf.map_fn(one, blobs, fn_output_signature=tf.TensorSpec((*size, channels), tf.uint8),
                                 parallel_iterations=16)

        self._batch = batch
        # Not a daemon: an interpreter exiting meanwhile waits for it rather than leave TensorFlow mid-call.
        self.warm_up = threading.Thread(target=self._warm_up, name="s3cache-decoder-warm-up")
        self.warm_up.start()

    def __call__(self, blobs: Sequence[bytes]) -> np.ndarray:
        """The ``(len(blobs), height, width, channels)`` array of the JPEGs (TensorFlow raises on any bad one)."""
        return self._batch(self._tf.constant(list(blobs), dtype=self._tf.string)).numpy()

    @property
    def traces(self) -> int:
        """How many times the graph was traced (1 once warmed up: every batch shape shares one trace)."""
        return int(self._batch.experimental_get_tracing_count())

    def _warm_up(self) -> None:
        try:
            self([_tiny_jpeg()])
        except Exception as exc:  # the first real batch traces it then, or reports what is wrong
            log.debug("warming up the TensorFlow decoder failed: %s", exc)


def _tiny_jpeg() -> bytes:
    """An 8x8 black JPEG."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG")
    return buffer.getvalue()
