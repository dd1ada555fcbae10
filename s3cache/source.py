"""The S3 side: listing with ETags, concurrent GETs with bounded retries, error translation.

Requests go through an ``s3fs.S3FileSystem``'s aiobotocore client on fsspec's event loop.
Keys are passed to S3 verbatim, never through s3fs's path or glob handling, so keys with
``[``, ``*``, ``?``, spaces or non-ASCII characters work. Retries are ours alone (botocore's
and s3fs's are switched off), so the number of attempts in an error message is the truth.
The filesystem is created lazily and again in every process: s3fs is not fork-safe.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import random
import threading
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote

from s3cache.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    CredentialsError,
    EndpointUnreachableError,
    ObjectNotFoundError,
    S3CacheError,
    S3RequestError,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
DEFAULT_CONCURRENCY = 32
DEFAULT_ATTEMPTS = 5

_T = TypeVar("_T")

_RETRYABLE_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling",
                    "ThrottlingException", "RequestLimitExceeded", "500", "502", "503", "504"}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_DENIED_CODES = {"AccessDenied", "403", "AllAccessDisabled", "AccountProblem"}
_BAD_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}


@dataclass(frozen=True)
class S3Object:
    """One object as listed: where it is and which version (ETag) of it was seen."""

    bucket: str
    key: str
    etag: str
    size: int

    @property
    def url(self) -> str:
        """The object's ``s3://bucket/key`` URL."""
        return f"s3://{self.bucket}/{self.key}"

    def to_json(self) -> list[Any]:
        """A compact JSON form (for stored listings)."""
        return [self.bucket, self.key, self.etag, self.size]

    @classmethod
    def from_json(cls, row: Sequence[Any]) -> S3Object:
        """Inverse of :meth:`to_json`."""
        return cls(str(row[0]), str(row[1]), str(row[2]), int(row[3]))


def split_url(url: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` (or ``bucket/key``) into bucket and key.

    Raises:
        ValueError: The URL names no bucket.
    """
    path = url.removeprefix("s3://").removeprefix("s3a://")
    bucket, _, key = path.partition("/")
    if not bucket:
        raise ValueError(f"not an S3 URL: {url!r} (expected s3://bucket/key)")
    return bucket, key


def is_image_key(key: str) -> bool:
    """Whether a key has an image extension we decode (any case)."""
    return key.lower().endswith(IMAGE_EXTENSIONS)


class S3Source:
    """Lists and fetches S3 objects through s3fs.

    Args:
        storage_options: Keyword arguments for ``s3fs.S3FileSystem`` (``endpoint_url``, ``anon``,
            ``key``, ``secret``, ``profile``, ``client_kwargs``, ``config_kwargs``, ...).
        concurrency: Most requests in flight at once.
        attempts: Tries per request before giving up on transient errors.
    """

    def __init__(
        self,
        storage_options: dict[str, Any] | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        attempts: int = DEFAULT_ATTEMPTS,
    ) -> None:
        if concurrency < 1 or attempts < 1:
            raise ValueError("concurrency and attempts must be at least 1")
        self.storage_options = dict(storage_options or {})
        self.concurrency = concurrency
        self.attempts = attempts
        self.requests = 0
        self.bytes_received = 0
        self.retries = 0
        self._fs: Any = None
        self._fs_pid = -1
        self._semaphore: asyncio.Semaphore | None = None
        self._lock = threading.Lock()

    # -- plumbing -------------------------------------------------------------------------------

    @property
    def fs(self) -> Any:
        """The process's ``s3fs.S3FileSystem``, created on first use (and after a fork)."""
        with self._lock:
            if self._fs is None or self._fs_pid != os.getpid():
                self._fs = self._make_filesystem()
                self._fs_pid = os.getpid()
                self._semaphore = None
            return self._fs

    def _make_filesystem(self) -> Any:
        import s3fs

        options = dict(self.storage_options)
        config = {"max_pool_connections": max(self.concurrency * 2, 10),
                  "retries": {"total_max_attempts": 1}, "connect_timeout": 10, "read_timeout": 60}
        config.update(options.pop("config_kwargs", None) or {})
        fs = s3fs.S3FileSystem(**options, config_kwargs=config, skip_instance_cache=True,
                               use_listings_cache=False, max_concurrency=1)
        fs.retries = 1  # our own loop retries; attempts in messages must be exact
        return fs

    @property
    def endpoint(self) -> str:
        """The endpoint requests go to, for messages."""
        return str(self.storage_options.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3")

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the S3 client runs on."""
        return self.fs.loop

    def submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        """Schedule a coroutine on the S3 event loop from any thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run a coroutine on the S3 event loop and wait for its result."""
        return self.submit(coro).result()

    async def _call(self, url: str, method: str, **kwargs: Any) -> dict[str, Any]:
        """One S3 API call with bounded, jittered exponential backoff on transient errors."""
        fs = self.fs
        return await self._with_retries(url, method, lambda: fs._call_s3(method, **kwargs))

    async def _with_retries(self, url: str, what: str, attempt: Callable[[], Awaitable[_T]]) -> _T:
        if self._semaphore is None:  # created on the event loop, once per process (see fs)
            self._semaphore = asyncio.Semaphore(self.concurrency)
        for number in range(1, self.attempts + 1):
            try:
                async with self._semaphore:
                    self.requests += 1
                    return await attempt()
            except Exception as raised:
                exc = _unwrap(raised)
                if not _is_retryable(exc):
                    raise translate_error(exc, url, self.endpoint) from exc
                if number == self.attempts:
                    translated = translate_error(exc, url, self.endpoint)
                    if isinstance(translated, EndpointUnreachableError):
                        raise translated from exc
                    raise S3RequestError(
                        f"{url}: {what} failed after {number} attempts; last error: {_describe(exc)}"
                    ) from exc
                self.retries += 1
                await asyncio.sleep(min(0.05 * 2 ** (number - 1), 2.0) * random.uniform(0.5, 1.5))
        raise AssertionError("unreachable")

    # -- listing ----------------------------------------------------------------------------------

    def list_prefix(self, url: str) -> list[S3Object]:
        """List every image object under a prefix URL, in key order.

        Raises:
            BucketNotFoundError, AccessDeniedError, CredentialsError, EndpointUnreachableError:
                as the situation demands, naming the bucket and prefix.
        """
        return self.run(self._list_prefix(url))

    async def _list_prefix(self, url: str) -> list[S3Object]:
        bucket, prefix = split_url(url)
        if prefix and not prefix.endswith("/"):
            prefix += "/"  # a prefix names a folder, as a directory does for Keras
        found: list[S3Object] = []
        token: dict[str, str] = {}
        while True:
            page = await self._call(url, "list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1000, **token)
            found.extend(S3Object(bucket, item["Key"], _etag(item["ETag"]), int(item["Size"]))
                         for item in page.get("Contents", []) if is_image_key(item["Key"]))
            if not page.get("IsTruncated"):
                return sorted(found, key=lambda obj: obj.key)
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def head_many(self, urls: Sequence[str]) -> list[S3Object]:
        """Look up the ETag and size of each object URL (concurrently), keeping their order."""
        return self.run(self._head_many(urls))

    async def _head_many(self, urls: Sequence[str]) -> list[S3Object]:
        async def head(url: str) -> S3Object:
            bucket, key = split_url(url)
            info = await self._call(url, "head_object", Bucket=bucket, Key=key)
            return S3Object(bucket, key, _etag(info["ETag"]), int(info["ContentLength"]))

        return list(await asyncio.gather(*(head(url) for url in urls)))

    # -- reading ----------------------------------------------------------------------------------

    async def get(self, obj: S3Object) -> tuple[bytes, str]:
        """GET one object's bytes (body read included in the retried attempt).

        Returns:
            The bytes and the ETag of the version actually read.
        """
        fs = self.fs

        async def attempt() -> tuple[bytes, str]:
            response = await fs._call_s3("get_object", Bucket=obj.bucket, Key=obj.key)
            async with response["Body"] as body:
                data = await body.read()
            length = int(response.get("ContentLength", len(data)))
            if len(data) != length:
                raise _TruncatedBody(f"read {len(data)} of {length} bytes")
            self.bytes_received += len(data)
            return data, _etag(response.get("ETag", obj.etag))

        return await self._with_retries(obj.url, "GET", attempt)


class _TruncatedBody(ConnectionError):
    """The connection ended before the whole body arrived."""


def _unwrap(exc: Exception) -> Exception:
    """The botocore error behind an ``OSError`` that s3fs translated it into, else ``exc`` itself."""
    cause = exc.__cause__
    return cause if isinstance(exc, OSError) and isinstance(cause, Exception) else exc


def _etag(raw: str) -> str:
    return raw.strip('"')


def _error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    code = response.get("Error", {}).get("Code")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(code or status) if (code or status) else None


def _is_retryable(exc: BaseException) -> bool:
    """Transient faults worth another attempt: throttling, 5xx, dropped or timed-out connections."""
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, ClientError):
        return _error_code(exc) in _RETRYABLE_CODES
    try:
        from aiohttp import ClientError as AiohttpError
    except ImportError:  # pragma: no cover - aiohttp comes with s3fs
        AiohttpError = OSError
    transient = (HTTPClientError, BotoConnectionError, AiohttpError, asyncio.TimeoutError, TimeoutError,
                 ConnectionError)
    return isinstance(exc, transient) and not isinstance(exc, S3CacheError)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def translate_error(exc: BaseException, url: str, endpoint: str) -> Exception:
    """Map a botocore/aiohttp error to an s3cache error that names the bucket or object.

    Args:
        exc: The original error.
        url: The ``s3://`` URL of the bucket, prefix or object involved.
        endpoint: The endpoint in use, for connection errors.
    """
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    if isinstance(exc, S3CacheError):
        return exc
    bucket, _ = split_url(url)
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return CredentialsError(
            f"no AWS credentials found to read {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, or pass storage_options={'anon': True} for a public bucket"
        )
    if isinstance(exc, ClientError):
        code = _error_code(exc) or "?"
        if code == "NoSuchBucket":
            return BucketNotFoundError(f"bucket {bucket!r} does not exist (while reading {url})")
        if code in _NOT_FOUND_CODES:
            return ObjectNotFoundError(f"{url}: no such object")
        if code in _DENIED_CODES:
            return AccessDeniedError(f"access denied to {url} (S3 error {code}): check the bucket policy "
                                     "and the credentials' permissions")
        if code in _BAD_CREDENTIAL_CODES:
            return CredentialsError(f"S3 rejected the credentials used for {url} ({code})")
        return S3RequestError(f"{url}: S3 error {code}: {exc}")
    if isinstance(exc, EndpointConnectionError) or "Cannot connect to host" in str(exc):
        return EndpointUnreachableError(
            f"cannot reach S3 at {endpoint} (while reading {url}): {unquote(str(exc))}. "
            "To train from the cache without network, pass offline=True."
        )
    return S3RequestError(f"{url}: {_describe(exc)}")
