"""The ``s3cache`` command: a thin formatting layer over :mod:`s3cache.ops` and :mod:`s3cache.demo`.

Only ``s3cache demo`` imports Keras; every other command starts quickly without it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from s3cache import __version__
from s3cache.arguments import check_array_size, image_size_of
from s3cache.config import DEFAULT_CONCURRENCY, CacheConfig
from s3cache.errors import S3CacheError
from s3cache.spec import COLOR_MODES, INTERPOLATIONS, ImageSpec
from s3cache.urls import prefix_of

if TYPE_CHECKING:
    from s3cache.loader import FillProgress

EXIT_ERROR = 2
EXIT_PROBLEMS = 1
EXIT_DECLINED = 1
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a command whose reader went away (`| head`)
FAILED_SHOWN = 5  # failed URLs named by `warm`


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``s3cache`` command.

    Args:
        argv: Arguments without the program name; default ``sys.argv[1:]``.

    Returns:
        The exit status: 0 on success, 1 when ``verify`` leaves problems, 2 on errors, 130 on Ctrl-C.
    """
    args = build_parser().parse_args(argv)
    try:
        status = int(args.handler(args))
        sys.stdout.flush()  # a reader that went away shows here, not as a traceback at exit
        return status
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        _quiet_interrupt()
        print("s3cache: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if not _is_user_error(exc):
            raise
        # One line, whatever the message holds: scripts and logs read it as a single record.
        message = _cli_advice(" ".join(str(exc).split()), args.command) or type(exc).__name__
        print(f"s3cache: error: {shown(message)}", file=sys.stderr)
        return EXIT_ERROR


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(
        prog="s3cache",
        description="Keras datasets from images in S3, served from an on-disk cache of resized arrays.",
        epilog="example:\n  s3cache warm s3://my-bucket/train/ --image-size 224 224\n  s3cache info",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"s3cache {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cache, s3, spec = _cache_options(), _s3_options(), _spec_options()

    warm = _command(commands, "warm", _warm, [cache, s3, spec], "fill the cache with the resized images of a prefix",
                    "s3cache warm s3://my-bucket/train/ --image-size 224 224 --cache-size-limit 20GB")
    warm.add_argument("url", help="prefix URL, e.g. s3://bucket/train/")
    warm.add_argument("--cache-size-limit", help="set the cache's size limit, e.g. 10GB (default: keep the stored one)")
    warm.add_argument("--concurrency", type=int, default=32, help="most S3 requests in flight (default: 32)")

    info = _command(commands, "info", _info, [cache], "show the cache's size, limit, specs and listings",
                    "s3cache info --json")
    info.add_argument("--json", action="store_true", help="print one JSON object")

    ls = _command(commands, "ls", _ls, [cache, s3, spec], "list a prefix, marking which objects are cached",
                  "s3cache ls s3://my-bucket/train/ --image-size 224 224")
    ls.add_argument("url", help="prefix URL, e.g. s3://bucket/train/")
    ls.add_argument("--offline", action="store_true", help="use the stored listing; do not contact S3")

    verify = _command(commands, "verify", _verify, [cache], "check every cache entry; exit status 1 on problems",
                      "s3cache verify --fix")
    verify.add_argument("--fix", action="store_true", help="remove damaged entries")

    clear = _command(commands, "clear", _clear, [cache], "remove everything, one spec or one listing",
                     "s3cache clear --spec 3f2a9c0d1e4b5a67 --yes")
    target = clear.add_mutually_exclusive_group()
    target.add_argument("--spec", help="a spec fingerprint (see `s3cache info`): remove its arrays")
    target.add_argument("--url", help="a stored listing's URL: remove it and its objects' arrays under every spec")
    clear.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    pack = _command(commands, "pack", _pack, [s3], "pack a prefix's images into tar shards with an index",
                    "s3cache pack s3://my-bucket/train/ s3://my-bucket/train-shards/ --shard-size 256MB")
    pack.add_argument("source", help="prefix URL of the images, e.g. s3://bucket/train/")
    pack.add_argument("destination", help="folder URL for the shards and index.json; rerun to resume")
    pack.add_argument("--shard-size", default="256MB", help="target shard size (default: 256MB)")
    pack.add_argument("--concurrency", type=int, default=32, help="most S3 GETs in flight (default: 32)")

    demo = _command(commands, "demo", _demo, [s3], "train a small CNN through the cache on an embedded S3",
                    "s3cache demo --images 300 --epochs 3")
    demo.add_argument("--cache-dir", help="cache directory (default: $S3CACHE_DIR, else a temporary one, "
                                          "deleted afterwards)")
    demo.add_argument("--images", type=int, default=300, help="photos uploaded to the embedded S3 (default: 300)")
    demo.add_argument("--epochs", type=int, default=3, help="training epochs (default: 3)")
    demo.add_argument("--image-size", type=int, nargs=2, default=[96, 96], metavar=("H", "W"),
                      help="array size (default: 96 96)")
    demo.add_argument("--batch-size", type=int, default=32, help="images per batch (default: 32)")
    demo.add_argument("--url", help="train on your own s3:// prefix (class folders) instead of the embedded S3")
    return parser


# -- commands ----------------------------------------------------------------------------------------


def _warm(args: argparse.Namespace) -> int:
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
                              concurrency=args.concurrency, progress=progress, on_listed=progress.listed)
        finally:
            progress.close()  # before any message, so it does not land on the bar's line
    except KeyboardInterrupt:
        _quiet_interrupt()
        print(f"s3cache: interrupted: {progress.stored} new arrays stored in this run, {progress.hits} were already "
              "cached; everything stored stays usable. Run the same command again to continue.", file=sys.stderr)
        return EXIT_INTERRUPTED
    left_out = f", {report.left_out} left out (the cache is full)" if report.left_out else ""
    print(f"{shown(report.url)}: {report.total} images, {report.hits} already cached, {report.fetched} fetched "
          f"({_size(report.bytes_fetched)}), {report.failed} failed{left_out}, {report.seconds:.1f} s "
          f"-> {shown(report.cache_dir)} (spec {report.fingerprint})")
    if progress.failed_urls:
        failed = ", ".join(shown(url) for url in progress.failed_urls[:FAILED_SHOWN])
        more = len(progress.failed_urls) - FAILED_SHOWN
        print(f"failed (not decodable images, remembered as such): {failed}"
              + (f" and {more} more" if more > 0 else ""))
    return 0


def _info(args: argparse.Namespace) -> int:
    from s3cache.ops import cache_info

    info = cache_info(args.cache_dir)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    limit = info["size_limit_bytes"]
    print(f"directory  {shown(info['directory'])}")
    print(f"size       {_size(info['size_bytes'])} of {_size(limit)} limit "
          f"({_percent(info['size_bytes'] / limit if limit else 0)})")
    print(f"limit      {_size(limit)}, kept in the cache for every process (change it with "
          "`s3cache warm --cache-size-limit` or cache_size_limit=)")
    print(f"entries    {info['entries']}")
    print("specs:" if info["specs"] else "specs:    none")
    for fingerprint, spec in info["specs"].items():
        print(f"  {shown(fingerprint)}  {_describe_spec(spec['description']):40} {spec['entries']} entries "
              f"({_size(spec['size_bytes'])})")
    unrecorded = info["unrecorded"]
    if unrecorded["entries"]:
        print(f"  unrecorded        {'(spec record missing; `s3cache clear` removes them)':40} "
              f"{unrecorded['entries']} entries ({_size(unrecorded['size_bytes'])})")
    print("listings:" if info["listings"] else "listings: none")
    for row in info["listings"]:
        under = f" (spec {shown(row['spec'])})" if row["spec"] else ""
        cached = f"{row['cached']} cached ({_percent(row['fraction'])})"
        print(f"  {shown(row['url'])}  {row['objects']} objects, {cached}{under}")
    return 0


def _ls(args: argparse.Namespace) -> int:
    from s3cache.ops import list_objects

    _check_url_and_size(args)
    if not args.offline:
        _listing(args.url)
    rows = list_objects(args.url, image_size=args.image_size, **_spec_kwargs(args), cache_dir=args.cache_dir,
                        storage_options=_storage_options(args), offline=args.offline)
    for item, cached in rows:
        print(f"{'cached' if cached else '-':7} {_size(item.size):>9}  {shown(item.url)}")
    cached_count = sum(cached for _, cached in rows)
    total_bytes = sum(item.size for item, _ in rows)
    print(f"{len(rows)} objects ({_size(total_bytes)}): {cached_count} cached, {len(rows) - cached_count} not cached")
    return 0


def _verify(args: argparse.Namespace) -> int:
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


def _clear(args: argparse.Namespace) -> int:
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


def _pack(args: argparse.Namespace) -> int:
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
          f"{report.packed} packed into {report.shards_written} new shards ({_size(report.bytes_written)}), "
          f"{report.kept} kept, {len(report.skipped)} skipped, {report.seconds:.1f} s")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from s3cache.demo import run_demo

    if args.url is not None:
        prefix_of(args.url)
    check_array_size(image_size_of(args.image_size))
    run_demo(images=args.images, epochs=args.epochs, image_size=tuple(args.image_size), batch_size=args.batch_size,
             url=args.url, storage_options=_storage_options(args), cache_dir=args.cache_dir)
    return 0


# -- helpers -----------------------------------------------------------------------------------------


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


def _command(
    commands: Any, name: str, handler: Callable[[argparse.Namespace], int], parents: list[argparse.ArgumentParser],
    summary: str, example: str,
) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, parents=parents, help=summary, description=summary + ".",
                                 epilog=f"example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(handler=handler)
    return parser


def _cache_options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--cache-dir", help="cache directory (default: $S3CACHE_DIR, else ~/.cache/s3cache)")
    return parser


def _s3_options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("S3 access (standard AWS variables and profiles apply)")
    group.add_argument("--endpoint-url", help="S3 endpoint (default: $AWS_ENDPOINT_URL, else AWS)")
    group.add_argument("--anon", action="store_true", help="unsigned requests, for public buckets")
    group.add_argument("--profile", help="AWS profile (default: $AWS_PROFILE, else the default profile)")
    return parser


def _spec_options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("image spec (as in image_dataset_from_s3)")
    group.add_argument("--image-size", type=int, nargs=2, required=True, metavar=("H", "W"), help="array size")
    group.add_argument("--color-mode", choices=sorted(COLOR_MODES), default="rgb", help="default: rgb")
    group.add_argument("--interpolation", choices=sorted(INTERPOLATIONS), default="bilinear",
                       help="default: bilinear")
    group.add_argument("--crop-to-aspect-ratio", action="store_true", help="center-crop to the target aspect ratio")
    group.add_argument("--pad-to-aspect-ratio", action="store_true", help="pad to the target aspect ratio")
    return parser


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


def _percent(fraction: float) -> str:
    """A percentage that reads 100% only when complete and 0% only when nothing is there."""
    if fraction <= 0:
        return "0%"
    if fraction < 0.01:
        return "<1%"
    return f"{min(99, round(fraction * 100))}%" if fraction < 1 else f"{round(fraction * 100)}%"


# Library advice (Python arguments) as the command's flags say it; (text, command or None for any, replacement).
_ADVICE = [
    ("pass storage_options={'anon': True}", None, "pass --anon"),
    ("To train from the cache without network, pass offline=True.", "ls", "To list without network, pass --offline."),
    ("To train from the cache without network, pass offline=True.", None, ""),
    ("Run once with offline=False (or `s3cache warm`)", None, "Run `s3cache warm` first"),
    ("offline=True", "ls", "--offline"),
    ("storage_options", None, "--endpoint-url/--anon/--profile"),
]


def _cli_advice(message: str, command: str) -> str:
    """A library message with its advice translated to this command's flags."""
    for text, only, replacement in _ADVICE:
        if only in (None, command):
            message = message.replace(text, replacement)
    return " ".join(message.split())


def _quiet_interrupt() -> None:
    """Ctrl-C can land before a coroutine was handed to the event loop: its "never awaited" warning is noise."""
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)


def _discard_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so that the flush at exit cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        pass


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        raise ValueError(f"refusing to {question.rstrip('?')} without --yes (no terminal to confirm on)")
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def _describe_spec(description: dict[str, Any]) -> str:
    try:
        height, width = description["image_size"]
        flags = [name for name in ("crop_to_aspect_ratio", "pad_to_aspect_ratio") if description[name]]
        text = " ".join([f"{height}x{width}", description["color_mode"], description["interpolation"], *flags])
    except (KeyError, TypeError, ValueError):
        return "(unreadable spec record)"
    return shown(text)


def shown(text: object) -> str:
    r"""Text that prints as one line and as itself: control, format and separator characters escaped.

    Keys, URLs and paths come from S3 and from the cache, and may hold a newline that would forge
    an output line, or terminal escape sequences. Each such character is written as Python writes
    it in a string literal (``\n``, ``\x1b``, ``\u202e``), and a backslash as ``\\``, so
    every shown string reads back unambiguously.
    """
    text = str(text)
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(char if char.isprintable() and char != "\\" else char.encode("unicode_escape").decode("ascii")
                   for char in text)


def _size(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def _is_user_error(exc: BaseException) -> bool:
    """Errors the user can act on (reported in one line), as opposed to bugs (reported with a traceback)."""
    if isinstance(exc, S3CacheError | ValueError | OSError):
        return True
    # botocore raises its own configuration errors (unknown profile, bad region) before any request.
    botocore_exceptions = sys.modules.get("botocore.exceptions")
    return botocore_exceptions is not None and isinstance(exc, botocore_exceptions.BotoCoreError)
