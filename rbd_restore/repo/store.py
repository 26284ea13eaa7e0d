"""The S3 bucket behind a repository: a handful of primitives with one error policy.

botocore retries throttling, 5xx replies and connection failures with
exponential backoff ("standard" mode, ``s3.max_attempts`` attempts). What is
left after the retries becomes a one-line :class:`UserError`; messages name the
endpoint and bucket, never credentials.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import botocore.exceptions

from rbd_restore.config import S3Settings, require
from rbd_restore.errors import NotFoundError, UnavailableError, UserError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


class ObjectMissing(NotFoundError):
    """The key does not exist in the bucket."""


class AccessDenied(UserError):
    """S3 refused the credentials or the request."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    last_modified: dt.datetime


_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"}


def make_client(settings: S3Settings, max_connections: int = 32) -> S3Client:
    # Imported here: boto3 costs a tenth of a second, and commands that never talk to
    # S3 themselves (restore --mode instant, status, abort) start faster without it.
    import boto3
    import botocore.config

    config = botocore.config.Config(
        # Unsigned bodies: hashing every body for the signature cost the client and RGW
        # 2 CPU-s per GiB uploaded (a fifth of a PUT's cost). Every object written
        # verifies itself on read instead: chunks by the SHA-256 in their name,
        # manifests by their checksum field (docs/format.md).
        s3={"addressing_style": "path", "payload_signing_enabled": bool(settings.sign_payload)},
        retries={"mode": "standard", "total_max_attempts": settings.max_attempts},
        connect_timeout=5,
        read_timeout=60,
        max_pool_connections=max_connections,
        # Every chunk carries its own SHA-256, checked end to end; botocore's extra
        # CRC32 over every body only costs CPU that the colocated OSD and RGW need.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    client: S3Client = boto3.session.Session().client(
        "s3",
        endpoint_url=settings.endpoint or None,
        aws_access_key_id=settings.access_key or None,
        aws_secret_access_key=settings.secret_key or None,
        region_name=settings.region,
        config=config,
    )
    return client


class ObjectStore:
    """Typed access to one bucket; safe to share between threads."""

    def __init__(self, settings: S3Settings, max_connections: int = 32) -> None:
        self.bucket = require(settings.bucket, "s3.bucket")
        self.endpoint = settings.endpoint or "AWS S3"
        self.attempts = settings.max_attempts
        self.client = make_client(settings, max_connections)

    def _fail(self, exc: Exception, key: str | None) -> NoReturn:
        where = f"s3://{self.bucket}/{key}" if key else f"bucket {self.bucket}"
        if isinstance(exc, botocore.exceptions.ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code == "NoSuchBucket" or (code in _MISSING_CODES and key is None):
                raise NotFoundError(f"bucket {self.bucket} does not exist at {self.endpoint}")
            if code in _MISSING_CODES:
                raise ObjectMissing(f"{where} does not exist")
            if code in _DENIED_CODES:
                raise AccessDenied(f"S3 at {self.endpoint} refused access to {where} ({code})")
            raise UnavailableError(f"S3 at {self.endpoint} failed on {where} after "
                                   f"{self.attempts} attempts ({code or 'no error code'})")
        if isinstance(exc, botocore.exceptions.NoCredentialsError):
            raise AccessDenied("no S3 credentials: set s3.access_key and s3.secret_key")
        detail = type(exc).__name__
        raise UnavailableError(f"S3 endpoint {self.endpoint} unreachable after {self.attempts} "
                               f"attempts ({detail})")

    def check_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            self._fail(exc, None)

    def get(self, key: str) -> bytes:
        try:
            reply = self.client.get_object(Bucket=self.bucket, Key=key)
            return reply["Body"].read()
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            self._fail(exc, key)

    def put(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            self._fail(exc, key)

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except botocore.exceptions.ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in _MISSING_CODES:
                return False
            self._fail(exc, key)
        except botocore.exceptions.BotoCoreError as exc:
            self._fail(exc, key)
        return True

    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    yield ObjectInfo(item["Key"], item["Size"], item["LastModified"])
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            self._fail(exc, None)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            self._fail(exc, key)

    def delete_many(self, keys: Iterable[str]) -> int:
        batch: list[Any] = []
        deleted = 0
        for key in keys:
            batch.append({"Key": key})
            if len(batch) == 1000:
                deleted += self._delete_batch(batch)
                batch = []
        if batch:
            deleted += self._delete_batch(batch)
        return deleted

    def _delete_batch(self, batch: list[Any]) -> int:
        try:
            reply = self.client.delete_objects(Bucket=self.bucket,
                                               Delete={"Objects": batch, "Quiet": True})
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            self._fail(exc, None)
        errors = reply.get("Errors", [])
        if errors:
            raise UnavailableError(f"S3 could not delete {len(errors)} objects, first "
                                   f"{errors[0].get('Key')}: {errors[0].get('Code')}")
        return len(batch)
