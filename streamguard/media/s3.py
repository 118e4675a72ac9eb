"""S3-compatible media storage through boto3 (AWS S3, MinIO, SeaweedFS, R2 ...).

boto3 clients are thread-safe and blocking: every call here runs in a
worker thread (media/storage.py). Files go up through boto3's transfer
manager, which splits objects larger than `multipart_mb` into a multipart
upload. Each operation is retried with exponential backoff for up to
`retry_seconds` when the failure can pass (the endpoint unreachable, a 5xx,
throttling, a timeout); wrong credentials, a missing bucket or a refused
permission fail at once, each with a message that says which.

The secret key is handed to boto3 and nowhere else: errors are built from
the store's error code and scrubbed of it all the same (S3Target.scrub).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import boto3
import botocore.exceptions as bex
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from .storage import MediaStorage, S3Target, StorageError, StoredObject, cache_control, content_type, join_key

log = logging.getLogger(__name__)
T = TypeVar("T")

# botocore logs request details at DEBUG; nothing of it belongs in our logs.
logging.getLogger("botocore").setLevel(logging.WARNING)
logging.getLogger("boto3").setLevel(logging.WARNING)
logging.getLogger("s3transfer").setLevel(logging.WARNING)

CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                    "InvalidSecurity", "AuthorizationHeaderMalformed", "InvalidClientTokenId"}
BUCKET_CODES = {"NoSuchBucket"}
ACCESS_CODES = {"AccessDenied", "AllAccessDisabled", "AccountProblem"}
RETRY_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
               "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "OperationAborted"}


def _cause(exc: BaseException) -> BaseException:
    """The client error behind a transfer-manager wrapper (S3UploadFailedError)."""
    seen = exc
    for _ in range(5):
        if isinstance(seen, (bex.ClientError, bex.BotoCoreError)):
            return seen
        nxt = seen.__cause__ or seen.__context__
        if nxt is None:
            break
        seen = nxt
    return exc


def classify(exc: BaseException, target: S3Target) -> StorageError:
    """A boto3/botocore failure as a StorageError that names what is wrong."""
    exc = _cause(exc)
    where = target.endpoint or "AWS S3"
    if isinstance(exc, bex.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code in CREDENTIAL_CODES:
            return StorageError("credentials", f"the S3 store at {where} refused the credentials ({code}): "
                                               f"check accessKey and secretKey")
        if code in BUCKET_CODES or (status == 404 and code in ("404", "NotFound", "")):
            return StorageError("bucket", f"bucket {target.bucket!r} does not exist at {where}")
        if code in ACCESS_CODES or status == 403:
            return StorageError("access", f"the S3 store at {where} denied access to bucket {target.bucket!r} "
                                          f"({code or status}): check the access key's permissions")
        retryable = code in RETRY_CODES or status >= 500 or status == 429
        message = target.scrub(str(err.get("Message") or code or status))
        return StorageError("refused", f"the S3 store at {where} refused the request ({code or status}: {message})",
                            retryable=retryable)
    if isinstance(exc, (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ReadTimeoutError,
                        bex.ConnectionClosedError, bex.ProxyConnectionError)):
        return StorageError("endpoint", f"the S3 endpoint {where} is unreachable ({type(exc).__name__})",
                            retryable=True)
    if isinstance(exc, bex.NoCredentialsError):
        return StorageError("credentials", "no S3 credentials were given (accessKey and secretKey)")
    if isinstance(exc, (bex.HTTPClientError, ConnectionError, TimeoutError)):
        return StorageError("endpoint", f"the S3 endpoint {where} failed mid-request ({type(exc).__name__})",
                            retryable=True)
    return StorageError("refused", f"S3 upload failed: {target.scrub(f'{type(exc).__name__}: {exc}')}")


def _folder(key: str) -> str:
    """A key prefix as a folder ("" for the whole bucket)."""
    return f"{key}/" if key else ""


class S3Storage(MediaStorage):
    kind = "s3"

    def __init__(self, target: S3Target, *, retry_seconds: float = 60.0, multipart_mb: int = 16,
                 concurrency: int = 4, connect_timeout: float = 5.0, read_timeout: float = 30.0) -> None:
        self.target = target
        self.retry_seconds = retry_seconds
        config = Config(
            region_name=target.region or "us-east-1", signature_version="s3v4",
            s3={"addressing_style": "path" if target.endpoint else "auto"},
            connect_timeout=connect_timeout, read_timeout=read_timeout,
            retries={"total_max_attempts": 1},  # the backoff is ours (_retry): one budget per object
            max_pool_connections=max(10, concurrency * 4))
        session = boto3.session.Session()
        try:
            self.client = session.client("s3", endpoint_url=target.endpoint or None,
                                         aws_access_key_id=target.access_key or None,
                                         aws_secret_access_key=target.secret_key or None, config=config)
        except (ValueError, bex.BotoCoreError) as exc:  # an endpoint botocore cannot use
            raise StorageError("endpoint", f"the S3 endpoint {target.endpoint!r} cannot be used: "
                                           f"{target.scrub(str(exc))}") from None
        mb = 1024 * 1024
        self.transfer = TransferConfig(multipart_threshold=multipart_mb * mb, multipart_chunksize=multipart_mb * mb,
                                       max_concurrency=concurrency, use_threads=True)

    def _object(self, key: str) -> str:
        return join_key(self.target.prefix, key)

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.5
        while True:
            try:
                return fn()
            except (bex.BotoCoreError, bex.ClientError, boto3.exceptions.Boto3Error, OSError) as exc:
                if isinstance(exc, FileNotFoundError):
                    raise  # a local file gone (retention): not the store's failure
                err = classify(exc, self.target)
                if not err.retryable or time.monotonic() + delay > deadline:
                    raise err from None
                log.warning("S3 %s: %s; retrying in %.1f s", what, err.message, delay)
                time.sleep(delay)
                delay = min(delay * 2, 8.0)

    def _extra(self, key: str, live: bool) -> dict[str, Any]:
        return {"ContentType": content_type(key), "CacheControl": cache_control(key, live=live)}

    def put_file(self, key: str, path: Path, *, live: bool = False) -> None:
        obj = self._object(key)
        self._retry(f"upload of {obj}", lambda: self.client.upload_file(
            str(path), self.target.bucket, obj, ExtraArgs=self._extra(key, live), Config=self.transfer))

    def put_bytes(self, key: str, data: bytes, *, live: bool = False) -> None:
        obj = self._object(key)
        self._retry(f"upload of {obj}", lambda: self.client.put_object(
            Bucket=self.target.bucket, Key=obj, Body=data, **self._extra(key, live)))

    def get_bytes(self, key: str) -> bytes | None:
        obj = self._object(key)

        def get() -> bytes | None:
            try:
                return self.client.get_object(Bucket=self.target.bucket, Key=obj)["Body"].read()
            except bex.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
        return self._retry(f"read of {obj}", get)

    def delete_keys(self, keys: Iterable[str]) -> None:
        objs = [{"Key": self._object(k)} for k in keys]
        for i in range(0, len(objs), 1000):  # DeleteObjects takes at most 1000 keys
            batch = objs[i:i + 1000]
            self._retry("delete", lambda: self.client.delete_objects(
                Bucket=self.target.bucket, Delete={"Objects": batch, "Quiet": True}))

    def list_objects(self, prefix: str) -> list[StoredObject]:
        root = join_key(self.target.prefix)
        full = _folder(join_key(self.target.prefix, prefix))

        def listing() -> list[StoredObject]:
            out = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.target.bucket, Prefix=full):
                for o in page.get("Contents", []):
                    key = o["Key"][len(root) + 1:] if root else o["Key"]
                    out.append(StoredObject(key, int(o["Size"]), o["LastModified"].timestamp()))
            return out
        return self._retry(f"listing of {full}", listing)

    def delete_prefix(self, prefix: str) -> int:
        keys = [o.key for o in self.list_objects(prefix)]
        if keys:
            self.delete_keys(keys)
        return len(keys)

    def url(self, key: str) -> str:
        return self.target.object_url(key)

    def check(self) -> None:
        """One listing under the prefix: wrong credentials, a missing bucket
        and an unreachable endpoint each fail here with their own message (a
        key that may write but not list passes: its uploads will tell)."""
        try:
            self._retry("check", lambda: self.client.list_objects_v2(
                Bucket=self.target.bucket, Prefix=_folder(join_key(self.target.prefix)), MaxKeys=1))
        except StorageError as err:
            if err.reason != "access":
                raise

    def close(self) -> None:
        self.client.close()
