"""Datasets larger than the cache: hits per shuffled epoch beside a plain LRU and the bound, and recency's cost.

Run from the repository root, in the project's virtual environment (``pip install -e .[bench]``)::

    python benchmarks/larger.py --out larger

Part 1 uploads ``--images`` real photos to a local S3 endpoint (``s3cache.testing.locals3.LocalS3``, no
latency), measures the cache volume of the whole dataset at ``--image-size``, then for each fraction
``c`` (``--fractions``, default 0.25 0.5 0.75) trains ``--epochs`` shuffled epochs (every batch, as Keras
reads them with ``workers=1``) through a cache whose limit holds ``c`` of the dataset, twice:

* ``s3cache``: ``image_dataset_from_s3`` as shipped (:class:`~s3cache.store.policy.KeepCurrentRun`);
* ``plain LRU``: the same dataset and store with :class:`~s3cache.store.policy.LeastRecentlyUsed` and a
  new recency generation after every batch, so that every read refreshes its entry: an exact LRU at
  batch granularity, as a read-through cache usually is.

Hits per epoch come from ``ds.stats`` and are checked against the endpoint's GET count. The table puts
them beside the bound ``c`` (a cache that keeps what it holds) and ``c + (1 - c) ln(1 - c)``, what an
LRU hits per shuffled epoch.

Part 2 fills stores of ``--cost-entries`` arrays (``--cost-sizes``, no S3) and reads them in shuffled
epochs through an offline ``S3ImageDataset``, another dataset being used just before each epoch,
alternating three settings: recency off (the store's ``RecencyLog.note`` patched to a no-op); entries
of the reading run (any epoch of a run, the first after another dataset included: one row written);
entries another dataset stamped last (two datasets sharing images: each read written back once). It
reports the median images/s of each and the cost.

It prints Markdown tables and writes ``benchmarks/results/<out>.json`` and ``<out>.md``. About a minute
on two cores with the defaults.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from harness import BENCH_ENV, RECENCY_SETTINGS, describe_machine, machine, recency, stamp_recency

for _name, _value in BENCH_ENV.items():
    os.environ.setdefault(_name, _value)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BUCKET = "larger"
PREFIX = "train/"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300, help="photos in the dataset (default 300)")
    parser.add_argument("--image-size", type=int, nargs=2, default=[32, 32], metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=4, help="shuffled epochs per cache size (default 4)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75],
                        help="fractions of the dataset the cache holds (default 0.25 0.5 0.75)")
    parser.add_argument("--cost-entries", type=int, default=2_000, help="entries read per recency-cost pass")
    parser.add_argument("--cost-sizes", type=int, nargs="+", default=[16, 64, 128],
                        help="square image sizes of the recency-cost stores (default 16 64 128)")
    parser.add_argument("--rounds", type=int, default=7, help="timed passes per recency setting (default 7)")
    parser.add_argument("--out", default="larger", help="name of the result files in benchmarks/results/")
    return parser.parse_args(argv)


def lru_theory(c: float) -> float:
    """Expected hits per shuffled epoch of an LRU cache holding a fraction ``c`` of the dataset."""
    return 1.0 if c >= 1 else c + (1 - c) * math.log(1 - c)


# -- part 1: hits per epoch -----------------------------------------------------------------------------


def run_epochs(ds: Any, s3: Any, epochs: int, after_batch: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Every batch of ``epochs`` shuffled epochs, as Keras reads them; hits and GETs per epoch."""
    rows = []
    for _ in range(epochs):
        s3.reset_stats()
        ds.on_epoch_begin()
        for index in range(len(ds)):
            ds[index]
            if after_batch is not None:
                after_batch()
        ds.on_epoch_end()
        gets = s3.requests("GET")
        epoch = ds.stats["epochs"][-1]
        rows.append({"hits": epoch["hits"], "misses": epoch["misses"], "hit_rate": epoch["hit_rate"],
                     "gets": gets})
    return rows


def plain_lru(ds: Any) -> Callable[[], None]:
    """Turn the dataset's store into an exact LRU (per batch); returns the hook to call after each batch."""
    from s3cache.store.policy import LeastRecentlyUsed

    store = ds.loader.store
    store.policy = LeastRecentlyUsed()
    counter = iter(range(10**9))

    def next_generation() -> None:
        store.recency.flush()
        store.recency.begin(f"benchmark:lru:{next(counter)}", protect=False)

    next_generation()
    return next_generation


def measure_hits(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Part 1."""
    import s3cache
    from s3cache.store import ArrayStore
    from s3cache.testing.locals3 import LocalS3
    from s3cache.testing.sampledata import make_photos, upload_photos

    photos = make_photos(args.images, seed=7, size_range=(64, 160))
    results: dict[str, Any] = {"fractions": []}
    with LocalS3(latency_ms=0) as s3:
        upload_photos(s3.storage_options, BUCKET, PREFIX, photos)
        options = {"image_size": tuple(args.image_size), "batch_size": args.batch_size, "shuffle": True,
                   "storage_options": s3.storage_options, "verbose": False}
        url = f"s3://{BUCKET}/{PREFIX}"
        with ArrayStore(tmp / "empty" / "arrays") as empty:
            base = empty.volume()
        full_dir = tmp / "full"
        ds = s3cache.image_dataset_from_s3(url, cache_dir=full_dir, seed=0, **options)
        run_epochs(ds, s3, 1)
        ds.close()
        with ArrayStore(full_dir / "arrays") as store:
            full = store.volume()
        results |= {"images": args.images, "dataset_cache_bytes": full - base, "empty_store_bytes": base}
        print(f"{args.images} photos at {args.image_size[0]}x{args.image_size[1]} take {(full - base) / 1e6:.2f} MB "
              "of cache", flush=True)
        for number, fraction in enumerate(args.fractions):
            limit = int(base + fraction * (full - base))
            row: dict[str, Any] = {"c": fraction, "limit_bytes": limit, "lru_theory": lru_theory(fraction)}
            for name in ("s3cache", "plain LRU"):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    ds = s3cache.image_dataset_from_s3(url, cache_dir=tmp / f"{name}-{fraction}",
                                                       cache_size_limit=limit, seed=number, **options)
                hook = plain_lru(ds) if name == "plain LRU" else None
                started = time.perf_counter()
                row[name] = run_epochs(ds, s3, args.epochs, hook)
                row[f"{name} seconds"] = time.perf_counter() - started
                row["warning"] = next((str(w.message) for w in caught), "")
                ds.close()
            results["fractions"].append(row)
            print(f"c = {fraction:.2f}: s3cache {_rates(row['s3cache'])}; plain LRU {_rates(row['plain LRU'])}; "
                  f"bound {fraction:.0%}, LRU theory {lru_theory(fraction):.0%}", flush=True)
    return results


def _rates(epochs: list[dict[str, Any]]) -> str:
    return " ".join(f"{e['hit_rate']:.0%}" for e in epochs)


# -- part 2: what recency costs a warm epoch --------------------------------------------------------------


def measure_cost(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    """Part 2, for every image size."""
    from s3cache import codec
    from s3cache.config import CacheConfig
    from s3cache.dataset import S3ImageDataset
    from s3cache.items import Item
    from s3cache.keys import cache_key
    from s3cache.spec import ImageSpec
    from s3cache.store.directory import CacheDirectory

    rows = []
    for size in args.cost_sizes:
        spec = ImageSpec((size, size))
        directory = tmp / f"cost-{size}"
        objects = [Item(BUCKET, f"{PREFIX}c{n % 10}/{n:07d}.jpg", f"{n:032x}", 1) for n in range(args.cost_entries)]
        pixels = np.random.default_rng(0).integers(0, 256, (len(objects), *spec.shape), dtype=np.uint8)
        with CacheDirectory(directory, 10**11) as cache:
            cache.arrays.begin_run("benchmark:fill")
            for obj, array in zip(objects, pixels, strict=True):
                cache.arrays.put(cache_key(spec.fingerprint, obj), codec.encode_array(array), tag=spec.fingerprint)
        config = CacheConfig.create(directory, offline=True)
        dataset = S3ImageDataset(objects, None, None, spec, config, label_mode=None, batch_size=32, seed=0,
                                 run="benchmark:reader")

        def one_pass(dataset: S3ImageDataset = dataset) -> tuple[float, float]:
            """Images/s (wall clock) and CPU microseconds per image (the process, background flush included)."""
            cpu, started = time.process_time(), time.perf_counter()
            dataset.on_epoch_begin()
            images = sum(len(dataset[index]) for index in range(len(dataset)))
            dataset.on_epoch_end()  # writes back what is left, as Keras's end of epoch does
            return images / (time.perf_counter() - started), (time.process_time() - cpu) / images * 1e6

        samples: dict[str, list[tuple[float, float]]] = {setting: [] for setting in RECENCY_SETTINGS}
        try:
            one_pass()  # untimed: opens the store, pulls the pages into the page cache
            for number in range(args.rounds):
                for setting in RECENCY_SETTINGS if number % 2 == 0 else RECENCY_SETTINGS[::-1]:
                    stamp_recency(directory, setting)
                    with recency(setting):
                        samples[setting].append(one_pass())
        finally:
            dataset.close()
        rate = {setting: statistics.median(r for r, _ in values) for setting, values in samples.items()}
        cpu = {setting: statistics.median(c for _, c in values) for setting, values in samples.items()}
        row = {"image_size": size, "entries": args.cost_entries, "images_per_s": rate, "cpu_us_per_image": cpu,
               "samples": samples,
               "cost_wall": {setting: 1 - rate[setting] / rate["off"] for setting in ("fresh", "stale")},
               "cost_cpu": {setting: cpu[setting] / cpu["off"] - 1 for setting in ("fresh", "stale")}}
        rows.append(row)
        print(f"{size}x{size}: CPU per image {cpu['off']:.1f} us without recency, {cpu['fresh']:.1f} over entries of "
              f"this run ({row['cost_cpu']['fresh']:+.1%}), {cpu['stale']:.1f} over entries another dataset stamped "
              f"last ({row['cost_cpu']['stale']:+.1%}); images/s {rate['off']:,.0f}, {rate['fresh']:,.0f}, "
              f"{rate['stale']:,.0f}", flush=True)
    return rows


# -- report ------------------------------------------------------------------------------------------------


def markdown(hits: dict[str, Any], costs: list[dict[str, Any]], info: dict[str, Any], args: argparse.Namespace) -> str:
    """The tables."""
    lines = [f"# Datasets larger than the cache ({datetime.date.today().isoformat()})", "",
             describe_machine(info), "",
             f"{hits['images']} photos at {args.image_size[0]}x{args.image_size[1]} "
             f"({hits['dataset_cache_bytes'] / 1e6:.2f} MB of cache), batch {args.batch_size}, {args.epochs} shuffled "
             "epochs per cache size. Hits per epoch from `ds.stats`; GETs are the endpoint's own count.", "",
             "| c | epoch | s3cache hits | s3cache GETs | plain LRU hits | plain LRU GETs | bound c | LRU theory |",
             "|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for row in hits["fractions"]:
        for index, (ours, lru) in enumerate(zip(row["s3cache"], row["plain LRU"], strict=True)):
            lines.append(f"| {row['c']:.2f} | {index + 1} | {ours['hit_rate']:.1%} | {ours['gets']} | "
                         f"{lru['hit_rate']:.1%} | {lru['gets']} | {row['c']:.0%} | {row['lru_theory']:.1%} |")
    lines += ["", "Epochs after the first, mean hit rate against the bound:", "",
              "| c | s3cache | s3cache / c | plain LRU | LRU theory |", "|--:|--:|--:|--:|--:|"]
    for row in hits["fractions"]:
        ours = statistics.mean(e["hit_rate"] for e in row["s3cache"][1:])
        lru = statistics.mean(e["hit_rate"] for e in row["plain LRU"][1:])
        lines.append(f"| {row['c']:.2f} | {ours:.1%} | {ours / row['c']:.2f} | {lru:.1%} | {row['lru_theory']:.1%} |")
    lines += ["", f"Recency bookkeeping of a warm epoch right after another dataset was read ({args.cost_entries} "
              f"entries, batch 32, medians of {args.rounds} passes per setting, settings alternating). CPU is the "
              "reading process's, background write-back included; wall-clock images/s vary more on a shared machine.",
              "", "| image size | measure | recency off | entries of this run | cost "
              "| entries another dataset stamped last | cost |", "|---|---|--:|--:|--:|--:|--:|"]
    for row in costs:
        size = f"{row['image_size']}x{row['image_size']}"
        cpu, rate, cost_cpu, cost_wall = row["cpu_us_per_image"], row["images_per_s"], row["cost_cpu"], row["cost_wall"]
        lines.append(f"| {size} | CPU us/image | {cpu['off']:.1f} | {cpu['fresh']:.1f} | {cost_cpu['fresh']:+.1%} | "
                     f"{cpu['stale']:.1f} | {cost_cpu['stale']:+.1%} |")
        lines.append(f"| {size} | images/s | {rate['off']:,.0f} | {rate['fresh']:,.0f} | {cost_wall['fresh']:+.1%} | "
                     f"{rate['stale']:,.0f} | {cost_wall['stale']:+.1%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Run both parts and write the results."""
    args = parse_args(argv)
    info = machine()
    with tempfile.TemporaryDirectory(prefix="s3cache-larger-") as tmp:
        hits = measure_hits(args, Path(tmp))
        costs = measure_cost(args, Path(tmp))
    info["load_average_1m_end"] = os.getloadavg()[0]
    RESULTS.mkdir(exist_ok=True)
    report = markdown(hits, costs, info, args)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(
        {"settings": vars(args), "machine": info, "hits": hits, "recency_cost": costs}, indent=1))
    (RESULTS / f"{args.out}.md").write_text(report)
    print()
    print(report)


if __name__ == "__main__":
    main()
