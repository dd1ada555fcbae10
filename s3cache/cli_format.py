"""Output formatting of the ``s3cache`` command: one-line, escaped text, sizes and percentages."""

from __future__ import annotations

from typing import Any


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


def percent(fraction: float) -> str:
    """A percentage that reads 100% only when complete and 0% only when nothing is there."""
    if fraction <= 0:
        return "0%"
    if fraction < 0.01:
        return "<1%"
    return f"{min(99, round(fraction * 100))}%" if fraction < 1 else f"{round(fraction * 100)}%"


def describe_spec(description: dict[str, Any]) -> str:
    """A spec record as one line (``224x224 rgb bilinear``), or a note that it cannot be read."""
    try:
        height, width = description["image_size"]
        flags = [name for name in ("crop_to_aspect_ratio", "pad_to_aspect_ratio") if description[name]]
        text = " ".join([f"{height}x{width}", description["color_mode"], description["interpolation"], *flags])
    except (KeyError, TypeError, ValueError):
        return "(unreadable spec record)"
    return shown(text)
