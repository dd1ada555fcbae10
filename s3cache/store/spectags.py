"""Recording a spec again when entries are written under it after ``s3cache clear`` removed its record.

A writer notes the tag (spec fingerprint) of every entry it writes; at most every
:data:`RECORD_CHECK_SECONDS`, and on close, it passes the tags noted since to its
:class:`SpecRecorder`, which records the spec again if its record has gone.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

# A writer checks at most this often that the specs it writes under are still recorded.
RECORD_CHECK_SECONDS = 10.0


class SpecRecorder(Protocol):
    """Records a spec again when entries are written under it and its record has gone.

    See :meth:`WrittenTags.record`.
    """

    def __call__(self, fingerprint: str) -> None:
        """Make sure the spec with this fingerprint (an entry tag) is recorded."""
        ...

    def close(self) -> None:
        """Release what the recorder holds."""
        ...


class WrittenTags:
    """The tags a store's entries were written under, passed to :attr:`recorder` now and then.

    Safe to share between threads.

    Args:
        directory: The store's directory (named when a record fails).

    Attributes:
        recorder: Called (at most every :data:`RECORD_CHECK_SECONDS`, and on close) with the
            tags written under since its last call; ``None`` records nothing.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.recorder: SpecRecorder | None = None
        self._lock = threading.Lock()  # guards the written tags
        self._tags: set[str] = set()
        self._check_at = time.monotonic() + RECORD_CHECK_SECONDS

    def note(self, tag: str) -> None:
        """Note an entry written under ``tag``; record the tags noted if a check is due."""
        if self.recorder is None:
            return
        with self._lock:
            self._tags.add(tag)
        if time.monotonic() >= self._check_at:
            self.record()

    def record(self) -> None:
        """Pass the tags written under since the last call to :attr:`recorder` (one check each)."""
        with self._lock:
            tags, self._tags = self._tags, set()
            self._check_at = time.monotonic() + RECORD_CHECK_SECONDS
        if self.recorder is None:
            return
        for tag in tags:
            try:
                self.recorder(tag)
            except (OSError, sqlite3.Error) as exc:  # CacheError included: a record is worth no failed batch
                log.warning("s3cache: cannot record spec %s in %s: %s", tag, self.directory.parent, exc)

    def close(self) -> None:
        """Record the tags noted, then close and drop the recorder."""
        if self.recorder is not None:
            if self._tags:
                self.record()
            self.recorder.close()
            self.recorder = None
