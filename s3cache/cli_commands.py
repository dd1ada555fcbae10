"""The handlers of the ``s3cache`` commands: each checks its arguments, calls the library and prints the outcome.

Each handler takes the parsed arguments (:func:`s3cache.cli.build_parser`) and returns the exit
status. The library work is in :mod:`s3cache.ops`, :mod:`s3cache.pack` and :mod:`s3cache.demo`,
imported on use, so that only ``s3cache demo`` imports Keras.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import TYPE_CHECKING, Any

from s3cache.arguments import check_array_size, image_size_of
from s3cache.cli_format import describe_spec, percent, shown
from s3cache.config import DEFAULT_CONCURRENCY, CacheConfig, size_text
from s3cache.spec import ImageSpec
from s3cache.urls import prefix_of

if TYPE_CHECKING:
    from s3cache.loader import FillProgress

EXIT_PROBLEMS = 1
EXIT_DECLINED = 1
EXIT_INTERRUPTED = 130
FAILED_SHOWN = 5  # failed URLs named by `warm`


def warm_command(args: argparse.Namespace) -> int:
    """``s3cache warm``: fill the cache with the resized images of a prefix, with a progress bar."""
    from s3cache.ops import warm

    _check_url_and_size(args)
    progress = _WarmProgress()
    _listing(args.url)
    try:
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _print_warning
                report = warm(args.url, args.image_size, **_spec_kwargs(args), cache_dir=args.cache_dir,
                              cache_size_limit=args.cache_size_limit, storage_options=_storage_options(args),
                              concurrency=args.concurrency, decoder=args.decoder, progress=progress,
                              on_listed=progress.listed)
        finally:
            progress.close()  # before any message, so it does not land on the bar's line
    except KeyboardInterrupt:
        quiet_interrupt()
        print(f"s3cache: interrupted: {progress.stored} new arrays stored in this run, {progress.hits} were already "
              "cached; everything stored stays usable. Run the same command again to continue.", file=sys.stderr)
        return EXIT_INTERRUPTED
    left_out = f", {report.left_out} left out (the cache is full)" if report.left_out else ""
    print(f"{shown(report.url)}: {report.total} images, {report.hits} already cached, {report.fetched} fetched "
          f"({size_text(report.bytes_fetched)}), {report.failed} failed{left_out}, {report.seconds:.1f} s "
          f"-> {shown(report.cache_dir)} (spec {report.fingerprint})")
    if progress.failed_urls:
        failed = ", ".join(shown(url) for url in progress.failed_urls[:FAILED_SHOWN])
        more = len(progress.failed_urls) - FAILED_SHOWN
        print(f"failed (not decodable images, remembered as such): {failed}"
              + (f" and {more} more" if more > 0 else ""))
    return 0


def info_command(args: argparse.Namespace) -> int:
    """``s3cache info``: the cache's size, limit, specs and listings, as text or one JSON object."""
    from s3cache.ops import cache_info

    info = cache_info(args.cache_dir)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    limit = info["size_limit_bytes"]
    print(f"directory  {shown(info['directory'])}")
    print(f"size       {size_text(info['size_bytes'])} of {size_text(limit)} limit "
          f"({percent(info['size_bytes'] / limit if limit else 0)})")
    print(f"limit      {size_text(limit)}, kept in the cache for every process (change it with "
          "`s3cache warm --cache-size-limit` or cache_size_limit=)")
    print(f"entries    {info['entries']}")
    print("specs:" if info["specs"] else "specs:    none")
    for fingerprint, spec in info["specs"].items():
        print(f"  {shown(fingerprint)}  {describe_spec(spec['description']):40} {spec['entries']} entries "
              f"({size_text(spec['size_bytes'])})")
    unrecorded = info["unrecorded"]
    if unrecorded["entries"]:
        print(f"  unrecorded        {'(spec record missing; `s3cache clear` removes them)':40} "
              f"{unrecorded['entries']} entries ({size_text(unrecorded['size_bytes'])})")
    print("listings:" if info["listings"] else "listings: none")
    for row in info["listings"]:
        under = f" (spec {shown(row['spec'])})" if row["spec"] else ""
        cached = f"{row['cached']} cached ({percent(row['fraction'])})"
        print(f"  {shown(row['url'])}  {row['objects']} objects, {cached}{under}")
    return 0


def ls_command(args: argparse.Namespace) -> int:
    """``s3cache ls``: a prefix's objects, each marked cached or not, and a summary line."""
    from s3cache.ops import list_objects

    _check_url_and_size(args)
    if not args.offline:
        _listing(args.url)
    rows = list_objects(args.url, image_size=args.image_size, **_spec_kwargs(args), cache_dir=args.cache_dir,
                        storage_options=_storage_options(args), offline=args.offline)
    for item, cached in rows:
        print(f"{'cached' if cached else '-':7} {size_text(item.size):>9}  {shown(item.url)}")
    cached_count = sum(cached for _, cached in rows)
    total_bytes = sum(item.size for item, _ in rows)
    print(f"{len(rows)} objects ({size_text(total_bytes)}): {cached_count} cached, "
          f"{len(rows) - cached_count} not cached")
    return 0


def verify_command(args: argparse.Namespace) -> int:
    """``s3cache verify``: print the problems found (and fixed, with ``--fix``); exit status 1 while any remain."""
    from s3cache.ops import verify_cache

    problems = verify_cache(args.cache_dir, fix=args.fix)
    for problem in problems:
        action = f" -> {shown(problem.action)}" if args.fix and problem.action else ""
        print(f"{shown(problem.key)}: {shown(problem.reason)}{action}")
    if not problems:
        print("no problems found")
        return 0
    if not args.fix:
        print(f"{len(problems)} problem(s) found; run `s3cache verify --fix` to remove damaged entries")
        return EXIT_PROBLEMS
    remaining = verify_cache(args.cache_dir)
    print(f"{len(problems)} problem(s) found and fixed" if not remaining
          else f"{len(problems)} problem(s) found, {len(remaining)} remain after fixing")
    return EXIT_PROBLEMS if remaining else 0


def clear_command(args: argparse.Namespace) -> int:
    """``s3cache clear``: remove everything, one spec or one listing, after confirming on a terminal."""
    from s3cache.ops import clear_cache

    directory = CacheConfig.create(args.cache_dir).cache_dir
    what = (f"spec {args.spec}" if args.spec else f"listing {args.url} and its arrays" if args.url
            else "every cached array, listing and spec")
    if not args.yes and not _confirm(shown(f"remove {what} from {directory}?")):
        print("nothing removed")
        return EXIT_DECLINED
    removed = clear_cache(args.cache_dir, spec=args.spec, url=args.url)
    print(shown(f"removed {what}: {removed} arrays"))
    return 0


def pack_command(args: argparse.Namespace) -> int:
    """``s3cache pack``: pack a prefix's images into tar shards with an index, with a progress bar."""
    from tqdm import tqdm

    from s3cache.pack import PackProgress, pack

    bars: list[Any] = []  # made on the first object, once the total is known (and not at all on early errors)

    def advance(event: PackProgress) -> None:
        if not bars:
            bars.append(tqdm(total=event.total, unit="img", desc="pack", file=sys.stderr))
        bars[0].update()

    try:
        try:
            report = pack(args.source, args.destination, args.shard_size, _storage_options(args), args.concurrency,
                          progress=advance)
        finally:
            for bar in bars:
                bar.close()
    except KeyboardInterrupt:
        print("s3cache: interrupted: complete shards are kept; run the same command again to finish",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    for line in report.skipped:
        print(f"skipped {line}", file=sys.stderr)
    print(f"{report.source} -> {report.destination}: {report.members} members in {report.shards} shards; "
          f"{report.packed} packed into {report.shards_written} new shards ({size_text(report.bytes_written)}), "
          f"{report.kept} kept, {len(report.skipped)} skipped, {report.seconds:.1f} s")
    return 0


def demo_command(args: argparse.Namespace) -> int:
    """``s3cache demo``: train a small CNN through the cache on an embedded S3 (or the given prefix)."""
    from s3cache.demo import run_demo

    if args.url is not None:
        prefix_of(args.url)
    check_array_size(image_size_of(args.image_size))
    run_demo(images=args.images, epochs=args.epochs, image_size=tuple(args.image_size), batch_size=args.batch_size,
             url=args.url, storage_options=_storage_options(args), cache_dir=args.cache_dir)
    return 0


class _WarmProgress:
    """Drives a tqdm bar from fill events and keeps the counts for an interrupted run."""

    def __init__(self) -> None:
        self.hits = self.stored = self.failed = self.bytes = 0
        self.failed_urls: list[str] = []
        self._bar: Any = None

    def listed(self, total: int) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, unit="img", desc="warm", file=sys.stderr)

    def __call__(self, event: FillProgress) -> None:
        if event.hit:
            self.hits += 1
        else:
            self.bytes += event.item.size
            self.failed += event.failed
            self.stored += not event.failed
            if event.failed:
                self.failed_urls.append(event.item.url)
        if self._bar is not None:
            self._bar.set_postfix_str(f"hits {self.hits}, fetched {self.stored + self.failed}, "
                                      f"{self.bytes / 1e6:.1f} MB", refresh=False)
            self._bar.update()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _print_warning(message: Warning | str, *args: Any, **kwargs: Any) -> None:
    """Show a warning (the cache cannot hold everything) as one line on stderr, without a source location."""
    print(" ".join(str(message).split()), file=sys.stderr)


def _spec_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"color_mode": args.color_mode, "interpolation": args.interpolation,
            "crop_to_aspect_ratio": args.crop_to_aspect_ratio, "pad_to_aspect_ratio": args.pad_to_aspect_ratio}


def _storage_options(args: argparse.Namespace) -> dict[str, Any]:
    """s3fs options from the flags; what is not given is left to botocore's own configuration chain."""
    options: dict[str, Any] = {}
    if args.endpoint_url:
        options["endpoint_url"] = args.endpoint_url
    if args.anon:
        options["anon"] = True
    if args.profile:
        options["profile"] = args.profile
    return options


def _check_url_and_size(args: argparse.Namespace) -> None:
    """Refuse a URL that is not ``s3://``, a bad spec or an absurd image size before anything is opened or written."""
    prefix_of(args.url)
    spec = ImageSpec(image_size_of(args.image_size), **_spec_kwargs(args))
    check_array_size(spec.image_size, spec.color_mode)
    CacheConfig.create(args.cache_dir, getattr(args, "cache_size_limit", None),
                       concurrency=getattr(args, "concurrency", DEFAULT_CONCURRENCY))


def _listing(url: str) -> None:
    """Say what is going on while a large prefix is listed (before the progress bar can start)."""
    print(f"listing {url} ...", file=sys.stderr, flush=True)


def quiet_interrupt() -> None:
    """Ctrl-C can land before a coroutine was handed to the event loop: its "never awaited" warning is noise."""
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)


def _confirm(question: str) -> bool:
    """Ask a yes/no question on the terminal; refuse to go on without one."""
    if not sys.stdin.isatty():
        raise ValueError(f"refusing to {question.rstrip('?')} without --yes (no terminal to confirm on)")
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
