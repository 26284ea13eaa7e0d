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
"""

from __future__ import annotations

import re
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Any, NamedTuple

import botocore.auth
import botocore.awsrequest
import botocore.credentials
import botocore.exceptions
import urllib3

from rbd_restore.config import S3Settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

_CODE = re.compile(rb"<Code>([^<]{1,64})</Code>")


class LeanConnectionError(ConnectionError):
    """A GET that got no complete reply; the message names the kind of failure only."""


class UntrustedCertificate(LeanConnectionError):
    """The endpoint's certificate does not verify against the CA bundle."""


class Reply(NamedTuple):
    data: bytes
    etag: str
    encryption: str | None  # x-amz-server-side-encryption: what the ETag can mean
    customer_key: bool  # SSE-C


def usable() -> bool:
    """Whether the lean path reaches the endpoint as botocore would: not through an
    HTTP proxy named in the environment (botocore honours those; this path does not)."""
    return not any(scheme in ("http", "https") for scheme in urllib.request.getproxies())


class LeanGetter:
    """GETs whole objects of one bucket; safe to share between threads."""

    def __init__(self, client: S3Client, credentials: botocore.credentials.Credentials,
                 bucket: str, settings: S3Settings, max_connections: int) -> None:
        """``client``: whose endpoint and region to use; ``credentials``: its session's
        (refreshed as botocore refreshes them)."""
        import botocore.httpsession

        endpoint_url = client.meta.endpoint_url.rstrip("/")
        self.bucket_url = f"{endpoint_url}/{urllib.parse.quote(bucket)}/"
        self.region = client.meta.region_name
        self.credentials = credentials
        self.pool = urllib3.PoolManager(
            num_pools=2, maxsize=max_connections, block=False, retries=False,
            timeout=urllib3.Timeout(connect=settings.connect_timeout,
                                    read=settings.read_timeout),
            cert_reqs="CERT_REQUIRED",
            ca_certs=settings.ca_bundle or botocore.httpsession.get_cert_path(True))

    def signed_headers(self, url: str) -> dict[str, str]:
        """SigV4 headers (Authorization, X-Amz-Date, X-Amz-Content-SHA256, and the
        session token if any) for a GET of ``url``, as botocore signs its own."""
        request = botocore.awsrequest.AWSRequest(method="GET", url=url)
        botocore.auth.S3SigV4Auth(self.credentials.get_frozen_credentials(), "s3",
                                  self.region).add_auth(request)
        return dict(request.headers.items())

    def url(self, key: str) -> str:
        # The key quoted as botocore quotes a path-style key; S3's SigV4 signs the path as sent.
        return self.bucket_url + urllib.parse.quote(key, safe="/~")

    def get(self, key: str) -> Reply:
        url = self.url(key)
        headers = self.signed_headers(url)
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
        if reply.status == 200:
            headers = reply.headers
            return Reply(reply.data, str(headers.get("ETag", "")),
                         headers.get("x-amz-server-side-encryption"),
                         "x-amz-server-side-encryption-customer-algorithm" in headers)
        found = _CODE.search(reply.data or b"")
        code = found.group(1).decode("ascii", "replace") if found else str(reply.status)
        error: Any = {"Error": {"Code": code, "Message": ""},
                      "ResponseMetadata": {"HTTPStatusCode": reply.status}}
        raise botocore.exceptions.ClientError(error, "GetObject")
