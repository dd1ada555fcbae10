"""Warm read cost per image as the cache grows, the LRU bookkeeping's share, and listing vs stored-listing time.

Run from the repository root, in the project's virtual environment (``pip install -e .[bench]``)::

    python benchmarks/scale.py --out scale

Part 1 fills array stores of 1k, 10k and 100k small images (``--image-size``, default 8x8) directly through
``ArrayStore.put``, ``codec.encode_array`` and ``keys.cache_key`` (no S3), then reads ``--reads`` of
them in random batches through ``S3ImageDataset`` offline, alternating LRU recency tracking on and off,
and reports microseconds per image. Part 2 puts ``--listing-keys`` empty objects on a local S3 endpoint
(``s3cache.testing.locals3.LocalS3``) and times the live listing through it (wall and this process's CPU,
the endpoint running in its own) against loading the stored listing.
It prints Markdown tables and writes ``benchmarks/results/<out>.json``, ``<out>.md`` and ``<out>.png``.
About five minutes on two cores, most of it uploading 100k keys (``--listing-keys 10000`` for a quick look).
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from harness import BENCH_ENV, RECENCY_SETTINGS, describe_machine, machine, recency, stamp_recency

from s3cache.items import Item
from s3cache.testing.locals3 import LocalS3

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BUCKET = "scale-keys"
PREFIX = "train/"
CLASSES = 10
BATCH_SIZE = 32
UPLOAD_THREADS = 8


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000],
                        help="cached entries per store (default 1000 10000 100000)")
    parser.add_argument("--reads", type=int, default=6_400, help="images read per timed pass (default 6400)")
    parser.add_argument("--rounds", type=int, default=5, help="timed passes per LRU setting (default 5)")
    parser.add_argument("--image-size", type=int, nargs=2, default=[8, 8], metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--listing-keys", type=int, default=100_000, help="objects to list (default 100000)")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="endpoint latency while listing")
    parser.add_argument("--out", default="scale", help="name of the result files in benchmarks/results/")
    return parser.parse_args(argv)


def object_for(number: int) -> Item:
    """The ``number``-th synthetic object: ten class folders, a unique key and ETag."""
    return Item(BUCKET, f"{PREFIX}c{number % CLASSES}/{number:07d}.jpg", f"{number:032x}", 1)


# -- part 1: warm reads -----------------------------------------------------------------------------------


def fill_store(directory: Path, spec: Any, count: int) -> tuple[list[Item], float]:
    """Put ``count`` random arrays in a new store, keyed as the loader keys them; return objects and seconds."""
    from s3cache import codec
    from s3cache.keys import cache_key
    from s3cache.store.directory import CacheDirectory

    objects = [object_for(number) for number in range(count)]
    pixels = np.random.default_rng(0).integers(0, 256, (count, *spec.shape), dtype=np.uint8)
    with CacheDirectory(directory) as cache:
        cache.meta.put_spec(spec.fingerprint, spec.to_dict())
        started = time.perf_counter()
        for obj, array in zip(objects, pixels, strict=True):
            cache.arrays.put(cache_key(spec.fingerprint, obj), codec.encode_array(array), tag=spec.fingerprint)
        seconds = time.perf_counter() - started
    return objects, seconds


def read_cost(directory: Path, spec: Any, objects: list[Item], reads: int, rounds: int) -> dict[str, Any]:
    """Microseconds per image reading ``reads`` random entries in batches, per recency setting (medians)."""
    from s3cache.config import CacheConfig
    from s3cache.dataset import S3ImageDataset

    config = CacheConfig.create(directory, "10GB", offline=True)
    dataset = S3ImageDataset(objects, None, None, spec, config, label_mode=None, batch_size=BATCH_SIZE, seed=0)
    wanted = range(min(len(dataset), max(1, reads // BATCH_SIZE)))

    def one_pass() -> tuple[int, float]:
        started = time.perf_counter()
        dataset.on_epoch_begin()  # as Keras calls it: the run re-checks its recency generation
        images = sum(len(dataset[index]) for index in wanted)
        dataset.loader.store.recency.flush()  # recency written back is part of the cost
        return images, (time.perf_counter() - started) / images * 1e6

    samples: dict[str, list[float]] = {setting: [] for setting in RECENCY_SETTINGS}
    try:
        images, _ = one_pass()  # untimed: opens the store, pulls the pages into the page cache
        for number in range(rounds):
            # Alternate the order of the settings, so drift over the run hits all alike.
            for setting in RECENCY_SETTINGS if number % 2 == 0 else RECENCY_SETTINGS[::-1]:
                stamp_recency(directory, setting)
                with recency(setting):
                    samples[setting].append(one_pass()[1])
    finally:
        dataset.close()
    median = {setting: statistics.median(values) for setting, values in samples.items()}
    return {"us_per_image": median, "lru_cost": {s: 1 - median["off"] / median[s] for s in ("fresh", "stale")},
            "samples_us": samples, "images_per_pass": images}


def measure_reads(sizes: list[int], image_size: tuple[int, int], reads: int, rounds: int, tmp: Path
                  ) -> list[dict[str, Any]]:
    """Part 1 for every store size."""
    from s3cache.spec import ImageSpec

    spec = ImageSpec(image_size)
    rows = []
    for count in sizes:
        directory = tmp / f"store-{count}"
        objects, fill_seconds = fill_store(directory, spec, count)
        row = {"entries": count, "fill_seconds": fill_seconds,
               "database_mb": (directory / "arrays" / "cache.db").stat().st_size / 1e6}
        row |= read_cost(directory, spec, objects, reads, rounds)
        cost = row["us_per_image"]
        print(f"{count:>7} entries: {cost['off']:.1f} us/image without LRU recency, {cost['fresh']:.1f} with it over "
              f"fresh entries, {cost['stale']:.1f} over stale ones (filled in {fill_seconds:.0f} s)", flush=True)
        rows.append(row)
    return rows


# -- part 2: listing -------------------------------------------------------------------------------------


def put_empty_objects(s3: LocalS3, count: int) -> None:
    """Create ``count`` one-byte objects with plain HTTP PUTs.

    Setup only: the endpoint does not check signatures, and skipping boto3's signing and parsing
    roughly halves the client's share of the two cores, so 100k keys upload in minutes.
    """
    s3.boto3_client().create_bucket(Bucket=BUCKET)
    host, port = s3.endpoint_url.removeprefix("http://").split(":")
    local = threading.local()

    def put(number: int) -> None:
        if not hasattr(local, "connection"):
            local.connection = http.client.HTTPConnection(host, int(port), timeout=60)
        local.connection.request("PUT", f"/{BUCKET}/{object_for(number).key}", body=b"\0")
        response = local.connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"PUT {object_for(number).key} answered {response.status}")

    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        list(pool.map(put, range(count)))


def _timed(action: Callable[[], Any]) -> tuple[Any, float, float]:
    """The action's value, its wall seconds and this process's CPU seconds (the endpoint has its own process)."""
    started, cpu = time.perf_counter(), time.process_time()
    value = action()
    return value, time.perf_counter() - started, time.process_time() - cpu


def measure_listing(count: int, latency_ms: float, tmp: Path) -> dict[str, Any]:
    """Part 2: live listing through the endpoint vs the stored listing, for ``count`` keys."""
    from s3cache import codec, image_dataset_from_s3
    from s3cache.keys import cache_key
    from s3cache.listing import resolve_items
    from s3cache.source.s3 import S3Source
    from s3cache.spec import ImageSpec
    from s3cache.store.directory import CacheDirectory

    url = f"s3://{BUCKET}/{PREFIX}"
    with LocalS3(latency_ms=latency_ms) as s3:
        s3.configure(latency_ms=0)  # the upload is setup
        _, upload_seconds, _ = _timed(lambda: put_empty_objects(s3, count))
        s3.configure(latency_ms=latency_ms)
        s3.reset_stats()
        cache = CacheDirectory(tmp / "listing-cache")
        listed, live_seconds, live_cpu = _timed(lambda: resolve_items(url, cache.meta, S3Source(s3.storage_options)))
        requests = s3.requests()
        stored, stored_seconds, stored_cpu = _timed(lambda: resolve_items(url, cache.meta, None))
        # An offline dataset needs every array cached (it checks up front): tiny ones, straight into the store.
        spec = ImageSpec((8, 8))
        entry = codec.encode_array(np.zeros(spec.shape, np.uint8))
        keys = [cache_key(spec.fingerprint, item) for item in stored]
        for start in range(0, len(keys), 1000):
            cache.arrays.put_many([(key, entry) for key in keys[start:start + 1000]], spec.fingerprint)
        cache.close()
        dataset, dataset_seconds, dataset_cpu = _timed(lambda: image_dataset_from_s3(
            url, offline=True, cache_dir=tmp / "listing-cache", image_size=(8, 8), seed=0, verbose=False))
        offline_requests = s3.requests() - requests
    if not len(listed) == len(stored) == len(dataset.items) == count:
        raise RuntimeError(f"listed {len(listed)}, stored {len(stored)}, dataset {len(dataset.items)} of {count}")
    return {"keys": count, "latency_ms": latency_ms, "upload_seconds": upload_seconds,
            "live_listing_seconds": live_seconds, "live_listing_cpu_seconds": live_cpu,
            "live_listing_requests": requests, "stored_listing_seconds": stored_seconds,
            "stored_listing_cpu_seconds": stored_cpu, "offline_dataset_seconds": dataset_seconds,
            "offline_dataset_cpu_seconds": dataset_cpu,
            "offline_requests": offline_requests}


# -- report ----------------------------------------------------------------------------------------------


def markdown(reads: list[dict[str, Any]], listing: dict[str, Any], settings: dict[str, Any]) -> str:
    """Both parts as Markdown tables."""
    height, width = settings["image_size"]
    lines = [f"### Warm reads of {height}x{width} images in random batches of {BATCH_SIZE} "
             f"(median of {settings['rounds']} passes)", "",
             "LRU recency off; on, over entries used just now (epochs shorter than the store's recency "
             "resolution: no write-back); on, over entries used an hour ago (every read written back).", "",
             "| cached entries | images per pass | us/image, LRU off | LRU on, fresh | LRU on, stale | "
             "LRU cost, fresh | LRU cost, stale | database MB |", "|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in reads:
        cost, share = r["us_per_image"], r["lru_cost"]
        lines.append(f"| {r['entries']:,} | {r['images_per_pass']:,} | {cost['off']:.1f} | {cost['fresh']:.1f} | "
                     f"{cost['stale']:.1f} | {share['fresh']:.1%} | {share['stale']:.1%} | {r['database_mb']:.1f} |")
    growth = {s: reads[-1]["us_per_image"][s] / reads[0]["us_per_image"][s] for s in RECENCY_SETTINGS}
    lines += ["", f"Cost per image at {reads[-1]['entries']:,} entries vs {reads[0]['entries']:,}: "
              f"{growth['off']:.2f}x without LRU recency, {growth['fresh']:.2f}x over fresh entries, "
              f"{growth['stale']:.2f}x over stale ones.", "",
              f"### Listing {listing['keys']:,} keys ({listing['latency_ms']:g} ms per S3 request)", "",
              "| step | seconds | client CPU seconds | S3 requests |", "|---|--:|--:|--:|",
              f"| live listing through the endpoint, then stored (`resolve_items`) | "
              f"{listing['live_listing_seconds']:.2f} | {listing['live_listing_cpu_seconds']:.2f} | "
              f"{listing['live_listing_requests']} |",
              f"| stored listing loaded (`resolve_items` offline) | {listing['stored_listing_seconds']:.2f} | "
              f"{listing['stored_listing_cpu_seconds']:.2f} | 0 |",
              f"| `image_dataset_from_s3(offline=True)`: listing, labels, cache check, shuffle | "
              f"{listing['offline_dataset_seconds']:.2f} | {listing['offline_dataset_cpu_seconds']:.2f} | "
              f"{listing['offline_requests']} |"]
    return "\n".join(lines) + "\n"


def chart(reads: list[dict[str, Any]], listing: dict[str, Any], path: Path) -> None:
    """Microseconds per image against cached entries, and the listing times."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    entries = [r["entries"] for r in reads]
    for setting, label in zip(RECENCY_SETTINGS, ("LRU recency off", "on, fresh entries", "on, stale entries"),
                              strict=True):
        left.plot(entries, [r["us_per_image"][setting] for r in reads], marker="o", label=label)
    left.set_xscale("log")
    left.set_ylim(bottom=0)
    left.set_xlabel("cached entries")
    left.set_ylabel("microseconds per image (warm)")
    left.set_title("Warm read cost as the cache grows")
    left.legend()
    steps = {"live listing": listing["live_listing_seconds"], "stored listing": listing["stored_listing_seconds"],
             "offline dataset": listing["offline_dataset_seconds"]}
    right.barh(list(steps)[::-1], list(steps.values())[::-1], color="tab:orange")
    for position, seconds in enumerate(list(steps.values())[::-1]):
        right.text(seconds, position, f" {seconds:.2f} s", va="center")
    right.set_xscale("log")
    right.set_xlim(right=max(steps.values()) * 5)  # room for the labels
    right.set_xlabel("seconds (log scale)")
    right.set_title(f"{listing['keys']:,} keys, {listing['latency_ms']:g} ms per request")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    """Run both parts and report them."""
    args = parse_args(argv)
    for name, value in BENCH_ENV.items():
        os.environ.setdefault(name, value)
    RESULTS.mkdir(exist_ok=True)
    info = machine()  # before the run: the s3cache source may change while it runs
    settings = {key: vars(args)[key] for key in ("sizes", "reads", "rounds", "image_size", "listing_keys",
                                                 "latency_ms")}
    with tempfile.TemporaryDirectory(prefix="s3cache-scale-") as tmp:
        reads = measure_reads(args.sizes, tuple(args.image_size), args.reads, args.rounds, Path(tmp))
        listing = measure_listing(args.listing_keys, args.latency_ms, Path(tmp))
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    document = {"name": args.out, "created": created, "settings": settings, "machine": info, "reads": reads,
                "listing": listing}
    (RESULTS / f"{args.out}.json").write_text(json.dumps(document, indent=1) + "\n")
    text = f"## s3cache at scale ({created})\n\n{describe_machine(info)}\n\n" + markdown(reads, listing, settings)
    (RESULTS / f"{args.out}.md").write_text(text)
    chart(reads, listing, RESULTS / f"{args.out}.png")
    print(text)


if __name__ == "__main__":
    main()
