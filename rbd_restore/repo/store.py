"""The S3 bucket behind a repository: a handful of primitives with one retry policy.

Every request goes through :meth:`ObjectStore._call`, which retries what can
succeed on a second try: throttling and 5xx replies, connection failures,
stalls past the read timeout, and a body that broke off or arrived damaged
(a reset in the middle of a GET, a PUT that RGW refused because its
``Content-MD5`` did not match). Backoff is exponential with jitter, capped,
for ``s3.max_attempts`` attempts; botocore's own retries are off, because its
retry quota runs dry under a steady fault rate and then fails at once.

Integrity in transit: every PUT carries ``Content-MD5``, so RGW refuses a body
damaged on the way; small objects read back are checked against their ETag
(the MD5 of a single-part upload); chunks and manifests verify themselves by
their own SHA-256. Listings that decide what may be deleted are read twice
and must agree (:meth:`list_stable`). What is left after the retries becomes a
one-line :class:`UserError`; messages name the endpoint and bucket, never
credentials.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast

import botocore.exceptions
import urllib3.exceptions

from rbd_restore.config import S3Settings, check_ca_bundle, require
from rbd_restore.errors import NotFoundError, UnavailableError, UsageError, UserError
from rbd_restore.repo import lean_get

if TYPE_CHECKING:
    import boto3.session
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)
T = TypeVar("T")

BACKOFF_FIRST = 0.1
BACKOFF_CAP = 10.0
SMALL_OBJECT = 1 << 20  # GETs up to this size are checked against their ETag


class ObjectMissing(NotFoundError):
    """The key does not exist in the bucket."""


class AccessDenied(UserError):
    """S3 refused the credentials or the request."""


class _Damaged(Exception):
    """A reply that arrived but cannot be right (ETag mismatch, listings that disagree)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    last_modified: dt.datetime


_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"}
# Client errors that a second attempt can cure: throttling, a body damaged in
# transit (RGW checked Content-MD5), a request RGW timed out on.
_THROTTLED = {"SlowDown", "Throttling", "ThrottlingException"}
_RETRY_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                "BadDigest", "InvalidDigest", "IncompleteBody", "InternalError",
                "ServiceUnavailable"}


def make_session(settings: S3Settings) -> boto3.session.Session:
    """The session whose credentials the client and the lean GET path share: the
    configured keys, or botocore's chain (environment, files, instance metadata)."""
    # Imported here: boto3 costs a tenth of a second, and commands that never talk to
    # S3 themselves (restore --mode instant, status, abort) start faster without it.
    import boto3

    return boto3.session.Session(aws_access_key_id=settings.access_key or None,
                                 aws_secret_access_key=settings.secret_key or None,
                                 region_name=settings.region or None)


def make_client(settings: S3Settings, max_connections: int = 32,
                session: boto3.session.Session | None = None,
                region: str | None = None) -> S3Client:
    """``region``: instead of the configured one (the endpoint then follows it, unless
    one is configured)."""
    import botocore.config

    config = botocore.config.Config(
        # Unsigned bodies: hashing every body for the signature cost the client and RGW
        # 2 CPU-s per GiB uploaded (a fifth of a PUT's cost). Content-MD5 lets RGW
        # refuse a damaged body for the client's MD5 alone (RGW computes it for the
        # ETag anyway), and every stored object verifies itself on read.
        s3={"addressing_style": "path", "payload_signing_enabled": bool(settings.sign_payload)},
        retries={"mode": "standard", "total_max_attempts": 1},  # _call retries
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        max_pool_connections=max_connections,
        # Every chunk carries its own SHA-256, checked end to end; botocore's extra
        # CRC32 over every body only costs CPU that the colocated OSD and RGW need.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    client: S3Client = (session or make_session(settings)).client(
        "s3",
        endpoint_url=settings.endpoint or None,
        region_name=region,
        config=config,
        verify=settings.ca_bundle or None,  # https is always verified; this names the CA
    )
    return client


def _untrusted_certificate(exc: Exception) -> bool:
    if isinstance(exc, lean_get.UntrustedCertificate):
        return True
    return isinstance(exc, botocore.exceptions.SSLError) and (
        "CERTIFICATE_VERIFY_FAILED" in str(exc) or "doesn't match" in str(exc))


def content_md5(data: bytes | bytearray | memoryview) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def etag_is_md5(etag: str, encryption: str | None, customer_key: bool) -> bool:
    """Whether an ETag is the MD5 of the object's bytes, which S3 promises only for a
    single-part object stored plaintext or under SSE-S3 (``AES256``). Under SSE-KMS
    (``aws:kms``, ``aws:kms:dsse``) or SSE-C, AWS S3 and MinIO give 32 hex digits
    that are not: taken for an MD5, every body of such a bucket looks damaged."""
    tag = etag.strip('"')
    if customer_key or (encryption or "AES256") != "AES256":
        return False
    return len(tag) == 32 and all(c in "0123456789abcdef" for c in tag)


def _etag_matches(etag: str, data: bytes, encryption: str | None = None,
                  customer_key: bool = False, stored_md5: str | None = None) -> bool:
    """Whether a reply's body matches its ETag, or where the ETag is no MD5 (SSE-KMS,
    SSE-C, multipart) the MD5 its writer stored beside it; an object with neither
    (written before rbd-restore stored one) cannot be checked and passes."""
    if etag_is_md5(etag, encryption, customer_key):
        return hashlib.md5(data).hexdigest() == etag.strip('"')
    if stored_md5:
        return hashlib.md5(data).hexdigest() == stored_md5.lower()
    return True


def _encryption(reply: Any) -> tuple[str | None, bool]:
    """What a botocore reply says of the object's server-side encryption: the
    algorithm (``x-amz-server-side-encryption``), and whether SSE-C keys it."""
    return reply.get("ServerSideEncryption"), "SSECustomerAlgorithm" in reply


def _error_code(exc: botocore.exceptions.ClientError) -> str:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code or str(status or "")


def _retryable(exc: botocore.exceptions.ClientError) -> bool:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    return _error_code(exc) in _RETRY_CODES or int(status) >= 500


class ObjectStore:
    """Typed access to one bucket; safe to share between threads."""

    def __init__(self, settings: S3Settings, max_connections: int = 32) -> None:
        self.bucket = require(settings.bucket, "s3.bucket")
        self.endpoint = settings.endpoint or "AWS S3"
        self.attempts = settings.max_attempts
        self.verify_uploads = settings.content_md5 != 0
        check_ca_bundle(settings.ca_bundle)
        session = make_session(settings)
        self.client = make_client(settings, max_connections, session)
        credentials = session.get_credentials()  # None: botocore's path says so, once

        def endpoint_for(region: str) -> str:
            return make_client(settings, 1, session, region).meta.endpoint_url

        self.lean = (lean_get.LeanGetter(self.client, credentials, self.bucket, settings,
                                         max_connections, endpoint_for)
                     if lean_get.usable() and credentials is not None else None)
        # Told of every retry, with its kind: throttled, server, connection or damaged.
        self.on_retry: Callable[[str], None] | None = None

    # One retry policy

    def _call(self, what: str, key: str | None, operation: Callable[[], T]) -> T:
        delay = BACKOFF_FIRST
        for attempt in range(1, self.attempts + 1):
            try:
                return operation()
            except botocore.exceptions.ClientError as exc:
                if not _retryable(exc) or attempt == self.attempts:
                    self._fail(exc, key, attempt)
                reason = _error_code(exc)
                kind = "throttled" if reason in _THROTTLED else "server"
            except (botocore.exceptions.NoCredentialsError,
                    botocore.exceptions.ParamValidationError) as exc:
                self._fail(exc, key, attempt)
            except (botocore.exceptions.BotoCoreError, urllib3.exceptions.HTTPError, _Damaged,
                    ConnectionError) as exc:  # urllib3's: a body read that broke off
                if _untrusted_certificate(exc):  # retrying cannot make it trusted
                    raise UnavailableError(
                        f"S3 at {self.endpoint} presented a certificate this host does not "
                        "trust (set s3.ca_bundle to the CA that signed it)") from None
                if attempt == self.attempts:
                    self._fail(exc, key, attempt)
                reason = type(exc).__name__
                kind = "damaged" if isinstance(exc, _Damaged) else "connection"
            if self.on_retry is not None:
                self.on_retry(kind)
            log.info("S3 %s %s: %s; attempt %d of %d in %.1f s", what, key or self.bucket,
                     reason, attempt + 1, self.attempts, delay)
            time.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, BACKOFF_CAP)
        raise AssertionError("unreachable")

    def _fail(self, exc: Exception, key: str | None, attempts: int) -> NoReturn:
        where = f"s3://{self.bucket}/{key}" if key else f"bucket {self.bucket}"
        tries = "1 attempt" if attempts == 1 else f"{attempts} attempts"
        if isinstance(exc, botocore.exceptions.ClientError):
            code = _error_code(exc)
            if code == "RequestTimeTooSkewed":
                raise UnavailableError(f"S3 at {self.endpoint} refused the request: this "
                                       "host's clock differs too much from S3's; fix the "
                                       "clock (NTP)")
            if code == "NoSuchBucket" or (code in _MISSING_CODES and key is None):
                raise NotFoundError(f"bucket {self.bucket} does not exist at {self.endpoint}")
            if code in _MISSING_CODES:
                raise ObjectMissing(f"{where} does not exist")
            if code in _DENIED_CODES:
                raise AccessDenied(f"S3 at {self.endpoint} refused access to {where} ({code})")
            raise UnavailableError(f"S3 at {self.endpoint} failed on {where} after {tries} "
                                   f"({code or 'no error code'})")
        if isinstance(exc, botocore.exceptions.NoCredentialsError):
            raise AccessDenied("no S3 credentials: set s3.access_key and s3.secret_key")
        if isinstance(exc, botocore.exceptions.ParamValidationError):  # never sent
            reason = str(exc).strip().splitlines()[-1].strip()
            raise UsageError(f"S3 request for {where} not sent: {reason}")
        if isinstance(exc, _Damaged):
            raise UnavailableError(f"S3 at {self.endpoint}: {where} arrived damaged "
                                   f"{tries} in a row ({exc})")
        raise UnavailableError(f"S3 endpoint {self.endpoint} unreachable after {tries} "
                               f"({type(exc).__name__})")

    # Primitives

    def check_bucket(self) -> None:
        self._call("HEAD", None, lambda: self.client.head_bucket(Bucket=self.bucket))

    def get(self, key: str, verify_etag: bool | None = None) -> bytes:
        """The object's bytes. ``verify_etag`` (default: for objects up to 1 MiB) checks
        them against the ETag; larger ones, chunks and manifests, verify themselves."""

        def once() -> bytes:
            if self.lean is not None:
                data, etag, encryption, customer_key, stored_md5 = self.lean.get(key)
            else:
                reply = self.client.get_object(Bucket=self.bucket, Key=key)
                data, etag = reply["Body"].read(), str(reply.get("ETag", ""))
                encryption, customer_key = _encryption(reply)
                stored_md5 = reply.get("Metadata", {}).get(lean_get.MD5_METADATA)
            check = verify_etag if verify_etag is not None else len(data) <= SMALL_OBJECT
            if check and not _etag_matches(etag, data, encryption, customer_key, stored_md5):
                raise _Damaged("body does not match its ETag or stored MD5")
            return data

        return self._call("GET", key, once)

    def put(self, key: str, data: bytes | bytearray) -> None:
        small = len(data) <= SMALL_OBJECT
        digest = hashlib.md5(data).digest() if self.verify_uploads or small else b""
        md5 = base64.b64encode(digest).decode() if self.verify_uploads else None
        body = cast(bytes, data)  # botocore sends any bytes-like body; its stubs say bytes
        extra: dict[str, Any] = {}
        if small:  # checked on read where its ETag is no MD5 (SSE-KMS, SSE-C)
            extra["Metadata"] = {lean_get.MD5_METADATA: digest.hex()}

        def once() -> None:
            if md5 is None:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=body, **extra)
                return
            reply = self.client.put_object(Bucket=self.bucket, Key=key, Body=body,
                                           ContentMD5=md5, **extra)
            etag = str(reply.get("ETag", "")).strip('"')
            if (etag_is_md5(etag, *_encryption(reply))
                    and base64.b64encode(bytes.fromhex(etag)).decode() != md5):
                raise _Damaged("the stored object's ETag differs from the body sent")

        self._call("PUT", key, once)

    def head(self, key: str) -> ObjectInfo:
        reply = self._call("HEAD", key, lambda: self.client.head_object(Bucket=self.bucket,
                                                                         Key=key))
        return ObjectInfo(key, int(reply["ContentLength"]), reply["LastModified"])

    def exists(self, key: str) -> bool:
        try:
            self.head(key)
        except ObjectMissing:
            return False
        return True

    def put_stamped(self, key: str, data: bytes) -> dt.datetime:
        """Store ``data`` and return its ``LastModified``: the time by S3's clock, which
        is what every other object's age is measured against (never this host's)."""
        self.put(key, data)
        return self.head(key).last_modified

    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        token: str | None = None
        while True:
            args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                args["ContinuationToken"] = token
            page = self._call("LIST", prefix, self._lister(args))
            for item in page.get("Contents", []):
                yield ObjectInfo(item["Key"], item["Size"], item["LastModified"])
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def _lister(self, args: dict[str, Any]) -> Callable[[], Any]:
        return lambda: self.client.list_objects_v2(**args)

    def list_stable(self, prefix: str) -> list[ObjectInfo]:
        """A listing read twice in a row that came back the same both times.

        For listings a deletion depends on (manifests for gc, open sessions for
        ``backups delete``): a damaged reply that drops a key would let data
        still in use go. Two listings differ only on such damage or a concurrent
        change, and either way a third look settles it.
        """

        def once() -> list[ObjectInfo]:
            first = list(self.list_objects(prefix))
            second = list(self.list_objects(prefix))
            if [(i.key, i.size) for i in first] != [(i.key, i.size) for i in second]:
                raise _Damaged("two listings in a row differ")
            return second

        return self._call("LIST", prefix, once)

    def delete(self, key: str) -> None:
        self._call("DELETE", key, lambda: self.client.delete_object(Bucket=self.bucket,
                                                                     Key=key))

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
        reply: Any = self._call("DELETE", None, lambda: self.client.delete_objects(
            Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}))
        errors = reply.get("Errors", [])
        if errors:
            raise UnavailableError(f"S3 could not delete {len(errors)} objects, first "
                                   f"{errors[0].get('Key')}: {errors[0].get('Code')}")
        return len(batch)
