"""Writing a shard set into an S3 folder: tar shards as multipart uploads, manifests, listing and clean-up.

Requests go through an ``s3fs.S3FileSystem``'s client on fsspec's event loop (with s3fs's retries). A shard
is built in order, member by member; every ``part_size`` bytes become one part of its multipart upload, sent
while the next members arrive, with a few parts in flight at most, so memory holds parts, never a whole
shard. A shard smaller than one part is sent with one PUT. A shard becomes visible only when its upload
completes, and counts as final only once its manifest (a one-shard index) is written after it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar

from s3cache.errors import AccessDeniedError
from s3cache.shards import MemberInfo, ShardIndex, ShardInfo, manifest_name
from s3cache.source.errors import translate_error
from s3cache.tarformat import END_OF_ARCHIVE, member_header, padding
from s3cache.urls import split_url

MIN_PART_SIZE = 5 * 2**20  # S3's smallest part (but the last)
DEFAULT_PART_SIZE = 8 * 2**20
PARTS_IN_FLIGHT = 3
_DELETE_BATCH = 1000  # S3's limit per DeleteObjects request

_T = TypeVar("_T")


class ShardSetWriter:
    """The S3 folder a shard set is written to.

    Args:
        url: Folder URL such as ``s3://bucket/packed/`` (a trailing ``/`` is added if missing).
        storage_options: Keyword arguments for ``s3fs.S3FileSystem``.
        part_size: Bytes per multipart part, at least 5 MiB.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None,
                 part_size: int = DEFAULT_PART_SIZE) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3's minimum), got {part_size}")
        self.bucket, prefix = split_url(url)
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.url = f"s3://{self.bucket}/{self.prefix}"
        self.part_size = part_size
        self.storage_options = dict(storage_options or {})
        self._fs: Any = None

    @property
    def fs(self) -> Any:
        """The ``s3fs.S3FileSystem``, created on first use."""
        if self._fs is None:
            import s3fs

            self._fs = s3fs.S3FileSystem(**self.storage_options, skip_instance_cache=True, use_listings_cache=False)
        return self._fs

    def url_of(self, name: str) -> str:
        """The URL of an object in the folder."""
        return f"{self.url}{name}"

    def submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        """Schedule a coroutine on the S3 event loop."""
        return asyncio.run_coroutine_threadsafe(coro, self.fs.loop)

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run a coroutine on the S3 event loop and wait for it."""
        return self.submit(coro).result()

    async def call(self, name: str, method: str, **kwargs: Any) -> dict[str, Any]:
        """One S3 request about object ``name`` of the folder (errors name its URL)."""
        fs = self.fs
        try:
            result: dict[str, Any] = await fs._call_s3(method, Bucket=self.bucket, **kwargs)
        except Exception as raised:
            # s3fs turns botocore errors into OSErrors; the botocore error (the cause) says more.
            cause = raised.__cause__ if isinstance(raised, OSError) and isinstance(raised.__cause__, Exception) \
                else raised
            raise translate_error(cause, self.url_of(name), self.bucket, _endpoint(self.storage_options)) from raised
        return result

    def contents(self) -> dict[str, tuple[str, int]]:
        """``{name: (ETag, size)}`` of the objects directly in the folder."""
        return self.run(self._contents())

    async def _contents(self) -> dict[str, tuple[str, int]]:
        found: dict[str, tuple[str, int]] = {}
        token: dict[str, str] = {}
        while True:
            page = await self.call("", "list_objects_v2", Prefix=self.prefix, Delimiter="/", **token)
            for item in page.get("Contents", []):
                found[item["Key"][len(self.prefix):]] = (_etag(item["ETag"]), int(item["Size"]))
            if not page.get("IsTruncated"):
                return found
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def abort_uploads(self, is_ours: Callable[[str], bool]) -> int:
        """Abort unfinished multipart uploads of our objects (left by a killed run); return how many.

        Lacking the permission to list or abort uploads is not an error: S3 lifecycle rules can clean up.
        """
        try:
            return self.run(self._abort_uploads(is_ours))
        except AccessDeniedError:
            return 0

    async def _abort_uploads(self, is_ours: Callable[[str], bool]) -> int:
        aborted = 0
        markers: dict[str, str] = {}
        while True:
            page = await self.call("", "list_multipart_uploads", Prefix=self.prefix, **markers)
            for upload in page.get("Uploads", []):
                name = upload["Key"][len(self.prefix):]
                if is_ours(name):
                    await self.call(name, "abort_multipart_upload", Key=upload["Key"], UploadId=upload["UploadId"])
                    aborted += 1
            if not page.get("IsTruncated"):
                return aborted
            markers = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}

    def get(self, name: str) -> bytes:
        """The bytes of an object in the folder."""
        return self.run(self._get(name))

    async def _get(self, name: str) -> bytes:
        response = await self.call(name, "get_object", Key=self.prefix + name)
        async with response["Body"] as body:
            data: bytes = await body.read()
        return data

    def put(self, name: str, body: bytes) -> str:
        """Write an object in one PUT; return its ETag."""
        return self.run(self.put_async(name, body))

    async def put_async(self, name: str, body: bytes) -> str:
        """Coroutine form of :meth:`put`."""
        return _etag((await self.call(name, "put_object", Key=self.prefix + name, Body=body))["ETag"])

    def delete(self, names: Iterable[str]) -> None:
        """Delete objects of the folder (missing ones are no error)."""
        keys = [{"Key": self.prefix + name} for name in names]
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = keys[start : start + _DELETE_BATCH]
            self.run(self.call(batch[0]["Key"][len(self.prefix):], "delete_objects",
                               Delete={"Objects": batch, "Quiet": True}))

    def open_shard(self, name: str) -> ShardUpload:
        """Start writing the shard ``name``."""
        return ShardUpload(self, name)


class ShardUpload:
    """One tar shard being written: members go in with :meth:`add`, then :meth:`finish` or :meth:`abort`."""

    def __init__(self, writer: ShardSetWriter, name: str) -> None:
        self.writer = writer
        self.name = name
        self.size = 0
        self._key = writer.prefix + name
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[concurrent.futures.Future[dict[str, Any]]] = []

    def add(self, name: str, data: bytes) -> int:
        """Append a member; return the offset of its data in the shard."""
        self._write(member_header(name, len(data)))
        offset = self.size
        self._write(data)
        self._write(padding(len(data)))
        return offset

    def finish(self, source: str, members: Sequence[MemberInfo]) -> concurrent.futures.Future[ShardIndex]:
        """Complete the shard, then write its manifest, in the background.

        Args:
            source: The index's source URL.
            members: The shard's members (position 0).

        Returns:
            A future of the shard's manifest.
        """
        self._write(END_OF_ARCHIVE)
        tail, self._buffer = bytes(self._buffer), bytearray()
        return self.writer.submit(self._finish(tail, source, tuple(members)))

    def abort(self) -> None:
        """Give the shard up: wait for parts in flight, then abort the multipart upload (best effort)."""
        concurrent.futures.wait(self._parts)
        if self._upload_id is not None:
            with contextlib.suppress(Exception):  # what is left over, the next run aborts
                self.writer.run(self.writer.call(self.name, "abort_multipart_upload", Key=self._key,
                                                 UploadId=self._upload_id))
            self._upload_id = None

    def _write(self, chunk: bytes) -> None:
        self._buffer += chunk
        self.size += len(chunk)
        while len(self._buffer) >= self.writer.part_size:
            with memoryview(self._buffer) as view:  # one copy; released before the buffer shrinks
                part = bytes(view[: self.writer.part_size])
            del self._buffer[: self.writer.part_size]
            self._send(part)

    def _send(self, part: bytes) -> None:
        if self._upload_id is None:
            created = self.writer.run(self.writer.call(self.name, "create_multipart_upload", Key=self._key))
            self._upload_id = str(created["UploadId"])
        self._parts.append(self.writer.submit(self._upload_part(len(self._parts) + 1, part)))
        for future in self._parts:
            if future.done():
                future.result()  # a failed part stops the shard now, not at its end
        in_flight = [future for future in self._parts if not future.done()]
        if len(in_flight) > PARTS_IN_FLIGHT:
            concurrent.futures.wait(in_flight[: len(in_flight) - PARTS_IN_FLIGHT])

    async def _upload_part(self, number: int, body: bytes) -> dict[str, Any]:
        out = await self.writer.call(self.name, "upload_part", Key=self._key, UploadId=self._upload_id,
                                     PartNumber=number, Body=body)
        return {"PartNumber": number, "ETag": out["ETag"]}

    async def _finish(self, tail: bytes, source: str, members: tuple[MemberInfo, ...]) -> ShardIndex:
        if self._upload_id is None:
            etag = await self.writer.put_async(self.name, tail)
        else:
            etag = await self._complete(tail)
        manifest = ShardIndex(source, (ShardInfo(self.name, etag, self.size),), members)
        await self.writer.put_async(manifest_name(self.name), manifest.dumps())
        return manifest

    async def _complete(self, tail: bytes) -> str:
        pending = [asyncio.wrap_future(future) for future in self._parts]
        if tail:
            pending.append(asyncio.ensure_future(self._upload_part(len(self._parts) + 1, tail)))
        try:
            parts = await asyncio.gather(*pending)
            out = await self.writer.call(self.name, "complete_multipart_upload", Key=self._key,
                                         UploadId=self._upload_id, MultipartUpload={"Parts": list(parts)})
        except BaseException:
            await asyncio.gather(*pending, return_exceptions=True)
            with contextlib.suppress(Exception):  # the first error is the one to report
                await self.writer.call(self.name, "abort_multipart_upload", Key=self._key, UploadId=self._upload_id)
            raise
        return _etag(out["ETag"])


def _etag(raw: str) -> str:
    return raw.strip('"')


def _endpoint(storage_options: dict[str, Any]) -> str:
    return str(storage_options.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3")
