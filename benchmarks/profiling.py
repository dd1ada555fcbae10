"""Summaries of py-spy recordings, for ``compare.py --profile`` (imported by it, not run by itself).

``compare.py`` records a contender's process with ``py-spy record --threads --format raw`` and keeps the
text summary made here: the share of samples per thread and each thread's heaviest functions. py-spy
counts a thread while it runs Python or native code or waits for the GIL, not while it sleeps in I/O.
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

RATE_HZ = 500
# Module imports are start-up cost, not part of any epoch.
_IMPORT_FRAME = "importlib._bootstrap"
_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>.*?)(?::\d+)?\)$")


def py_spy_command(output: Path, command: list[str]) -> list[str]:
    """``command`` wrapped in a py-spy recording of all its threads.

    Raises:
        RuntimeError: py-spy is not installed.
    """
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        raise RuntimeError("--profile needs py-spy: pip install py-spy")
    return [py_spy, "record", "--threads", "--rate", str(RATE_HZ), "--format", "raw", "--output", str(output),
            "--", *command]


def _function(frame: str) -> str:
    match = _FRAME.match(frame)
    if match is None:
        return frame
    return f"{match['function']} ({Path(match['file']).name})"


def summarize(recording: Path, title: str, top: int = 15) -> str:
    """A text summary of a raw py-spy recording: samples per thread, then each thread's heaviest functions.

    Args:
        recording: The ``--format raw`` output (one ``frame;frame;... count`` line per distinct stack).
        title: First line of the summary.
        top: Functions listed per thread, by inclusive samples.
    """
    per_thread: Counter[str] = Counter()
    inclusive: dict[str, Counter[str]] = {}
    for line in recording.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not count.isdigit() or any(_IMPORT_FRAME in frame for frame in frames):
            continue
        thread = frames[0].split(": ", 1)[-1]
        per_thread[thread] += int(count)
        functions = inclusive.setdefault(thread, Counter())
        for function in {_function(frame) for frame in frames[1:]}:
            functions[function] += int(count)
    total = sum(per_thread.values())
    lines = [title, f"{total} samples at {RATE_HZ} Hz outside imports ({total / RATE_HZ:.1f} thread-seconds)", ""]
    for thread, samples in per_thread.most_common():
        lines.append(f"thread {thread}: {samples} samples ({samples / RATE_HZ:.1f} s)")
        # Frames in (nearly) every sample of the thread, its entry point or event loop, say nothing.
        heavy = [(f, c) for f, c in inclusive[thread].most_common() if c < 0.99 * samples][:top]
        lines += [f"  {count / samples:6.1%}  {function}" for function, count in heavy]
        lines.append("")
    return "\n".join(lines)
