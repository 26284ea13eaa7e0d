"""The embedded cluster: healthy, usable through python-rbd and boto3, and clean to stop."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from rbd_restore import devcluster
from rbd_restore.devcluster.launcher import daemon_specs
from rbd_restore.devcluster.layout import Layout
from rbd_restore.devcluster.processes import is_running

CLI = [sys.executable, "-m", "rbd_restore.cli"]


def _health(rados_cluster: Any) -> str:
    ret, out, _ = rados_cluster.mon_command(json.dumps({"prefix": "health", "format": "json"}),
                                            b"", timeout=30)
    assert ret == 0
    return str(json.loads(out)["status"])


def test_cluster_reaches_health_ok(rados_cluster: Any) -> None:
    deadline = time.monotonic() + 60
    status = _health(rados_cluster)
    while status != "HEALTH_OK" and time.monotonic() < deadline:
        time.sleep(0.5)
        status = _health(rados_cluster)
    assert status == "HEALTH_OK"


def test_rbd_image_create_write_read(rados_cluster: Any, unique_name: str) -> None:
    import rbd

    payload = bytes(range(256)) * 4096
    with rados_cluster.open_ioctx("volumes") as ioctx:
        rbd.RBD().create(ioctx, unique_name, 64 << 20)
        try:
            with rbd.Image(ioctx, unique_name) as image:
                image.write(payload, 8 << 20)
                assert image.read(8 << 20, len(payload)) == payload
                assert image.read(0, 4096) == bytes(4096)
        finally:
            rbd.RBD().remove(ioctx, unique_name)


def test_s3_object_round_trip(s3_client: Any, cluster: devcluster.ClusterInfo,
                              unique_name: str) -> None:
    body = b"rbd-restore " * 10000
    s3_client.put_object(Bucket=cluster.bucket, Key=unique_name, Body=body)
    try:
        got = s3_client.get_object(Bucket=cluster.bucket, Key=unique_name)["Body"].read()
        assert got == body
    finally:
        s3_client.delete_object(Bucket=cluster.bucket, Key=unique_name)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=180,
                          check=False)


def test_second_cluster_side_by_side_then_down(cluster: devcluster.ClusterInfo,
                                               tmp_path: Path) -> None:
    """`dev up --json` next to the session cluster; what it prints works; `down` stops all."""
    import boto3
    import botocore.config
    import rados
    import rbd

    root = tmp_path / "second"
    up = _cli("dev", "up", "--dir", str(root), "--osd-size", "1G", "--json")
    assert up.returncode == 0, up.stderr
    info = json.loads(up.stdout)
    try:
        for key in ("dir", "ceph_conf", "keyring", "config", "s3_endpoint", "s3_access_key",
                    "s3_secret_key", "bucket"):
            assert info[key], key
        assert info["s3_endpoint"] != cluster.s3_endpoint
        assert Path(info["config"]).stat().st_mode & 0o077 == 0

        handle = rados.Rados(conffile=info["ceph_conf"], rados_id="admin",
                             conf={"keyring": info["keyring"]})
        handle.connect(timeout=30)
        try:
            assert handle.get_fsid() != json.loads(
                (cluster.dir / "cluster.json").read_text())["fsid"]
            with handle.open_ioctx("rbd") as ioctx:
                rbd.RBD().create(ioctx, "img", 8 << 20)
                with rbd.Image(ioctx, "img") as image:
                    image.write(b"x" * 4096, 0)
                    assert image.read(0, 4096) == b"x" * 4096
        finally:
            handle.shutdown()
        s3 = boto3.client("s3", endpoint_url=info["s3_endpoint"],
                          aws_access_key_id=info["s3_access_key"],
                          aws_secret_access_key=info["s3_secret_key"], region_name="us-east-1",
                          config=botocore.config.Config(s3={"addressing_style": "path"}))
        s3.put_object(Bucket=info["bucket"], Key="k", Body=b"v")
        assert s3.get_object(Bucket=info["bucket"], Key="k")["Body"].read() == b"v"

        again = _cli("dev", "up", "--dir", str(root))
        assert again.returncode == 0
        assert "already running" in again.stdout
    finally:
        records = [spec.record() for spec in daemon_specs(Layout(root))]
        down = _cli("dev", "down", "--dir", str(root), "--purge")
    assert down.returncode == 0, down.stderr
    assert all(r is not None for r in records)
    assert not any(is_running(r) for r in records if r is not None)
    assert not root.exists()
    # The session's cluster is untouched by the other one's shutdown.
    assert all(devcluster.status(cluster.dir).values())


@pytest.mark.parametrize("args", [
    ["dev", "down", "--dir", "/nonexistent/rbd-restore-test"],
    ["dev", "up", "--dir", "/tmp", "--osd-size", "lots"],
])
def test_dev_bad_input_is_one_line(args: list[str]) -> None:
    result = _cli(*args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
