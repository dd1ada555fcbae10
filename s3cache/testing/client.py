"""The client half of the local S3 endpoint: :class:`LocalS3` starts the server process and drives its control API."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from s3cache.testing.middleware import CONTROL_PREFIX
from s3cache.testing.records import FaultCounts, RequestRecord

SERVER_MODULE = "s3cache.testing.locals3"
# The server prints this line once it listens.
PORT_LINE = "LOCALS3 PORT {port}"
_PORT_PATTERN = re.compile(r"^LOCALS3 PORT (\d+)$")
ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


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
            if match := _PORT_PATTERN.match(line.strip()):
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
        counts: dict[str, int] = self._stats()["requests"]
        return sum(counts.values()) if method is None else counts.get(method.upper(), 0)

    def log(self) -> list[tuple[str, str, str]]:
        """(method, URL-decoded path, query string) of each S3 request since the last stats reset."""
        return [(record.method, record.path, record.query) for record in self.records()]

    def records(self) -> list[RequestRecord]:
        """Each S3 request since the last stats reset, with its Range header, body bytes sent, connection, fault."""
        return [RequestRecord.from_json(entry) for entry in self._stats()["log"]]

    def faults(self) -> FaultCounts:
        """Faults injected since the last stats reset, by kind (a kind never injected counts 0).

        The kinds: ``slow_down`` (503s), ``dropped`` bodies, ``denied`` (403s) and ``trickled`` bodies.
        """
        return FaultCounts(self._stats()["faults"])

    def connections(self) -> int:
        """Distinct client connections that carried S3 requests since the last stats reset."""
        count: int = self._stats()["connections"]
        return count

    def reset_stats(self) -> None:
        """Zeroes the request counts, the log, the fault counts and the connections."""
        self._call("POST", "reset-stats")

    def configure(self, **faults: float | str) -> None:
        """Replaces the latency and fault settings and restarts their counts; trickles under way end at once.

        See :class:`s3cache.testing.faults.FaultConfig`; settings not given are off.

        Raises:
            ValueError: If the server rejects the settings.
        """
        self._call("POST", "config", faults)

    def reset(self) -> None:
        """Deletes all buckets and objects, zeroes the stats and restores the start-up settings."""
        self._call("POST", "reset")

    def _stats(self) -> dict[str, Any]:
        return self._call("GET", "stats")

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
