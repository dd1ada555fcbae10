"""Shared fixtures: one local S3 server per test run, a clean state per test and a bucket of real photos."""

import os
from collections.abc import Iterator
from pathlib import Path

# Set before anything imports Keras or TensorFlow, which read them once at import time.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Tests compare cached arrays with ImageSpec.decode bit for bit; "auto" would switch to TensorFlow's decoder
# (equal to within rounding) once any test imported TensorFlow. tests/test_decoders.py covers that decoder.
os.environ["S3CACHE_DECODER"] = "numpy"

# Tests talk only to the local server: never pick up a developer's real AWS profile or credentials.
for _name in [name for name in os.environ if name.startswith("AWS_")]:
    del os.environ[_name]
os.environ["AWS_CONFIG_FILE"] = os.devnull
os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"

import pytest  # noqa: E402

from s3cache.testing.locals3 import LocalS3  # noqa: E402
from s3cache.testing.sampledata import make_photos, upload_photos  # noqa: E402

PHOTO_BUCKET = "photos"
PHOTO_PREFIX = "train/"


@pytest.fixture(scope="session")
def locals3() -> Iterator[LocalS3]:
    """One local S3 server process shared by the whole test run."""
    with LocalS3(latency_ms=0) as server:
        yield server


@pytest.fixture
def s3(locals3: LocalS3) -> LocalS3:
    """The shared server with no buckets, no faults and zeroed stats."""
    locals3.reset()
    return locals3


@pytest.fixture(scope="session")
def photos() -> list[tuple[str, bytes]]:
    """24 small JPEG photos as (relative key, bytes), classes round-robin."""
    return make_photos(24, seed=1)


@pytest.fixture
def bucket(s3: LocalS3, photos: list[tuple[str, bytes]]) -> str:
    """Name of a bucket holding ``photos`` under ``train/``; stats are zeroed after the upload."""
    upload_photos(s3.storage_options, PHOTO_BUCKET, PHOTO_PREFIX, photos)
    s3.reset_stats()
    return PHOTO_BUCKET


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """A not yet existing cache directory inside the test's temporary directory."""
    return tmp_path / "cache"
