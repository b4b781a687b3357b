"""How botocore's failures map onto vitscope's error hierarchy.

The split decides what a worker does next: ``NotFoundError`` is an answer, not a failure;
``StorageUnavailableError`` is retried with backoff (the endpoint may come back);
``StorageConfigError`` fails at once, because no retry will create a bucket or fix a credential.
"""

from __future__ import annotations

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from common.errors import (
    NotFoundError,
    StorageConfigError,
    StorageUnavailableError,
    VitscopeError,
)

__all__ = ["translate_s3_error"]

# Error codes as S3, MinIO and botocore report them. HEAD requests carry no body, so their errors
# arrive with the bare status code as the code ("404", "403").
_NOT_FOUND = frozenset({"NoSuchKey", "NotFound", "404"})
_NO_BUCKET = frozenset({"NoSuchBucket"})
_DENIED = frozenset(
    {
        "AccessDenied",
        "403",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "AuthorizationHeaderMalformed",
        "PermanentRedirect",  # the bucket lives in another region than the client's
        "301",
    }
)
_THROTTLED = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "RequestTimeout",
        "ServiceUnavailable",
        "InternalError",
    }
)


def translate_s3_error(
    exc: BotoCoreError | ClientError, *, bucket: str, key: str | None = None
) -> VitscopeError:
    """The vitscope error for a botocore exception raised while working on ``bucket``/``key``.

    Unknown client errors with a 4xx status are treated as permanent (``StorageConfigError``): a
    request S3 rejects as malformed will be rejected again, and so will a client botocore cannot
    even build (a bad region or endpoint setting).
    """
    where = f"s3://{bucket}/{key}" if key is not None else f"s3://{bucket}"
    if isinstance(exc, ClientError):
        return _from_client_error(exc, bucket=bucket, where=where)
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return StorageConfigError(f"no usable S3 credentials for bucket {bucket!r}: {exc}")
    if isinstance(exc, BotoConnectionError | HTTPClientError | IncompleteReadError):
        # Refused or reset connections, DNS failures, connect and read timeouts, and a body cut off
        # before its Content-Length (the connection dropped mid-download): after botocore's own
        # retries, still worth retrying the job later.
        return StorageUnavailableError(f"S3 endpoint unreachable for {where}: {exc}")
    return StorageConfigError(f"S3 client misconfigured for bucket {bucket!r}: {exc}")


def _from_client_error(exc: ClientError, *, bucket: str, where: str) -> VitscopeError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    detail = f"{code or status}: {error.get('Message') or exc}"
    if code in _NO_BUCKET:
        return StorageConfigError(f"S3 bucket {bucket!r} does not exist ({detail})")
    if code in _NOT_FOUND:
        return NotFoundError(f"no such object: {where}")
    if code in _DENIED:
        return StorageConfigError(f"S3 access to bucket {bucket!r} denied or misconfigured ({detail})")
    if code in _THROTTLED or status == 429 or status >= 500:
        return StorageUnavailableError(f"S3 temporarily failed for {where} ({detail})")
    return StorageConfigError(f"S3 rejected the request for {where} ({detail})")
