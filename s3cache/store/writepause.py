"""Cache writes paused by a full file system, and when to try one again.

A write that fails for a full disk pauses writes, with one warning per cache directory and process
(:func:`~s3cache.store.faults.warn_writes_paused`). While paused, a write is tried again once the
file system has :data:`RESUME_MARGIN` more room than the entry needs (checked at most every
:data:`SPACE_CHECK_SECONDS`), or after :data:`WRITE_RETRY_SECONDS` in any case; the first write that
succeeds resumes writes, and says so in the log.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from s3cache.store.faults import free_bytes, warn_writes_paused

log = logging.getLogger(__name__)

# While writes are paused by a full disk: retry a write after this many seconds in any case, and
# sooner once the file system has this much more room than the entry needs (an eviction, a deletion).
WRITE_RETRY_SECONDS = 30.0
RESUME_MARGIN = 256 * 1024
SPACE_CHECK_SECONDS = 1.0


class WritePause:
    """Whether a store's writes are paused by a full file system, and when to try one again.

    Safe to share between threads.

    Args:
        directory: The store's directory, on the file system whose free space is checked.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()  # guards the pause state
        self._paused_since: float | None = None
        self._retry_at = self._space_check_at = 0.0

    @property
    def paused(self) -> bool:
        """Whether writes are paused because the file system is full."""
        return self._paused_since is not None

    def may_write(self, size: int) -> bool:
        """Whether to try a write now: always, unless writes are paused and no room or retry time has come."""
        if self._paused_since is None:
            return True
        now = time.monotonic()
        if now >= self._retry_at:
            return True
        if now >= self._space_check_at:
            self._space_check_at = now + SPACE_CHECK_SECONDS
            return free_bytes(self.directory) >= size + RESUME_MARGIN
        return False

    def pause(self, exc: BaseException) -> None:
        """Pause writes after a write failed for a full disk (warned once per directory and process)."""
        now = time.monotonic()
        with self._lock:
            first = self._paused_since is None
            if first:
                self._paused_since = now
            self._retry_at = now + WRITE_RETRY_SECONDS
            self._space_check_at = now + SPACE_CHECK_SECONDS
        if first:
            warn_writes_paused(self.directory, exc)

    def resume(self) -> None:
        """Resume writes after one succeeded (logged when they were paused)."""
        if self._paused_since is None:
            return
        with self._lock:
            since, self._paused_since = self._paused_since, None
        if since is not None:
            log.warning("s3cache: cache writes to %s resumed after %.0f s", self.directory.parent,
                        time.monotonic() - since)
