"""Object GETs without botocore's response handling: a request signed by botocore,
read by urllib3.

A fetcher serving a restore cold spends most of its CPU on GETs of 4 MiB
chunks. botocore's ``get_object`` costs 1.61 ms of CPU per such GET here
(its event hooks, response parsing and body wrapper); signing the same
request (0.05 ms) and reading it with urllib3 costs 0.9-1.2 ms: about 0.15
CPU-s per GiB, a tenth of what serving a GiB cold costs in all.

Only the reply path changes: the request is signed by botocore's SigV4 signer
in its headers, with the credentials of the client's own session, its region
and path-style addressing, sent to the same endpoint, verified against the same
CA bundle, with the same timeouts; the caller's retry policy
(:meth:`ObjectStore._call`) sees the errors it knows: an error reply becomes a
botocore ``ClientError`` with S3's code and status, a failed connection a
:class:`LeanConnectionError`.

Why headers and not a presigned URL: botocore presigns S3 URLs with Signature
Version 2 in us-east-1 (the region S3-compatible stores are configured with)
unless told otherwise, which AWS S3 has turned off and SigV4-only stores
refuse; and a URL carrying the access key id and a signature is written to
RGW's log and to every proxy's access log, where it can be replayed until it
expires. A signed header travels with the request and nowhere else.
urllib3's exceptions still never leave this module, not even as the context
of another: the errors raised here are built outside the ``except`` block and
name only the kind of failure.

A bucket that lives in another region than the client's: S3 answers a request
signed for the wrong region with the bucket's region (400
AuthorizationHeaderMalformed with ``<Region>``, or a 301/307 redirect, with
``x-amz-bucket-region``). botocore's redirector follows that for its own calls;
this path follows it the same way, once: it signs for the bucket's region from
then on, at that region's endpoint (a configured endpoint stays as it is).
"""

from __future__ import annotations

import logging
import re
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import botocore.auth
import botocore.awsrequest
import botocore.credentials
import botocore.exceptions
import urllib3

from rbd_restore.config import S3Settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

MD5_METADATA = "md5"  # user metadata: the hex MD5 of a small object's bytes

_CODE = re.compile(rb"<Code>([^<]{1,64})</Code>")
_REGION = re.compile(rb"<Region>([^<]{1,64})</Region>")
_REGION_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
# What S3 answers a request signed for, or sent to, another region than its bucket's.
_WRONG_REGION_CODES = {"AuthorizationHeaderMalformed", "PermanentRedirect", "TemporaryRedirect"}


class LeanConnectionError(ConnectionError):
    """A GET that got no complete reply; the message names the kind of failure only."""


class UntrustedCertificate(LeanConnectionError):
    """The endpoint's certificate does not verify against the CA bundle."""


class Reply(NamedTuple):
    data: bytes
    etag: str
    encryption: str | None  # x-amz-server-side-encryption: what the ETag can mean
    customer_key: bool  # SSE-C
    stored_md5: str | None  # x-amz-meta-md5: what the writer stored beside a small object


def usable() -> bool:
    """Whether the lean path reaches the endpoint as botocore would: not through an
    HTTP proxy named in the environment (botocore honours those; this path does not)."""
    return not any(scheme in ("http", "https") for scheme in urllib.request.getproxies())


class _Target(NamedTuple):
    bucket_url: str
    region: str


def bucket_region(status: int, headers: Any, body: bytes) -> str | None:
    """The region an error reply says the bucket is in, if it says so."""
    found = _CODE.search(body)
    code = found.group(1).decode("ascii", "replace") if found else ""
    if code not in _WRONG_REGION_CODES and status not in (301, 307):
        return None
    region = headers.get("x-amz-bucket-region")
    if not region:
        named = _REGION.search(body)
        region = named.group(1).decode("ascii", "replace") if named else ""
    return region if _REGION_NAME.fullmatch(region) else None


class LeanGetter:
    """GETs whole objects of one bucket; safe to share between threads."""

    def __init__(self, client: S3Client, credentials: botocore.credentials.Credentials,
                 bucket: str, settings: S3Settings, max_connections: int,
                 endpoint_for: Callable[[str], str] | None = None) -> None:
        """``client``: whose endpoint and region to use; ``credentials``: its session's
        (refreshed as botocore refreshes them); ``endpoint_for``: the endpoint URL for
        a region, when the bucket turns out to be in another (default: the same)."""
        import botocore.httpsession

        self.bucket = bucket
        endpoint_url = client.meta.endpoint_url
        self.endpoint_for = endpoint_for or (lambda region: endpoint_url)
        self.target = self._target(endpoint_url, client.meta.region_name)
        self.moving = threading.Lock()
        self.credentials = credentials
        self.pool = urllib3.PoolManager(
            num_pools=2, maxsize=max_connections, block=False, retries=False,
            timeout=urllib3.Timeout(connect=settings.connect_timeout,
                                    read=settings.read_timeout),
            cert_reqs="CERT_REQUIRED",
            ca_certs=settings.ca_bundle or botocore.httpsession.get_cert_path(True))

    def _target(self, endpoint_url: str, region: str) -> _Target:
        return _Target(f"{endpoint_url.rstrip('/')}/{urllib.parse.quote(self.bucket)}/", region)

    @property
    def region(self) -> str:
        return self.target.region

    def signed_headers(self, url: str, region: str | None = None) -> dict[str, str]:
        """SigV4 headers (Authorization, X-Amz-Date, X-Amz-Content-SHA256, and the
        session token if any) for a GET of ``url``, as botocore signs its own."""
        request = botocore.awsrequest.AWSRequest(method="GET", url=url)
        botocore.auth.S3SigV4Auth(self.credentials.get_frozen_credentials(), "s3",
                                  region or self.target.region).add_auth(request)
        return dict(request.headers.items())

    def url(self, key: str, target: _Target | None = None) -> str:
        # The key quoted as botocore quotes a path-style key; S3's SigV4 signs the path as sent.
        return (target or self.target).bucket_url + urllib.parse.quote(key, safe="/~")

    def _move_to(self, region: str, was: _Target) -> None:
        with self.moving:
            if self.target is not was:  # another thread got there first
                return
            try:
                endpoint_url = self.endpoint_for(region)
            except botocore.exceptions.BotoCoreError:  # no endpoint known: S3's error stands
                return
            self.target = self._target(endpoint_url, region)
        log.info("bucket %s is in region %s, not %s; its objects are read there",
                 self.bucket, region, was.region)

    def get(self, key: str) -> Reply:
        target = self.target
        reply = self._send(key, target)
        if reply.status != 200:
            region = bucket_region(reply.status, reply.headers, reply.data or b"")
            if region is not None and region != target.region:
                self._move_to(region, target)
                if self.target is not target:
                    reply = self._send(key, self.target)
        if reply.status == 200:
            headers = reply.headers
            return Reply(reply.data, str(headers.get("ETag", "")),
                         headers.get("x-amz-server-side-encryption"),
                         "x-amz-server-side-encryption-customer-algorithm" in headers,
                         headers.get(f"x-amz-meta-{MD5_METADATA}"))
        found = _CODE.search(reply.data or b"")
        code = found.group(1).decode("ascii", "replace") if found else str(reply.status)
        error: Any = {"Error": {"Code": code, "Message": ""},
                      "ResponseMetadata": {"HTTPStatusCode": reply.status}}
        raise botocore.exceptions.ClientError(error, "GetObject")

    def _send(self, key: str, target: _Target) -> Any:
        """The reply to one signed GET, whatever its status; errors of the connection
        as :class:`LeanConnectionError`."""
        url = self.url(key, target)
        headers = self.signed_headers(url, target.region)
        failure, untrusted = "", False
        reply: Any = None
        try:
            reply = self.pool.request("GET", url, headers=headers, preload_content=True,
                                      redirect=False, enforce_content_length=True)
        except urllib3.exceptions.SSLError as exc:
            failure = type(exc).__name__
            untrusted = "CERTIFICATE_VERIFY_FAILED" in str(exc) or "match" in str(exc)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            failure = type(exc).__name__
        if untrusted:
            raise UntrustedCertificate("certificate verify failed")
        if failure:
            raise LeanConnectionError(failure)
        return reply
