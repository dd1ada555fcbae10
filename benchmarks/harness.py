"""Shared pieces of the benchmarks: the workload description, epoch timing and the endpoint's counters.

Not run by itself; ``compare.py``, ``contenders.py`` and ``scale.py`` import it.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import platform
import resource
import sqlite3
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar
from unittest import mock

import psutil

# Set before anything imports Keras or TensorFlow, which read them once at import time.
BENCH_ENV = {
    "KERAS_BACKEND": "tensorflow",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    # Only the local endpoint is used: never pick up a real AWS profile or the instance metadata service.
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}
T = TypeVar("T")
CONTROL_STATS = "/_locals3/stats"
# RecencyLog's method that notes reads for LRU; the "LRU off" runs replace it with a no-op.
RECENCY_HOOK = "note"
# The LRU comparisons: recency off, on over entries of the reading run, on over entries another dataset used since.
RECENCY_SETTINGS = ("off", "fresh", "stale")
PACKAGES = ["s3cache", "tensorflow", "keras", "numpy", "pillow", "diskcache", "boto3", "aiobotocore", "s3fs",
            "fsspec", "moto"]


@dataclass(frozen=True)
class Workload:
    """What every contender reads, and where.

    Attributes:
        endpoint_url: The local S3 endpoint.
        storage_options: ``s3fs`` options that reach it.
        bucket: Bucket holding the photos.
        prefix: Key prefix of the class folders, ending in ``/``.
        local_dir: A local copy of the same files, same class folders.
        work_dir: Scratch space; each contender gets a subfolder.
        cache_dir: The s3cache cache shared by the cold, offline and LRU runs.
        images: Photos in the dataset.
        seed_images: Photos the seed recipe reads (a subset when smaller than ``images``).
        image_size: ``(height, width)`` of the arrays.
        batch_size: Images per batch.
        epochs: Passes per contender.
        lru_rounds: Warm passes per setting in the LRU comparison.
        warm_rounds: Further passes of s3cache and of the raw read limit after their timed epochs,
            summed up by their median (the warm ratio compares the two medians).
        server_pid: The endpoint's process, whose CPU time is read around every epoch.
        packed_prefix: Key prefix (ending in ``/``) the packed contenders pack the photos under; one per
            round of ``compare.py``, so that every round packs afresh.
    """

    endpoint_url: str
    storage_options: dict[str, Any]
    bucket: str
    prefix: str
    local_dir: str
    work_dir: str
    cache_dir: str
    images: int
    seed_images: int
    image_size: tuple[int, int]
    batch_size: int
    epochs: int = 2
    lru_rounds: int = 5
    warm_rounds: int = 5
    server_pid: int = 0
    packed_prefix: str = "packed/"

    @property
    def url(self) -> str:
        """The ``s3://`` prefix of the dataset."""
        return f"s3://{self.bucket}/{self.prefix}"

    @property
    def packed_url(self) -> str:
        """The ``s3://`` prefix the packed contenders pack the dataset under."""
        return f"s3://{self.bucket}/{self.packed_prefix}"

    def scratch(self, name: str) -> Path:
        """An empty-on-first-use folder for one contender."""
        path = Path(self.work_dir) / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def save(self, path: Path) -> None:
        """Write the workload as JSON."""
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> Workload:
        """Read a workload written by :meth:`save`."""
        data = json.loads(path.read_text())
        return cls(**data | {"image_size": tuple(data["image_size"])})


@dataclass
class Epoch:
    """One timed pass over the data.

    Attributes:
        label: ``"1"``, ``"2"``, or a summary such as ``"median of 5"``.
        images: Images delivered.
        seconds: Wall time of the pass.
        s3_requests: Requests the endpoint received during the pass.
        peak_rss_mb: The process's peak resident memory at the end of the pass.
        cpu_seconds: CPU time of the contender's process (all threads) during the pass.
        server_cpu_seconds: CPU time of the endpoint's process during the pass.
    """

    label: str
    images: int
    seconds: float
    s3_requests: int
    peak_rss_mb: float
    cpu_seconds: float = 0.0
    server_cpu_seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        """Throughput of the pass."""
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Run:
    """What one contender measured.

    Attributes:
        name: Short key, e.g. ``"s3cache"``.
        label: Description for tables and charts.
        epochs: The timed passes.
        setup_s3_requests: Requests before the first pass (listing).
        note: Caveats shown in the table, e.g. a measured subset.
        extra: Anything else worth keeping in the JSON.
    """

    name: str
    label: str
    epochs: list[Epoch]
    setup_s3_requests: int = 0
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict, throughput included."""
        return asdict(self) | {"epochs": [asdict(e) | {"images_per_s": e.images_per_s} for e in self.epochs]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Run:
        """Inverse of :meth:`to_json`."""
        epochs = [Epoch(**{k: v for k, v in e.items() if k != "images_per_s"}) for e in data["epochs"]]
        return cls(**data | {"epochs": epochs})


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def server_requests(endpoint_url: str) -> int:
    """S3 requests the local endpoint received since its last stats reset (its control API is not counted)."""
    # No proxy: an HTTP(S)_PROXY in the environment must not capture calls to 127.0.0.1.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(endpoint_url + CONTROL_STATS, timeout=30) as response:
        return sum(json.load(response)["requests"].values())


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def collect_setup_garbage() -> None:
    """Collect garbage before a timed pass, untimed, in every contender alike.

    A process with TensorFlow loaded holds about 450,000 Python objects, and a full collection pauses every
    thread for 150-270 ms on this machine. CPython runs one once enough objects have outlived younger
    collections since the last, so a setup that allocates much (listing, packing, building a model) leaves a
    debt that an otherwise unrelated pass pays. A pause that a pass's own allocations bring on is still timed.
    """
    gc.collect()


def timed_epoch(label: str, workload: Workload, run_epoch: Callable[[], int]) -> Epoch:
    """Time one pass; count the endpoint's requests and both processes' CPU time during it.

    Args:
        label: The epoch's label.
        workload: Names the endpoint and its process.
        run_epoch: Makes the pass and returns how many images it delivered.
    """
    server = psutil.Process(workload.server_pid)
    collect_setup_garbage()
    requests, server_cpu = server_requests(workload.endpoint_url), _cpu_seconds(server)
    cpu, start = time.process_time(), time.perf_counter()
    images = run_epoch()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    # The server's CPU before its counters: answering the stats call is not part of the epoch.
    server_cpu = _cpu_seconds(server) - server_cpu
    return Epoch(label, images, seconds, server_requests(workload.endpoint_url) - requests, peak_rss_mb(), cpu,
                 server_cpu)


def timed_epochs(workload: Workload, run_epoch: Callable[[int], int], labels: list[str] | None = None) -> list[Epoch]:
    """Time ``workload.epochs`` passes; ``run_epoch(i)`` makes pass ``i`` (from 0) and returns its image count."""
    labels = labels or [str(i + 1) for i in range(workload.epochs)]
    return [timed_epoch(labels[i], workload, lambda i=i: run_epoch(i)) for i in range(workload.epochs)]


def median_round(measured: list[T], rate: Callable[[T], float]) -> T:
    """The measurement of median ``rate`` (of an even count, the upper of the middle two)."""
    return sorted(measured, key=rate)[len(measured) // 2]


def median_epoch(label: str, epochs: list[Epoch]) -> Epoch:
    """One line for several passes: the median pass's time and CPU, all their requests, the highest peak RSS."""
    median = median_round(epochs, lambda e: e.images_per_s)
    return Epoch(f"{label}, median of {len(epochs)}", median.images, median.seconds,
                 sum(e.s3_requests for e in epochs), max(e.peak_rss_mb for e in epochs), median.cpu_seconds,
                 median.server_cpu_seconds)


def repeated_passes(workload: Workload, run_epoch: Callable[[int], int], first: int) -> tuple[Epoch, list[float]]:
    """Time ``workload.warm_rounds`` more passes, numbered from ``first`` (0-based), as their median.

    Returns:
        The median pass (:func:`median_epoch`) and every pass's throughput (tables note their
        min/median/max).
    """
    passes = [timed_epoch(str(first + i + 1), workload, lambda i=i: run_epoch(first + i))
              for i in range(workload.warm_rounds)]
    return median_epoch(f"{first + 1}-{first + len(passes)}", passes), [e.images_per_s for e in passes]


def _no_touch(self: Any, *args: Any) -> None:
    """Stands in for the store's recency hook: no read is recorded, so nothing is flushed either."""


def recency(setting: str) -> contextlib.AbstractContextManager[Any]:
    """LRU recency tracking switched off (``"off"``) or as shipped (any other setting) for this process."""
    from s3cache.store.recency import RecencyLog

    if setting == "off":
        return mock.patch.object(RecencyLog, RECENCY_HOOK, _no_touch)
    return contextlib.nullcontext()


def stamp_recency(cache_dir: str | os.PathLike[str], setting: str) -> None:
    """Make every cached entry the reading run's own (``"fresh"``), or another dataset's (any other setting).

    Recency is one generation per run, ordered by last use (:mod:`s3cache.store.recency`). Either way
    another dataset is used just before the pass, so the reading run becomes the most recently used
    again when it re-checks at the start of its epoch (``on_epoch_begin``, as Keras calls it): one
    row written. Over its own entries the pass then writes nothing more, as in any epoch of a
    run, or the first one after another dataset was read. Over entries another dataset stamped (two
    datasets sharing images), each read is written back once. The reading run is the one used most
    recently before the call. Set straight in the array database, before the pass.

    Args:
        cache_dir: The cache directory.
        setting: ``"fresh"`` for entries of the reading run; anything else for another run's.
    """
    from s3cache.store.recency import GENERATIONS

    other = "benchmark:another-dataset"
    database = Path(cache_dir) / "arrays" / "cache.db"
    with contextlib.closing(sqlite3.connect(database, timeout=60)) as con:
        with con:
            (reader,) = con.execute(f"SELECT gen FROM {GENERATIONS} WHERE run != ? ORDER BY ord DESC LIMIT 1",
                                    (other,)).fetchone()
            con.execute(f"INSERT OR IGNORE INTO {GENERATIONS} (run, ord, taken) VALUES (?, 0, ?)", (other, time.time()))
            con.execute(f"UPDATE {GENERATIONS} SET ord = (SELECT MAX(ord) FROM {GENERATIONS}) + 1 WHERE run = ?",
                        (other,))
            stamp = reader if setting == "fresh" else f"(SELECT gen FROM {GENERATIONS} WHERE run = '{other}')"
            con.execute(f"UPDATE Cache SET access_time = {stamp}")
        # Fold this rewrite of every row into the database now, not during the timed pass.
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def machine() -> dict[str, Any]:
    """Where the numbers come from: CPU, memory, load, Python, library versions and the s3cache source."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "memory_gib": round(memory, 1), "load_average_1m": os.getloadavg()[0],
            "python": platform.python_version(), "packages": {name: metadata.version(name) for name in PACKAGES},
            "s3cache_source": _source_state()}


def describe_machine(info: dict[str, Any]) -> str:
    """One line about the machine and the s3cache source, for result headers."""
    source = info["s3cache_source"]
    changes = f" with uncommitted changes {source['uncommitted_s3cache_diff_sha256']}" if (
        source["uncommitted_s3cache_diff_sha256"]) else ""
    return (f"Machine: {info['cpus']} CPUs, {info['memory_gib']} GiB, load average {info['load_average_1m']:.1f} "
            f"at the start, Python {info['python']}, TensorFlow {info['packages']['tensorflow']}; "
            f"s3cache at {source['commit']}{changes}.")


def _source_state() -> dict[str, str]:
    """The commit measured, and a digest of uncommitted changes to the package (numbers depend on both)."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else None

    diff = git("diff", "HEAD", "--", "s3cache")
    digest = "unknown" if diff is None else hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else ""
    return {"commit": git("rev-parse", "--short", "HEAD") or "unknown", "uncommitted_s3cache_diff_sha256": digest}


def batches(items: list[Any], size: int) -> list[list[Any]]:
    """Split a list into consecutive batches of ``size`` (the last one may be shorter)."""
    return [items[i:i + size] for i in range(0, len(items), size)]
