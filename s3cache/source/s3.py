"""The S3 source: listing with ETags and concurrent reads through s3fs, with bounded retries.

Requests go through an ``s3fs.S3FileSystem``'s aiobotocore client on fsspec's event loop.
Keys are passed to S3 verbatim, never through s3fs's path or glob handling, so keys with
``[``, ``*``, ``?``, spaces or non-ASCII characters work. Retries are ours alone (botocore's
and s3fs's are switched off), so the number of attempts in an error message is the truth.
The filesystem is created lazily and again in every process: s3fs is not fork-safe.

Every attempt has a deadline (a flat allowance plus the object's size at a minimum rate), so a
server that trickles a body cannot hold a batch forever; a body may not exceed its listed size by
more than a small slack, so a listing cannot understate what lands in memory; and a tar member is
read only from the shard version it was listed from.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import logging
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

from s3cache.errors import (
    EndpointUnreachableError,
    FetchTimeoutError,
    ObjectChangedError,
    ObjectTooLargeError,
    S3RequestError,
)
from s3cache.items import Item
from s3cache.source.base import DEFAULT_FETCH_TIMEOUT, DEFAULT_MIN_RATE, Payload, SourceCounters
from s3cache.source.errors import (
    DeadlineExceeded,
    TruncatedBodyError,
    describe,
    error_code,
    is_retryable,
    redact,
    translate_error,
    unwrap,
)
from s3cache.urls import is_image_key, prefix_of, split_url

DEFAULT_CONCURRENCY = 32
DEFAULT_ATTEMPTS = 5
LIST_PAGE_SIZE = 1000
BODY_SLACK = 2**20
"""A whole object's body may exceed its listed size by this much, or by a quarter, whichever is more."""
_CHUNK = 2**20
_SHARD_CHANGED_CODES = {"PreconditionFailed", "412", "InvalidRange", "416"}

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class S3Source:
    """Lists and reads S3 objects (and byte ranges of them) through s3fs.

    Args:
        storage_options: Keyword arguments for ``s3fs.S3FileSystem`` (``endpoint_url``, ``anon``,
            ``key``, ``secret``, ``profile``, ``client_kwargs``, ``config_kwargs``, ...).
        concurrency: Most requests in flight at once.
        attempts: Tries per request before giving up on transient errors.
        fetch_timeout: Seconds each attempt may take (a listing page or HEAD: exactly this; an object:
            this plus its listed size at ``min_rate``). A missed deadline is retried like a dropped
            connection; when every attempt misses it, the read fails with
            :class:`~s3cache.errors.FetchTimeoutError`.
        min_rate: Bytes per second an object's body must arrive at, at least.
    """

    def __init__(
        self,
        storage_options: dict[str, Any] | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        attempts: int = DEFAULT_ATTEMPTS,
        *,
        fetch_timeout: float = DEFAULT_FETCH_TIMEOUT,
        min_rate: float = DEFAULT_MIN_RATE,
    ) -> None:
        if concurrency < 1 or attempts < 1:
            raise ValueError("concurrency and attempts must be at least 1")
        if not fetch_timeout > 0 or not min_rate > 0:
            raise ValueError(f"fetch_timeout and min_rate must be positive, got {fetch_timeout} and {min_rate}")
        self.storage_options = dict(storage_options or {})
        self.concurrency = concurrency
        self.attempts = attempts
        self.fetch_timeout = float(fetch_timeout)
        self.min_rate = float(min_rate)
        self._counters = SourceCounters()
        self._fs: Any = None
        self._fs_pid = -1
        self._tuned_fs: Any = None  # the filesystem whose timestamp parsing is switched off
        self._semaphore: asyncio.Semaphore | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        # Never the storage options: they may hold credentials.
        return f"S3Source(endpoint={self.endpoint!r}, concurrency={self.concurrency})"

    @property
    def counters(self) -> SourceCounters:
        """Requests, bytes received and retries so far."""
        return self._counters

    def sharing_client(self) -> S3Source:
        """A source with counters of its own that reads through this one's client and request limit.

        A dataset reads through the client that listed it: creating another costs about 70 ms of CPU
        and a new connection, in the first batch's wait. After a fork each creates its own client.
        """
        twin = copy.copy(self)
        twin._counters = SourceCounters()
        return twin

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
        # Checksums only where S3 requires them: validating every response's CRC costs client CPU per
        # GET, and each entry carries its own checksum from the moment it is decoded. A fixed User-Agent:
        # botocore otherwise assembles and sanitizes one twice per request (about 0.13 ms of CPU per GET).
        config = {"max_pool_connections": max(self.concurrency * 2, 10),
                  "retries": {"total_max_attempts": 1}, "connect_timeout": 10, "read_timeout": 60,
                  "request_checksum_calculation": "when_required", "response_checksum_validation": "when_required",
                  "user_agent": _user_agent()}
        config.update(options.pop("config_kwargs", None) or {})
        fs = s3fs.S3FileSystem(**options, config_kwargs=config, skip_instance_cache=True,
                               use_listings_cache=False, max_concurrency=1)
        fs.retries = 1  # our own loop retries; attempts in messages must be exact
        return fs

    @property
    def endpoint(self) -> str:
        """The endpoint requests go to, for messages (without any ``user:password@``)."""
        return redact(str(self.storage_options.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")
                          or "AWS S3"))

    def deadline(self, item: Item) -> float:
        """Seconds one attempt at reading ``item`` may take: ``fetch_timeout`` plus its size at ``min_rate``."""
        return self.fetch_timeout + item.size / self.min_rate

    def submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        """Schedule a coroutine on the S3 event loop from any thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.fs.loop)

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run a coroutine on the S3 event loop and wait for its result."""
        future = self.submit(coro)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # Ctrl-C: stop the coroutine instead of leaving it to be garbage collected
            raise

    async def _client_ready(self) -> None:
        """Create the filesystem's client (once), and have its responses' timestamps left as text.

        Nothing here reads a ``LastModified``, and botocore parses each one with dateutil, at about
        0.1 ms of CPU: once per GET, and once per key listed. A session passed in ``storage_options``
        is the caller's and is left as it is.
        """
        fs = self.fs
        await fs.set_session()
        if self._tuned_fs is not fs and "session" not in self.storage_options:
            fs.session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
        self._tuned_fs = fs

    def close(self) -> None:
        """Forget the filesystem (its connections close with it)."""
        with self._lock:
            self._fs = None

    async def _call(self, url: str, bucket: str, method: str, **kwargs: Any) -> dict[str, Any]:
        """One S3 API call with bounded, jittered exponential backoff on transient errors."""
        fs = self.fs
        return await self._with_retries(url, bucket, method, lambda: fs._call_s3(method, **kwargs),
                                        self.fetch_timeout)

    async def _with_retries(self, url: str, bucket: str, what: str, attempt: Callable[[], Awaitable[_T]],
                            deadline: float) -> _T:
        """Run ``attempt`` until it succeeds, fails for good, or ``attempts`` tries have failed.

        Each try holds one of the ``concurrency`` request slots and must finish within ``deadline``
        seconds (waiting for a slot does not count).
        """
        if self._semaphore is None:  # created on the event loop, once per process (see fs)
            self._semaphore = asyncio.Semaphore(self.concurrency)
        for number in range(1, self.attempts + 1):
            try:
                async with self._semaphore:
                    self._counters.add(requests=1)
                    await self._client_ready()  # creating the client (once) is no part of a deadline
                    return await _within(deadline, attempt())
            except Exception as raised:
                exc = unwrap(raised)
                if not is_retryable(exc):
                    raise translate_error(exc, url, bucket, self.endpoint) from exc
                if number == self.attempts:
                    translated = translate_error(exc, url, bucket, self.endpoint)
                    if isinstance(translated, EndpointUnreachableError):
                        raise translated from exc
                    error = FetchTimeoutError if isinstance(exc, DeadlineExceeded) else S3RequestError
                    log.info("giving up on %s %s after %d attempts: %s", what, url, number, describe(exc))
                    raise error(f"{url}: {what} failed after {number} attempts; last error: {describe(exc)}") from exc
                self._counters.add(retries=1)
                delay = min(0.05 * 2 ** (number - 1), 2.0) * random.uniform(0.5, 1.5)
                log.info("retrying %s %s in %.2f s (attempt %d of %d): %s", what, url, delay, number + 1,
                         self.attempts, describe(exc))
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    # -- listing ----------------------------------------------------------------------------------

    def list_objects(self, url: str) -> list[Item]:
        """List every object under a prefix URL (a folder), in key order.

        Raises:
            BucketNotFoundError, AccessDeniedError, CredentialsError, EndpointUnreachableError:
                as the situation demands, naming the bucket and prefix.
        """
        started = time.perf_counter()
        items = self.run(self._list_objects(url))
        log.info("listed %s: %d objects in %.2f s", url, len(items), time.perf_counter() - started)
        return items

    def list_prefix(self, url: str) -> list[Item]:
        """List the image objects under a prefix URL, in key order (see :meth:`list_objects`)."""
        return [item for item in self.list_objects(url) if is_image_key(item.key)]

    async def _list_objects(self, url: str) -> list[Item]:
        bucket, prefix = prefix_of(url)
        found: list[Item] = []
        token: dict[str, str] = {}
        while True:
            page = await self._call(url, bucket, "list_objects_v2", Bucket=bucket, Prefix=prefix,
                                    MaxKeys=LIST_PAGE_SIZE, **token)
            found.extend(Item(bucket, entry["Key"], _etag(entry["ETag"]), int(entry["Size"]))
                         for entry in page.get("Contents", []))
            if not page.get("IsTruncated"):
                return sorted(found, key=lambda item: item.key)
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def list_page(self, bucket: str, prefix: str, start_after: str) -> tuple[list[Item], bool]:
        """One ``ListObjectsV2`` page: up to 1,000 objects under ``prefix`` with keys after ``start_after``.

        Every object is returned, image or not (URL lists name their objects). Used by
        :func:`s3cache.listing.resolve_url_list` to resolve long URL lists by key range.

        Returns:
            The objects in key order, and whether more keys follow.
        """
        return self.run(self._list_page(bucket, prefix, start_after))

    async def _list_page(self, bucket: str, prefix: str, start_after: str) -> tuple[list[Item], bool]:
        after = {"StartAfter": start_after} if start_after else {}
        page = await self._call(f"s3://{bucket}/{prefix}", bucket, "list_objects_v2", Bucket=bucket, Prefix=prefix,
                                MaxKeys=LIST_PAGE_SIZE, **after)
        items = [Item(bucket, entry["Key"], _etag(entry["ETag"]), int(entry["Size"]))
                 for entry in page.get("Contents", [])]
        return items, bool(page.get("IsTruncated"))

    def resolve_urls(self, urls: Sequence[str]) -> list[Item]:
        """Look up the ETag and size of each object URL (concurrently), keeping their order."""
        return self.run(self._head_many(urls))

    async def _head_many(self, urls: Sequence[str]) -> list[Item]:
        async def head(url: str) -> Item:
            bucket, key = split_url(url)
            info = await self._call(url, bucket, "head_object", Bucket=bucket, Key=key)
            return Item(bucket, key, _etag(info["ETag"]), int(info["ContentLength"]))

        return list(await asyncio.gather(*(head(url) for url in urls)))

    # -- reading ----------------------------------------------------------------------------------

    def read(self, item: Item) -> concurrent.futures.Future[Payload]:
        """Start reading an item: the whole object, or a member's byte range of its shard."""
        return self.submit(self.read_async(item))

    async def read_async(self, item: Item) -> Payload:
        """GET an item's bytes (the body read is part of the retried attempt, under its deadline).

        Returns:
            The bytes and the ETag of the version actually read (for a whole object, possibly a
            newer version than the one listed).

        Raises:
            ObjectTooLargeError: The body is larger than the listed size allows (see :func:`body_limit`);
                it is not read.
            ObjectChangedError: A tar member's shard is no longer the version it was listed from.
            FetchTimeoutError: Every attempt missed its deadline.
            S3CacheError: Other failures, naming the item.
        """
        fs = self.fs
        # A member is read only from the shard version it was listed from: its offset means nothing in another.
        ranged = {} if item.offset is None else {"Range": f"bytes={item.offset}-{item.offset + item.size - 1}",
                                                  "IfMatch": f'"{item.etag}"'}
        limit = body_limit(item)

        def changed(now: str) -> ObjectChangedError:
            return ObjectChangedError(f"{item.url}: the shard {item.object_url} changed since it was listed "
                                      f"(ETag {item.etag} listed, {now}), so its members may have moved; list it again")

        async def attempt() -> Payload:
            try:
                response = await fs._call_s3("get_object", Bucket=item.bucket, Key=item.key, **ranged)
            except Exception as exc:
                if item.member is not None and error_code(unwrap(exc)) in _SHARD_CHANGED_CODES:
                    raise changed(f"S3 answered {error_code(unwrap(exc))}") from exc
                raise
            async with response["Body"] as body:  # leaving closes the connection unless the body was read
                etag = _etag(response.get("ETag", item.etag))
                if item.member is not None and etag != item.etag:
                    raise changed(f"{etag} now")
                length = response.get("ContentLength")
                if length is not None and int(length) > limit:
                    raise _too_large(item, int(length), limit)
                data = await _read_body(body, item, limit)
            if length is not None and len(data) != int(length):
                raise TruncatedBodyError(f"read {len(data)} of {length} bytes")
            if item.member is not None and len(data) != item.size:
                raise TruncatedBodyError(f"range read returned {len(data)} of {item.size} bytes")
            self._counters.add(bytes_received=len(data))
            return Payload(data, etag)

        return await self._with_retries(item.url, item.bucket, "GET", attempt, self.deadline(item))


def _user_agent() -> str:
    """The User-Agent of s3cache's requests: s3cache's version, botocore's and Python's."""
    import platform

    import botocore

    from s3cache import __version__

    return f"s3cache/{__version__} botocore/{botocore.__version__} lang/python#{platform.python_version()}"


def body_limit(item: Item) -> int:
    """The most bytes a read of ``item`` may return.

    A member's exact size; for a whole object its listed size plus :data:`BODY_SLACK` or a quarter
    of it, whichever is more (an object rewritten since it was listed may have grown a little).
    """
    return item.size if item.member is not None else item.size + max(BODY_SLACK, item.size // 4)


def _too_large(item: Item, size: int, limit: int) -> ObjectTooLargeError:
    return ObjectTooLargeError(
        f"{item.url}: S3 sent a body of {size} bytes, but the object was listed at {item.size} bytes "
        f"(at most {limit} accepted); it changed since it was listed (list it again) or the endpoint misbehaves"
    )


async def _read_body(body: Any, item: Item, limit: int) -> bytes:
    """The whole body, refusing more than ``limit`` bytes even when no Content-Length announced them."""
    chunks: list[bytes] = []
    received = 0
    while chunk := await body.read(min(_CHUNK, limit + 1 - received)):
        chunks.append(chunk)
        received += len(chunk)
        if received > limit:
            raise _too_large(item, received, limit)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _within(seconds: float, awaitable: Awaitable[_T]) -> _T:
    """Await ``awaitable`` for at most ``seconds``; past that, cancel it and raise :class:`DeadlineExceeded`."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        return await asyncio.wait_for(awaitable, seconds)
    except asyncio.TimeoutError:
        if loop.time() - started < seconds:
            raise  # a timeout of the client's own, before the deadline
        raise DeadlineExceeded(f"no complete response within the deadline of {seconds:.1f} s") from None


def _etag(raw: str) -> str:
    return raw.strip('"')
