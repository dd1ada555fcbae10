"""Latency and fault settings of the local S3 endpoint, and which request gets which fault."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import parse_qs

# Query keys that turn a GET on an object path into a request for something other than its bytes.
_SUBRESOURCES = frozenset(
    {"acl", "attributes", "legal-hold", "restore", "retention", "tagging", "torrent", "uploadId"}
)
SLOW_DOWN = "slow_down"
DROPPED = "dropped"
DENIED = "denied"
TRICKLED = "trickled"
FAULT_KINDS = (SLOW_DOWN, DROPPED, DENIED, TRICKLED)


@dataclass(frozen=True)
class FaultConfig:
    """Latency and fault settings of the server; 0 (or ``""``) turns a setting off.

    Attributes:
        latency_ms: Sleep before every S3 request.
        spike_every: Every N-th S3 request also sleeps ``spike_ms``.
        spike_ms: Length of a latency spike.
        fail_every: Every N-th object GET is answered ``503 SlowDown``.
        drop_every: Every N-th object GET is cut off halfway through its body.
        trickle_every: Every N-th object GET sends its body at ``trickle_bytes_per_s``.
        trickle_bytes_per_s: Pace of a trickled body; required by ``trickle_every``.
        deny: Requests whose object key or listing prefix contains this substring get ``403 AccessDenied``.
    """

    latency_ms: float = 0.0
    spike_every: int = 0
    spike_ms: float = 0.0
    fail_every: int = 0
    drop_every: int = 0
    trickle_every: int = 0
    trickle_bytes_per_s: float = 0.0
    deny: str = ""

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> FaultConfig:
        """Builds a config from JSON-like data, where absent settings are off.

        Raises:
            ValueError: On unknown settings, numbers that are negative or not numbers, a non-string ``deny``,
                or ``trickle_every`` without a pace.
        """
        known = {f.name: type(f.default) for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown settings {unknown}; known: {sorted(known)}")
        config = cls(**{name: _checked(name, kind, data.get(name) or kind()) for name, kind in known.items()})
        if config.trickle_every and not config.trickle_bytes_per_s:
            raise ValueError("trickle_every needs trickle_bytes_per_s > 0, e.g. 1 for one byte per second")
        return config


def _checked(name: str, kind: type, value: object) -> Any:
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    if kind is int and value != int(value):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return kind(value)


@dataclass(frozen=True)
class Plan:
    """What the server does to one S3 request.

    Attributes:
        delay_s: Sleep before answering.
        fault: One of :data:`FAULT_KINDS`, or None to answer normally.
        trickle_bytes_per_s: Pace of the body when ``fault`` is ``trickled``.
        interrupted: Set once the settings change, so that a trickle still running ends at once.
    """

    delay_s: float
    fault: str | None
    trickle_bytes_per_s: float
    interrupted: threading.Event


class FaultSchedule:
    """Counts S3 requests and object GETs since the last configuration and picks each one's fault."""

    def __init__(self, config: FaultConfig) -> None:
        """Starts counting under ``config``."""
        self._lock = threading.Lock()
        self._config = config
        self._interrupted = threading.Event()
        self._requests = 0
        self._object_gets = 0

    def configure(self, config: FaultConfig) -> None:
        """Replaces the settings, restarts the counts and ends the trickles of the old settings."""
        with self._lock:
            self._interrupted.set()
            self._config = config
            self._interrupted = threading.Event()
            self._requests = 0
            self._object_gets = 0

    def plan(self, method: str, path: str, query: str) -> Plan:
        """Counts one S3 request and decides its delay and fault.

        A denied key wins over the object-GET faults, and among those ``slow_down`` wins over ``dropped``,
        which wins over ``trickled``.

        Args:
            method: The HTTP method.
            path: The URL-decoded path, ``/bucket/key``.
            query: The raw query string.
        """
        object_get = is_object_get(method, path, query)
        with self._lock:
            config, interrupted = self._config, self._interrupted
            self._requests += 1
            self._object_gets += object_get
            requests, object_gets = self._requests, self._object_gets
        delay_ms = config.latency_ms + (config.spike_ms if _every(config.spike_every, requests) else 0.0)
        fault = None
        if is_denied(config.deny, path, query):
            fault = DENIED
        elif object_get:
            fault = _object_get_fault(config, object_gets)
        return Plan(delay_ms / 1000, fault, config.trickle_bytes_per_s, interrupted)


def _object_get_fault(config: FaultConfig, count: int) -> str | None:
    for kind, every in ((SLOW_DOWN, config.fail_every), (DROPPED, config.drop_every), (TRICKLED, config.trickle_every)):
        if _every(every, count):
            return kind
    return None


def _every(n: int, count: int) -> bool:
    return n > 0 and count % n == 0


def is_denied(deny: str, path: str, query: str) -> bool:
    """Whether a request's object key, or for a listing its prefix, contains ``deny`` (never when empty)."""
    if not deny:
        return False
    _, _, key = path.lstrip("/").partition("/")
    return deny in (key or parse_qs(query).get("prefix", [""])[0])


def is_object_get(method: str, path: str, query: str) -> bool:
    """Whether a request reads an object's bytes: a GET of a key, ranged or not, without a sub-resource."""
    _, _, key = path.lstrip("/").partition("/")
    subresources = _SUBRESOURCES & parse_qs(query, keep_blank_values=True).keys()
    return method == "GET" and bool(key) and not subresources
