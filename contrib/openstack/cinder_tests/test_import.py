"""Backups written by Cinder's own S3 backup driver into RGW, imported and restored
bit-exact; damaged ones refused.

Cinder's real S3BackupDriver runs here in-process, on Cinder's objects over an
sqlite database made by Cinder's own migrations: a full backup (zlib) of a 1 GiB
volume, then an incremental (zstd) after changes.
"""

from __future__ import annotations

import hashlib
import json
import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rbd_restore import devcluster
from tests.support.helpers import Cli, export_digest

MiB = 1 << 20
GiB = 1 << 30


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            digest.update(block)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def cinder_backups(cluster: devcluster.ClusterInfo, s3_bucket: str,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from cinder import context, objects, rpc
    from cinder.backup.drivers import s3
    from cinder.db import migration
    from oslo_config import cfg

    work = tmp_path_factory.mktemp("cinder-s3")
    conf = cfg.CONF
    conf([], project="cinder", default_config_files=[])
    conf.set_override("connection", f"sqlite:///{work / 'cinder.sqlite'}", group="database")
    for name, value in (("backup_s3_endpoint_url", cluster.s3_endpoint),
                        ("backup_s3_store_access_key", cluster.s3_access_key),
                        ("backup_s3_store_secret_key", cluster.s3_secret_key),
                        ("backup_s3_store_bucket", s3_bucket),
                        ("backup_s3_object_size", 16 * MiB),
                        ("backup_s3_block_size", 32768)):
        conf.set_override(name, value)
    # Objects send notifications: the in-process transport, set up as Cinder's own
    # unit tests set it up.
    from oslo_messaging import conffixture

    messaging = conffixture.ConfFixture(conf)
    messaging.setUp()
    messaging.transport_url = "fake:/"
    conf.set_override("driver", ["noop"], group="oslo_messaging_notifications")
    rpc.init(conf)
    migration.db_sync()
    objects.register_all()
    ctx = context.get_admin_context()
    volume = objects.Volume(ctx, size=1, status="available", host="test@ceph#ceph",
                            display_name="s3-backed", project_id="p1", user_id="u1",
                            availability_zone="nova")
    volume.create()
    raw = work / "volume.raw"
    rng = random.Random(7)
    with open(raw, "wb") as f:
        f.truncate(GiB)
        for offset in (0, 37 * MiB + 5, 300 * MiB, GiB - 4 * MiB):
            f.seek(offset)
            f.write(rng.randbytes(3 * MiB))
    states = []
    parent = None
    for round_no, compression in enumerate(("zlib", "zstd")):
        conf.set_override("backup_compression_algorithm", compression)
        if round_no:
            with open(raw, "r+b") as f:  # a few changes: an incremental stores only them
                for offset in (1 * MiB, 300 * MiB + 12345, 700 * MiB):
                    f.seek(offset)
                    f.write(rng.randbytes(200 * 1024))
        backup = objects.Backup(ctx, volume_id=volume.id, status="creating",
                                container=s3_bucket, display_name=f"b{round_no}",
                                user_id="u1", project_id="p1", size=1,
                                parent_id=parent.id if parent else None,
                                availability_zone="nova")
        backup.create()
        with open(raw, "rb") as f:
            updates = s3.S3BackupDriver(ctx).backup(backup, f)
        backup.update(updates or {})
        backup.status = "available"
        backup.save()
        states.append({"backup_id": backup.id, "digest": file_digest(raw)})
        parent = backup
    yield {"volume_id": volume.id, "backups": states, "bucket": s3_bucket, "work": work}


@pytest.fixture(scope="module")
def s3_bucket(cluster: devcluster.ClusterInfo) -> Iterator[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=cluster.s3_endpoint,
                          aws_access_key_id=cluster.s3_access_key,
                          aws_secret_access_key=cluster.s3_secret_key, region_name="us-east-1")
    name = f"cinder-backups-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=name)
    yield name
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=name, Key=item["Key"])
    client.delete_bucket(Bucket=name)


def cinder_conf(cluster: devcluster.ClusterInfo, bucket: str, path: Path) -> Path:
    path.write_text(f"""[DEFAULT]
backup_driver = cinder.backup.drivers.s3.S3BackupDriver
backup_s3_endpoint_url = {cluster.s3_endpoint}
backup_s3_store_access_key = {cluster.s3_access_key}
backup_s3_store_secret_key = {cluster.s3_secret_key}
backup_s3_store_bucket = {bucket}
""")
    return path


def test_an_incremental_cinder_s3_backup_imports_and_restores_bit_exact(
        cluster: devcluster.ClusterInfo, cli: Cli, fetcher: Any,
        cinder_backups: dict[str, Any], tmp_path: Path) -> None:
    conf = cinder_conf(cluster, cinder_backups["bucket"], tmp_path / "cinder.conf")
    newest = cinder_backups["backups"][-1]
    done = cli.run("cinder", "--cinder-config", str(conf), "import-backup",
                   newest["backup_id"], "--volume-id", cinder_backups["volume_id"], "--json")
    assert done.returncode == 0, done.stderr
    imported = json.loads(done.stdout)
    assert imported["cinder_backup_id"] == newest["backup_id"]
    assert imported["image_size"] == GiB
    shown = cli.json("backups", "show", imported["backup_id"])
    assert shown["labels"]["openstack.volume_id"] == cinder_backups["volume_id"]
    assert shown["allocated_bytes"] < 40 * MiB  # zero chunks are holes

    name = f"imported-{uuid.uuid4().hex[:6]}"
    cli.json("restore", imported["backup_id"], f"volumes/{name}")
    assert export_digest(cluster, f"volumes/{name}") == newest["digest"]
    instant = cli.json("restore", imported["backup_id"], f"volumes/{name}-i", "--mode",
                       "instant", "--wait")
    assert instant["committed_seconds"] >= instant["ready_seconds"]  # --wait: committed
    assert export_digest(cluster, f"volumes/{name}-i") == newest["digest"]

    # The full backup alone, too.
    first = cinder_backups["backups"][0]
    again = json.loads(cli.run("cinder", "--cinder-config", str(conf), "import-backup",
                               first["backup_id"], "--volume-id",
                               cinder_backups["volume_id"], "--json").stdout)
    cli.json("restore", again["backup_id"], f"volumes/{name}-f")
    assert export_digest(cluster, f"volumes/{name}-f") == first["digest"]
    assert again["chunks_reused"] > 0  # what the incremental did not change: deduplicated


def test_a_damaged_cinder_object_is_refused_and_nothing_imported(
        cluster: devcluster.ClusterInfo, cli: Cli, cinder_backups: dict[str, Any],
        tmp_path: Path) -> None:
    import zlib

    import boto3

    client = boto3.client("s3", endpoint_url=cluster.s3_endpoint,
                          aws_access_key_id=cluster.s3_access_key,
                          aws_secret_access_key=cluster.s3_secret_key, region_name="us-east-1")
    bucket = cinder_backups["bucket"]
    first = cinder_backups["backups"][0]["backup_id"]
    key = next(item["Key"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket) for item in page.get("Contents", [])
        if f"_backup_{first}-00001" in item["Key"])
    original = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    plain = bytearray(zlib.decompress(original))
    plain[100] ^= 1  # a valid zlib stream of the wrong bytes: only the MD5 can tell
    client.put_object(Bucket=bucket, Key=key, Body=zlib.compress(bytes(plain)))
    before = {b["backup_id"] for b in cli.json("backups", "list")["backups"]}
    try:
        conf = cinder_conf(cluster, bucket, tmp_path / "cinder.conf")
        done = cli.run("cinder", "--cinder-config", str(conf), "import-backup", first,
                       "--volume-id", cinder_backups["volume_id"])
        assert done.returncode == 7, done.stderr
        assert "fails its MD5" in done.stderr and len(done.stderr.strip().splitlines()) == 1
        assert {b["backup_id"] for b in cli.json("backups", "list")["backups"]} == before
    finally:
        client.put_object(Bucket=bucket, Key=key, Body=original)
