"""What the local S3 endpoint saw: request counts, a log of each S3 request, injected faults, connections."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from s3cache.testing.faults import FAULT_KINDS


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One S3 request as the server saw and answered it.

    Attributes:
        method: HTTP method.
        path: URL-decoded path, ``/bucket/key``.
        query: Raw query string.
        range: The ``Range`` header, e.g. ``bytes=0-99``, or None.
        body_bytes: Response body bytes the server has sent so far (final once the response is complete).
        connection: Number of the TCP connection that carried the request, unique over the server's life.
        fault: The fault injected into the answer (see ``FAULT_KINDS``), or None.
    """

    method: str
    path: str
    query: str
    range: str | None
    body_bytes: int
    connection: int
    fault: str | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RequestRecord:
        """Rebuilds a record from its JSON form in the stats."""
        return cls(**data)


@dataclass(slots=True)
class LogEntry:
    """The server's still growing form of a :class:`RequestRecord`: ``body_bytes`` rises while the body is sent."""

    method: str
    path: str
    query: str
    range: str | None
    connection: int
    body_bytes: int = 0
    fault: str | None = None


class FaultCounts(Counter[str]):
    """Injected faults by kind, where a kind never injected counts 0, also when compared with a plain dict.

    So ``faults == {"dropped": 1}`` holds whether or not the other kinds are listed with 0.
    """

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return all(self[kind] == other.get(kind, 0) for kind in self.keys() | other.keys())

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = None  # type: ignore[assignment]


class RequestLog:
    """Thread-safe counts and log of S3 requests, zeroed by :meth:`clear`."""

    def __init__(self) -> None:
        """Starts empty."""
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._entries: list[LogEntry] = []
        self._faults: Counter[str] = Counter()
        self._connections: set[int] = set()

    def admit(self, method: str, path: str, query: str, range_header: str | None, connection: int) -> LogEntry:
        """Counts and logs a request; the returned entry takes its body size and fault later."""
        entry = LogEntry(method, path, query, range_header, connection)
        with self._lock:
            self._counts[method] += 1
            self._entries.append(entry)
            self._connections.add(connection)
        return entry

    def fault(self, entry: LogEntry, kind: str) -> None:
        """Marks ``entry`` as answered with an injected fault."""
        with self._lock:
            entry.fault = kind
            self._faults[kind] += 1

    def snapshot(self) -> dict[str, Any]:
        """The stats as JSON-ready data: ``requests``, ``log``, ``faults`` and ``connections``."""
        with self._lock:
            return {
                "requests": dict(self._counts),
                "log": [asdict(entry) for entry in self._entries],
                "faults": {kind: self._faults[kind] for kind in FAULT_KINDS},
                "connections": len(self._connections),
            }

    def clear(self) -> None:
        """Zeroes the counts, the log, the fault counts and the connections."""
        with self._lock:
            self._counts.clear()
            self._entries.clear()
            self._faults.clear()
            self._connections.clear()


def count_sent(chunks: Iterable[bytes], entry: LogEntry) -> Iterator[bytes]:
    """Passes a WSGI body through, adding each chunk to ``entry.body_bytes`` as the server takes it to write."""
    try:
        for chunk in chunks:
            # Counted before the write, so a client that has the whole body also sees it counted.
            # One writer per entry, and readers may see the value before or after: no lock.
            entry.body_bytes += len(chunk)
            yield chunk
    finally:
        getattr(chunks, "close", lambda: None)()
