"""Where the array store keeps an entry (a row, on database pages of which size, or a value file), by entry size.

Run from the repository root, in the project's virtual environment (``pip install -e .[bench]``)::

    python benchmarks/inline.py --out inline

For each entry size (``--sides``: square RGB arrays, 128x128 is 48 KiB) and each way of storing
(``row``: the value inside SQLite, on pages of 4, 8 or 16 KiB; ``file``: a value file, diskcache's
layout), it fills a new store
in the system's temporary directory with ``--entries`` encoded arrays (at most ``--megabytes``),
written as s3cache's store writer writes them (``ArrayStore.put_many``, ``--batch`` entries per
transaction, then ``cull``), and reads them back in shuffled batches of ``--batch``
(``ArrayStore.get_many``: one query per batch, checksum checked). Each setting is measured
``--rounds`` times, alternating, on a fresh store each time; the table gives the write CPU per
entry (the process's CPU time, system time included: file creation is mostly kernel work), the
read wall time per entry (min/median/max), and the store's volume per entry over the entry's bytes.

It prints a Markdown table and writes ``benchmarks/results/<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from harness import describe_machine, machine

from s3cache import codec
from s3cache.store import ArrayStore
from s3cache.store.layout import INLINE_LIMIT, page_size_for

RESULTS = Path(__file__).resolve().parent / "results"
# The store's inline limit and page size for each way of storing.
WAYS = {"row, 4 KiB pages": (2**40, 4096), "row, 8 KiB pages": (2**40, 8192), "row, 16 KiB pages": (2**40, 16384),
        "file": (0, 4096)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[64, 128, 224, 288, 448],
                        help="entry sizes: side of a square RGB array")
    parser.add_argument("--entries", type=int, default=1024, help="entries per store (at most --megabytes of them)")
    parser.add_argument("--megabytes", type=int, default=128, help="most megabytes of entries per store")
    parser.add_argument("--batch", type=int, default=32, help="entries per write transaction and per read")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per setting")
    parser.add_argument("--out", default="inline", help="name of the result files in benchmarks/results/")
    return parser.parse_args(argv)


def measure(side: int, way: str, entries: int, batch: int) -> tuple[float, float, float]:
    """Write CPU ms and read wall ms per entry, and the volume over the entries' bytes, for one fresh store."""
    inline_limit, page_size = WAYS[way]
    array = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    keys = [f"entry-{i}" for i in range(entries)]
    values = [codec.encode_array(array, key=key) for key in keys]
    with (tempfile.TemporaryDirectory(prefix="s3cache-inline-") as tmp,
          ArrayStore(Path(tmp) / "arrays", inline_limit=inline_limit, page_size=page_size) as store):
        empty = store.volume()
        store.begin_run("inline-benchmark")
        started = time.process_time()
        for start in range(0, entries, batch):
            store.put_many(list(zip(keys[start:start + batch], values[start:start + batch], strict=True)), "t")
            store.cull()
        write = (time.process_time() - started) / entries
        space = (store.volume() - empty) / sum(map(len, values))
        order = np.random.default_rng(0).permutation(entries)
        started = time.perf_counter()
        for start in range(0, entries, batch):
            found = store.get_many([keys[i] for i in order[start:start + batch]])
            assert all(entry is not None for entry in found)
        read = (time.perf_counter() - started) / entries
    return write * 1e3, read * 1e3, space


def spread(values: list[float]) -> str:
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}"


def _picked(row: dict[str, Any]) -> str:
    """A mark on the way the store keeps the row's entries: a value file, or rows on the page size it picks."""
    in_file = row["kib"] * 1024 >= INLINE_LIMIT
    inline_limit, page_size = WAYS[row["way"]]
    chosen = inline_limit == 0 if in_file else inline_limit > 0 and page_size == row["picked"]
    return " *" if chosen else ""


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    info = machine()
    rows: list[dict[str, Any]] = []
    for side in args.sides:
        found: dict[str, dict[str, list[float]]] = {way: {"write": [], "read": [], "space": []} for way in WAYS}
        for number in range(args.rounds):
            for way in WAYS if number % 2 == 0 else list(WAYS)[::-1]:
                entries = min(args.entries, args.megabytes * 10**6 // (side * side * 3))
                write, read, space = measure(side, way, entries, args.batch)
                found[way]["write"].append(write)
                found[way]["read"].append(read)
                found[way]["space"].append(space)
        entry = codec.entry_size((side, side, 3))
        kib = entry / 1024
        picked = page_size_for(entry)
        rows += [{"side": side, "kib": kib, "way": way, "picked": picked, **times} for way, times in found.items()]
        print(f"{side}x{side}: " + ", ".join(f"{way} write {statistics.median(t['write']):.3f} ms, read "
                                             f"{statistics.median(t['read']):.3f} ms" for way, t in found.items()),
              flush=True)
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    lines = [f"## Array store: rows (on which page size) or value files ({now})",
             "", f"{args.entries} entries per store, {args.batch} per transaction and per read, {args.rounds} rounds, "
             f"in {tempfile.gettempdir()} (at most {args.megabytes} MB per store). {describe_machine(info)}", "",
             "| entry | KiB | stored as | write CPU ms/entry (min/median/max) | read ms/entry (min/median/max) | "
             "volume / bytes |", "|---|--:|---|--:|--:|--:|"]
    lines += [f"| {row['side']}x{row['side']}x3 | {row['kib']:.0f} | {row['way']}{_picked(row)} | "
              f"{spread(row['write'])} | {spread(row['read'])} | {statistics.median(row['space']):.2f} |"
              for row in rows]
    lines += ["", f"The store keeps entries under {INLINE_LIMIT // 1024} KiB as rows "
              "(`s3cache.store.layout.INLINE_LIMIT`); the way marked * is the store's: a new store's page size "
              "is picked for its first dataset's entries (`s3cache.store.layout.page_size_for`)."]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.md").write_text(text)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"settings": vars(args), "machine": info, "rows": rows},
                                                         indent=1))


if __name__ == "__main__":
    main()
