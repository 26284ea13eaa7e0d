"""GETs signed by botocore and read by urllib3 (rbd_restore/repo/lean_get.py), against RGW.

The lean path must answer as botocore's did: the same bytes, the same errors
for a missing key and refused credentials, retries through broken replies;
it must sign as S3 stores without Signature Version 2 accept, and never put a
credential (access key id, signature) in a URL, an error or its context.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import traceback
import uuid
from collections.abc import Iterator

import pytest

from rbd_restore import devcluster
from rbd_restore.config import S3Settings, load
from rbd_restore.errors import UnavailableError, UserError
from rbd_restore.repo.store import AccessDenied, ObjectMissing, ObjectStore
from tests.support.faultproxy import FaultPlan, FaultProxy


@pytest.fixture
def settings(cluster: devcluster.ClusterInfo) -> S3Settings:
    return dataclasses.replace(load(str(cluster.config)).s3, max_attempts=3)


@pytest.fixture
def stored(settings: S3Settings) -> Iterator[tuple[str, bytes]]:
    store = ObjectStore(settings)
    key, data = f"lean-get/{uuid.uuid4().hex}", os.urandom(3 << 20)
    store.put(key, data)
    yield key, data
    store.delete(key)


def everything_said(exc: BaseException) -> str:
    """The error's text with its whole chain, as a traceback would print it."""
    return "".join(traceback.format_exception(exc, chain=True))


def test_the_lean_path_reads_what_botocore_reads(settings: S3Settings,
                                                 stored: tuple[str, bytes]) -> None:
    key, data = stored
    store = ObjectStore(settings)
    assert store.lean is not None
    assert store.get(key) == data
    assert store.get(key, verify_etag=True) == data  # its ETag, from the lean reply
    small = f"{key}-small"
    store.put(small, b"manifest-sized")
    try:
        assert store.get(small) == b"manifest-sized"
    finally:
        store.delete(small)


def test_errors_are_the_ones_the_callers_know(settings: S3Settings,
                                              stored: tuple[str, bytes]) -> None:
    key, _ = stored
    with pytest.raises(ObjectMissing, match="does not exist"):
        ObjectStore(settings).get(f"{key}-absent")
    wrong = dataclasses.replace(settings, secret_key="not-the-secret-" + "x" * 25)
    with pytest.raises(AccessDenied) as refused:
        ObjectStore(wrong).get(key)
    said = everything_said(refused.value)
    assert "SignatureDoesNotMatch" in said
    for secret in (settings.access_key, "X-Amz-Signature", "not-the-secret"):
        assert secret not in said


def test_an_unreachable_endpoint_names_no_credential(settings: S3Settings) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    gone = dataclasses.replace(settings, endpoint=f"http://127.0.0.1:{port}", max_attempts=2)
    with pytest.raises(UnavailableError) as failed:
        ObjectStore(gone).get("lean-get/anything")
    said = everything_said(failed.value)
    assert "unreachable after 2 attempts" in said
    assert settings.access_key not in said and "X-Amz" not in said


def test_broken_replies_are_retried_until_whole(cluster: devcluster.ClusterInfo,
                                                settings: S3Settings,
                                                stored: tuple[str, bytes]) -> None:
    key, data = stored
    host, port = cluster.s3_endpoint.removeprefix("http://").split(":")
    plan = FaultPlan(rate=1.0, faults=("reset", "truncate", "error", "slowdown"), stall_seconds=2,
                     only=(key,))
    with FaultProxy(host, int(port), plan).running() as proxy:
        faulty = ObjectStore(dataclasses.replace(settings, endpoint=proxy.endpoint,
                                                 read_timeout=1, max_attempts=4))
        with pytest.raises(UserError) as failed:
            faulty.get(key)  # every attempt broken: a one-line error, never partial bytes
        assert "4 attempts" in str(failed.value)
        assert settings.access_key not in everything_said(failed.value)
        retried: list[str] = []
        faulty.on_retry = retried.append
        plan.rate = 0.5
        for _ in range(6):
            assert faulty.get(key) == data
        assert proxy.total_injected >= 5 and retried


def test_a_sigv4_only_store_is_read_and_no_url_carries_a_credential(
        cluster: devcluster.ClusterInfo, settings: S3Settings,
        stored: tuple[str, bytes]) -> None:
    """AWS S3 has turned Signature Version 2 off (and SigV4-only stores never had it);
    botocore presigns S3 URLs with it in us-east-1. And whatever a URL carries is
    written to RGW's log and every proxy's."""
    key, data = stored
    host, port = cluster.s3_endpoint.removeprefix("http://").split(":")
    with FaultProxy(host, int(port)).running() as proxy:
        proxy.refuse_sigv2 = True
        store = ObjectStore(dataclasses.replace(settings, endpoint=proxy.endpoint))
        assert store.lean is not None
        assert store.get(key) == data
        assert store.get(key, verify_etag=True) == data
    urls = b"\n".join(proxy.request_lines)
    assert f"/{settings.bucket}/{key} HTTP/1.1".encode() in urls
    for credential in (settings.access_key, "Signature", "X-Amz-Credential", "AWSAccessKeyId"):
        assert credential.encode() not in urls


def test_a_proxy_in_the_environment_keeps_botocore(settings: S3Settings,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    assert ObjectStore(settings).lean is None


def test_a_bucket_in_another_region_is_read_from_its_region(
        cluster: devcluster.ClusterInfo, settings: S3Settings,
        stored: tuple[str, bytes]) -> None:
    """A bucket made in another AWS region than ``s3.region`` says: botocore follows
    S3's answer (AuthorizationHeaderMalformed naming the bucket's region) for its own
    calls; the chunk GETs must too, or a fetcher fails on every chunk where backups
    work. The region is learnt once, not on every GET."""
    key, data = stored
    host, port = cluster.s3_endpoint.removeprefix("http://").split(":")
    with FaultProxy(host, int(port)).running() as proxy:
        proxy.bucket_region = "eu-west-1"
        store = ObjectStore(dataclasses.replace(settings, endpoint=proxy.endpoint))
        assert store.lean is not None
        store.check_bucket()  # botocore's own redirect
        for _ in range(3):
            assert store.get(key) == data
        assert store.get(key, verify_etag=True) == data
        assert ObjectStore(dataclasses.replace(settings, endpoint=proxy.endpoint,
                                               region="eu-west-1")).get(key) == data
    assert 1 <= proxy.wrong_region <= 3  # botocore's HEAD, then the first GET only


def test_a_small_object_under_sse_kms_damaged_on_the_way_is_read_again(
        cluster: devcluster.ClusterInfo, settings: S3Settings) -> None:
    """Under SSE-KMS an ETag is no MD5, so a small object (a session, a job record)
    cannot be checked against it: the MD5 its writer stored beside it is checked."""
    key, data = f"lean-get/{uuid.uuid4().hex}-record", b'{"state": "relocating", "n": 17}'
    ObjectStore(settings).put(key, data)
    host, port = cluster.s3_endpoint.removeprefix("http://").split(":")
    plan = FaultPlan(faults=("corrupt_reply",), at=(1, 3), only=(key,))
    try:
        with FaultProxy(host, int(port), plan).running() as proxy:
            proxy.etags_as_sse_kms = True
            store = ObjectStore(dataclasses.replace(settings, endpoint=proxy.endpoint))
            retried: list[str] = []
            store.on_retry = retried.append
            assert store.lean is not None
            assert store.get(key) == data  # the lean path
            store.lean = None
            assert store.get(key) == data  # botocore's
        assert proxy.injected["corrupt_reply"] == 2 and retried == ["damaged", "damaged"]
    finally:
        ObjectStore(settings).delete(key)
