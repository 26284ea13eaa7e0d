"""Every bad input meets a one-line error and a non-zero exit, and nothing is created."""

from __future__ import annotations

import socket
import uuid
from typing import Any

import pytest
import rbd

from rbd_restore import devcluster
from rbd_restore.ceph import remove_image
from rbd_restore.repo.layout import KeyLayout
from rbd_restore.repo.repository import new_backup_id
from tests.support.helpers import Cli, manifest_body, put_manifest_body


@pytest.fixture
def cli(cluster: devcluster.ClusterInfo, unique_name: str) -> Cli:
    return Cli(cluster, prefix=f"{unique_name}/", extra_env={})


@pytest.fixture
def image(rados_cluster: Any, unique_name: str) -> Any:
    with rados_cluster.open_ioctx("volumes") as ioctx:
        rbd.RBD().create(ioctx, unique_name, 8 << 20)
        with rbd.Image(ioctx, unique_name) as img:
            img.write(b"x" * 65536, 0)
        yield f"volumes/{unique_name}"
        remove_image(ioctx, unique_name)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_unknown_pool_image_and_backup(cli: Cli) -> None:
    assert "pool nopool does not exist" in cli.fails("backup", "nopool/x")
    assert "image volumes/absent does not exist" in cli.fails("backup", "volumes/absent")
    missing = new_backup_id()
    assert f"backup {missing} does not exist" in cli.fails("restore", missing, "volumes/x")
    assert "not a backup id" in cli.fails("backups", "show", "../../etc/passwd")


def test_chunk_size_not_a_power_of_two(cli: Cli, image: str) -> None:
    assert "power of two" in cli.fails("backup", image, "--chunk-size", "3M")


def test_s3_endpoint_down(cli: Cli, image: str, rados_cluster: Any) -> None:
    env = {"RBD_RESTORE_S3_ENDPOINT": f"http://127.0.0.1:{closed_port()}",
           "RBD_RESTORE_S3_MAX_ATTEMPTS": "2"}
    line = cli.fails("backup", image, env=env)
    assert "unreachable after 2 attempts" in line
    assert cli.cluster.s3_secret_key not in line
    with rados_cluster.open_ioctx("volumes") as ioctx, \
            rbd.Image(ioctx, image.split("/")[1]) as img:
        assert img.list_snaps() is not None and not list(img.list_snaps())


def test_bucket_missing(cli: Cli, image: str) -> None:
    env = {"RBD_RESTORE_S3_BUCKET": "no-such-bucket-here"}
    assert "bucket no-such-bucket-here does not exist" in cli.fails("backup", image, env=env)
    assert "does not exist" in cli.fails("backups", "list", env=env)


def test_wrong_credentials(cli: Cli, image: str) -> None:
    secret = f"not-the-key-{uuid.uuid4().hex}"
    line = cli.fails("backup", image, env={"RBD_RESTORE_S3_SECRET_KEY": secret})
    assert "refused access" in line and secret not in line


def test_truncated_and_tampered_manifests(cli: Cli, image: str, s3_client: Any,
                                          cluster: devcluster.ClusterInfo) -> None:
    backup_id = cli.json("backup", image)["backup_id"]
    key = KeyLayout(cli.prefix).manifest(backup_id)
    original = s3_client.get_object(Bucket=cluster.bucket, Key=key)["Body"].read()
    body = manifest_body(cli, backup_id)

    s3_client.put_object(Bucket=cluster.bucket, Key=key, Body=original[: len(original) // 2])
    assert "does not authenticate" in cli.fails("backups", "show", backup_id)
    assert "does not authenticate" in cli.fails("restore", backup_id, "volumes/never")

    body["image_size"] += 4096
    put_manifest_body(cli, backup_id, body)
    assert "MAC" in cli.fails("backups", "verify", backup_id)
    assert "MAC" in cli.fails("restore", backup_id, "volumes/never")


def test_missing_config_field(cli: Cli, image: str) -> None:
    line = cli.fails("backup", image, env={"RBD_RESTORE_S3_BUCKET": ""})
    assert "s3.bucket" in line


def test_restore_refuses_existing_image(cli: Cli, image: str) -> None:
    backup_id = cli.json("backup", image)["backup_id"]
    assert "already exists" in cli.fails("restore", backup_id, image)
    assert "instant or full" in cli.fails("restore", backup_id, "volumes/x", "--mode", "lazy")
