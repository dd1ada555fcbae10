"""Real photos for the demo, the tests and the benchmarks, cut from the images bundled with scikit-image.

Every photo is a random crop of one source image per class, so files look like real camera images (sizes,
aspect ratios and JPEG sizes vary) while nothing is downloaded.
"""

import functools
import hashlib
import io
import math
import mimetypes
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np

PhotoFormat = Literal["jpeg", "png"]

# Class name -> loader in skimage.data; each of these reads a file shipped inside the package.
_SOURCES = {
    "astronaut": "astronaut",
    "cat": "chelsea",
    "coffee": "coffee",
    "rocket": "rocket",
    "galaxy": "hubble_deep_field",
    "retina": "retina",
}
_EXTENSIONS: dict[str, str] = {"jpeg": ".jpg", "png": ".png"}
_MAX_ASPECT = 4 / 3
_UPLOAD_THREADS = 16


def photo_classes() -> list[str]:
    """Names of the photo classes, in the round-robin order used by :func:`make_photos`."""
    return list(_SOURCES)


@functools.cache
def _source(name: str) -> np.ndarray:
    import skimage.data

    image = np.asarray(getattr(skimage.data, _SOURCES[name])())
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return image[..., :3]


def _crop(image: np.ndarray, rng: np.random.Generator, size_range: tuple[int, int]) -> np.ndarray:
    side = rng.uniform(size_range[0], size_range[1])
    # Log-uniform aspect ratio, so portrait and landscape crops are equally likely.
    aspect = math.exp(rng.uniform(-math.log(_MAX_ASPECT), math.log(_MAX_ASPECT)))
    height = min(image.shape[0], max(1, round(side / math.sqrt(aspect))))
    width = min(image.shape[1], max(1, round(side * math.sqrt(aspect))))
    top = int(rng.integers(0, image.shape[0] - height + 1))
    left = int(rng.integers(0, image.shape[1] - width + 1))
    crop = image[top : top + height, left : left + width]
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def _encode(pixels: np.ndarray, fmt: PhotoFormat) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    options: dict[str, Any] = {"quality": 90} if fmt == "jpeg" else {}
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format=fmt.upper(), **options)
    return buffer.getvalue()


def make_photos(
    n: int,
    *,
    seed: int = 0,
    size_range: tuple[int, int] = (96, 320),
    fmt: PhotoFormat = "jpeg",
) -> list[tuple[str, bytes]]:
    """Makes ``n`` distinct encoded photos, deterministic for a given seed.

    Args:
        n: Number of photos.
        seed: Seed of the random crops.
        size_range: Range of the crop size in pixels (geometric mean of height and width, before clipping
            to the source image).
        fmt: ``"jpeg"`` (quality 90) or ``"png"``.

    Returns:
        ``(key, data)`` pairs such as ``("cat/cat_00017.jpg", b"...")``, classes in round-robin order.
    """
    if fmt not in _EXTENSIONS:
        raise ValueError(f"fmt must be one of {sorted(_EXTENSIONS)}, got {fmt!r}")
    low, high = size_range
    if not 0 < low <= high:
        raise ValueError(f"size_range must be (low, high) with 0 < low <= high, got {size_range!r}")
    rng = np.random.default_rng(seed)
    classes = photo_classes()
    seen: set[bytes] = set()
    photos: list[tuple[str, bytes]] = []
    for index in range(n):
        name = classes[index % len(classes)]
        data = _encode(_crop(_source(name), rng, size_range), fmt)
        # Two identical crops are very unlikely, but the callers count on distinct files.
        while (digest := hashlib.sha256(data).digest()) in seen:
            data = _encode(_crop(_source(name), rng, size_range), fmt)
        seen.add(digest)
        photos.append((f"{name}/{name}_{index:05d}{_EXTENSIONS[fmt]}", data))
    return photos


def _join(prefix: str, name: str) -> str:
    return f"{prefix.rstrip('/')}/{name}" if prefix.strip("/") else name


def _client(client_or_storage_options: Any) -> Any:
    if not isinstance(client_or_storage_options, Mapping):
        return client_or_storage_options
    import boto3
    from botocore.config import Config

    options = client_or_storage_options
    return boto3.session.Session().client(
        "s3",
        endpoint_url=options.get("endpoint_url"),
        aws_access_key_id=options.get("key"),
        aws_secret_access_key=options.get("secret"),
        config=Config(max_pool_connections=_UPLOAD_THREADS),
        **options.get("client_kwargs", {}),
    )


def _ensure_bucket(client: Any, bucket: str) -> None:
    from botocore.exceptions import ClientError

    try:
        client.head_bucket(Bucket=bucket)
        return
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") not in {"404", "NoSuchBucket"}:
            raise
    region = client.meta.region_name
    # us-east-1 is the one region that rejects an explicit location constraint.
    if region in (None, "us-east-1"):
        client.create_bucket(Bucket=bucket)
    else:
        client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": region})


def upload_photos(
    client_or_storage_options: Any, bucket: str, prefix: str, photos: Iterable[tuple[str, bytes]]
) -> list[str]:
    """Uploads photos to S3 concurrently, creating the bucket if it is missing.

    Args:
        client_or_storage_options: A boto3 S3 client, or s3fs-style storage options (``endpoint_url``,
            ``key``, ``secret``, ``client_kwargs``) to build one from.
        bucket: Bucket name.
        prefix: Key prefix such as ``"train/"``; photo keys are appended below it.
        photos: ``(key, data)`` pairs from :func:`make_photos`.

    Returns:
        The object keys, in the order of ``photos``.
    """
    client = _client(client_or_storage_options)
    _ensure_bucket(client, bucket)
    items = [(_join(prefix, name), data) for name, data in photos]

    def put(item: tuple[str, bytes]) -> str:
        key, data = item
        content_type = mimetypes.guess_type(key)[0] or "application/octet-stream"
        client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)
        return key

    with ThreadPoolExecutor(max_workers=_UPLOAD_THREADS) as pool:
        return list(pool.map(put, items))


def write_photos(directory: Path, photos: Iterable[tuple[str, bytes]]) -> list[Path]:
    """Writes photos below a local directory, with the same relative keys as in S3.

    Args:
        directory: Root directory; created if missing.
        photos: ``(key, data)`` pairs from :func:`make_photos`.

    Returns:
        The written file paths, in the order of ``photos``.
    """
    paths = []
    for name, data in photos:
        path = Path(directory) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        paths.append(path)
    return paths
