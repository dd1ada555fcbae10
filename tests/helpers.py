"""Small helpers shared by the test modules."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from s3cache.testing.locals3 import LocalS3

# Images resized to FILE_SIDE x FILE_SIDE make entries of 300 KB, stored as value files (smaller ones
# are rows of the database: s3cache.store.layout.INLINE_LIMIT).
FILE_SIDE = 320


def object_gets(s3: LocalS3) -> list[str]:
    """Paths of the object GETs the server received (listings excluded)."""
    return [path for method, path, query in s3.log()
            if method == "GET" and path.strip("/").count("/") >= 1 and "list-type" not in query]


def listings(s3: LocalS3) -> list[str]:
    """Paths of the list requests the server received."""
    return [path for method, path, query in s3.log() if method == "GET" and "list-type" in query]


def dataset_options(s3: LocalS3, cache_dir: Path, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for image_dataset_from_s3 against the test server."""
    options: dict[str, Any] = {"image_size": (32, 32), "batch_size": 8, "shuffle": False, "cache_dir": cache_dir,
                               "storage_options": s3.storage_options, "verbose": False}
    return options | overrides


def wal_frames(database: Path) -> tuple[int, int]:
    """Frames in a database's write-ahead log, and how many of them are copied into the database file.

    Read from the WAL index (``<database>-shm``, SQLite's "WAL-index format"): the last valid frame
    is the header's ``mxFrame`` (offset 16), the frames copied its checkpoint info's ``nBackfill``
    (offset 96), both in native byte order.
    """
    header = (database.parent / f"{database.name}-shm").read_bytes()[:100]
    return struct.unpack_from("=I", header, 16)[0], struct.unpack_from("=I", header, 96)[0]


def all_batches(ds: Any) -> list[Any]:
    """Every batch of one epoch, then the end-of-epoch hook, as Keras would."""
    batches = [ds[i] for i in range(len(ds))]
    ds.on_epoch_end()
    return batches


def stack_images(batches: list[Any]) -> np.ndarray:
    """All images of an epoch's batches in one array."""
    return np.concatenate([b[0] if isinstance(b, tuple) else b for b in batches])


def encode(array: np.ndarray, fmt: str = "JPEG", **kwargs: Any) -> bytes:
    """Encode an array with Pillow."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


WORKERS = Path(__file__).with_name("workers.py")


def run_together(commands: list[list[str]], tmp_path: Path, env: dict[str, str],
                 timeout: float = 300) -> list[subprocess.CompletedProcess[str]]:
    """Start ``workers.py`` processes, release them at once when all are ready, and wait for them."""
    go = tmp_path / "go"
    readies = [tmp_path / f"ready-{i}" for i in range(len(commands))]
    processes = [subprocess.Popen([sys.executable, str(WORKERS), str(ready), str(go), *command], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for ready, command in zip(readies, commands, strict=True)]
    deadline = time.monotonic() + 120
    while not all(ready.exists() for ready in readies):
        assert all(p.poll() is None for p in processes), [p.communicate() for p in processes]
        assert time.monotonic() < deadline, "workers never got ready"
        time.sleep(0.01)
    go.touch()
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return results
