"""Translation of botocore and aiohttp errors into s3cache errors that name the bucket or object."""

from __future__ import annotations

import asyncio
import re
from urllib.parse import unquote

from s3cache.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    CredentialsError,
    EndpointUnreachableError,
    ObjectChangedError,
    ObjectNotFoundError,
    S3CacheError,
    S3RequestError,
)

_RETRYABLE_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling",
                    "ThrottlingException", "RequestLimitExceeded", "500", "502", "503", "504"}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_DENIED_CODES = {"AccessDenied", "403", "AllAccessDisabled", "AccountProblem"}
_CHANGED_CODES = {"PreconditionFailed", "412"}
_BAD_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}


class TruncatedBodyError(ConnectionError):
    """The connection ended before the whole body arrived."""


class DeadlineExceeded(TimeoutError):
    """One attempt at fetching an object took longer than its deadline (a stalled or trickling body)."""


_USERINFO = re.compile(r"(?<=://)[^/@\s]*@")


def redact(text: str) -> str:
    """``text`` without the ``user:password@`` part of any URL in it (for messages and logs)."""
    return _USERINFO.sub("***@", text)


def unwrap(exc: BaseException) -> BaseException:
    """The botocore error behind an ``OSError`` that s3fs translated it into, else ``exc`` itself.

    Our own errors (some of which are ``OSError`` too) are never unwrapped.
    """
    cause = exc.__cause__
    translated = isinstance(exc, OSError) and not isinstance(exc, S3CacheError)
    return cause if translated and isinstance(cause, Exception) else exc


def error_code(exc: BaseException) -> str | None:
    """The S3 error code (or HTTP status) of a botocore ``ClientError``, else ``None``."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    code = response.get("Error", {}).get("Code")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(code or status) if (code or status) else None


def is_retryable(exc: BaseException) -> bool:
    """Transient faults worth another attempt: throttling, 5xx, dropped or timed-out connections."""
    from aiohttp import ClientError as AiohttpError
    from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, ClientError):
        return error_code(exc) in _RETRYABLE_CODES
    transient = (HTTPClientError, BotoConnectionError, IncompleteReadError, AiohttpError, asyncio.TimeoutError,
                 TimeoutError, ConnectionError)
    return isinstance(exc, transient) and not isinstance(exc, S3CacheError)


def describe(exc: BaseException) -> str:
    """``Type: message`` of an exception, for messages and logs (URLs without user info)."""
    return redact(f"{type(exc).__name__}: {exc}") if str(exc) else type(exc).__name__


def translate_error(exc: BaseException, url: str, bucket: str, endpoint: str) -> S3CacheError:
    """Map a botocore/aiohttp error to an s3cache error that names the bucket or object.

    Args:
        exc: The original error.
        url: The URL of the bucket, prefix or item involved.
        bucket: The bucket involved.
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
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return CredentialsError(
            f"no AWS credentials found to read {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, or pass storage_options={'anon': True} for a public bucket"
        )
    if isinstance(exc, ClientError):
        code = error_code(exc) or "?"
        if code == "NoSuchBucket":
            return BucketNotFoundError(f"bucket {bucket!r} does not exist (while reading {url})")
        if code in _NOT_FOUND_CODES:
            return ObjectNotFoundError(f"{url}: no such object")
        if code in _DENIED_CODES:
            return AccessDeniedError(f"access denied to {url} (S3 error {code}): check the bucket policy "
                                     "and the credentials' permissions")
        if code in _CHANGED_CODES:
            return ObjectChangedError(f"{url}: the object changed since it was listed; list it again (build the "
                                      "dataset with offline=False, or rerun `s3cache warm`)")
        if code in _BAD_CREDENTIAL_CODES:
            return CredentialsError(f"S3 rejected the credentials used for {url} ({code})")
        return S3RequestError(f"{url}: S3 error {code}: {exc}")
    if isinstance(exc, EndpointConnectionError) or "Cannot connect to host" in str(exc):
        return EndpointUnreachableError(
            f"cannot reach S3 at {redact(endpoint)} (while reading {url}): {redact(unquote(str(exc)))}. "
            "To train from the cache without network, pass offline=True."
        )
    return S3RequestError(f"{url}: {describe(exc)}")
