"""diskcache storage for ``str`` keys and ``bytes`` values that never unpickles.

Nothing read from a cache is trusted to be in the form s3cache writes:

* diskcache pickles any key or value that is not a plain ``str``/``bytes``/number and marks such
  rows ``raw = 0`` (keys) or ``mode = 3/4`` (text/pickled values); reading one back unpickles it. A
  row planted in a cache database could therefore run code. :class:`SafeDisk` refuses every
  (un)pickling path, and :class:`~s3cache.store.safecache.SafeCache` lists only rows in s3cache's
  own form (:data:`SAFE_ROW`), so iterating keys never even meets a planted row; ``verify`` reports them.
* Value file names come from the database: a planted row naming ``../../somewhere`` must not make
  a read, ``clear`` or an eviction read or delete a file outside the store. Only names of the form
  diskcache generates (``ab/cd/<28 hex>.val``) are read or removed.
* A value file whose write fails (a full disk) leaves no partial file or emptied directory behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sqlite3
import threading
from collections.abc import Iterator
from typing import Any

import diskcache
from diskcache.core import DBNAME, MODE_BINARY, MODE_RAW, UNKNOWN

log = logging.getLogger(__name__)

# The names diskcache gives value files (``Disk.filename``): two levels of hex directories, 28 hex digits.
VALUE_FILE = re.compile(r"[0-9a-f]{2}[/\\][0-9a-f]{2}[/\\][0-9a-f]{28}\.val")
# The files SQLite keeps next to a database.
DATABASE_FILES = (DBNAME, DBNAME + "-wal", DBNAME + "-shm", DBNAME + "-journal")

# The rows s3cache writes: raw text keys; raw values inline as blobs or in a value file.
SAFE_ROW = ("raw = 1 AND typeof(key) = 'text' AND (mode = 1 AND typeof(value) = 'blob'"
            " OR mode = 2 AND typeof(filename) = 'text' AND value IS NULL)")


class UnsafeEntryError(ValueError):
    """A stored key or value is not in a form s3cache writes (it would need unpickling)."""


class SafeDisk(diskcache.Disk):
    """A diskcache ``Disk`` for ``str`` keys and ``bytes`` values that never pickles or unpickles.

    Value files are written by :meth:`write_file`: owner-only (``0600`` in ``0700`` directories)
    unless :attr:`private` is off, and a failed write (a full disk) leaves nothing behind. Only value
    file names diskcache generates are read or removed.
    """

    #: Create value files and their directories owner-only; off for a shared cache (the umask decides).
    private = True

    def __init__(self, directory: str, min_file_size: int = 0, pickle_protocol: int = 0, **_unknown: Any) -> None:
        # Unknown ``disk_*`` settings in a database are ignored, not passed on or applied.
        super().__init__(directory, int(min_file_size), int(pickle_protocol))
        self._tracked = threading.local()

    def put(self, key: Any) -> tuple[Any, bool]:
        """Store keys as SQLite text."""
        if not isinstance(key, str):
            raise TypeError(f"cache keys must be str, got {type(key).__name__}")
        return key, True

    def get(self, key: Any, raw: bool) -> Any:
        """Return a stored key; refuse one stored pickled (``raw = 0``)."""
        if not raw or not isinstance(key, str):
            raise UnsafeEntryError("a cache key is stored pickled; s3cache never writes such keys")
        return key

    def store(self, value: Any, read: bool, key: Any = UNKNOWN) -> tuple[Any, ...]:
        """Store values as raw bytes (inline in SQLite when small, else in a new value file)."""
        if read or not isinstance(value, bytes):
            raise TypeError(f"cache values must be bytes, got {type(value).__name__}")
        if len(value) < self.min_file_size:
            return 0, MODE_RAW, None, sqlite3.Binary(value)
        filename, _ = self.filename(key, value)
        self.write_file(filename, value)
        written = getattr(self._tracked, "files", None)
        if written is not None:
            written.append(filename)
        return len(value), MODE_BINARY, filename, None

    @contextlib.contextmanager
    def tracking(self) -> Iterator[list[str]]:
        """Collect the value files this thread writes meanwhile (to remove them if the write fails)."""
        files: list[str] = []
        self._tracked.files = files
        try:
            yield files
        finally:
            self._tracked.files = None

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
        """Refuse any stored mode other than raw bytes (pickle and text modes included)."""
        if read or mode not in (MODE_RAW, MODE_BINARY):
            raise UnsafeEntryError(f"unexpected storage mode {mode} in an s3cache store")
        if mode == MODE_RAW and not isinstance(value, bytes):
            raise UnsafeEntryError(f"an inline value is stored as {type(value).__name__}, not bytes")
        if mode == MODE_BINARY and not is_value_file(filename):
            raise UnsafeEntryError(f"unexpected value file name {filename!r}")
        return super().fetch(mode, filename, value, read)

    def write_file(self, filename: str, data: bytes) -> None:
        """Write a new value file (relative name from :meth:`filename`).

        Raises:
            OSError: The file could not be written (a full disk); nothing is left behind.
        """
        full_path = os.path.join(self._directory, filename)
        for attempt in range(10):
            try:
                self._make_parents(filename)
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
                fd = os.open(full_path, flags, 0o600 if self.private else 0o666)
                break
            except FileNotFoundError:
                # Another process removed an emptied directory between mkdir and open: try again.
                if attempt == 9:
                    raise
            except BaseException:
                self._prune(filename)
                raise
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except BaseException:
            os.close(fd)
            self.remove(filename)
            raise
        os.close(fd)

    def remove(self, file_path: str) -> None:
        """Remove a value file and its emptied directories; names not of a value file are left alone."""
        if not is_value_file(file_path):
            log.warning("not removing %r: not a value file name", file_path)
            return
        with contextlib.suppress(OSError):
            os.remove(os.path.join(self._directory, file_path))
        self._prune(file_path)

    def _make_parents(self, filename: str) -> None:
        mode = 0o700 if self.private else 0o777
        first, second = os.path.split(os.path.dirname(filename))
        for part in (first, os.path.join(first, second)):
            with contextlib.suppress(FileExistsError):
                os.mkdir(os.path.join(self._directory, part), mode)

    def _prune(self, filename: str) -> None:
        """Remove the value file's two directory levels where they are empty."""
        first, second = os.path.split(os.path.dirname(filename))
        for part in (os.path.join(first, second), first):
            try:
                os.rmdir(os.path.join(self._directory, part))
            except OSError:
                return


def is_value_file(filename: object) -> bool:
    """Whether a stored file name has the form diskcache generates (no way out of the store)."""
    return isinstance(filename, str) and VALUE_FILE.fullmatch(filename) is not None
