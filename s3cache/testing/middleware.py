"""WSGI middleware of the local S3 endpoint: counts, delays and breaks S3 requests, serves the control API."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import escape

from s3cache.testing.faults import DENIED, DROPPED, SLOW_DOWN, TRICKLED, FaultConfig, FaultSchedule, Plan
from s3cache.testing.records import LogEntry, RequestLog, count_sent

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

CONTROL_PREFIX = "/_locals3/"
# Set by the HTTP server: the number of the connection that carried the request.
CONNECTION_KEY = "locals3.connection"
# A trickled body is paced for at most this long, then sent at once, so that its thread ends by itself.
TRICKLE_LIMIT_S = 30.0
# How often a trickled body sends its next piece, for paces above one byte per tick.
_TRICKLE_TICK_S = 0.1
_ERROR = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>{code}</Code><Message>{message}</Message>"
    "<Resource>{resource}</Resource><RequestId>{request_id}</RequestId></Error>"
)


class Instrumented:
    """WSGI middleware that counts, delays and breaks S3 requests and serves the control API."""

    def __init__(self, app: WSGIApplication, startup: FaultConfig, reset_backend: Callable[[], None]) -> None:
        """Wraps an S3 WSGI app.

        Args:
            app: The S3 implementation.
            startup: The configuration to start with and to return to on reset.
            reset_backend: Deletes all S3 state (buckets and objects).
        """
        self._app = app
        self._startup = startup
        self._reset_backend = reset_backend
        self._log = RequestLog()
        self._schedule = FaultSchedule(startup)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Dispatches to the control API or to the instrumented S3 app."""
        path = _path(environ)
        if path.startswith(CONTROL_PREFIX):
            return self._control(environ, path.removeprefix(CONTROL_PREFIX), start_response)
        method = str(environ["REQUEST_METHOD"])
        query = str(environ.get("QUERY_STRING", ""))
        entry = self._log.admit(method, path, query, environ.get("HTTP_RANGE"), int(environ.get(CONNECTION_KEY, 0)))
        plan = self._schedule.plan(method, path, query)
        if plan.delay_s:
            time.sleep(plan.delay_s)
        answer = self._answer(environ, start_response, entry, plan)
        # The server sends no body in answer to HEAD, whatever the answer holds.
        return answer if method == "HEAD" else count_sent(answer, entry)

    def _answer(
        self, environ: WSGIEnvironment, start_response: StartResponse, entry: LogEntry, plan: Plan
    ) -> Iterable[bytes]:
        if plan.fault == DENIED:
            self._log.fault(entry, DENIED)
            return _error(start_response, "403 Forbidden", "AccessDenied", "Access Denied", entry.path)
        if plan.fault == SLOW_DOWN:
            self._log.fault(entry, SLOW_DOWN)
            return _error(start_response, "503 Slow Down", "SlowDown", "Please reduce your request rate.", entry.path)
        if plan.fault == DROPPED:
            # Short of its Content-Length, so the server closes the connection after it: clients see a truncation.
            return self._disturbed(environ, start_response, entry, DROPPED, lambda body: [body[: len(body) // 2]])
        if plan.fault == TRICKLED:
            return self._disturbed(environ, start_response, entry, TRICKLED,
                                   lambda body: _trickle(body, plan.trickle_bytes_per_s, plan.interrupted))
        return self._app(environ, start_response)

    def _disturbed(
        self,
        environ: WSGIEnvironment,
        start_response: StartResponse,
        entry: LogEntry,
        kind: str,
        disturb: Callable[[bytes], Iterable[bytes]],
    ) -> Iterable[bytes]:
        status, headers, body = _buffered(self._app, environ)
        # Only a real object body is cut short or slowed down; errors such as NoSuchKey pass through untouched.
        if not status.startswith(("200", "206")) or len(body) < 2:
            start_response(status, headers)
            return [body]
        self._log.fault(entry, kind)
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return disturb(body)

    def _control(self, environ: WSGIEnvironment, name: str, start_response: StartResponse) -> list[bytes]:
        method = environ["REQUEST_METHOD"]
        if name == "stats" and method == "GET":
            return _json(start_response, "200 OK", self._log.snapshot())
        if name == "reset-stats" and method == "POST":
            self._log.clear()
        elif name == "config" and method == "POST":
            try:
                self._schedule.configure(FaultConfig.from_mapping(_read_json(environ)))
            except ValueError as error:
                return _json(start_response, "400 Bad Request", {"error": str(error)})
        elif name == "reset" and method == "POST":
            self._reset_backend()
            self._log.clear()
            self._schedule.configure(self._startup)
        else:
            return _json(start_response, "404 Not Found", {"error": f"no control call {method} {name}"})
        return _json(start_response, "200 OK", {"status": "ok"})


def _trickle(body: bytes, bytes_per_s: float, interrupted: threading.Event) -> Iterator[bytes]:
    # Pieces of at least one byte, one per tick or slower; the rest goes at once when the settings change or
    # TRICKLE_LIMIT_S has passed. A client that gives up closes the connection, and the next write ends this.
    step = max(1, int(bytes_per_s * _TRICKLE_TICK_S))
    interval = step / bytes_per_s
    deadline = time.monotonic() + TRICKLE_LIMIT_S
    for start in range(0, len(body), step):
        if start and (interrupted.wait(interval) or time.monotonic() >= deadline):
            yield body[start:]
            return
        yield body[start : start + step]


def _buffered(app: WSGIApplication, environ: WSGIEnvironment) -> tuple[str, list[tuple[str, str]], bytes]:
    chunks: list[bytes] = []
    started: list[tuple[str, list[tuple[str, str]]]] = []

    def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        started.append((status, headers))
        return chunks.append

    body_iter = app(environ, capture)
    try:
        chunks.extend(body_iter)
    finally:
        getattr(body_iter, "close", lambda: None)()
    status, headers = started[-1]
    return status, headers, b"".join(chunks)


def _path(environ: WSGIEnvironment) -> str:
    # WSGI hands over the URL-decoded path as latin-1 code points; S3 keys are UTF-8.
    return str(environ.get("PATH_INFO", "")).encode("latin-1").decode("utf-8", "replace")


def _respond(start_response: StartResponse, status: str, body: bytes, content_type: str) -> list[bytes]:
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]


def _json(start_response: StartResponse, status: str, payload: object) -> list[bytes]:
    return _respond(start_response, status, json.dumps(payload).encode(), "application/json")


def _error(start_response: StartResponse, status: str, code: str, message: str, path: str) -> list[bytes]:
    # The server leaves the body out of an answer to HEAD.
    body = _ERROR.format(code=code, message=message, resource=escape(path), request_id=uuid.uuid4().hex.upper()[:16])
    return _respond(start_response, status, body.encode(), "application/xml")


def _read_json(environ: WSGIEnvironment) -> dict[str, Any]:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    raw = environ["wsgi.input"].read(length) if length else b""
    try:
        data = json.loads(raw or b"{}")
    except json.JSONDecodeError as error:
        raise ValueError(f"config is not JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError("config must be a JSON object")
    return data
