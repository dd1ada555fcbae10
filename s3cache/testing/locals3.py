"""A local S3 endpoint on 127.0.0.1 for the demo, the tests and the benchmarks.

The server half runs moto's S3 implementation behind a small WSGI middleware that counts and logs every
S3 request, adds latency, injects faults on object GETs and denies access to chosen keys. It is started as
its own process::

    python -m s3cache.testing.locals3 --port 0 --latency-ms 20

and prints ``LOCALS3 PORT <port>`` once it listens. The client half, :class:`LocalS3`, starts that process
and drives the control API under ``/_locals3/`` (which is never counted):

* ``GET /_locals3/stats`` -> ``{"requests": {"GET": n, ...}, "log": [[method, path, query], ...],
  "faults": {"slow_down": n, "dropped": n, "denied": n}}``
* ``POST /_locals3/reset-stats`` zeroes the counts, the log and the fault counts.
* ``POST /_locals3/config`` with JSON ``{"latency_ms", "spike_every", "spike_ms", "fail_every",
  "drop_every", "deny"}`` replaces the whole configuration (absent, 0 or "" = off) and restarts the fault
  counters.
* ``POST /_locals3/reset`` zeroes the stats, restores the start-up configuration (``--latency-ms``, no
  faults) and deletes every bucket and object.

Faults apply to object GETs (``GET /bucket/key`` without a sub-resource such as ``?tagging``), counted
from the last ``config`` or ``reset``: every ``fail_every``-th one is answered ``503 SlowDown``; every
``drop_every``-th one sends its headers with the full ``Content-Length`` and the first half of the body,
then closes the connection, so clients see a truncated body. When both fire on the same GET, the 503 wins.
Independently, any S3 request (of any method) whose object key or listing prefix contains ``deny`` is
answered ``403 AccessDenied``, as a bucket policy denying that part of the bucket would.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import parse_qs
from xml.sax.saxutils import escape

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

SERVER_MODULE = "s3cache.testing.locals3"
CONTROL_PREFIX = "/_locals3/"
PORT_LINE = re.compile(r"^LOCALS3 PORT (\d+)$")
ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"

# Query keys that turn a GET on an object path into a request for something other than its bytes.
_SUBRESOURCES = frozenset(
    {"acl", "attributes", "legal-hold", "restore", "retention", "tagging", "torrent", "uploadId"}
)
_ERROR = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>{code}</Code><Message>{message}</Message>"
    "<Resource>{resource}</Resource><RequestId>{request_id}</RequestId></Error>"
)
FAULT_KINDS = ("slow_down", "dropped", "denied")


@dataclass(frozen=True)
class FaultConfig:
    """Latency and fault settings of the server; 0 (or ``""``) turns a setting off.

    Attributes:
        latency_ms: Sleep before every S3 request.
        spike_every: Every N-th S3 request also sleeps ``spike_ms``.
        spike_ms: Length of a latency spike.
        fail_every: Every N-th object GET is answered ``503 SlowDown``.
        drop_every: Every N-th object GET is cut off halfway through its body.
        deny: Requests whose object key or listing prefix contains this substring get ``403 AccessDenied``.
    """

    latency_ms: float = 0.0
    spike_every: int = 0
    spike_ms: float = 0.0
    fail_every: int = 0
    drop_every: int = 0
    deny: str = ""

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> FaultConfig:
        """Builds a config from JSON-like data, where absent settings are off.

        Raises:
            ValueError: On unknown settings, numbers that are negative or not numbers, or a non-string ``deny``.
        """
        known = {f.name: type(f.default) for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown settings {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        for name, kind in known.items():
            value = data.get(name) or kind()
            if kind is str:
                if not isinstance(value, str):
                    raise ValueError(f"{name} must be a string, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
            if kind is int and value != int(value):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
            values[name] = kind(value)
        return cls(**values)


def _every(n: int, count: int) -> bool:
    return n > 0 and count % n == 0


def _path(environ: WSGIEnvironment) -> str:
    # WSGI hands over the URL-decoded path as latin-1 code points; S3 keys are UTF-8.
    return str(environ.get("PATH_INFO", "")).encode("latin-1").decode("utf-8", "replace")


def _is_denied(deny: str, path: str, query: str) -> bool:
    if not deny:
        return False
    # Object requests are matched on their key, bucket requests (listings) on their prefix.
    _, _, key = path.lstrip("/").partition("/")
    return deny in (key or parse_qs(query).get("prefix", [""])[0])


def _is_object_get(method: str, path: str, query: str) -> bool:
    _, _, key = path.lstrip("/").partition("/")
    subresources = _SUBRESOURCES & parse_qs(query, keep_blank_values=True).keys()
    return method == "GET" and bool(key) and not subresources


def _respond(start_response: StartResponse, status: str, body: bytes, content_type: str) -> list[bytes]:
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]


def _json(start_response: StartResponse, status: str, payload: object) -> list[bytes]:
    return _respond(start_response, status, json.dumps(payload).encode(), "application/json")


def _error(
    start_response: StartResponse, status: str, code: str, message: str, path: str, *, head: bool = False
) -> list[bytes]:
    body = _ERROR.format(code=code, message=message, resource=escape(path), request_id=uuid.uuid4().hex.upper()[:16])
    # The server writes whatever it is given, and a body after a HEAD answer breaks the client's connection.
    return _respond(start_response, status, b"" if head else body.encode(), "application/xml")


def _cut_short(part: bytes, sock: socket.socket | None) -> Iterator[bytes]:
    yield part
    # Runs once the server has flushed `part`: a half-close makes the client see EOF right away,
    # before Content-Length is reached, instead of after the server's own clean-up.
    # OSError: the client already went away, having seen the truncation either way.
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)


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
        self._lock = threading.Lock()
        self._faults = startup
        self._counts: Counter[str] = Counter()
        self._log: list[tuple[str, str, str]] = []
        self._seen = 0
        self._object_gets = 0
        self._fault_counts: Counter[str] = Counter()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Dispatches to the control API or to the instrumented S3 app."""
        path = _path(environ)
        if path.startswith(CONTROL_PREFIX):
            return self._control(environ, path.removeprefix(CONTROL_PREFIX), start_response)
        return self._s3(environ, path, start_response)

    def _s3(self, environ: WSGIEnvironment, path: str, start_response: StartResponse) -> Iterable[bytes]:
        method = str(environ["REQUEST_METHOD"])
        query = str(environ.get("QUERY_STRING", ""))
        object_get = _is_object_get(method, path, query)
        with self._lock:
            faults = self._faults
            self._counts[method] += 1
            self._log.append((method, path, query))
            self._seen += 1
            seen = self._seen
            self._object_gets += object_get
            object_gets = self._object_gets
        delay_ms = faults.latency_ms + (faults.spike_ms if _every(faults.spike_every, seen) else 0.0)
        if delay_ms:
            time.sleep(delay_ms / 1000)
        if _is_denied(faults.deny, path, query):
            self._count_fault("denied")
            return _error(start_response, "403 Forbidden", "AccessDenied", "Access Denied", path, head=method == "HEAD")
        if object_get and _every(faults.fail_every, object_gets):
            self._count_fault("slow_down")
            return _error(start_response, "503 Slow Down", "SlowDown", "Please reduce your request rate.", path)
        if object_get and _every(faults.drop_every, object_gets):
            return self._truncated(environ, start_response)
        return self._app(environ, start_response)

    def _count_fault(self, kind: str) -> None:
        with self._lock:
            self._fault_counts[kind] += 1

    def _truncated(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        chunks: list[bytes] = []
        started: list[tuple[str, list[tuple[str, str]]]] = []

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            started.append((status, headers))
            return chunks.append

        body_iter = self._app(environ, capture)
        try:
            chunks.extend(body_iter)
        finally:
            getattr(body_iter, "close", lambda: None)()
        body = b"".join(chunks)
        status, headers = started[-1]
        # Only a real object body can be cut short; errors such as NoSuchKey pass through untouched.
        if not status.startswith(("200", "206")) or len(body) < 2:
            start_response(status, headers)
            return [body]
        self._count_fault("dropped")
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return _cut_short(body[: len(body) // 2], environ.get("werkzeug.socket"))

    def _control(self, environ: WSGIEnvironment, name: str, start_response: StartResponse) -> list[bytes]:
        method = environ["REQUEST_METHOD"]
        if name == "stats" and method == "GET":
            return _json(start_response, "200 OK", self._stats())
        if name == "reset-stats" and method == "POST":
            self._reset_stats()
        elif name == "config" and method == "POST":
            try:
                self._configure(FaultConfig.from_mapping(_read_json(environ)))
            except ValueError as error:
                return _json(start_response, "400 Bad Request", {"error": str(error)})
        elif name == "reset" and method == "POST":
            self._reset_backend()
            self._reset_stats()
            self._configure(self._startup)
        else:
            return _json(start_response, "404 Not Found", {"error": f"no control call {method} {name}"})
        return _json(start_response, "200 OK", {"status": "ok"})

    def _stats(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": dict(self._counts), "log": [list(entry) for entry in self._log],
                    "faults": {kind: self._fault_counts[kind] for kind in FAULT_KINDS}}

    def _reset_stats(self) -> None:
        with self._lock:
            self._counts.clear()
            self._log.clear()
            self._fault_counts.clear()

    def _configure(self, faults: FaultConfig) -> None:
        with self._lock:
            self._faults = faults
            self._seen = 0
            self._object_gets = 0


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


def serve(port: int, startup: FaultConfig) -> None:
    """Runs the instrumented S3 server on 127.0.0.1 until the process is terminated.

    Args:
        port: Port to bind; 0 picks a free one.
        startup: Latency and faults to start with.
    """
    from moto.moto_api._internal.models import moto_api_backend
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    # werkzeug closes the connection after every response (no keep-alive): each request pays a
    # TCP connect on loopback, for every client and benchmark contender alike.
    class QuietHandler(MotoRequestHandler):
        # A line on stderr per request would slow benchmarks down and flood test output.
        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            pass

    app = Instrumented(DomainDispatcherApplication(create_backend_app), startup, moto_api_backend.reset)
    server = make_server("127.0.0.1", port, app, threaded=True, request_handler=QuietHandler)
    print(f"LOCALS3 PORT {server.server_port}", flush=True)
    server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point of the server process."""
    parser = argparse.ArgumentParser(description="Local S3 endpoint with request counting and faults.")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0 = any free port)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay before every S3 request")
    args = parser.parse_args(argv)
    serve(args.port, FaultConfig(latency_ms=args.latency_ms))


class LocalS3:
    """Client for a local S3 server subprocess; use as a context manager.

    Example:
        >>> with LocalS3(latency_ms=5) as s3:  # doctest: +SKIP
        ...     s3.boto3_client().create_bucket(Bucket="demo")
        ...     s3.requests("PUT")
        1
    """

    def __init__(self, latency_ms: float = 0.0, *, startup_timeout: float = 60.0) -> None:
        """Prepares (but does not start) a server.

        Args:
            latency_ms: Delay before every S3 request, also restored by :meth:`reset`.
            startup_timeout: Seconds to wait for the server to report its port.
        """
        self.latency_ms = latency_ms
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[str] | None = None
        self._stderr: IO[bytes] | None = None
        self._port: int | None = None
        # No proxy: an HTTP(S)_PROXY in the environment must not capture calls to 127.0.0.1.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> LocalS3:
        """Starts the server process and waits until it listens.

        Raises:
            RuntimeError: If the server exits or stays silent past ``startup_timeout``.
        """
        if self._proc is not None:
            raise RuntimeError("LocalS3 is already started")
        # Kept open while the server runs, for error messages; stop() closes it.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self._proc = subprocess.Popen(
            [sys.executable, "-m", SERVER_MODULE, "--port", "0", "--latency-ms", str(self.latency_ms)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=_child_env(),
        )
        try:
            self._port = self._await_port(self._proc)
        except BaseException:
            self.stop()
            raise
        return self

    def _await_port(self, proc: subprocess.Popen[str]) -> int:
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        deadline = time.monotonic() + self.startup_timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                raise RuntimeError(f"local S3 server exited with code {proc.wait()}:\n{self._stderr_text()}")
            if match := PORT_LINE.match(line.strip()):
                return int(match.group(1))
        raise RuntimeError(
            f"local S3 server did not report its port within {self.startup_timeout} s:\n{self._stderr_text()}"
        )

    def _stderr_text(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace")

    def stop(self) -> None:
        """Stops the server process; safe to call more than once."""
        proc, self._proc, self._port = self._proc, None, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    @property
    def endpoint_url(self) -> str:
        """Base URL of the running server, e.g. ``http://127.0.0.1:53211``."""
        if self._port is None:
            raise RuntimeError("LocalS3 is not running; use it as a context manager or call start()")
        return f"http://127.0.0.1:{self._port}"

    @property
    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments for ``s3fs.S3FileSystem`` pointing at this server (a fresh dict each time)."""
        return {
            "endpoint_url": self.endpoint_url,
            "key": ACCESS_KEY,
            "secret": SECRET_KEY,
            "client_kwargs": {"region_name": REGION},
        }

    def boto3_client(self, **kwargs: Any) -> Any:
        """Creates a boto3 S3 client for this server.

        Args:
            **kwargs: Extra arguments for ``Session.client``, e.g. ``config=botocore.config.Config(...)``.
        """
        import boto3

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
            **kwargs,
        )

    def requests(self, method: str | None = None) -> int:
        """Number of S3 requests since the last stats reset, in total or for one HTTP method."""
        counts: dict[str, int] = self._call("GET", "stats")["requests"]
        return sum(counts.values()) if method is None else counts.get(method.upper(), 0)

    def log(self) -> list[tuple[str, str, str]]:
        """(method, URL-decoded path, query string) of each S3 request since the last stats reset."""
        return [(method, path, query) for method, path, query in self._call("GET", "stats")["log"]]

    def faults(self) -> dict[str, int]:
        """Faults injected since the last stats reset: ``slow_down`` (503s), ``dropped`` bodies, ``denied`` (403s)."""
        counts: dict[str, int] = self._call("GET", "stats")["faults"]
        return counts

    def reset_stats(self) -> None:
        """Zeroes the request counts, the log and the fault counts."""
        self._call("POST", "reset-stats")

    def configure(self, **faults: float | str) -> None:
        """Replaces the latency and fault settings; see :class:`FaultConfig` (settings not given are off).

        Raises:
            ValueError: If the server rejects the settings.
        """
        self._call("POST", "config", faults)

    def reset(self) -> None:
        """Deletes all buckets and objects, zeroes the stats and restores the start-up settings."""
        self._call("POST", "reset")

    def _call(self, method: str, name: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(
            f"{self.endpoint_url}{CONTROL_PREFIX}{name}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with self._opener.open(request, timeout=30) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:
            detail = json.loads(error.read() or b"{}").get("error", error.reason)
            if error.code == 400:
                raise ValueError(detail) from None
            raise RuntimeError(f"control call {method} {name} failed: {error.code} {detail}") from None


def _pump(stream: IO[str] | None, lines: queue.Queue[str | None]) -> None:
    # Keeps draining the child's stdout after the port line so that later output can never block it.
    if stream is not None:
        with stream:
            for line in stream:
                lines.put(line)
    lines.put(None)


def _child_env() -> dict[str, str]:
    # The child must import this package even when it is not installed (e.g. tests run from a checkout).
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, path]) if path else root}


if __name__ == "__main__":
    main()
