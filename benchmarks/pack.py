"""Packing throughput and memory against the local endpoint, next to the endpoint's bare GET capacity.

    python benchmarks/pack.py --images 2000 --shard-size 16MB --rounds 2

Each measurement runs in a fresh process (so peak RSS is its own): ``capacity`` GETs every object with an
``asyncio.gather`` of aiobotocore requests, 32 in flight, bytes read and dropped (the endpoint's bare GET
capacity); ``source`` makes the same GETs through ``s3cache.source.S3Source`` (the read path of ``pack``);
``pack`` runs ``s3cache.pack.pack`` into a new destination folder (listing, GETs, shard uploads,
manifests and index included). Rounds alternate the three so that load from elsewhere hits both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BUCKET, PREFIX, DEST_BUCKET = "photos", "train/", "shards"
CONCURRENCY = 32
KINDS = ("capacity", "source", "pack")


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB of 10^6 bytes.

    Read from ``VmHWM`` (Linux): ``ru_maxrss`` would carry over the parent's peak into a child process.
    """
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB$", status, re.MULTILINE).group(1)) * 1024 / 1e6  # type: ignore[union-attr]


def measure_capacity(options: dict[str, Any]) -> dict[str, float]:
    """GET every object once, 32 in flight, bytes dropped; the listing is not timed."""
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    async def run() -> tuple[int, float]:
        async with get_session().create_client(
            "s3", endpoint_url=options["endpoint_url"], aws_access_key_id=options["key"],
            aws_secret_access_key=options["secret"], config=AioConfig(max_pool_connections=2 * CONCURRENCY),
            **options["client_kwargs"],
        ) as client:
            keys = [item["Key"] async for page in client.get_paginator("list_objects_v2").paginate(
                Bucket=BUCKET, Prefix=PREFIX) for item in page.get("Contents", [])]
            limit = asyncio.Semaphore(CONCURRENCY)

            async def get(key: str) -> int:
                async with limit:
                    response = await client.get_object(Bucket=BUCKET, Key=key)
                    async with response["Body"] as body:
                        return len(await body.read())

            start = time.perf_counter()
            await asyncio.gather(*(get(key) for key in keys))
            return len(keys), time.perf_counter() - start

    images, seconds = asyncio.run(run())
    return {"images": images, "seconds": seconds}


def measure_source(options: dict[str, Any]) -> dict[str, float]:
    """The same GETs through ``S3Source``, the read path ``pack`` uses; the listing is not timed."""
    from s3cache.source.s3 import S3Source

    source = S3Source(options, concurrency=CONCURRENCY)
    objects = source.list_prefix(f"s3://{BUCKET}/{PREFIX}")

    async def get_all() -> None:
        await asyncio.gather(*(source.read_async(obj) for obj in objects))

    start = time.perf_counter()
    source.run(get_all())
    return {"images": len(objects), "seconds": time.perf_counter() - start}


def measure_pack(options: dict[str, Any], destination: str, shard_size: str) -> dict[str, float]:
    """One whole ``pack`` call into an empty folder."""
    from s3cache.pack import pack

    start = time.perf_counter()
    report = pack(f"s3://{BUCKET}/{PREFIX}", destination, shard_size, options, concurrency=CONCURRENCY)
    return {"images": report.packed, "seconds": time.perf_counter() - start, "shards": report.shards,
            "bytes": report.bytes_written}


def child(args: argparse.Namespace) -> None:
    options = json.loads(args.options)
    import s3cache.pack  # noqa: F401 - imports (the S3 client stack included) count in the baseline, not the run

    baseline = peak_rss_mb()
    cpu = time.process_time()
    if args.child == "pack":
        result = measure_pack(options, args.destination, args.shard_size)
    else:
        result = measure_capacity(options) if args.child == "capacity" else measure_source(options)
    print(json.dumps(result | {"baseline_rss_mb": baseline, "peak_rss_mb": peak_rss_mb(),
                               "cpu_s": time.process_time() - cpu}))


def run_child(kind: str, options: dict[str, Any], destination: str = "", shard_size: str = "") -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", kind, "--options", json.dumps(options),
               "--destination", destination, "--shard-size", shard_size]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out.splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--shard-size", default="16MB")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--options", help=argparse.SUPPRESS)
    parser.add_argument("--destination", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from s3cache.config import parse_size
    from s3cache.testing.locals3 import LocalS3
    from s3cache.testing.sampledata import make_photos, upload_photos

    with LocalS3(latency_ms=0) as s3:
        photos = make_photos(args.images, seed=0)
        upload_photos(s3.storage_options, BUCKET, PREFIX, photos)
        s3.boto3_client().create_bucket(Bucket=DEST_BUCKET)
        s3.configure(latency_ms=args.latency_ms)
        total = sum(len(data) for _, data in photos)
        print(f"{args.images} photos, {total / 1e6:.1f} MB, shards of {args.shard_size}, "
              f"latency {args.latency_ms:g} ms, {CONCURRENCY} GETs in flight")
        rows = []
        for number in range(args.rounds):
            rows.append(("capacity", run_child("capacity", s3.storage_options)))
            rows.append(("source", run_child("source", s3.storage_options)))
            rows.append(("pack", run_child("pack", s3.storage_options, f"s3://{DEST_BUCKET}/round-{number}/",
                                           args.shard_size)))
    print("| run | images/s | seconds | client CPU s | baseline RSS MB | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for kind, row in rows:
        print(f"| {kind} | {row['images'] / row['seconds']:.0f} | {row['seconds']:.2f} | {row['cpu_s']:.2f} | "
              f"{row['baseline_rss_mb']:.0f} | {row['peak_rss_mb']:.0f} |")
    best = {kind: max(row["images"] / row["seconds"] for k, row in rows if k == kind) for kind in KINDS}
    limit_mb = (2 * parse_size(args.shard_size) + 200e6) / 1e6
    peak = max(row["peak_rss_mb"] for kind, row in rows if kind == "pack")
    print(f"\npack / capacity (best of each): {best['pack'] / best['capacity']:.2f} (goal >= 0.8); "
          f"S3Source GETs / capacity: {best['source'] / best['capacity']:.2f}; "
          f"pack peak RSS {peak:.0f} MB (limit: two shards + 200 MB = {limit_mb:.0f} MB)")


if __name__ == "__main__":
    main()
