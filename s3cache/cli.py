"""The ``s3cache`` command: its argument parser, and one-line error reports.

A thin layer over :mod:`s3cache.ops` and :mod:`s3cache.demo`: the commands' handlers are in
:mod:`s3cache.cli_commands`, their output formatting in :mod:`s3cache.cli_format`. Only
``s3cache demo`` imports Keras; every other command starts quickly without it.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from s3cache import __version__
from s3cache.cli_commands import (
    EXIT_INTERRUPTED,
    clear_command,
    demo_command,
    info_command,
    ls_command,
    pack_command,
    quiet_interrupt,
    verify_command,
    warm_command,
)
from s3cache.cli_format import shown
from s3cache.errors import S3CacheError
from s3cache.spec import COLOR_MODES, INTERPOLATIONS

EXIT_ERROR = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a command whose reader went away (`| head`)


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
        quiet_interrupt()
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

    warm = _command(commands, "warm", warm_command, [cache, s3, spec],
                    "fill the cache with the resized images of a prefix",
                    "s3cache warm s3://my-bucket/train/ --image-size 224 224 --cache-size-limit 20GB")
    warm.add_argument("url", help="prefix URL, e.g. s3://bucket/train/")
    warm.add_argument("--cache-size-limit", help="set the cache's size limit, e.g. 10GB (default: keep the stored one)")
    warm.add_argument("--concurrency", type=int, default=32, help="most S3 requests in flight (default: 32)")
    warm.add_argument("--decoder", choices=["auto", "numpy", "tensorflow"],
                      help="decode with NumPy or in TensorFlow batches (imports TensorFlow: faster on many JPEGs, "
                           "such as a packed prefix); the arrays are the same (default: $S3CACHE_DECODER, else auto, "
                           "which is NumPy here)")

    info = _command(commands, "info", info_command, [cache], "show the cache's size, limit, specs and listings",
                    "s3cache info --json")
    info.add_argument("--json", action="store_true", help="print one JSON object")

    ls = _command(commands, "ls", ls_command, [cache, s3, spec], "list a prefix, marking which objects are cached",
                  "s3cache ls s3://my-bucket/train/ --image-size 224 224")
    ls.add_argument("url", help="prefix URL, e.g. s3://bucket/train/")
    ls.add_argument("--offline", action="store_true", help="use the stored listing; do not contact S3")

    verify = _command(commands, "verify", verify_command, [cache], "check every cache entry; exit status 1 on problems",
                      "s3cache verify --fix")
    verify.add_argument("--fix", action="store_true", help="remove damaged entries")

    clear = _command(commands, "clear", clear_command, [cache], "remove everything, one spec or one listing",
                     "s3cache clear --spec 3f2a9c0d1e4b5a67 --yes")
    target = clear.add_mutually_exclusive_group()
    target.add_argument("--spec", help="a spec fingerprint (see `s3cache info`): remove its arrays")
    target.add_argument("--url", help="a stored listing's URL: remove it and its objects' arrays under every spec")
    clear.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    pack = _command(commands, "pack", pack_command, [s3], "pack a prefix's images into tar shards with an index",
                    "s3cache pack s3://my-bucket/train/ s3://my-bucket/train-shards/ --shard-size 256MB")
    pack.add_argument("source", help="prefix URL of the images, e.g. s3://bucket/train/")
    pack.add_argument("destination", help="folder URL for the shards and index.json; rerun to resume")
    pack.add_argument("--shard-size", default="256MB", help="target shard size (default: 256MB)")
    pack.add_argument("--concurrency", type=int, default=32, help="most S3 GETs in flight (default: 32)")

    demo = _command(commands, "demo", demo_command, [s3], "train a small CNN through the cache on an embedded S3",
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


def _discard_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so that the flush at exit cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        pass


def _is_user_error(exc: BaseException) -> bool:
    """Errors the user can act on (reported in one line), as opposed to bugs (reported with a traceback)."""
    if isinstance(exc, S3CacheError | ValueError | OSError):
        return True
    # botocore raises its own configuration errors (unknown profile, bad region) before any request.
    botocore_exceptions = sys.modules.get("botocore.exceptions")
    return botocore_exceptions is not None and isinstance(exc, botocore_exceptions.BotoCoreError)
