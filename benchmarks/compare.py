"""s3cache against the seed recipe, tf.data, fsspec and local Keras, over an S3 endpoint with latency.

Run from the repository root, in the project's virtual environment (``pip install -e .[bench]``)::

    python benchmarks/compare.py --latency-ms 20 --latency-ms 100 --out compare

Per latency setting it starts one local S3 endpoint (``s3cache.testing.locals3.LocalS3``: moto in its own process,
sleeping ``--latency-ms`` before every request and counting requests), uploads ``--images`` real photos
once, and runs every contender of ``contenders.py`` in its own process for two epochs, zeroing the
endpoint's counters in between. With ``--rounds N`` it runs all of them N times in turn, each round
from an empty cache and packing afresh, and reports each epoch's median round (min/median/max in the
notes), so that a burst of other work on a shared machine moves one round, not the verdict. It prints
a Markdown table per latency with the ratios and targets of the issue, and writes
``benchmarks/results/<out>.json``, ``<out>.md`` and ``<out>.png``. Use fewer images
(``--images 300 --seed-images 64``) while developing; one round takes about six minutes per latency on
two cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from harness import BENCH_ENV, Run, Workload, describe_machine, machine
from profiling import py_spy_command
from profiling import summarize as summarize_profile
from report import Target, chart, combine_rounds, markdown, summarize

from s3cache.testing.locals3 import LocalS3
from s3cache.testing.sampledata import make_photos, upload_photos, write_photos

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BUCKET = "bench-photos"
PREFIX = "train/"
# Limits first (nothing else runs beside them), then the baselines, then s3cache's three processes in
# the order they need each other: the cold run fills the cache that the offline and LRU runs read.
ORDER = ["capacity-boto3", "capacity-aio", "seed", "keras-local", "tfdata", "fsspec", "s3cache", "s3cache-numpy",
         "s3cache-offline", "s3cache-lru", "s3cache-packed", "s3cache-packed-numpy", "raw"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="photos in the dataset (default 2000)")
    parser.add_argument("--latency-ms", type=float, action="append",
                        help="injected latency per S3 request; repeat for several (default 20)")
    parser.add_argument("--image-size", type=int, nargs=2, default=[128, 128], metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed-images", type=int, default=200,
                        help="photos the sequential seed recipe reads; its rate is measured on this subset")
    parser.add_argument("--lru-rounds", type=int, default=5, help="warm passes per setting in the LRU comparison")
    parser.add_argument("--warm-rounds", type=int, default=5,
                        help="further warm passes of s3cache and the raw read limit, compared by their medians")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every contender this many times in turn and report the median round (default 1; "
                             "an odd count has a middle one)")
    parser.add_argument("--contenders", nargs="+", choices=ORDER, default=ORDER, help="run only these")
    parser.add_argument("--profile", nargs="+", choices=ORDER, default=[],
                        help="record these contenders with py-spy (summary: results/<out>-<ms>ms-<name>.profile.txt)")
    parser.add_argument("--out", default="compare", help="name of the result files in benchmarks/results/")
    args = parser.parse_args(argv)
    args.latency_ms = args.latency_ms or [20.0]
    if min(args.images, args.batch_size, args.seed_images, args.rounds) < 1:
        parser.error("--images, --batch-size, --seed-images and --rounds must be positive")
    return args


def run_contender(name: str, workload_path: Path, scratch: Path, profile: Path | None = None) -> list[Run]:
    """Run one contender in a fresh process and read back its runs.

    Args:
        name: The contender.
        workload_path: The workload JSON.
        scratch: Where its result (and recording) go.
        profile: Record the process with py-spy and write a summary here.

    Raises:
        RuntimeError: The contender failed (its stderr is included).
    """
    result = scratch / f"{name}.result.json"
    command = [sys.executable, str(HERE / "contenders.py"), "--contender", name,
               "--workload", str(workload_path), "--result", str(result)]
    recording = scratch / f"{name}.pyspy.txt"
    if profile:
        command = py_spy_command(recording, command)
    done = subprocess.run(command, env=os.environ | BENCH_ENV, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not result.exists():
        raise RuntimeError(f"contender {name} failed with code {done.returncode}:\n{done.stderr[-4000:]}")
    runs = [Run.from_json(data) for data in json.loads(result.read_text())]
    if profile:
        profile.write_text(summarize_profile(recording, f"py-spy profile of contender {name!r}"))
        for run in runs:
            run.note = "; ".join(filter(None, [run.note, "recorded with py-spy"]))
    return runs


def run_latency(latency_ms: float, photos: list[tuple[str, bytes]], local_dir: Path, scratch: Path,
                args: argparse.Namespace) -> list[Run]:
    """All contenders against one endpoint with the given latency, ``args.rounds`` times (:func:`combine_rounds`)."""
    with LocalS3(latency_ms=latency_ms) as s3:
        s3.configure(latency_ms=0)  # the upload is setup, not part of any measurement
        upload_photos(s3.storage_options, BUCKET, PREFIX, photos)
        s3.configure(latency_ms=latency_ms)
        rounds = []
        for number in range(1, args.rounds + 1):
            folder = scratch / f"round-{number}"
            workload = Workload(
                endpoint_url=s3.endpoint_url, storage_options=s3.storage_options, bucket=BUCKET, prefix=PREFIX,
                local_dir=str(local_dir), work_dir=str(folder / "work"), cache_dir=str(folder / "s3cache"),
                images=len(photos), seed_images=min(args.seed_images, len(photos)),
                image_size=tuple(args.image_size), batch_size=args.batch_size, lru_rounds=args.lru_rounds,
                warm_rounds=args.warm_rounds, server_pid=_server_pid(), packed_prefix=f"packed-{number}/",
            )
            folder.mkdir()
            workload.save(folder / "workload.json")
            rounds.append(run_round(s3, folder, args, latency_ms, number))
    return combine_rounds(rounds)


def run_round(s3: LocalS3, folder: Path, args: argparse.Namespace, latency_ms: float, number: int) -> list[Run]:
    """Every contender once, in :data:`ORDER`, against the workload saved in ``folder`` (round ``number``)."""
    runs: list[Run] = []
    title = f"{latency_ms:g} ms, round {number}/{args.rounds}"
    suffix = f"-round{number}" if args.rounds > 1 else ""
    for name in [n for n in ORDER if n in args.contenders]:
        s3.reset_stats()
        started = time.perf_counter()
        profile = RESULTS / f"{args.out}-{latency_ms:g}ms-{name}{suffix}.profile.txt" if name in args.profile else None
        found = run_contender(name, folder / "workload.json", folder, profile)
        # Whatever the endpoint saw outside the timed passes is setup (listing, warm-up).
        found[0].setup_s3_requests = s3.requests() - sum(e.s3_requests for r in found for e in r.epochs)
        # Other work on the machine skews the numbers: keep the load (this contender's included) next to them.
        found[0].extra["load_average_1m_after"] = os.getloadavg()[0]
        rates = ", ".join(f"{e.images_per_s:,.0f}" for r in found for e in r.epochs)
        print(f"[{title}] {name}: {rates} images/s ({time.perf_counter() - started:.0f} s in all)",
              file=sys.stderr, flush=True)
        runs += found
    return runs


def _server_pid() -> int:
    """The endpoint's process: LocalS3 starts it as a child of this one."""
    servers = [p.pid for p in psutil.Process().children() if "s3cache.testing.locals3" in " ".join(p.cmdline())]
    if len(servers) != 1:
        raise RuntimeError(f"expected one local S3 server process, found {len(servers)}")
    return servers[0]


def write_results(name: str, settings: dict[str, Any], info: dict[str, Any], summaries: list[dict[str, Any]]) -> str:
    """Write ``<name>.json``, ``<name>.md`` and ``<name>.png`` to benchmarks/results/; return the Markdown."""
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    document = {"name": name, "created": created, "settings": settings, "machine": info, "latencies": summaries}
    (RESULTS / f"{name}.json").write_text(json.dumps(document, indent=1) + "\n")
    header = (f"## s3cache compared ({created})\n\n{settings['images']} photos, {settings['image_size'][0]}x"
              f"{settings['image_size'][1]} float32, batch {settings['batch_size']}, 2 epochs per contender"
              f"{_rounds_text(settings.get('rounds', 1))}. "
              f"{describe_machine(info)}\n\n")
    text = header + "\n".join(markdown(summary) for summary in summaries)
    (RESULTS / f"{name}.md").write_text(text)
    chart(summaries, RESULTS / f"{name}.png", f"images/s per epoch, {settings['images']} photos")
    return text


def _rounds_text(rounds: int) -> str:
    if rounds == 1:
        return ""
    return f", {rounds} rounds of all contenders in turn: each epoch's median round, min/median/max in the notes"


def main(argv: list[str] | None = None) -> None:
    """Run the comparison and report it."""
    args = parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    info = machine()  # before the run: the s3cache source may change while it runs
    photos = make_photos(args.images, seed=0)
    summaries = []
    with tempfile.TemporaryDirectory(prefix="s3cache-bench-") as tmp:
        local_dir = Path(tmp) / "local"
        write_photos(local_dir, photos)
        for latency_ms in args.latency_ms:
            scratch = Path(tmp) / f"latency-{latency_ms:g}"
            scratch.mkdir()
            summaries.append(summarize(latency_ms, run_latency(latency_ms, photos, local_dir, scratch, args)))
    settings = {key: vars(args)[key] for key in ("images", "latency_ms", "image_size", "batch_size", "seed_images",
                                                 "rounds", "lru_rounds", "warm_rounds", "contenders")}
    print(write_results(args.out, settings, info, summaries))
    for summary in summaries:
        print(f"targets at {summary['latency_ms']:g} ms:")
        for target in summary["targets"]:
            print("  " + Target(**target).describe())


if __name__ == "__main__":
    main()
