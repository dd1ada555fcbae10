"""The server process of the local S3 endpoint: moto's S3 behind :class:`Instrumented`, over HTTP/1.1 keep-alive.

Started by :class:`s3cache.testing.client.LocalS3` as ``python -m s3cache.testing.locals3``.
"""

from __future__ import annotations

import argparse
import io
import itertools
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import IO, TYPE_CHECKING, Any

from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server
from werkzeug.test import Client

from s3cache.testing.client import PORT_LINE
from s3cache.testing.faults import FaultConfig
from s3cache.testing.middleware import CONNECTION_KEY, Instrumented

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication, WSGIEnvironment

# moto's public HTTP call that deletes all of its state.
MOTO_RESET_PATH = "/moto-api/reset"
# A connection with no request for this long is closed, so that its thread ends; clients reconnect as with S3.
IDLE_TIMEOUT_S = 120.0
_connection_numbers = itertools.count(1)


class RequestBody(io.RawIOBase):
    """A request's body as the app reads it; whatever the app leaves is drained before the next request."""

    def __init__(self, stream: IO[bytes], length: int | None) -> None:
        """Reads ``length`` bytes of ``stream``, or up to the end a chunked ``stream`` reports when None."""
        self._stream = stream
        self._left = length
        self._broken = False

    def readable(self) -> bool:
        """A request body is readable."""
        return True

    def readinto(self, buffer: Any) -> int:
        """Reads up to ``len(buffer)`` bytes of the body, 0 at its end."""
        if self._left == 0 or self._broken:
            return 0
        view = memoryview(buffer).cast("B")
        if self._left is not None:
            view = view[: self._left]
        try:
            count = self._stream.readinto(view) or 0
        except OSError:
            self._broken = True
            raise
        if count == 0 and self._left is None:
            self._left = 0
        elif count == 0:
            self._broken = True  # The client went away before the announced length.
        elif self._left is not None:
            self._left -= count
        return count

    def drain(self) -> bool:
        """Reads the rest of the body; False if the client went away first, leaving the connection unusable."""
        buffer = bytearray(64 * 1024)
        try:
            while self.readinto(buffer):
                pass
        except OSError:
            return False
        return not self._broken


class KeepAliveHandler(MotoRequestHandler):
    """Answers a connection's requests one after another over HTTP/1.1 keep-alive, as S3 does.

    werkzeug's own handler closes every connection after one response; this one keeps it open whenever the
    answer's body matched its ``Content-Length`` and the request's body was read to its end.
    """

    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT_S
    # Headers and body are separate writes: without this the body waits for the client's delayed ACK.
    disable_nagle_algorithm = True

    def setup(self) -> None:
        """Numbers the connection (itertools.count steps atomically)."""
        super().setup()
        self.connection_number = next(_connection_numbers)

    def make_environ(self) -> WSGIEnvironment:
        """The environ moto builds, with a body that stops at the request's end and the connection's number."""
        environ = super().make_environ()
        # werkzeug marks chunked bodies as ending on their own; others end after CONTENT_LENGTH bytes.
        length = None if environ.get("wsgi.input_terminated") else int(environ.get("CONTENT_LENGTH") or 0)
        self.body = RequestBody(environ["wsgi.input"], length)
        environ["wsgi.input"] = self.body
        environ[CONNECTION_KEY] = self.connection_number
        return environ

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Logs nothing: a line per request would slow benchmarks down and flood test output."""

    def run_wsgi(self) -> None:
        """Answers one request; http.server already sent ``100 Continue`` if the client expected it."""
        environ = self.make_environ()
        self.headers_sent = False
        try:
            complete = self._respond(environ)
        except (ConnectionError, TimeoutError):
            complete = False
        except Exception:
            traceback.print_exc()
            # The connection stays usable only if the error is the whole answer.
            complete = not self.headers_sent
            if complete:
                self._send_headers(500, "Internal Server Error", [], 0)
        if not (complete and self.body.drain()):
            self.close_connection = True

    def _respond(self, environ: WSGIEnvironment) -> bool:
        started: list[tuple[str, list[tuple[str, str]]]] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[..., Any]:
            # Nothing is sent before the first body chunk, so a later call (with exc_info) simply replaces this.
            started[:] = [(status, headers)]
            return _unsupported_write

        chunks = self.server.app(environ, start_response)
        try:
            body = iter(chunks)
            first = next(body, b"")  # Generators call start_response on their first step.
            status, headers = started[-1]
            return self._send(environ, status, headers, first, body)
        finally:
            getattr(chunks, "close", lambda: None)()

    def _send(
        self, environ: WSGIEnvironment, status: str, headers: list[tuple[str, str]], first: bytes,
        rest: Iterator[bytes],
    ) -> bool:
        """Writes one answer; False if its body did not match its Content-Length."""
        code_text, _, reason = status.partition(" ")
        code = int(code_text)
        if environ["REQUEST_METHOD"] == "HEAD" or code in (204, 304) or code < 200:
            self._send_headers(code, reason, headers, None)
            return True
        declared = _content_length(headers)
        if declared is None:
            # Keep-alive needs a length: buffer the (in-memory anyway) answers that come without one.
            first, rest = first + b"".join(rest), iter(())
            declared = len(first)
        self._send_headers(code, reason, headers, declared)
        sent = 0
        for chunk in itertools.chain([first], rest):
            self.wfile.write(chunk)
            sent += len(chunk)
        return sent == declared

    def _send_headers(self, code: int, reason: str, headers: Iterable[tuple[str, str]], length: int | None) -> None:
        self.send_response(code, reason)
        for name, value in headers:
            if name.lower() != "content-length" or length is None:
                self.send_header(name, value)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        self.headers_sent = True


def _unsupported_write(data: bytes) -> None:
    raise NotImplementedError("this server takes a WSGI app's body from its iterable only, not from write()")


def _content_length(headers: Iterable[tuple[str, str]]) -> int | None:
    return next((int(value) for name, value in headers if name.lower() == "content-length"), None)


def reset_moto(app: WSGIApplication) -> None:
    """Deletes all buckets and objects through moto's public reset call.

    Raises:
        RuntimeError: If moto refuses.
    """
    response = Client(app).post(MOTO_RESET_PATH)
    if response.status_code != 200:
        raise RuntimeError(f"POST {MOTO_RESET_PATH} answered {response.status}: {response.get_data(as_text=True)}")


def serve(port: int, startup: FaultConfig) -> None:
    """Runs the instrumented S3 server on 127.0.0.1 until the process is terminated.

    Prints ``LOCALS3 PORT <port>`` once it listens.

    Args:
        port: Port to bind; 0 picks a free one.
        startup: Latency and faults to start with.
    """
    moto = DomainDispatcherApplication(create_backend_app)
    app = Instrumented(moto, startup, lambda: reset_moto(moto))
    server = make_server("127.0.0.1", port, app, threaded=True, request_handler=KeepAliveHandler)
    print(PORT_LINE.format(port=server.server_port), flush=True)
    server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point of the server process."""
    parser = argparse.ArgumentParser(description="Local S3 endpoint with request counting and faults.")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0 = any free port)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay before every S3 request")
    args = parser.parse_args(argv)
    serve(args.port, FaultConfig(latency_ms=args.latency_ms))
