"""Where the lean GET path reads a bucket that lives in another region
(rbd_restore/repo/lean_get.py); no network: clients are built, never called."""

from __future__ import annotations

import pytest

from rbd_restore.config import S3Settings
from rbd_restore.repo.lean_get import bucket_region
from rbd_restore.repo.store import ObjectStore

AWS = S3Settings(access_key="AKIDEXAMPLE", secret_key="s" * 40, region="us-east-1",
                 bucket="backups")
WRONG_REGION = (b"<Error><Code>AuthorizationHeaderMalformed</Code><Message>the region "
                b"'us-east-1' is wrong; expecting 'eu-west-1'</Message>"
                b"<Region>eu-west-1</Region></Error>")


def test_s3s_answers_name_the_buckets_region() -> None:
    assert bucket_region(400, {}, WRONG_REGION) == "eu-west-1"
    assert bucket_region(400, {"x-amz-bucket-region": "ap-south-1"}, WRONG_REGION) == \
        "ap-south-1"
    assert bucket_region(301, {"x-amz-bucket-region": "eu-west-1"},
                         b"<Error><Code>PermanentRedirect</Code></Error>") == "eu-west-1"
    assert bucket_region(307, {"x-amz-bucket-region": "eu-west-1"}, b"") == "eu-west-1"


@pytest.mark.parametrize(("status", "headers", "body"), [
    (403, {"x-amz-bucket-region": "eu-west-1"},
     b"<Error><Code>AccessDenied</Code><Region>eu-west-1</Region></Error>"),
    (400, {}, b"<Error><Code>InvalidRequest</Code></Error>"),
    (400, {}, WRONG_REGION.replace(b"eu-west-1</Region>", b"evil.example/x</Region>")),
    (301, {"x-amz-bucket-region": "https://evil.example"}, b""),
])
def test_other_answers_and_odd_regions_move_nothing(status: int, headers: dict[str, str],
                                                    body: bytes) -> None:
    assert bucket_region(status, headers, body) is None


def test_on_aws_the_endpoint_follows_the_region() -> None:
    lean = ObjectStore(AWS).lean
    assert lean is not None
    assert lean.url("c/1") == "https://s3.amazonaws.com/backups/c/1"  # botocore: global
    lean._move_to("eu-west-1", lean.target)
    assert lean.url("c/1") == "https://s3.eu-west-1.amazonaws.com/backups/c/1"
    assert "/eu-west-1/s3/aws4_request" in lean.signed_headers(lean.url("c/1"))["Authorization"]


def test_a_configured_endpoint_stays_and_only_the_signing_region_moves() -> None:
    lean = ObjectStore(S3Settings(**{**AWS.__dict__, "endpoint": "https://s3.example:7480"})).lean
    assert lean is not None
    lean._move_to("eu-west-1", lean.target)
    assert lean.url("c/1") == "https://s3.example:7480/backups/c/1"
    assert lean.region == "eu-west-1"


def test_a_move_another_thread_made_first_is_kept() -> None:
    lean = ObjectStore(AWS).lean
    assert lean is not None
    before = lean.target
    lean._move_to("eu-west-1", before)
    lean._move_to("ap-south-1", before)  # learnt from a reply to the old target: stale
    assert lean.region == "eu-west-1"
