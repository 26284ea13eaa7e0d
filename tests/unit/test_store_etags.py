"""Which S3 ETags are the MD5 of an object's bytes (rbd_restore/repo/store.py)."""

from __future__ import annotations

import hashlib

import pytest

from rbd_restore.repo.store import _etag_matches, etag_is_md5

BODY = b"a small object"
MD5 = f'"{hashlib.md5(BODY).hexdigest()}"'
NOT_MD5 = f'"{hashlib.md5(b"something else").hexdigest()}"'


@pytest.mark.parametrize(("encryption", "customer_key"), [(None, False), ("AES256", False)])
def test_plaintext_and_sse_s3_etags_are_md5s_and_checked(encryption: str | None,
                                                         customer_key: bool) -> None:
    assert etag_is_md5(MD5, encryption, customer_key)
    assert _etag_matches(MD5, BODY, encryption, customer_key)
    assert not _etag_matches(NOT_MD5, BODY, encryption, customer_key)


@pytest.mark.parametrize(("encryption", "customer_key"),
                         [("aws:kms", False), ("aws:kms:dsse", False), ("AES256", True),
                          (None, True)])
def test_sse_kms_and_sse_c_etags_are_not_md5s(encryption: str | None,
                                              customer_key: bool) -> None:
    assert not etag_is_md5(NOT_MD5, encryption, customer_key)
    assert _etag_matches(NOT_MD5, BODY, encryption, customer_key)


def test_multipart_etags_are_not_md5s() -> None:
    assert not etag_is_md5('"' + "a" * 32 + '-3"', None, False)


def test_a_request_botocore_refuses_to_send_is_named_not_unreachable() -> None:
    """No network: botocore checks the parameters before it connects."""
    from rbd_restore.config import S3Settings
    from rbd_restore.errors import UsageError
    from rbd_restore.repo.store import ObjectStore

    store = ObjectStore(S3Settings(endpoint="http://127.0.0.1:9", access_key="a",
                                   secret_key="s", bucket="b", max_attempts=3))
    store.lean = None  # botocore's own path, where parameters are checked
    with pytest.raises(UsageError, match=r"S3 request for bucket b not sent: Invalid "
                       r"length for parameter Key"):
        store.get("")
